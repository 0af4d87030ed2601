"""qbert-serve against hostile and unlucky clients (issue 19): a real server process on 127.0.0.1, the tiny export.

Every request loop is bounded; time bounds are generous (the figures are in benchmarks/reliability.py).
"""

from __future__ import annotations

import gzip
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from transformers import AutoModelForQuestionAnswering

from benchmarks.serve_load import HEADER_STALLS, STALLS, open_stalled, rss_mb, wait_closed
from qbert_deploy.cli.serve import build_parser
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.models.build import make_checkpoint
from qbert_deploy.models.wrap import calibrate, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.runtimes.serving import ServedModel, create_app
from qbert_deploy.runtimes.serving.model import CHARS_PER_TOKEN
from qbert_deploy.tasks import QA, QA_LABELS
from tests.served import Reference, RunningServer, metric_value, post_later, running_server
from tests.tiny import LABELS, _tokenizer_texts, calibration_batches, tiny_config, tokenizer

BIG_TEXT = "good film " * 838_000  # 8.38 MB as a JSON body, just under the 8 MiB limit (the probe's was 8.0 MB)
CLASSIFY, INFER = "/v2/models/qbert/classify", "/v2/models/qbert/infer"


@pytest.fixture(scope="module")
def server(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tiny_export, tmp_path_factory.mktemp("hardening")) as running:
        yield running


@pytest.fixture(scope="module")
def reference(tiny_export: Path) -> Reference:
    return Reference(tiny_export / "model.onnx", "cpu-w8a8")


def _port(running: RunningServer) -> int:
    return int(running.hostport.rsplit(":", 1)[1])


