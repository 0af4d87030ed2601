"""Shape buckets: padding to a bucket and slicing back is invisible to the caller (CPU EP, I/O binding included);
the CUDA graph itself only on a GPU (`@pytest.mark.gpu`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qbert_deploy.runtimes.buckets import BucketedSession, ShapeBucketError, ShapeBuckets, pad_feed
from qbert_deploy.runtimes.serving import ServedModel
from qbert_deploy.runtimes.serving.model import softmax
from qbert_deploy.runtimes.session import SessionError, open_session
from tests.served import running_server
from tests.tiny import SENTENCES, text_batch

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
SMALL = ShapeBuckets(batches=(1, 4, 8), sequences=(8, 16, 32))
FEEDS = {"eight padded": text_batch(), "one": text_batch(["one unpadded sentence"]),
         "three padded": text_batch(SENTENCES[2:5]), "five": text_batch(SENTENCES[:5])}


def test_bucket_choice_and_parsing() -> None:
    buckets = ShapeBuckets()
    assert buckets.bucket(1, 7) == (1, 32) and buckets.bucket(2, 33) == (8, 64) and buckets.bucket(32, 256) == (32, 256)
    assert buckets.bucket(33, 10) is None and buckets.bucket(1, 257) is None
    assert ShapeBuckets.parse("1,8X16,128") == ShapeBuckets((1, 8), (16, 128))
    for bad in ("1,8", "a x 2", "8,1x16", "0x16", "1x"):
        with pytest.raises(ShapeBucketError):
            ShapeBuckets.parse(bad)


def test_pad_feed_masks_tokens_and_repeats_the_first_row() -> None:
    feed = {"input_ids": np.array([[5, 6, 7], [8, 9, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    padded = pad_feed(feed, (4, 5), {"input_ids": 3, "attention_mask": 1})
    assert padded["input_ids"].tolist() == [[5, 6, 7, 3, 3], [8, 9, 0, 3, 3], [5, 6, 7, 3, 3], [5, 6, 7, 3, 3]]
    assert padded["attention_mask"][:2].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], "pad tokens are masked"
    with pytest.raises(ShapeBucketError, match="does not fit bucket 1 x 5"):
        pad_feed(feed, (1, 5))


@pytest.mark.parametrize("io_binding", [False, True])
@pytest.mark.parametrize(("profile", "exact"), [("cpu-w8a8", True), (None, False)])
def test_buckets_are_invisible_to_the_caller(tiny_export: Path, profile: str | None, exact: bool,
                                             io_binding: bool) -> None:
    """cpu-w8a8 is batch-invariant (its docstring), so bucketed logits are bitwise the unbucketed ones; the
    canonical graph's attention sums padded keys in another order, so it agrees to float rounding."""
    session = open_session(tiny_export / "model.onnx", threads=1, profile=profile)
    bucketed = BucketedSession(session, SMALL, io_binding=io_binding)
    assert bucketed.get_providers() == ["CPUExecutionProvider"], "other attributes are the session's"
    for label, feed in FEEDS.items():
        expected = session.run(["logits"], feed)[0]
        got = bucketed.run(["logits"], feed)[0]
        assert got.shape == expected.shape, label
        if exact:
            np.testing.assert_array_equal(got, expected, err_msg=label)
        else:
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=label)
    assert bucketed.runs == {"bucketed": len(FEEDS), "unbucketed": 0}


def test_oversize_batches_are_refused_or_run_unbucketed(tiny_export: Path) -> None:
    session = open_session(tiny_export / "model.onnx", threads=1, profile="cpu-w8a8")
    feed = text_batch(SENTENCES * 2)  # 16 rows, more than the largest batch bucket
    with pytest.raises(ShapeBucketError, match=r"batch 16 x sequence \d+ is larger than the largest .* 8 x 32"):
        BucketedSession(session, SMALL).run(["logits"], feed)
    fallback = BucketedSession(session, SMALL, io_binding=True, oversize="unbucketed")
    np.testing.assert_array_equal(fallback.run(["logits"], feed)[0], session.run(["logits"], feed)[0])
    assert fallback.runs == {"bucketed": 0, "unbucketed": 1}
    with pytest.raises(ShapeBucketError, match="'token_type_ids' is missing"):
        fallback.run(["logits"], {k: v for k, v in feed.items() if k != "token_type_ids"})


