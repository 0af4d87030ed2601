"""Helpers for the serving tests: the real server process (from the load benchmark) and an in-process reference."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.serve_load import RunningServer, metric_value, running_server
from qbert_deploy.runtimes.session import open_session

__all__ = ["Reference", "RunningServer", "feeds_for", "metric_value", "post_later", "running_server"]


class Reference:
    """In-process ORT on the same model file and profile: what each served answer must agree with."""

    def __init__(self, model_path: Path, profile: str | None = None) -> None:
        self.session = open_session(model_path, threads=1, profile=profile)

    def logits(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        out: np.ndarray = self.session.run(["logits"], feeds)[0]
        return out


def feeds_for(ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def post_later(url: str, body: dict[str, Any], results: list[httpx.Response | Exception],
               timeout: float = 30) -> threading.Thread:
    """POST `body` from a thread (a client still waiting while the test acts); the answer or error goes to
    `results`."""
    def send() -> None:
        try:
            results.append(httpx.post(url, json=body, timeout=timeout))
        except httpx.HTTPError as err:
            results.append(err)

    thread = threading.Thread(target=send)
    thread.start()
    return thread
