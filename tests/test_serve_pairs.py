"""Issue 18, item 4: /classify serves a sentence-pair model: {"text": ..., "text_pair": ...}, batched like single texts.

model.pt records whether the model was trained on pairs and the export copies it into the ONNX metadata
(qbert.text_pairs), so the server takes the form the model reads and refuses the other with a 400; a field
/classify does not read is a 400 too (it was ignored before, and a pair model answered on the first text alone).
Real qbert-quantize and qbert-export runs on a tiny random BERT and QNLI / SST-2 files in GLUE's layouts, real
qbert-serve processes, real HTTP clients; answers are checked against in-process ORT fed by transformers' own pair
tokenisation (what training used).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from transformers import BertModel

from qbert_deploy.cli.export import main as export_main
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.runtimes.serving.model import softmax
from qbert_deploy.runtimes.trained_length import TEXT_PAIRS_KEY, read_metadata, trained_max_length
from tests.served import Reference, RunningServer, metric_value, post_later, running_server
from tests.task_files import QUICK, SENTENCE_PAIRS, write_glue
from tests.tiny import save_hf_dir, tiny_config, tokenizer

MAX_LENGTH = 64  # qbert-quantize's default --max-length, recorded in the export: what the server cuts at


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pairs")
    torch.manual_seed(0)
    save_hf_dir(BertModel(tiny_config()), root / "model")
    out = {}
    for task in ("QNLI", "SST-2"):
        train, dev = write_glue(root, task)
        run = root / f"run-{task}"
        assert quantize_main(["--model", str(root / "model"), "--train", str(train), "--dev", str(dev), *QUICK,
                              "-o", str(run)]) == 0
        assert export_main([str(run / "model.pt"), "-o", str(root / f"export-{task}")]) == 0
        out[task] = root / f"export-{task}"
    return out


@pytest.fixture(scope="module")
def servers(exports: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningServer]]:
    logs = tmp_path_factory.mktemp("serve-pairs")
    with running_server(exports["QNLI"], logs, "--max-delay-ms", "50") as pairs, \
            running_server(exports["SST-2"], logs) as single:
        yield {"pairs": pairs, "single": single}


def _expected(export: Path, texts: list[str], pairs: list[str]) -> np.ndarray:
    """In-process ORT on the served profile, fed by transformers' pair encoding (truncation=True: longest first)."""
    encoded = tokenizer()(texts, pairs, padding=True, truncation=True, max_length=MAX_LENGTH,  # type: ignore[operator]
                          return_tensors="np")
    feeds = {k: np.asarray(encoded[k], dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    return softmax(Reference(export / "model.onnx", "cpu-w8a8").logits(feeds))


def _classify(server: RunningServer, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/qbert/classify", json=body, timeout=30)


def test_the_export_records_which_text_form_the_model_reads(exports: dict[str, Path]) -> None:
    assert trained_max_length(exports["QNLI"]) == MAX_LENGTH
    assert read_metadata(exports["QNLI"] / "model.onnx")[TEXT_PAIRS_KEY] == "true"
    assert read_metadata(exports["SST-2"] / "model.onnx")[TEXT_PAIRS_KEY] == "false"


def test_served_pairs_agree_with_in_process_ort(exports: dict[str, Path], servers: dict[str, RunningServer]) -> None:
    long = " ".join(["the film was long"] * 40)  # 160 tokens: the longer text of the pair loses the rest
    texts = [a for a, _ in SENTENCE_PAIRS] + [long]
    pairs = [b for _, b in SENTENCE_PAIRS] + ["short"]
    response = _classify(servers["pairs"], {"text": texts, "text_pair": pairs})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected = _expected(exports["QNLI"], texts, pairs)
    assert len(predictions) == len(texts)
    for got, want in zip(predictions, expected, strict=True):
        assert list(got["probabilities"]) == ["entailment", "not_entailment"]
        assert np.abs(np.array(list(got["probabilities"].values())) - want).max() < 1e-5, (got, want)
    assert [p["truncated"] for p in predictions] == [False] * len(SENTENCE_PAIRS) + [True]
    one = _classify(servers["pairs"], {"text": texts[0], "text_pair": pairs[0]})  # one pair, not lists
    assert one.status_code == 200 and one.json()["predictions"][0] == predictions[0], one.text
    # the second text matters: the same first text with another pair is another answer
    swapped = _classify(servers["pairs"], {"text": texts[0], "text_pair": pairs[1]}).json()["predictions"][0]
    assert swapped["probabilities"] != predictions[0]["probabilities"]
    meta = httpx.get(f"{servers['pairs'].url}/v2/models/qbert").json()["parameters"]
    assert meta["text_pairs"] is True and meta["max_sequence_length"] == MAX_LENGTH


def test_concurrent_pair_requests_are_batched(exports: dict[str, Path], servers: dict[str, RunningServer]) -> None:
    url = f"{servers['pairs'].url}/v2/models/qbert/classify"
    before = metric_value(httpx.get(f"{servers['pairs'].url}/metrics").text, "qbert_batch_requests_count")
    runs_before = metric_value(httpx.get(f"{servers['pairs'].url}/metrics").text, "qbert_batch_requests_sum")
    answers: list[list[httpx.Response | Exception]] = [[] for _ in SENTENCE_PAIRS]
    threads = [post_later(url, {"text": a, "text_pair": b}, answer)
               for (a, b), answer in zip(SENTENCE_PAIRS, answers, strict=True)]
    for thread in threads:
        thread.join()
    text = httpx.get(f"{servers['pairs'].url}/metrics").text
    batches = metric_value(text, "qbert_batch_requests_count") - before
    requests = metric_value(text, "qbert_batch_requests_sum") - runs_before
    assert requests == len(SENTENCE_PAIRS) and batches < requests, (batches, requests)  # merged into fewer runs
    expected = _expected(exports["QNLI"], [a for a, _ in SENTENCE_PAIRS], [b for _, b in SENTENCE_PAIRS])
    for (response,), want in zip(answers, expected, strict=True):
        assert isinstance(response, httpx.Response) and response.status_code == 200, response
        got = response.json()["predictions"][0]["probabilities"]
        assert np.abs(np.array(list(got.values())) - want).max() < 1e-5, (got, want)


@pytest.mark.parametrize(("server", "body", "message"), [
    ("pairs", {"text": "a question?"}, 'this model was trained on sentence pairs: send {"text": ..., "text_pair"'),
    ("pairs", {"text": ["a", "b"], "text_pair": ["c"]}, "2 texts but 1 text_pair values"),
    ("pairs", {"text": "a", "text_pair": 3}, 'expected {"text_pair": "a second sentence"}'),
    ("pairs", {"text": "a", "text_pair": "b", "texts_pair": "c"}, "unknown field 'texts_pair'; this endpoint reads "
                                                                  "'text', 'text_pair'"),
    ("single", {"text": "fine", "text_pair": "ignored before"}, "this model was trained on single texts"),
    ("single", {"text": "fine", "top_k": 2}, "unknown field 'top_k'"),
])
def test_the_wrong_form_and_unknown_fields_are_400(servers: dict[str, RunningServer], server: str,
                                                   body: dict[str, object], message: str) -> None:
    response = _classify(servers[server], body)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_single_text_model_still_classifies_text(servers: dict[str, RunningServer]) -> None:
    response = _classify(servers["single"], {"text": ["fine", "dull"]})
    assert response.status_code == 200, response.text
    assert list(response.json()["predictions"][0]["probabilities"]) == ["negative", "positive"]
