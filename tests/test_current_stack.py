"""The installed stack (transformers 5.x by default, 4.45-4.57 in the compat environment): an odd-shaped BERT on
sentence pairs through every command, and the version adapter's claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from onnx import TensorProto, helper
from transformers import BertConfig, BertForSequenceClassification

from qbert_deploy.data.tsv import Example, write_tsv
from qbert_deploy.models.hf_compat import TRANSFORMERS_MAJOR, export_attention, head_gate_hook
from qbert_deploy.runtimes.session import SessionError, open_session
from tests.tiny import SENTENCES, save_hf_dir

pytestmark = pytest.mark.compat  # the end-to-end path, run on both lines of transformers

LABELS = "entailment,neutral,contradiction"


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=900,
                          env=env)


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_transformers_version_is_in_the_supported_range() -> None:
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    assert (major, minor) >= (4, 45) and major < 6, transformers.__version__
    assert major == TRANSFORMERS_MAJOR


def test_odd_shape_sentence_pairs_through_every_command(tmp_path: Path) -> None:
    """Hidden 96 with 3 heads (head size 32), intermediate 200 (not a multiple of 16), 3 labels, sentence pairs:
    quantize, export with two lowerings, --check, validate (the issue's acceptance path)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=200, max_position_embeddings=128, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model_dir = save_hf_dir(BertForSequenceClassification(config), tmp_path / "model")
    pairs = [Example(a, i % 3, b) for i, (a, b) in enumerate(zip(SENTENCES, reversed(SENTENCES), strict=True))]
    write_tsv(tmp_path / "train.tsv", pairs * 3)
    write_tsv(tmp_path / "dev.tsv", pairs)
    out, export = tmp_path / "out", tmp_path / "export"
    _ok(_run("qbert_deploy.cli.quantize", "--model", str(model_dir), "--train", str(tmp_path / "train.tsv"),
             "--dev", str(tmp_path / "dev.tsv"), "--labels", LABELS, "--avg-bits", "3", "--bit-choices", "2,4",
             "--finetune-steps", "2", "--qat-steps", "2", "--hessian-subsets", "2", "--hessian-batch", "4",
             "--hessian-iters", "2", "--calibration-batches", "1", "--batch-size", "4", "--groups", "4",
             "-o", str(out)))
    _ok(_run("qbert_deploy.cli.export", str(out / "model.pt"), "-o", str(export),
             "--lower", "cpu-w8a8,weight-only"))
    assert {p.name for p in export.glob("model*.onnx")} == {"model.onnx", "model.cpu-w8a8.onnx",
                                                             "model.weight-only.onnx"}
    _ok(_run("qbert_deploy.cli.export", "--check", str(export), "--checkpoint", str(out / "model.pt")))
    report = tmp_path / "report"
    _ok(_run("qbert_deploy.cli.validate", str(export), "--checkpoint", str(out / "model.pt"),
             "--data", str(tmp_path / "dev.tsv"), "--profile", "canonical,cpu-w8a8,weight-only",
             "--report", str(report)))
    backends = json.loads((report / "report.json").read_text())
    assert "cpu-w8a8" in json.dumps(backends) and "weight-only" in json.dumps(backends)


def test_export_attention_computes_what_the_model_computes() -> None:
    """The export-time attention (4.x's eager form under 5.x) gives the model's own logits, padding included."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 200, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 4:], mask[2, 7:] = 0, 0
    before = str(model.config._attn_implementation)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with export_attention(model) as to_model_mask:
            exported = model(input_ids=ids, attention_mask=to_model_mask(mask)).logits
    assert str(model.config._attn_implementation) == before
    np.testing.assert_allclose(exported.numpy(), reference.numpy(), atol=1e-5)


def test_head_gate_hook_equals_masking_a_head() -> None:
    """Gating a head's context to 0 equals removing that head's value rows (what 4.x's head_mask did to P)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=96, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    model = BertForSequenceClassification(config).eval()
    attention = model.bert.encoder.layer[0].attention.self
    ids = torch.randint(0, 200, (2, 7))
    gate = torch.tensor([1.0, 0.0, 1.0, 0.5])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    handle = attention.register_forward_hook(head_gate_hook(lambda: gate, 16))
    with torch.no_grad():
        gated = model(input_ids=ids).logits
    handle.remove()
    with torch.no_grad():  # the same through the value projection: P·(V·g) = g·(P·V) per head
        attention.value.weight.mul_(gate.repeat_interleave(16)[:, None])
        attention.value.bias.mul_(gate.repeat_interleave(16))
        reference = model(input_ids=ids).logits
    np.testing.assert_allclose(gated.numpy(), reference.numpy(), atol=1e-5)
    assert not torch.allclose(gated, plain, atol=1e-4), "the gate changed nothing"


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="transformers 4.x exports its own eager form")
def test_export_graph_has_the_4x_attention_form(tiny_export: Path) -> None:
    """Under 5.x the canonical graph keeps 4.x's attention: Div by sqrt(d), no masking_utils subgraph."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(tiny_export / "model.onnx"), load_external_data=False).graph.node]
    assert "GatherND" not in ops and "GreaterOrEqual" not in ops, sorted(set(ops))
    assert ops.count("Softmax") == ops.count("Div") >= 2, sorted(set(ops))


@pytest.mark.parametrize(("node", "named"), [
    (("Erf", "", TensorProto.DOUBLE), "Erf (opset 13)"),  # ONNX op, no kernel for that type in this ORT
    (("GatherBlockQuantizedV9", "com.microsoft", TensorProto.FLOAT), "com.microsoft:GatherBlockQuantizedV9"),
])
def test_an_operator_this_onnxruntime_lacks_is_one_line_naming_the_version(node: tuple[str, str, int],
                                                                            named: str) -> None:
    """What a profile's op looks like to an older onnxruntime: a real ORT session refuses a kernel it lacks."""
    import onnxruntime as ort

    op, domain, dtype = node
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g",
                              [helper.make_tensor_value_info("x", dtype, [2])],
                              [helper.make_tensor_value_info("y", dtype, [2])])
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    with pytest.raises(SessionError) as caught:
        open_session(model.SerializeToString())
    message = str(caught.value)
    assert "\n" not in message and f"onnxruntime {ort.__version__} has no kernel for {named}" in message, message
    assert "pip install -U onnxruntime" in message


def test_the_declared_requirements_admit_both_lines_and_force_no_downgrade() -> None:
    """pyproject's transformers range holds 5.x and 4.45-4.57; only the [optimum] extra ties it to 4.x."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    core = {r.name: r for r in map(Requirement, project["dependencies"])}
    for version in ("4.45.0", "4.57.6", "5.0.0", "5.24.0"):
        assert core["transformers"].specifier.contains(version), (version, core["transformers"])
    assert not core["transformers"].specifier.contains("6.0.0")
    extras = project["optional-dependencies"]
    assert not any("optimum" in r for r in extras["dev"] + extras["serve"]), "dev/serve must not pull optimum"
