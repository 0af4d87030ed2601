"""Load test of qbert-serve on loopback: latency percentiles, throughput and the batch sizes the server formed.

    python -m benchmarks.serve_load EXPORT_DIR [--requests 2000] [--concurrency 16] [--max-batch 32]
                                              [--max-delay-ms 5] [--threads N] [--json OUT]

Starts `qbert-serve EXPORT_DIR` on 127.0.0.1 (a free port; its default profile, cpu-w8a8, unless --profile), sends
a bounded number of KServe v2 infer requests (random token ids, 4..32 tokens, one row each) from concurrent asyncio
clients, checks every answer against in-process ONNX Runtime on the same file and profile, each request run alone
(a mismatch: any logit off by more than --atol, 0 by default: bitwise), reads the batch-size histogram from
/metrics and stops the server.
Traffic goes only to 127.0.0.1; the run is bounded in requests and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def hostport(self) -> str:
        return self.url.removeprefix("http://")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(export_dir: Path, log_dir: Path, *args: str, timeout: float = 60.0) -> Iterator[RunningServer]:
    """Start `qbert-serve EXPORT_DIR --port 0 ARGS` on 127.0.0.1, wait until it is ready, stop it (SIGTERM) after."""
    log = log_dir / f"serve-{time.monotonic_ns()}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "qbert_deploy.cli.serve", str(export_dir), "--port", "0",
                                    "--host", "127.0.0.1", *args], stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield RunningServer(_wait_ready(process, log, timeout), process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"qbert-serve exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        if url is None:
            found = LISTENING.search(log.read_text(errors="replace"))
            url = found.group(1) if found else None
        if url is not None:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"qbert-serve not ready after {timeout} s:\n{log.read_text(errors='replace')}")


def rss_mb(pid: int) -> float:
    """A process's resident set size now, in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


_CLASSIFY = b"POST /v2/models/qbert/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
# Clients that stop part way; the first three stop before their request headers are complete, the others in the body.
STALLS: dict[str, bytes] = {
    "idle": b"",
    "partial request line": b"POST /v2/models/qbert/cla",
    "headers without the blank line": _CLASSIFY + b"Content-Type: application/json\r\n",
    "body 10 of 100 bytes": _CLASSIFY + b"Content-Length: 100\r\n\r\n" + b'{"text": "',
    "chunked body stalled after a chunk": _CLASSIFY + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"tex\r\n",
    "chunk of 2^64-1 bytes declared": _CLASSIFY + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc",
}
HEADER_STALLS = ("idle", "partial request line", "headers without the blank line")


def open_stalled(port: int, kind: str, count: int = 1) -> list[socket.socket]:
    """`count` connections to 127.0.0.1:port that send the start of a request of kind `kind` and then nothing."""
    out = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(STALLS[kind])
        out.append(sock)
    return out


@dataclass
class Closed:
    after_s: float | None  # when the server closed it, from `since`; None: still open
    answer: bytes  # what the server sent before closing (the first 300 bytes)


def wait_closed(socks: Sequence[socket.socket], timeout_s: float, since: float | None = None) -> list[Closed]:
    """Wait (at most `timeout_s`) for the server to close each connection; what it sent, and when, counted from
    `since` (a time.monotonic(); default: now)."""
    started = time.monotonic() if since is None else since
    results = [Closed(None, b"") for _ in socks]
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        while selector.get_map() and time.monotonic() - started < timeout_s:
            for key, _ in selector.select(timeout=0.05):
                index = key.data
                try:
                    data = socks[index].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # reset
                    data = b""
                if data:
                    results[index].answer = (results[index].answer + data)[:300]
                    continue
                results[index].after_s = time.monotonic() - started
                selector.unregister(socks[index])
    for sock in socks:
        sock.close()
    return results


def metric_value(text: str, name: str) -> float:
    """One unlabelled sample from a Prometheus text exposition."""
    found = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.MULTILINE)
    if found is None:
        raise ValueError(f"metric {name} not in the exposition")
    return float(found.group(1))


