"""Helpers for the serving tests: the real server process (from the load benchmark) and an in-process reference."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from benchmarks.serve_load import RunningServer, metric_value, running_server
from qbert_deploy.runtimes.session import open_session

__all__ = ["Reference", "RunningServer", "feeds_for", "metric_value", "post_answered_early", "post_later",
           "running_server"]


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


def post_answered_early(url: str, body: bytes, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """POST `body` as curl does for large bodies: `Expect: 100-continue`, and the body only once the server asks
    for it. A server refusing the body from its Content-Length answers at once; a client that writes the whole
    body before reading (httpx) instead races the server's close and can meet a reset in place of the answer.
    Returns the final status and the JSON answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        sock.sendall(head.encode())
        answer = sock.recv(1 << 16)
        if answer.startswith(b"HTTP/1.1 100"):
            sock.sendall(body)
            answer = answer.partition(b"\r\n\r\n")[2]
        while chunk := sock.recv(1 << 16):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)
