"""qbert-serve pieces without HTTP: the batcher on the real model, profile choice, CLI errors."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qbert_deploy.cli.serve import build_parser
from qbert_deploy.runtimes.export_dir import record_files
from qbert_deploy.runtimes.lowering import lower_in_export
from qbert_deploy.runtimes.serving import Batcher, QueueFull, ServedModel
from qbert_deploy.runtimes.serving.batcher import pad_and_stack
from qbert_deploy.runtimes.serving.metrics import ServeMetrics
from qbert_deploy.runtimes.session import open_session
from tests.served import Reference, feeds_for, running_server
from tests.tiny import text_batch


def _requests() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [feeds_for(rng.integers(1000, 30000, size=(rows, length))) for rows, length in
            [(1, 5), (3, 9), (2, 3), (1, 12), (3, 4), (1, 7)]]


def test_pad_and_stack_pads_each_request_on_the_right() -> None:
    a, b = feeds_for(np.array([[1, 2, 3]])), feeds_for(np.array([[4], [5]]))
    batch = pad_and_stack([a, b], {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0})
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]


def test_batcher_answers_each_request_with_its_own_rows(tiny_export: Path) -> None:
    model = ServedModel(tiny_export)
    reference = Reference(tiny_export / "model.onnx", "cpu-w8a8")
    requests = _requests()
    metrics = ServeMetrics()

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(model.run, max_batch=4, max_delay=0.05, max_queue=16, pad_values=model.pad_values,
                          metrics=metrics)
        await batcher.start()
        futures = [batcher.submit(r) for r in requests]  # queued at once: batches of <= 4 rows form, some carry over
        answers = await asyncio.gather(*futures)
        await batcher.close()
        return list(answers)

    answers = asyncio.run(scenario())
    for i, (request, answer) in enumerate(zip(requests, answers, strict=True)):
        expected = reference.logits(request)
        assert np.array_equal(answer, expected), f"request {i}: {answer} != {expected} (batch-invariance)"
    rows = metrics.batch_rows.collect()[0].samples
    count = next(s.value for s in rows if s.name.endswith("_count"))
    total = next(s.value for s in rows if s.name.endswith("_sum"))
    assert total == sum(r["input_ids"].shape[0] for r in requests) and count >= 3, (count, total)


def test_batcher_refuses_beyond_its_queue_bound(tiny_export: Path) -> None:
    model = ServedModel(tiny_export)

    async def scenario() -> tuple[int, int]:
        batcher = Batcher(model.run, max_batch=8, max_delay=0.01, max_queue=3, pad_values=model.pad_values)
        await batcher.start()
        accepted, refused = [], 0
        for request in _requests():
            try:
                accepted.append(batcher.submit(request))
            except QueueFull:
                refused += 1
        await asyncio.gather(*accepted)
        after = batcher.submit(_requests()[0])  # answered requests free their places
        await after
        await batcher.close()
        return len(accepted), refused

    assert asyncio.run(scenario()) == (3, 3)


def test_profile_is_served_and_a_missing_one_is_a_one_line_error(tiny_export: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    shutil.copyfile(export / "model.onnx", export / "model.cpu-test.onnx")
    record_files(export, ["model.cpu-test.onnx"])  # a file placed by hand is served once its sha256 is recorded
    assert ServedModel(export, profile="cpu-test").path.name == "model.cpu-test.onnx"
    foreign = tmp_path / "foreign"  # a model.onnx that is not a qbert export: the default profile cannot lower it
    shutil.copytree(tiny_export, foreign)
    model = onnx.load(str(foreign / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(foreign / "model.onnx"))
    assert ServedModel(foreign, profile="canonical", verify=False).profile == "canonical"
    for args, message in [([str(export), "--profile", "cuda-w4"], "no profile 'cuda-w4'"),
                          ([str(tmp_path / "missing")], "not an export directory"),
                          ([str(export), "--providers", "tpu"], "unknown execution provider 'tpu'"),
                          ([str(export), "--profile", "cuda-fp16"], "profile 'cuda-fp16' is for cuda, not cpu"),
                          ([str(foreign), "--no-verify"], "not a qbert-deploy export (no qbert.format_version "
                                                          "metadata) (--profile canonical serves the graph as "
                                                          "exported)")]:
        done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.serve", *args, "--port", "0"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith("qbert-serve: error:"), done
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_default_profile_is_the_fast_one(tiny_export: Path, tmp_path: Path) -> None:
    feed = text_batch()
    default = ServedModel(tiny_export)
    assert (default.profile, default.path.name, default.served.lowered_in_memory) == ("cpu-w8a8", "model.onnx", True)
    fast = open_session(tiny_export / "model.onnx", threads=1, profile="cpu-w8a8").run(["logits"], feed)[0]
    canonical = open_session(tiny_export / "model.onnx", threads=1).run(["logits"], feed)[0]
    assert np.array_equal(default.run(feed), fast) and not np.array_equal(fast, canonical)
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    lower_in_export(export, "cpu-w8a8")
    on_disk = ServedModel(export)
    assert (on_disk.path.name, on_disk.profile, on_disk.served.lowered_in_memory) == (
        "model.cpu-w8a8.onnx", "cpu-w8a8", False)
    assert np.array_equal(on_disk.run(feed), fast)
    asked = ServedModel(export, profile="canonical")
    assert (asked.path.name, asked.profile) == ("model.onnx", "canonical")
    assert np.array_equal(asked.run(feed), canonical)
    other = ServedModel(export, profile="weight-only")
    assert (other.path.name, other.profile, other.served.lowered_in_memory) == ("model.onnx", "weight-only", True)


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["EXPORT"])
    assert (args.host, args.port, args.max_batch, args.max_delay_ms, args.model_name, args.providers) == (
        "127.0.0.1", 8000, 32, 5.0, "qbert", "cpu")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["EXPORT", "--max-batch", "0"])


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA provider")
def test_serves_on_cuda(tiny_export: Path, tmp_path: Path) -> None:
    import httpx

    with running_server(tiny_export, tmp_path, "--providers", "cuda") as server:
        meta = httpx.get(f"{server.url}/v2/models/qbert").json()
        assert meta["parameters"]["providers"][0] == "CUDAExecutionProvider", meta
        response = httpx.post(f"{server.url}/v2/models/qbert/classify", json={"text": "fine"})
        assert response.status_code == 200, response.text
