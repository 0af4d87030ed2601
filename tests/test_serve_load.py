"""A bounded load test: 2,000 requests from 16 concurrent clients on loopback, each answer checked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_load import mismatches, random_requests, reference_logits, run_load
from tests.served import Reference, running_server
from tests.tiny import LABELS, text_batch

REQUESTS, CLIENTS, DISTINCT = 2000, 16, 250
ATOL = 1e-5  # to tell requests apart; the answers themselves must match bitwise (cpu-w8a8 is batch-invariant)


def _distinguishable(export: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Requests whose in-process logits lie more than 2 x ATOL apart, so no answer can match two of them."""
    candidates = random_requests(3 * DISTINCT, seed=1)
    logits = reference_logits(export, candidates)
    kept: list[int] = []
    for i, row in enumerate(logits):
        if all(np.abs(row - logits[j]).max() > 2 * ATOL for j in kept):
            kept.append(i)
        if len(kept) == DISTINCT:
            break
    assert len(kept) == DISTINCT, f"only {len(kept)} distinguishable requests among {len(candidates)}"
    return [candidates[i] for i in kept], [logits[i] for i in kept]


def test_load_no_errors_answers_match_requests_and_batches_form(tiny_export: Path, tmp_path: Path) -> None:
    requests, references = _distinguishable(tiny_export)
    with running_server(tiny_export, tmp_path, "--max-batch", "32", "--max-delay-ms", "5") as server:
        result = run_load(server.url, requests, total=REQUESTS, concurrency=CLIENTS, time_limit_s=120)
        assert server.process.poll() is None, server.log_text()
    assert not result.errors, f"{len(result.errors)} errors, first: {result.errors[:3]}"
    assert len(result.answers) == REQUESTS, f"{REQUESTS - len(result.answers)} answers missing"
    bad = mismatches(result, references, atol=0.0)
    assert not bad, f"{len(bad)} answers differ from in-process ORT on their own request: {bad[:3]}"
    summary = result.summary()
    assert result.rows == REQUESTS, f"the batches ran {result.rows} rows for {REQUESTS} one-row requests"
    assert result.mean_batch > 1.0, f"no batching observed: {summary}"
    print(f"load: {summary}")


def test_concurrent_text_requests_each_get_their_own_answer(tiny_export: Path, tmp_path: Path) -> None:
    words = ["gorgeous", "dull", "moving", "tedious", "charming", "a mess", "the best", "lifeless", "not bad"]
    sentences = [f"{words[i % 9]} and {words[(i * 5 + 2) % 9]}, {'really ' * (i % 7)}{words[(i * 7 + 1) % 9]}"
                 for i in range(60)]
    reference = Reference(tiny_export / "model.onnx", "cpu-w8a8")
    expected = []
    for sentence in sentences:
        logits = reference.logits(text_batch([sentence]))[0]
        expected.append(np.exp(logits) / np.exp(logits).sum())

    async def load(url: str) -> list[tuple[int, int, list[float]]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def one(number: int) -> tuple[int, int, list[float]]:
                response = await client.post("/v2/models/qbert/classify",
                                             json={"text": sentences[number % len(sentences)]})
                probs = response.json()["predictions"][0]["probabilities"] if response.status_code == 200 else {}
                return number, response.status_code, [probs.get(label, -1.0) for label in LABELS]

            semaphore = asyncio.Semaphore(16)

            async def bounded(number: int) -> tuple[int, int, list[float]]:
                async with semaphore:
                    return await one(number)

            return await asyncio.gather(*(bounded(n) for n in range(240)))

    with running_server(tiny_export, tmp_path) as server:
        answers = asyncio.run(load(server.url))
    for number, status, probs in answers:
        assert status == 200, f"text request {number}: HTTP {status}"
        want = expected[number % len(sentences)]
        assert np.abs(np.array(probs) - want).max() <= 1e-5, f"text request {number}: {probs} != {want.tolist()}"