def test_sequence_outputs_are_sliced_back(tmp_path: Path) -> None:
    """A token-level output [batch, sequence] comes back at the caller's length, through bound buffers too."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["ids_float"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["ids_float", "attention_mask_float"], ["token_scores"]),
         helper.make_node("Cast", ["attention_mask"], ["attention_mask_float"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["token_scores"], ["pooled"], keepdims=0, axes=[1])],
        "tokens",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("token_scores", TensorProto.FLOAT, ["batch", "sequence"]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch"])])
    graph.node.sort(key=lambda n: n.output[0] != "attention_mask_float")
    path = tmp_path / "tokens.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=8), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([[4, 5, 6], [7, 8, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    for io_binding in (False, True):
        scores, pooled = BucketedSession(session, SMALL, io_binding=io_binding).run(None, feed)
        assert scores.tolist() == [[4, 5, 6], [7, 8, 0]] and pooled.tolist() == [15, 15], io_binding


def test_server_buckets_are_invisible(tiny_export: Path) -> None:
    plain = ServedModel(tiny_export)
    bucketed = ServedModel(tiny_export, shape_buckets=SMALL)
    assert isinstance(bucketed.session, BucketedSession)
    for label, feed in {**FEEDS, "sixteen (beyond the largest bucket)": text_batch(SENTENCES * 2)}.items():
        np.testing.assert_array_equal(bucketed.run(feed), plain.run(feed), err_msg=label)
    assert bucketed.session.runs["unbucketed"] == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--shape-buckets", "8,1x32"], "batch buckets must be positive, distinct and ascending, got [8, 1]"),
    (["--shape-buckets", "32"], "expected BATCHES x SEQUENCES"),
    (["--cuda-graph"], "CUDA graphs need the cuda provider; cpu would run")])
def test_serve_bucket_options_are_one_line_errors(tiny_export: Path, args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "qbert_deploy.cli.serve", str(tiny_export), "--port", "0", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("qbert-serve: error:"), done
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_graph_needs_the_cuda_provider(tiny_export: Path) -> None:
    with pytest.raises(SessionError, match="CUDA graphs need the cuda provider, not CPUExecutionProvider"), \
            pytest.warns(UserWarning, match="falling back to CPUExecutionProvider"):
        open_session(tiny_export / "model.onnx", providers=("cuda", "cpu"), allow_fallback=True, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and onnxruntime-gpu")
@pytest.mark.parametrize("profile", ["cuda-fp16", "cuda-fused"])
def test_cuda_graph_buckets_match_plain_cuda_runs(tiny_export: Path, profile: str) -> None:
    plain = open_session(tiny_export / "model.onnx", providers=("cuda",), profile=profile)
    graphed = BucketedSession(open_session(tiny_export / "model.onnx", providers=("cuda",), profile=profile,
                                           cuda_graph=True), SMALL)
    assert graphed.cuda_graph and graphed.io_binding
    for _ in range(2):  # the first run of a bucket captures its graph, the second replays it
        for label, feed in FEEDS.items():
            expected = plain.run(["logits"], feed)[0]
            got = graphed.run(["logits"], feed)[0]
            np.testing.assert_allclose(got, expected, rtol=0, atol=2e-2, err_msg=label)
            assert (got.argmax(-1) == expected.argmax(-1)).all(), label


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and onnxruntime-gpu")
def test_serves_with_cuda_graphs(tiny_export: Path, tmp_path: Path) -> None:
    import httpx

    expected = ServedModel(tiny_export, providers=("cuda",))
    with running_server(tiny_export, tmp_path, "--providers", "cuda", "--cuda-graph") as server:
        for text in ("fine", "a gorgeous, moving film that i would see again"):
            response = httpx.post(f"{server.url}/v2/models/qbert/classify", json={"text": text})
            assert response.status_code == 200, response.text
            want = softmax(expected.run(expected.encode([text]).feeds))[0]
            got = response.json()["predictions"][0]["probabilities"]
            np.testing.assert_allclose([got[label] for label in expected.labels], want, rtol=0, atol=1e-3)
