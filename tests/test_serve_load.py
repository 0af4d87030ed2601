"""A bounded load test: 2,000 requests from 16 concurrent clients on loopback, each answer checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.serve_load import mismatches, random_requests, reference_logits, run_load
from tests.served import running_server

REQUESTS, CLIENTS, DISTINCT = 2000, 16, 250
ATOL = 1e-5


def _distinguishable(model: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Requests whose in-process logits lie more than 2 x ATOL apart, so no answer can match two of them."""
    candidates = random_requests(3 * DISTINCT, seed=1)
    logits = reference_logits(model, candidates)
    kept: list[int] = []
    for i, row in enumerate(logits):
        if all(np.abs(row - logits[j]).max() > 2 * ATOL for j in kept):
            kept.append(i)
        if len(kept) == DISTINCT:
            break
    assert len(kept) == DISTINCT, f"only {len(kept)} distinguishable requests among {len(candidates)}"
    return [candidates[i] for i in kept], [logits[i] for i in kept]


def test_load_no_errors_answers_match_requests_and_batches_form(tiny_export: Path, tmp_path: Path) -> None:
    requests, references = _distinguishable(tiny_export / "model.onnx")
    with running_server(tiny_export, tmp_path, "--max-batch", "32", "--max-delay-ms", "5") as server:
        result = run_load(server.url, requests, total=REQUESTS, concurrency=CLIENTS, time_limit_s=120)
        assert server.process.poll() is None, server.log_text()
    assert not result.errors, f"{len(result.errors)} errors, first: {result.errors[:3]}"
    assert len(result.answers) == REQUESTS, f"{REQUESTS - len(result.answers)} answers missing"
    bad = mismatches(result, references, atol=ATOL)
    assert not bad, f"{len(bad)} answers differ from in-process ORT on their own request: {bad[:3]}"
    summary = result.summary()
    assert result.rows == REQUESTS, f"the batches ran {result.rows} rows for {REQUESTS} one-row requests"
    assert result.mean_batch > 1.0, f"no batching observed: {summary}"
    print(f"load: {summary}")
