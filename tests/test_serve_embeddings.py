"""qbert-serve on a sentence-embedding export: KServe v2, /embed and OpenAI's /v1/embeddings on a real server."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton

from qbert_deploy.runtimes.session import open_session
from tests.served import RunningServer, running_server
from tests.tiny import SENTENCES, text_batch

# Not bitwise: the embedding's mean pooling and normalisation run in float after the last integer GEMM, and ORT's
# vectorised reductions give last-bit differences between a row alone and the same row padded in a batch.
ATOL = 1e-5
HIDDEN = 64


@pytest.fixture(scope="module")
def server(embedding_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(embedding_export, tmp_path_factory.mktemp("serve"), "--max-batch", "8") as running:
        yield running


def reference(export: Path, texts: list[str]) -> tuple[np.ndarray, int]:
    """Direct ORT on the file qbert-serve runs by default on the CPU (the cpu-w8a8 lowering), fed by the
    transformers tokenizer: embeddings and token count."""
    feeds = text_batch(texts)
    session = open_session(export / "model.cpu-w8a8.onnx", threads=1)
    embeddings = session.run(["sentence_embedding"], feeds)[0]
    return np.asarray(embeddings), int(feeds["attention_mask"].sum())


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_the_openai_client_gets_the_embeddings_of_direct_ort(server: RunningServer, embedding_export: Path,
                                                             encoding_format: str) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    answer = client.embeddings.create(model="qbert", input=SENTENCES, encoding_format=encoding_format)  # type: ignore[arg-type]
    expected, tokens = reference(embedding_export, SENTENCES)
    # asked for base64, the client hands the string on as it came: little-endian float32 bytes
    served = np.array([np.frombuffer(base64.b64decode(str(item.embedding)), "<f4") if encoding_format == "base64"
                       else item.embedding for item in answer.data], dtype=np.float32)
    assert [item.index for item in answer.data] == list(range(len(SENTENCES)))
    assert served.shape == (len(SENTENCES), HIDDEN)
    assert np.abs(served - expected).max() <= ATOL
    assert answer.model == "qbert" and answer.usage.prompt_tokens == answer.usage.total_tokens == tokens
    one = client.embeddings.create(model="qbert", input=SENTENCES[1])  # a string; the client's default format
    assert np.abs(np.array(one.data[0].embedding) - expected[1]).max() <= ATOL


def test_openai_errors_have_openai_shape(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="other", input="x")
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model="qbert", input=[])
    url = f"{server.url}/v1/embeddings"
    for body, param in [({"model": "qbert", "input": [1, 2, 3]}, "input"),
                        ({"model": "qbert", "input": [{"text": "x"}]}, "input"),
                        ({"model": "qbert", "input": ["x"] * 9}, "input"),
                        ({"model": "qbert", "input": ["x", " "]}, "input"),
                        ({"model": "qbert", "input": ""}, "input"),
                        ({"model": "qbert", "input": "x", "encoding_format": "int8"}, "encoding_format"),
                        ({"model": "qbert", "input": "x", "dimensions": 3}, "dimensions"),
                        ({"model": "qbert", "input": "x", "colour": 1}, "colour"),
                        ({"input": "x"}, "model")]:
        response = httpx.post(url, json=body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error"
    tokens = httpx.post(url, json={"model": "qbert", "input": ["word " * 200] * 8})  # 8 x 128 tokens fit
    assert tokens.status_code == 200, tokens.text


def test_embed_endpoint_is_batch_invariant(server: RunningServer, embedding_export: Path) -> None:
    url = f"{server.url}/v2/models/qbert/embed"
    batch = httpx.post(url, json={"text": SENTENCES})
    assert batch.status_code == 200, batch.text
    together = np.array([p["embedding"] for p in batch.json()["predictions"]])
    expected, _ = reference(embedding_export, SENTENCES)
    assert np.abs(together - expected).max() <= ATOL
    for text, row in zip(SENTENCES, together, strict=True):
        alone = httpx.post(url, json={"text": text}).json()["predictions"][0]
        assert np.abs(np.array(alone["embedding"]) - row).max() <= ATOL, text
        assert alone["truncated"] is False


def test_kserve_infer_gives_sentence_embedding(server: RunningServer, embedding_export: Path) -> None:
    client = triton.InferenceServerClient(server.hostport)
    meta = client.get_model_metadata("qbert")
    assert meta["outputs"] == [{"name": "sentence_embedding", "datatype": "FP32", "shape": [-1, HIDDEN]}], meta
    assert client.get_model_config("qbert")["output"][0]["dims"] == [HIDDEN]
    feeds = text_batch()
    inputs = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    served = client.infer("qbert", inputs).as_numpy("sentence_embedding")
    expected, _ = reference(embedding_export, SENTENCES)
    assert served is not None and np.abs(served - expected).max() <= ATOL


def test_classification_endpoints_refuse_an_embedding_model(server: RunningServer) -> None:
    for endpoint in ("classify", "tag"):
        response = httpx.post(f"{server.url}/v2/models/qbert/{endpoint}", json={"text": "x"})
        assert response.status_code == 400 and "use /embed" in response.json()["error"], response.text


def test_a_classifier_gives_no_embeddings(tiny_export: Path, tmp_path: Path) -> None:
    with running_server(tiny_export, tmp_path) as classifier:
        response = httpx.post(f"{classifier.url}/v1/embeddings", json={"model": "qbert", "input": "x"})
        assert response.status_code == 400 and "gives no embeddings" in response.json()["error"]["message"]
        embed = httpx.post(f"{classifier.url}/v2/models/qbert/embed", json={"text": "x"})
        assert embed.status_code == 400 and "use /classify" in embed.json()["error"]