def random_requests(count: int, seed: int = 0, vocab: int = 30522) -> list[np.ndarray]:
    """`count` distinct [1, tokens] id arrays, 4..32 tokens, [CLS] ... [SEP] shaped."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(1000, vocab, size=(1, int(rng.integers(4, 33))))
        ids[:, 0], ids[:, -1] = 101, 102
        out.append(ids.astype(np.int64))
    return out


def infer_body(ids: np.ndarray, request_id: str) -> bytes:
    shape = list(ids.shape)
    tensors = [{"name": name, "datatype": "INT64", "shape": shape, "data": data.reshape(-1).tolist()}
               for name, data in (("input_ids", ids), ("attention_mask", np.ones_like(ids)),
                                  ("token_type_ids", np.zeros_like(ids)))]
    return json.dumps({"id": request_id, "inputs": tensors}).encode()


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answers: dict[int, np.ndarray] = field(default_factory=dict)  # request number -> logits
    wall_s: float = 0.0
    batches: float = 0.0
    rows: float = 0.0

    @property
    def mean_batch(self) -> float:
        return self.rows / self.batches if self.batches else 0.0

    def summary(self) -> dict[str, float]:
        lat = np.asarray(self.latencies) * 1000
        return {"requests": len(self.latencies), "errors": len(self.errors), "wall_s": self.wall_s,
                "throughput_rps": len(self.latencies) / self.wall_s if self.wall_s else 0.0,
                "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
                "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
                "mean_batch": self.mean_batch, "batches": self.batches}


async def _load(url: str, model: str, payloads: Sequence[bytes], total: int, concurrency: int,
                time_limit_s: float) -> LoadResult:
    result = LoadResult()
    counter = iter(range(total))
    deadline = time.monotonic() + time_limit_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def worker() -> None:
            for number in counter:
                if time.monotonic() > deadline:
                    result.errors.append(f"request {number}: not sent, the {time_limit_s} s budget ran out")
                    continue
                started = time.perf_counter()
                try:
                    response = await client.post(f"/v2/models/{model}/infer",
                                                 content=payloads[number],
                                                 headers={"content-type": "application/json"})
                except httpx.HTTPError as err:
                    result.errors.append(f"request {number}: {type(err).__name__}: {err}")
                    continue
                result.latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    result.errors.append(f"request {number}: HTTP {response.status_code} {response.text[:200]}")
                    continue
                body = response.json()
                if body.get("id") != str(number):
                    result.errors.append(f"request {number}: answer carries id {body.get('id')!r}")
                    continue
                output = body["outputs"][0]
                result.answers[number] = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])

        before = (await client.get("/metrics")).text
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - started
        after = (await client.get("/metrics")).text
    result.batches = metric_value(after, "qbert_batch_size_count") - metric_value(before, "qbert_batch_size_count")
    result.rows = metric_value(after, "qbert_batch_size_sum") - metric_value(before, "qbert_batch_size_sum")
    return result


def run_load(url: str, requests: Sequence[np.ndarray], total: int = 2000, concurrency: int = 16,
             model: str = "qbert", time_limit_s: float = 300.0) -> LoadResult:
    """Send `total` requests (request n carries id n and the ids `requests[n % len(requests)]`)."""
    bodies = [infer_body(requests[n % len(requests)], str(n)) for n in range(total)]
    return asyncio.run(_load(url, model, bodies, total, concurrency, time_limit_s))


def reference_logits(export_dir: Path, requests: Sequence[np.ndarray], profile: str | None = None,
                     ) -> list[np.ndarray]:
    """Each request run alone, in process, on what `qbert-serve EXPORT_DIR [--profile P]` serves."""
    from qbert_deploy.runtimes.serving import open_served, served_file

    session = open_served(served_file(export_dir, profile), threads=1)
    return [session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                     "token_type_ids": np.zeros_like(ids)})[0] for ids in requests]


def mismatches(result: LoadResult, references: Sequence[np.ndarray], atol: float = 0.0) -> list[str]:
    """Answers that differ from in-process ORT on their own request."""
    bad = []
    for number, logits in result.answers.items():
        expected = references[number % len(references)]
        if logits.shape != expected.shape or not np.allclose(logits, expected, atol=atol, rtol=0):
            bad.append(f"request {number}: served {logits.tolist()} != in-process {expected.tolist()}")
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.serve_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=500, help="distinct request payloads (default 500)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads in the server")
    parser.add_argument("--profile", default=None, help="as qbert-serve's (default: the CPU's fast profile)")
    parser.add_argument("--atol", type=float, default=0.0,
                        help="largest logit difference from the request run alone (default 0: bitwise)")
    parser.add_argument("--time-limit-s", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    requests = random_requests(args.distinct)
    from qbert_deploy.runtimes.serving import served_file

    served = served_file(args.export_dir, args.profile)
    references = reference_logits(args.export_dir, requests, args.profile)
    extra = ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    extra += ["--threads", str(args.threads)] if args.threads else []
    extra += ["--profile", args.profile] if args.profile else []
    with tempfile.TemporaryDirectory() as tmp, running_server(args.export_dir, Path(tmp), *extra) as server:
        result = run_load(server.url, requests, args.requests, args.concurrency, time_limit_s=args.time_limit_s)
    bad = mismatches(result, references, args.atol)
    worst = max((float(np.abs(result.answers[n] - references[n % len(references)]).max())
                 for n in result.answers), default=0.0)
    summary = {**result.summary(), "profile": served.profile, "model_file": served.path.name,
               "mismatches": len(bad), "max_abs_diff": worst, "atol": args.atol,
               "concurrency": args.concurrency, "max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if result.errors or summary["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
