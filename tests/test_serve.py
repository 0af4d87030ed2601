"""qbert-serve end to end: a real server process on 127.0.0.1 serving the tiny export."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from qbert_deploy.runtimes.lowering import lower_in_export
from tests.served import (
    Reference,
    RunningServer,
    feeds_for,
    metric_value,
    post_answered_early,
    post_later,
    running_server,
)
from tests.tiny import LABELS, SENTENCES, text_batch, tokenizer

ATOL = 0.0  # the default profile (cpu-w8a8) is batch-invariant: padding per batch changes no bit of the logits


@pytest.fixture(scope="module")
def server(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tiny_export, tmp_path_factory.mktemp("serve"), "--max-batch", "8") as running:
        yield running


@pytest.fixture(scope="module")
def reference(tiny_export: Path) -> Reference:
    return Reference(tiny_export / "model.onnx", "cpu-w8a8")


def _triton_inputs(feeds: dict[str, np.ndarray], binary: bool = True) -> list[triton.InferInput]:
    inputs = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def _assert_close(served: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert served.shape == expected.shape, f"{what}: shape {served.shape} != {expected.shape}"
    diff = float(np.abs(served - expected).max())
    assert diff <= ATOL, f"{what}: served logits differ from in-process ORT by {diff}\n{served}\n{expected}"


def test_startup_line_names_the_file_and_profile(server: RunningServer, tiny_export: Path, tmp_path: Path) -> None:
    assert "model.onnx lowered in memory to profile cpu-w8a8 as 'qbert'" in server.log_text(), server.log_text()
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    lower_in_export(export, "cpu-w8a8")
    with running_server(export, tmp_path) as lowered:
        assert "model.cpu-w8a8.onnx (profile cpu-w8a8) as 'qbert'" in lowered.log_text(), lowered.log_text()
        meta = httpx.get(f"{lowered.url}/v2/models/qbert").json()["parameters"]
        assert (meta["model_file"], meta["profile"], meta["lowered_in_memory"]) == (
            "model.cpu-w8a8.onnx", "cpu-w8a8", False), meta


def test_tritonclient_metadata(server: RunningServer) -> None:
    client = triton.InferenceServerClient(server.hostport)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("qbert")
    meta = client.get_model_metadata("qbert")
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [
        ("input_ids", "INT64"), ("attention_mask", "INT64"), ("token_type_ids", "INT64")], meta
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(LABELS)]}], meta
    served = {k: meta["parameters"][k] for k in ("model_file", "profile", "lowered_in_memory")}
    assert served == {"model_file": "model.onnx", "profile": "cpu-w8a8", "lowered_in_memory": True}, meta
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    config = client.get_model_config("qbert")
    assert (config["max_batch_size"], config["output"][0]["dims"]) == (8, [len(LABELS)]), config
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_tritonclient_infer_matches_in_process_ort(server: RunningServer, reference: Reference, binary: bool) -> None:
    client = triton.InferenceServerClient(server.hostport)
    feeds = text_batch()
    outputs = None if binary else [triton.InferRequestedOutput("logits", binary_data=False)]
    result = client.infer("qbert", _triton_inputs(feeds, binary), outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    _assert_close(result.as_numpy("logits"), reference.logits(feeds), "tritonclient infer")
    # gzip request bodies, as tritonclient's request_compression_algorithm sends them
    zipped = client.infer("qbert", _triton_inputs(feeds, binary), request_compression_algorithm="gzip")
    _assert_close(zipped.as_numpy("logits"), reference.logits(feeds), "gzip infer")


def test_text_endpoint_matches_transformers_tokenizer_and_ort(server: RunningServer, reference: Reference) -> None:
    response = httpx.post(f"{server.url}/v2/models/qbert/classify", json={"text": SENTENCES})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    logits = reference.logits(text_batch())  # the HF tokenizer in-process, ORT in-process
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for sentence, prediction, probs in zip(SENTENCES, predictions, expected, strict=True):
        served = np.array([prediction["probabilities"][label] for label in LABELS])
        assert np.abs(served - probs).max() <= 1e-5, f"{sentence!r}: {served} != {probs}"
        assert prediction["label"] == LABELS[int(probs.argmax())], prediction
        assert prediction["truncated"] is False
    one = httpx.post(f"{server.url}/v2/models/qbert/classify", json={"text": SENTENCES[0]}).json()
    assert one["predictions"][0]["probabilities"] == predictions[0]["probabilities"]


def test_long_text_is_truncated_by_default(server: RunningServer, reference: Reference) -> None:
    text = " ".join(["wonderful"] * 400)
    response = httpx.post(f"{server.url}/v2/models/qbert/classify", json={"text": text})
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    assert prediction["truncated"] is True, prediction
    cut = tokenizer()([text], truncation=True, max_length=128, return_tensors="np")  # type: ignore[operator]
    feeds = {k: np.asarray(cut[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert feeds["input_ids"].shape == (1, 128)
    logits = reference.logits(feeds)[0]
    probs = np.exp(logits) / np.exp(logits).sum()
    served = np.array([prediction["probabilities"][label] for label in LABELS])
    assert np.abs(served - probs).max() <= 1e-5, f"{served} != {probs}"


def test_long_text_is_rejected_when_configured(tiny_export: Path, tmp_path: Path) -> None:
    with running_server(tiny_export, tmp_path, "--reject-long-text") as strict:
        url = f"{strict.url}/v2/models/qbert/classify"
        response = httpx.post(url, json={"text": ["fine", " ".join(["long"] * 400)]})
        assert response.status_code == 400, response.text
        assert "text 1 is longer than the model maximum of 128 tokens" in response.json()["error"]
        assert httpx.post(url, json={"text": "fine"}).status_code == 200
        huge = httpx.post(url, json={"text": ["fine", "x" * 9000]})  # refused before it is tokenised
        assert huge.status_code == 400 and "text 1 has 9000 characters, more than the 8192" in huge.json()["error"]


def _ids_tensor(shape: list[int], data: Any, datatype: str = "INT64", name: str = "input_ids") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


BAD_INFER: dict[str, tuple[bytes, int, str]] = {
    "malformed json": (b'{"inputs": [', 400, "malformed JSON"),
    "not utf-8": (b'{"inputs": "\xff\xfe"}', 400, "not valid UTF-8"),
    "wrong dtype": (json.dumps({"inputs": [_ids_tensor([1, 2], [101, 102], "INT32")]}).encode(), 400,
                    "must have datatype INT64"),
    "float data": (json.dumps({"inputs": [_ids_tensor([1, 2], [101.5, 102])]}).encode(), 400, "must hold integers"),
    "1-d shape": (json.dumps({"inputs": [_ids_tensor([2], [101, 102])]}).encode(), 400, "must be 2-D"),
    "count mismatch": (json.dumps({"inputs": [_ids_tensor([1, 3], [101, 102])]}).encode(), 400, "needs 3 values"),
    "shape mismatch": (json.dumps({"inputs": [_ids_tensor([1, 2], [101, 102]),
                                              _ids_tensor([2, 1], [1, 1], name="attention_mask")]}).encode(), 400,
                       "has shape [2, 1]"),
    "empty tensor": (json.dumps({"inputs": [_ids_tensor([1, 0], [])]}).encode(), 400, "empty input"),
    "no inputs": (json.dumps({"inputs": []}).encode(), 400, "has no inputs"),
    "unknown input": (json.dumps({"inputs": [_ids_tensor([1, 1], [1], name="pixels")]}).encode(), 400,
                      "unknown input 'pixels'"),
    "id out of vocab": (json.dumps({"inputs": [_ids_tensor([1, 2], [101, 99999])]}).encode(), 400,
                        "outside [0, 30521]"),
    "too long": (json.dumps({"inputs": [_ids_tensor([1, 129], [101] * 129)]}).encode(), 400,
                 "longer than the model maximum 128"),
    "too many rows": (json.dumps({"inputs": [_ids_tensor([9, 1], [101] * 9)]}).encode(), 400,
                      "larger than the maximum batch of 8"),
    "huge body": (b"[" * (9 << 20), 413, "over the 8388608-byte limit"),
}


@pytest.mark.parametrize("case", list(BAD_INFER))
def test_bad_infer_requests_get_4xx_json_and_the_server_stays_up(server: RunningServer, case: str) -> None:
    body, status, message = BAD_INFER[case]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        if len(body) > (8 << 20):  # refused from its Content-Length, the connection closed: read the answer early
            got, answer = post_answered_early(f"{server.url}/v2/models/qbert/infer", body)
        else:
            response = client.post("/v2/models/qbert/infer", content=body,
                                   headers={"content-type": "application/json"})
            got, answer = response.status_code, response.json()
        assert got == status, f"{case}: {got} {answer}"
        assert message in answer["error"], f"{case}: {answer}"
        good = client.post("/v2/models/qbert/infer", json={"inputs": [_ids_tensor([1, 2], [101, 102])]})
        assert good.status_code == 200, good.text


BAD_TEXT: dict[str, tuple[bytes, int, str]] = {
    "malformed json": (b'{"text": ', 400, "malformed JSON"),
    "not utf-8": (b'{"text": "caf\xe9"}', 400, "not valid UTF-8"),
    "empty list": (b'{"text": []}', 400, "empty input"),
    "not text": (b'{"text": [1, 2]}', 400, "expected {\"text\""),
    "huge body": (b'{"text": "' + b"a " * (5 << 20) + b'"}', 413, "over the 8388608-byte limit"),
}


@pytest.mark.parametrize("case", list(BAD_TEXT))
def test_bad_text_requests_get_4xx_json(server: RunningServer, case: str) -> None:
    body, status, message = BAD_TEXT[case]
    if len(body) > (8 << 20):  # as for /infer: refused from its Content-Length
        got, answer = post_answered_early(f"{server.url}/v2/models/qbert/classify", body)
    else:
        response = httpx.post(f"{server.url}/v2/models/qbert/classify", content=body, timeout=30)
        got, answer = response.status_code, response.json()
    assert got == status, f"{case}: {got} {answer}"
    assert message in answer["error"], f"{case}: {answer}"
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_gzip_bomb_and_unknown_encoding_are_refused(server: RunningServer) -> None:
    url = f"{server.url}/v2/models/qbert/infer"
    bomb = gzip.compress(b" " * (16 << 20))
    response = httpx.post(url, content=bomb, headers={"content-encoding": "gzip"})
    assert response.status_code == 413 and "decompressed" in response.json()["error"], response.text
    response = httpx.post(url, content=b"{}", headers={"content-encoding": "br"})
    assert response.status_code == 415, response.text


def test_metrics_are_exposed(server: RunningServer) -> None:
    httpx.post(f"{server.url}/v2/models/qbert/classify", json={"text": "fine"})
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("qbert_requests_total", "qbert_batch_size_bucket", "qbert_request_latency_seconds_bucket",
                 "qbert_queue_depth"):
        assert name in text, f"{name} missing from /metrics"
    assert metric_value(text, "qbert_batch_size_count") >= 1
    assert metric_value(text, "qbert_queue_depth") == 0


def test_full_queue_answers_503_with_retry_after(tiny_export: Path, tmp_path: Path, reference: Reference) -> None:
    # Each request waits up to 1.5 s for a batch to fill, so two requests hold the queue of two while a third comes.
    args = ("--max-queue", "2", "--max-batch", "32", "--max-delay-ms", "1500")
    with running_server(tiny_export, tmp_path, *args) as slow:
        url = f"{slow.url}/v2/models/qbert/infer"
        ids = [np.array([[101, 2000 + i, 102]]) for i in range(2)]
        results: list[httpx.Response | Exception] = []
        threads = [post_later(url, {"inputs": [_ids_tensor([1, 3], a.reshape(-1).tolist())]}, results) for a in ids]
        deadline = time.monotonic() + 5
        while metric_value(httpx.get(f"{slow.url}/metrics").text, "qbert_queue_depth") < 2:
            assert time.monotonic() < deadline, "the two requests never reached the queue"
            time.sleep(0.02)
        refused = httpx.post(url, json={"inputs": [_ids_tensor([1, 2], [101, 102])]})
        assert refused.status_code == 503, refused.text
        assert refused.headers.get("retry-after") == "1" and "queue is full" in refused.json()["error"]
        for thread in threads:
            thread.join(timeout=30)
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results
        served = sorted(np.asarray(r.json()["outputs"][0]["data"]).tolist() for r in results)  # type: ignore[union-attr]
        expected = sorted(reference.logits(feeds_for(a)).reshape(-1).tolist() for a in ids)
        assert np.abs(np.array(served) - np.array(expected)).max() <= ATOL, (served, expected)
        assert metric_value(httpx.get(f"{slow.url}/metrics").text, "qbert_rejected_queue_full_total") == 1


def test_graceful_shutdown_finishes_in_flight_requests(tiny_export: Path, tmp_path: Path,
                                                       reference: Reference) -> None:
    with running_server(tiny_export, tmp_path, "--max-delay-ms", "1500") as slow:
        results: list[httpx.Response | Exception] = []
        thread = post_later(f"{slow.url}/v2/models/qbert/infer",
                            {"inputs": [_ids_tensor([1, 3], [101, 2054, 102])]}, results)
        deadline = time.monotonic() + 5
        while metric_value(httpx.get(f"{slow.url}/metrics").text, "qbert_queue_depth") < 1:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.02)
        slow.process.send_signal(signal.SIGTERM)  # the request is still waiting for its batch to fill
        thread.join(timeout=30)
        slow.process.wait(timeout=30)
        assert len(results) == 1 and isinstance(results[0], httpx.Response), results
        assert results[0].status_code == 200, results[0].text
        served = np.asarray(results[0].json()["outputs"][0]["data"])
        expected = reference.logits(feeds_for(np.array([[101, 2054, 102]]))).reshape(-1)
        assert np.abs(served - expected).max() <= ATOL, (served, expected)
        assert slow.process.returncode in (0, -signal.SIGTERM), slow.log_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{slow.url}/v2/health/live", timeout=2)


def _binary_request(blob: bytes, size: int) -> bytes:
    header = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2],
                          "parameters": {"binary_data_size": size}}]}
    return json.dumps(header).encode() + blob


BAD_BINARY: dict[str, tuple[bytes, str, str]] = {
    "header length not a number": (_binary_request(b"\0" * 16, 16), "abc", "is not an integer"),
    "header length past the body": (_binary_request(b"\0" * 16, 16), "100000", "does not fit"),
    "binary size past the data": (_binary_request(b"\0" * 8, 16), "", "runs past the binary data"),
    "bytes left over": (_binary_request(b"\0" * 24, 16), "", "belong to no input"),
    "partial value": (_binary_request(b"\0" * 12, 12), "", "not a whole number of INT64 values"),
}


@pytest.mark.parametrize("case", list(BAD_BINARY))
def test_bad_binary_tensors_get_400(server: RunningServer, case: str) -> None:
    body, length, message = BAD_BINARY[case]
    header_length = length or str(body.index(b"}]}") + 3)
    response = httpx.post(f"{server.url}/v2/models/qbert/infer", content=body,
                          headers={"Inference-Header-Content-Length": header_length})
    assert response.status_code == 400, f"{case}: {response.status_code} {response.text}"
    assert message in response.json()["error"], f"{case}: {response.json()}"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_classification_extension(server: RunningServer, reference: Reference, binary: bool) -> None:
    client = triton.InferenceServerClient(server.hostport)
    feeds = text_batch()
    outputs = [triton.InferRequestedOutput("logits", binary_data=binary, class_count=2)]
    result = client.infer("qbert", _triton_inputs(feeds), outputs=outputs)
    served = result.as_numpy("logits")
    logits = reference.logits(feeds)
    assert served.shape == (len(SENTENCES), 2), served.shape
    for row, (entries, expected) in enumerate(zip(served, logits, strict=True)):
        # tritonclient gives bytes from binary BYTES tensors and str from JSON ones
        fields = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in entries]
        order = np.argsort(-expected, kind="stable")
        assert [int(f[1]) for f in fields] == order.tolist(), f"row {row}: {entries} vs {expected}"
        assert [f[2] for f in fields] == [LABELS[i] for i in order], entries
        assert np.allclose([float(f[0]) for f in fields], expected[order], atol=1e-5), (entries, expected)