def _count(running: RunningServer, endpoint: str, code: str) -> float:
    found = re.search(rf'^qbert_requests_total{{code="{code}",endpoint="{endpoint}"}} ([0-9.e+]+)$',
                      httpx.get(f"{running.url}/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _wait_queue(running: RunningServer, depth: int) -> None:
    deadline = time.monotonic() + 10
    while metric_value(httpx.get(f"{running.url}/metrics").text, "qbert_queue_depth") < depth:
        assert time.monotonic() < deadline, f"fewer than {depth} requests ever reached the queue"
        time.sleep(0.02)


def _ids(shape: list[int], data: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": shape, "data": data}]}


# ---- item 1: the work of one request is bounded before it is done ----

def test_a_maximum_size_text_costs_little_memory_and_is_cut_to_the_model_maximum(
        server: RunningServer, reference: Reference) -> None:
    body = json.dumps({"text": BIG_TEXT}).encode()
    assert len(body) <= 8 << 20
    before = rss_mb(server.process.pid)
    for _ in range(3):  # the probe: ~650 MB kept per request, 18 s each
        response = httpx.post(server.url + CLASSIFY, content=body, timeout=120)
        assert response.status_code == 200, response.text[:300]
    time.sleep(0.5)  # memory is handed back after the answer is sent
    grown = rss_mb(server.process.pid) - before
    assert grown <= 150, f"the server's RSS grew by {grown:.0f} MB over three 8 MB texts"
    prediction = response.json()["predictions"][0]
    assert prediction["truncated"] is True
    cut = tokenizer()([BIG_TEXT[:5000]], truncation=True, max_length=128, return_tensors="np")  # type: ignore[operator]
    logits = reference.logits({k: np.asarray(cut[k], dtype=np.int64)
                               for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
    expected = np.exp(logits) / np.exp(logits).sum()
    served = np.array([prediction["probabilities"][label] for label in LABELS])
    assert np.abs(served - expected).max() <= 1e-5, (served, expected)


def test_text_is_cut_before_tokenising_and_truncated_without_overflow_windows(tiny_export: Path) -> None:
    model = ServedModel(tiny_export)
    assert model.tokenizer.truncation is None, "tokenizers' truncation builds every overflow window of the text"
    texts = [BIG_TEXT, "wonderful " * 400, "short", "café naïve, " * 3000, "x" * 20_000]
    encoded = model.encode(texts)
    hf = tokenizer()
    for text, window in zip(texts[:4], encoded.encodings, strict=False):
        expected = hf(text[:5000], truncation=True, max_length=128)  # type: ignore[operator]
        assert window.ids == expected["input_ids"], text[:40]  # the first 128 tokens, [SEP] last
        assert not hasattr(window, "overflowing")
    assert encoded.truncated == [True, True, False, True, True]
    cut, was_cut = model.cut(BIG_TEXT)
    assert was_cut and len(cut) <= CHARS_PER_TOKEN * model.max_length and BIG_TEXT.startswith(cut + " ")


def test_a_full_queue_refuses_text_before_parsing_or_tokenising_it(tiny_export: Path, tmp_path: Path) -> None:
    # one request waits 6 s for its batch to fill and holds the queue of one
    with running_server(tiny_export, tmp_path, "--max-queue", "1", "--max-delay-ms", "6000") as slow:
        results: list[httpx.Response | Exception] = []
        thread = post_later(slow.url + INFER, _ids([1, 3], [101, 2054, 102]), results, timeout=60)
        _wait_queue(slow, 1)
        started = time.monotonic()
        big = httpx.post(slow.url + CLASSIFY, content=json.dumps({"text": BIG_TEXT}), timeout=60)
        elapsed = time.monotonic() - started
        assert big.status_code == 503 and "queue is full" in big.json()["error"], big.text[:300]
        assert big.headers.get("retry-after") == "1"
        assert elapsed < 4, f"the 503 took {elapsed:.1f} s (tokenising 8 MB first took ~10 s here)"
        unparsed = httpx.post(slow.url + CLASSIFY, content=b'{"text": "bad \\ud800 film"}')
        assert unparsed.status_code == 503, "refused before it was parsed, so its bad text is never looked at"
        thread.join(timeout=60)
        assert isinstance(results[0], httpx.Response) and results[0].status_code == 200, results


def test_texts_and_tokens_per_request_are_limited(tiny_export: Path, tmp_path: Path) -> None:
    with running_server(tiny_export, tmp_path, "--max-request-tokens", "64") as strict, \
            httpx.Client(base_url=strict.url, timeout=30) as client:
        two = client.post(CLASSIFY, json={"text": ["word " * 40] * 2})  # 2 rows x 42 tokens
        assert two.status_code == 400 and "more than the 64 one request may run" in two.json()["error"], two.text
        assert client.post(CLASSIFY, json={"text": "word " * 40}).status_code == 200
        wide = client.post(INFER, json=_ids([1, 65], [101] * 65))
        assert wide.status_code == 400 and "1 x 65 tokens" in wide.json()["error"], wide.text
        assert client.post(INFER, json=_ids([1, 64], [101] * 64)).status_code == 200
        many = client.post(CLASSIFY, json={"text": ["a"] * 33})
        assert many.status_code == 400 and "33 texts is more than the maximum batch of 32" in many.json()["error"]
        chars = client.post(CLASSIFY, json={"text": "a" * 5000})  # over 64 characters per token of 64 tokens
        assert chars.status_code == 400 and "characters of text to tokenise" in chars.json()["error"], chars.text


@pytest.fixture(scope="module")
def qa_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random extractive-QA BERT, quantized and exported like the classifier."""
    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_config(tiny_config(), attn_implementation="eager").eval()
    recipe = Recipe(default=WeightQuant(bits=4, groups=4))
    quantize_model(model, recipe)
    calibrate(model, calibration_batches())
    out = tmp_path_factory.mktemp("qa") / "export"
    export_checkpoint(make_checkpoint(model, recipe, list(QA_LABELS), _tokenizer_texts(), task=QA), out, opset=21)
    return out


def test_qa_windows_are_counted_before_any_is_made(qa_export: Path, tmp_path: Path) -> None:
    model = ServedModel(qa_export)
    context = "the film was shot in paris and it rained every day . " * 20
    made = len(model.encode_questions(["where ?"], [context]).question_of)
    assert 2 <= model.question_windows(["where ?"], [context]) <= made  # a lower bound, from the tokens alone
    with running_server(qa_export, tmp_path) as reader:
        url = reader.url + "/v2/models/qbert/answer"
        before = rss_mb(reader.process.pid)
        whole = httpx.post(url, json={"question": "who ?", "context": BIG_TEXT}, timeout=120)
        assert whole.status_code == 400 and "characters" in whole.json()["error"], whole.text[:300]
        many = httpx.post(url, json={"question": "who ?", "context": "good film " * 20_000}, timeout=60)
        assert many.status_code == 400 and "need at least" in many.json()["error"], many.text[:300]
        grown = rss_mb(reader.process.pid) - before
        assert grown <= 150, f"RSS grew by {grown:.0f} MB refusing two long contexts"
        fine = httpx.post(url, json={"question": "where ?", "context": context}, timeout=60)
        assert fine.status_code == 200 and fine.json()["predictions"][0]["answer"] in context, fine.text


# ---- items 4, 5, 6, 13: malformed requests get a 4xx JSON answer ----

def _nested(depth: int) -> bytes:
    return json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": 0}]}
                      ).encode().replace(b'"data": 0', b'"data": ' + b"[" * depth + b"1" + b"]" * depth)


def _binary(shape: list[int], size: int) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": shape,
                                     "parameters": {"binary_data_size": size}}]}).encode()
    return header + b"\0" * size, {"Inference-Header-Content-Length": str(len(header))}


ZIPPED = gzip.compress(b'{"text": "a film"}')
MALFORMED: dict[str, tuple[str, bytes, dict[str, str], int, str]] = {
    "lone surrogate": (CLASSIFY, b'{"text": "bad \\ud800 film"}', {}, 400, "text 0 holds a lone UTF-16 surrogate"),
    "lone surrogate in a list": (CLASSIFY, b'{"text": ["fine", "x \\udfff"]}', {}, 400, "text 1 holds a lone"),
    "100k nested arrays (text)": (CLASSIFY, b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400,
                                  "nested too deeply"),
    "100k nested objects (infer)": (INFER, b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, {}, 400, "nested too deeply"),
    "5000 levels inside data": (INFER, _nested(5000), {}, 400, "nested too deeply"),
    "100 levels inside data": (INFER, _nested(100), {}, 400, "too deeply nested list"),
    "shape [2^32, 2^32], no data": (INFER, json.dumps(_ids([2**32, 2**32], [])).encode(), {}, 400, "is over"),
    "shape [2^62, 4, 1], no data": (INFER, json.dumps(_ids([2**62, 4, 1], [])).encode(), {}, 400, "is over"),
    "shape [2^20, 2^20], no data": (INFER, json.dumps(_ids([2**20, 2**20], [])).encode(), {}, 400,
                                    "needs 1099511627776 values, got 0"),
    "100 dimensions": (INFER, json.dumps(_ids([1] * 100, [5])).encode(), {}, 400, "100 dimensions"),
    "binary shape [2^32, 2^32]": (INFER, *_binary([2**32, 2**32], 0), 400, "is over"),
    "binary shape [2^20, 2^20]": (INFER, *_binary([2**20, 2**20], 0), 400, "needs 1099511627776 values"),
    "gzip cut in its trailer": (CLASSIFY, ZIPPED[:-8], {"content-encoding": "gzip"}, 400, "cut short"),
    "gzip cut in its data": (CLASSIFY, ZIPPED[:-12], {"content-encoding": "gzip"}, 400, "not valid gzip"),
    "gzip then junk": (CLASSIFY, ZIPPED + b"junk", {"content-encoding": "gzip"}, 400, "not valid gzip"),
    "deflate cut short": (CLASSIFY, zlib.compress(b'{"text": "a film"}')[:-4], {"content-encoding": "deflate"}, 400,
                          "cut short"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_a_4xx_json_answer(server: RunningServer, case: str) -> None:
    path, body, headers, status, message = MALFORMED[case]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post(path, content=body, headers=headers)
        assert response.status_code == status, f"{case}: {response.status_code} {response.text[:300]}"
        assert response.headers["content-type"] == "application/json", response.headers
        assert message in response.json()["error"], f"{case}: {response.json()}"
        assert client.post(CLASSIFY, json={"text": "fine"}).status_code == 200


def test_gzip_of_several_members_is_one_body(server: RunningServer) -> None:
    body = gzip.compress(b'{"text": ') + gzip.compress(b'"a film"}')  # RFC 1952: members one after another
    response = httpx.post(server.url + CLASSIFY, content=body, headers={"content-encoding": "gzip"})
    assert response.status_code == 200, response.text


# ---- item 12: an unexpected error is a JSON 500 that the metrics count, and one log line ----

def test_an_unexpected_error_is_a_json_500_counted_in_the_metrics(tiny_export: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(ServedModel(tiny_export))
    state = app.state.server

    async def buggy() -> Any:  # stands for a bug in a handler: the path every unforeseen error takes
        raise KeyError("a bug\nsecond line")

    async def route() -> Any:
        return await state.observed("classify", buggy)

    app.add_api_route("/buggy", route, methods=["POST"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    runner = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not runner.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
            time.sleep(0.05)
        with caplog.at_level("ERROR", logger="qbert_deploy.serve"):
            response = httpx.post(url + "/buggy")
        assert response.status_code == 500 and "internal error (KeyError)" in response.json()["error"], response.text
        text = httpx.get(url + "/metrics").text
        assert 'qbert_requests_total{code="500",endpoint="classify"} 1.0' in text, text
        records = [r for r in caplog.records if r.name == "qbert_deploy.serve"]
        assert len(records) == 1 and records[0].exc_info is None and "\n" not in records[0].getMessage(), records
    finally:
        runner.should_exit = True
        thread.join(timeout=30)
        sock.close()


# ---- item 14: a client that hangs up mid-body is counted, not a traceback ----

def test_a_client_hanging_up_mid_body_leaves_no_traceback(server: RunningServer) -> None:
    before_log, before = len(server.log_text()), _count(server, "classify", "499")
    for _ in range(3):
        (sock,) = open_stalled(_port(server), "body 10 of 100 bytes")
        time.sleep(0.3)
        sock.close()
    deadline = time.monotonic() + 10
    while _count(server, "classify", "499") < before + 3:
        assert time.monotonic() < deadline, "the disconnects were never counted"
        time.sleep(0.05)
    written = server.log_text()[before_log:]
    assert "Traceback" not in written and len(written.splitlines()) <= 3, written[:2000]


# ---- item 3: slow clients are dropped, connections are limited, a stall does not hold the shutdown ----

def test_the_limits_have_defaults() -> None:
    args = build_parser().parse_args(["EXPORT"])
    assert (args.max_connections, args.header_timeout_s, args.body_timeout_s, args.max_request_tokens) == (
        1000, 10.0, 30.0, None)
    for bad in (["--header-timeout-s", "0"], ["--body-timeout-s", "-1"], ["--max-connections", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["EXPORT", *bad])


def test_stalled_clients_are_dropped_and_normal_requests_go_on(tiny_export: Path, tmp_path: Path) -> None:
    with running_server(tiny_export, tmp_path, "--header-timeout-s", "1", "--body-timeout-s", "2") as slow:
        opened = time.monotonic()
        kinds = [kind for kind in STALLS for _ in range(2)]
        stalled = [sock for kind in STALLS for sock in open_stalled(_port(slow), kind, 2)]
        assert httpx.post(slow.url + CLASSIFY, json={"text": "fine"}).status_code == 200
        closed = wait_closed(stalled, 15, since=opened)
        assert httpx.post(slow.url + CLASSIFY, json={"text": "fine"}).status_code == 200
        assert slow.process.poll() is None
    for kind, outcome in zip(kinds, closed, strict=True):
        assert outcome.after_s is not None, f"{kind}: still open after 15 s"
        if kind in HEADER_STALLS:  # closed at the header deadline, without an answer
            assert 0.5 <= outcome.after_s <= 6 and outcome.answer == b"", (kind, outcome)
        else:  # the body deadline: 408 and the connection closed
            assert 1.5 <= outcome.after_s <= 8, (kind, outcome)
            assert outcome.answer.startswith(b"HTTP/1.1 408 "), (kind, outcome)
            assert b'{"error":"the request body did not arrive within 2 s"}' in outcome.answer, (kind, outcome)


def test_connections_past_the_limit_get_503_until_they_go(tiny_export: Path, tmp_path: Path) -> None:
    with running_server(tiny_export, tmp_path, "--max-connections", "2", "--header-timeout-s", "2") as limited:
        idle = open_stalled(_port(limited), "idle", 2)
        refused = httpx.get(limited.url + "/v2/health/ready")
        assert refused.status_code == 503, refused.text
        assert all(c.after_s is not None for c in wait_closed(idle, 10))
        assert httpx.get(limited.url + "/v2/health/ready").status_code == 200


def test_a_stalled_client_does_not_hold_the_shutdown(tiny_export: Path, tmp_path: Path) -> None:
    with running_server(tiny_export, tmp_path, "--graceful-timeout-s", "20") as slow:
        body = open_stalled(_port(slow), "body 10 of 100 bytes")
        head = open_stalled(_port(slow), "headers without the blank line")
        time.sleep(0.5)  # the body read has begun
        started = time.monotonic()
        slow.process.send_signal(signal.SIGTERM)
        code = slow.process.wait(timeout=40)
        elapsed = time.monotonic() - started
        (cut,) = wait_closed(body, 5)
        wait_closed(head, 5)
    assert code == 0 and elapsed < 5, f"exit {code} after {elapsed:.1f} s (the graceful timeout is 20 s)"
    assert cut.answer.startswith(b"HTTP/1.1 503 ") and b"the server is shutting down" in cut.answer, cut


# ---- items 7, 15: the stop ----

def test_requests_past_the_graceful_timeout_get_a_json_503_and_nothing_waits_for_them(
        tiny_export: Path, tmp_path: Path) -> None:
    # each request waits 10 s for its batch to fill: past the 2 s graceful timeout
    with running_server(tiny_export, tmp_path, "--graceful-timeout-s", "2", "--max-delay-ms", "10000") as slow:
        results: list[httpx.Response | Exception] = []
        threads = [post_later(slow.url + INFER, _ids([1, 3], [101, 2000 + i, 102]), results, timeout=60)
                   for i in range(3)]
        _wait_queue(slow, 3)
        started = time.monotonic()
        slow.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        code = slow.process.wait(timeout=60)
        elapsed = time.monotonic() - started
        log = slow.log_text()
    for r in results:
        assert isinstance(r, httpx.Response) and r.status_code == 503, r
        assert r.headers["content-type"] == "application/json" and r.headers.get("retry-after") == "1", r.headers
        assert "the server stopped before this request was run" in r.json()["error"], r.text
    assert code == 0 and elapsed < 2 + 3, f"exit {code} {elapsed:.1f} s after SIGTERM, graceful timeout 2 s"
    assert "qbert-serve: stopped (3 requests unfinished at the 2 s graceful timeout got 503)" in log, log
    assert "Traceback" not in log, log


def test_a_model_run_can_be_stopped_from_another_thread(tiny_export: Path) -> None:
    model = ServedModel(tiny_export, threads=1)
    ids = np.random.default_rng(0).integers(1000, 30000, size=(512, 128))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    threading.Timer(0.02, model.stop_run).start()
    with pytest.raises(Exception, match="terminate"):
        model.run(feeds)
    assert model.run({k: v[:1, :4] for k, v in feeds.items()}).shape == (1, len(LABELS))  # the next run is whole


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_drained_stop_exits_0_and_says_stopped(tiny_export: Path, tmp_path: Path, sig: signal.Signals) -> None:
    with running_server(tiny_export, tmp_path) as running:
        assert httpx.post(running.url + CLASSIFY, json={"text": "fine"}).status_code == 200
        running.process.send_signal(sig)
        code = running.process.wait(timeout=40)
        log = running.log_text()
    assert code == 0, f"exit status {code}:\n{log}"
    assert log.rstrip().endswith("qbert-serve: stopped"), log


# ---- item 16: the listening line ----

def test_the_listening_line_comes_when_the_socket_accepts(tiny_export: Path) -> None:
    for _ in range(2):
        process = subprocess.Popen([sys.executable, "-m", "qbert_deploy.cli.serve", str(tiny_export), "--port", "0"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert process.stdout is not None
            found, deadline, seen = None, time.monotonic() + 120, ""
            while found is None and time.monotonic() < deadline:
                ready, _, _ = select.select([process.stdout], [], [], 1.0)
                line = process.stdout.readline() if ready else ""
                assert not ready or line, f"the server exited before listening:\n{seen}"
                seen += line
                found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            assert found, seen
            with socket.create_connection(("127.0.0.1", int(found.group(1))), timeout=5):
                pass  # refused when the line came before listen()
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=40)


# ---- item 17: Ctrl-C while onnxruntime initialises ----

INTERRUPT_DURING_IMPORT = """
import signal, sys
def hook(frame, event, arg):  # a real SIGINT, timed to land while onnxruntime's extension initialises
    if event == "c_call" and getattr(arg, "__name__", "") == "create_dynamic":
        spec = frame.f_locals.get("args", (None,))[0]
        if "onnxruntime_pybind11_state" in str(getattr(spec, "name", "")):
            sys.setprofile(None)
            signal.signal(signal.SIGALRM, signal.default_int_handler)  # the alarm acts as Ctrl-C
            signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))
sys.setprofile(hook)
from qbert_deploy.cli.serve import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("delay", [0.01, 0.02])  # into the window where the extension initialises
def test_ctrl_c_while_onnxruntime_initialises_is_interrupted_130(tiny_export: Path, delay: float) -> None:
    done = subprocess.run([sys.executable, "-c", INTERRUPT_DURING_IMPORT, str(delay), str(tiny_export), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done
    assert done.stderr.strip() == "qbert-serve: error: interrupted", done.stderr

