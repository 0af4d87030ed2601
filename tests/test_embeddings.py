"""Feature extraction (sentence embeddings): the pooling a sentence-transformers directory declares, the label-free
qbert-quantize run on it, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.models.build import build_model
from qbert_deploy.models.embedding import EmbeddingModel
from qbert_deploy.tasks import FEATURE
from qbert_deploy.tasks.embeddings import (
    EmbeddingDataError,
    Pooling,
    fidelity,
    neighbour_overlap,
    pooling_config,
    read_pooling,
    read_texts,
)
from tests.task_files import quantize_refused
from tests.tiny import SENTENCES, save_hf_dir, text_batch, tiny_config


def write_st_dir(folder: Path, mode: str = "mean", normalize: bool = True) -> Path:
    """A tiny random BertModel as a sentence-transformers directory: modules.json, 1_Pooling, Normalize."""
    torch.manual_seed(0)
    save_hf_dir(BertModel(tiny_config()), folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config(Pooling(mode, normalize), 64)))
    return folder


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_st_dir(tmp_path_factory.mktemp("st") / "model")


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("texts")
    (root / "train.txt").write_text("\n".join(SENTENCES * 4) + "\n")
    (root / "dev.txt").write_text("\n".join(SENTENCES) + "\n\n")
    return root / "train.txt", root / "dev.txt"


@pytest.mark.parametrize("mode, normalize", [("mean", True), ("cls", False), ("max", True)])
def test_pooling_and_normalisation_match_sentence_transformers(tmp_path: Path, mode: str, normalize: bool) -> None:
    from sentence_transformers import SentenceTransformer

    folder = write_st_dir(tmp_path / "model", mode, normalize)
    pooling = read_pooling(folder)
    assert pooling == Pooling(mode, normalize)
    ours = EmbeddingModel.from_pretrained(folder, pooling).eval()
    batch = {k: torch.from_numpy(v) for k, v in text_batch().items()}
    with torch.no_grad():
        got = ours(**batch).sentence_embedding.numpy()
    theirs = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    np.testing.assert_allclose(got, theirs, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5) == normalize


def test_fidelity_measures() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(20, 8))
    same = fidelity(reference, reference)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["neighbours_10"] == 1.0
    shuffled = reference[rng.permutation(20)]
    assert fidelity(shuffled, reference)["mean_cosine"] < 0.9
    assert neighbour_overlap(rng.normal(size=(20, 8)), reference) < 1.0


def test_reading_texts_and_pooling_configs(tmp_path: Path, st_dir: Path) -> None:
    (tmp_path / "t.txt").write_text("one\n\n  two  \n")
    assert read_texts(tmp_path / "t.txt") == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(EmbeddingDataError, match="no texts"):
        read_texts(tmp_path / "empty.txt")
    assert read_pooling(st_dir, "cls") == Pooling("cls", True)  # --pooling overrides the mode, Normalize stays
    with pytest.raises(EmbeddingDataError, match="--pooling"):
        read_pooling(tmp_path)


def test_label_free_qbert_writes_an_embedding_model_pt(st_dir: Path, texts: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    """No --task, no labels: the sentence-transformers directory makes it feature extraction; the Hessian and QAT
    run on the distance to the fp32 embeddings."""
    out = tmp_path / "out"
    assert quantize_main(["--model", str(st_dir), "--train", str(texts[0]), "--dev", str(texts[1]),
                          "--avg-bits", "3", "--bit-choices", "2,4", "--groups", "8", "--qat-steps", "2",
                          "--batch-size", "8",
                          "--hessian-subsets", "1", "--hessian-batch", "8", "--hessian-iters", "2",
                          "--calibration-batches", "1", "-o", str(out)]) == 0
    sensitivity = json.loads((out / "sensitivity.json").read_text())
    assert len(sensitivity["omega"]) == 2 and all(v > 0 for v in sensitivity["omega"])
    checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint.task == FEATURE and checkpoint.labels == []
    assert {checkpoint.recipe.for_module(n).bits for n in checkpoint.recipe.overrides} <= {2, 4}
    model = build_model(checkpoint)
    assert isinstance(model, EmbeddingModel) and model.pooling == Pooling("mean", True)
    fp32 = EmbeddingModel.from_pretrained(st_dir, Pooling("mean", True)).eval()
    batch = {k: torch.from_numpy(v) for k, v in text_batch().items()}
    with torch.no_grad():
        quantized, reference = model(**batch).sentence_embedding, fp32(**batch).sentence_embedding
    cosine = torch.nn.functional.cosine_similarity(quantized, reference).numpy()
    assert checkpoint.metrics["dev_mean_cosine_fp32"] == 1.0
    assert 0 < checkpoint.metrics["dev_mean_cosine_quantized"] < 1.0
    assert cosine.mean() == pytest.approx(checkpoint.metrics["dev_mean_cosine_quantized"], abs=1e-4)
    assert checkpoint.max_length == 64  # a directory without sentence_bert_config.json: the default


def test_the_directorys_max_seq_length_is_the_trained_and_served_length(tmp_path: Path,
                                                                        texts: tuple[Path, Path]) -> None:
    folder = write_st_dir(tmp_path / "model")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    out = tmp_path / "out"
    assert quantize_main(["--model", str(folder), "--train", str(texts[0]), "--dev", str(texts[1]), "--bits", "8",
                          "--groups", "8", "--qat-steps", "0", "--calibration-batches", "1", "--batch-size", "8",
                          "-o", str(out)]) == 0
    assert load_checkpoint(out / "model.pt").max_length == 48


def test_refusals_write_nothing(capsys: pytest.CaptureFixture[str], st_dir: Path, texts: tuple[Path, Path],
                                tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    base = ["--bits", "4", "--groups", "8", "--qat-steps", "0", "--calibration-batches", "1"]
    quantize_refused(capsys, ["--model", str(st_dir), "--train", str(tmp_path / "empty.txt"), "--dev",
                              str(texts[1]), *base], tmp_path / "out", "empty.txt: no texts")
    odd = write_st_dir(tmp_path / "odd")
    (odd / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    quantize_refused(capsys, ["--model", str(odd), "--train", str(texts[0]), "--dev", str(texts[1]), *base],
                     tmp_path / "out", "pooling pooling_mode_weightedmean_tokens is not supported")
    torch.manual_seed(0)
    classifier = save_hf_dir(BertForSequenceClassification(tiny_config()), tmp_path / "classifier")
    argv = ["--model", str(classifier), "--task", "feature-extraction", "--train", str(texts[0]), "--dev",
            str(texts[1]), *base]
    quantize_refused(capsys, argv, tmp_path / "out", "give --pooling mean|cls|max")
    capsys.readouterr()
    assert quantize_main([*argv, "--pooling", "cls", "-o", str(tmp_path / "cls")]) == 0
    assert build_model(load_checkpoint(tmp_path / "cls" / "model.pt")).pooling == Pooling("cls", False)


def test_labelled_data_keeps_a_sentence_transformers_directory_a_classifier(st_dir: Path, tmp_path: Path) -> None:
    """A TSV with labels means the user wants a classifier, as before embeddings existed (the CI gate's run)."""
    from qbert_deploy.data.tsv import Example, write_tsv
    from qbert_deploy.tasks import SEQUENCE

    examples = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    write_tsv(tmp_path / "train.tsv", examples * 4)
    write_tsv(tmp_path / "dev.tsv", examples)
    out = tmp_path / "out"
    assert quantize_main(["--model", str(st_dir), "--train", str(tmp_path / "train.tsv"), "--dev",
                          str(tmp_path / "dev.tsv"), "--bits", "8", "--groups", "4", "--finetune-steps", "2",
                          "--qat-steps", "0", "--calibration-batches", "1", "--batch-size", "4", "-o", str(out)]) == 0
    assert load_checkpoint(out / "model.pt").task == SEQUENCE


def test_label_free_qat_loss_is_the_embedding_distance_plus_the_hidden_states(st_dir: Path) -> None:
    import copy

    from qbert_deploy.models.distill import Distiller, DistillWeights

    teacher = EmbeddingModel.from_pretrained(st_dir, read_pooling(st_dir)).eval()
    student = copy.deepcopy(teacher)
    inputs = {k: torch.from_numpy(v) for k, v in text_batch().items()}
    with torch.no_grad():
        targets = teacher(**inputs).sentence_embedding
    both = Distiller(teacher, DistillWeights(logits=0.0, hidden=1.0, attention=0.0, own=1.0))
    own_only = Distiller(teacher, DistillWeights(logits=0.0, hidden=0.0, attention=0.0, own=1.0))
    with torch.no_grad():
        assert float(both(student, inputs, targets)) == pytest.approx(0.0, abs=1e-10)  # the student is the teacher
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
        distance = float(student(**inputs, labels=targets).loss)
        assert distance > 1e-4
        assert float(own_only(student, inputs, targets)) == pytest.approx(distance, rel=1e-5)
        assert float(both(student, inputs, targets)) > distance * 1.01  # the hidden states pull too


def test_the_label_free_hessian_reads_more_data_by_default(st_dir: Path, texts: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    """2 x 16 examples did not give a stable allocation for embeddings on 3 seeds; 4 x 32 did (the default here)."""
    out = tmp_path / "out"
    assert quantize_main(["--model", str(st_dir), "--train", str(texts[0]), "--dev", str(texts[1]),
                          "--avg-bits", "3", "--bit-choices", "2,4", "--groups", "8", "--qat-steps", "0",
                          "--hessian-iters", "1", "--calibration-batches", "1", "--batch-size", "8",
                          "-o", str(out)]) == 0
    settings = json.loads((out / "sensitivity.json").read_text())["settings"]
    assert (settings["hessian subsets"], settings["hessian batch"]) == (4, 32)
