"""Token classification (CoNLL) and extractive QA (SQuAD v1.1) through every command, on tiny random BERTs."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertForTokenClassification, BertModel, pipeline

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.cli.export import main as export_main
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.cli.validate import main as validate_main
from qbert_deploy.data.conll import read_conll, read_tags, tag_names
from qbert_deploy.data.features import decode_answers, qa_features
from qbert_deploy.metrics import normalize_answer, squad_scores, tagging_scores
from qbert_deploy.runtimes.serving.model import ServedModel
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.runtimes.triton_repo import write_triton_repo
from qbert_deploy.tasks import QA, TOKEN, entities
from tests.served import RunningServer, running_server
from tests.stack import needs_optimum
from tests.task_files import TAGS, questions, write_conll_pair, write_squad_pair
from tests.task_files import quantize_refused as _refused
from tests.tiny import save_hf_dir, tiny_config, tokenizer

FAST = ["--finetune-steps", "3", "--qat-steps", "2", "--hessian-subsets", "2", "--hessian-batch", "4",
        "--hessian-iters", "3", "--calibration-batches", "1", "--batch-size", "4", "--groups", "4",
        "--avg-bits", "3", "--bit-choices", "2,4"]


# ---- metrics and readers ----

def test_squad_normalisation_and_scores() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple and a pear") == "apple and pear"
    assert normalize_answer("Theory") == "theory", "articles are removed as whole words only"
    scores = squad_scores(["the Eiffel Tower", "in Paris France", "nothing"],
                          [["Eiffel Tower"], ["Paris", "Paris, France"], ["something"]])
    assert scores["exact_match"] == pytest.approx(100 / 3)
    # second: best of F1("in paris france", "paris") = 0.5 and F1(.., "paris france") = 0.8
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)


def test_tagging_scores_are_entity_level() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-LOC"]]  # the person is cut short: a wrong entity
    scores = tagging_scores(pred, gold)
    assert scores["entity_precision"] == pytest.approx(200 / 3) and scores["entity_recall"] == pytest.approx(200 / 3)
    assert scores["entity_f1"] == pytest.approx(200 / 3)
    assert scores["token_accuracy"] == pytest.approx(100 * 5 / 6)
    assert entities(["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 4),
                                                                            ("LOC", 5, 5)]


def test_conll_reader_takes_the_last_column_and_skips_docstart(tmp_path: Path) -> None:
    train, _ = write_conll_pair(tmp_path)
    sentences = read_tags(train)
    assert sentences[0][:2] == [("john", "B-PER"), ("smith", "I-PER")]
    assert tag_names(sentences) == ["O", "B-LOC", "B-PER", "I-PER"]
    assert len(read_conll(train, TAGS)) == len(sentences) == 24


def test_doc_stride_windows_find_an_answer_in_a_long_context() -> None:
    long = [q for q in questions() if q.id == "long"]
    features = qa_features(tokenizer(), long, max_length=48, stride=12)
    assert len(features.question_of) > 2, "a long context must be cut into several windows"
    inside = [r for r in range(len(features.question_of)) if features.positions[r, 0] > 0]
    assert inside, "some window must hold the answer"
    row = inside[0]
    logits = np.full((len(features.question_of), 48, 2), -10.0)
    logits[row, features.positions[row, 0], 0] = logits[row, features.positions[row, 1], 1] = 10.0
    assert decode_answers(logits, features, long)[0].text == "under the old oak tree"


# ---- the commands end to end ----

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(0)
    save_hf_dir(BertModel(tiny_config()), root / "model")
    write_conll_pair(root)
    write_squad_pair(root)
    return root


def _suffix(task: str) -> str:
    return "conll" if task == TOKEN else "json"


@pytest.fixture(scope="module")
def exported(workdir: Path) -> dict[str, Path]:
    """qbert-quantize (task inferred from the data) then qbert-export --lower cpu-w8a8, for both tasks."""
    out = {}
    for task in (TOKEN, QA):
        ext = _suffix(task)
        run = workdir / f"run-{task}"
        assert quantize_main(["--model", str(workdir / "model"), "--train", str(workdir / f"train.{ext}"),
                              "--dev", str(workdir / f"dev.{ext}"), *FAST, "-o", str(run)]) == 0
        assert export_main([str(run / "model.pt"), "-o", str(workdir / f"export-{task}"), "--lower", "cpu-w8a8"]) == 0
        out[task] = workdir / f"export-{task}"
    return out


@pytest.mark.parametrize("task", [TOKEN, QA])
def test_quantize_export_validate(workdir: Path, exported: dict[str, Path], task: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = load_checkpoint(workdir / f"run-{task}" / "model.pt")
    assert checkpoint.task == task
    metric = "entity_f1" if task == TOKEN else "f1"
    assert {f"dev_{metric}_fp32", f"dev_{metric}_quantized"} <= set(checkpoint.metrics), checkpoint.metrics
    config = json.loads((exported[task] / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification" if task == TOKEN else "BertForQuestionAnswering"]
    report = workdir / f"report-{task}"
    capsys.readouterr()
    assert validate_main([str(exported[task]), "--checkpoint", str(workdir / f"run-{task}" / "model.pt"),
                          "--data", str(workdir / f"dev.{_suffix(task)}"), "--profile", "canonical,cpu-w8a8",
                          "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((report / "report.json").read_text())
    backends = {b["name"]: b for b in data["backends"]}
    assert set(backends) >= {"pytorch-fp32", "pytorch-fakequant", "ort-spec", "ort-cpu-canonical",
                             "ort-cpu-cpu-w8a8"}
    agreements = ["token_agreement", "entity_set_agreement"] if task == TOKEN else ["start_end_agreement",
                                                                                    "span_agreement"]
    for name, b in backends.items():
        assert b["metric"] == metric and metric in b["metrics"], b
        assert list(b["agreements_fakequant"]) == agreements
        if name.startswith("ort-"):
            assert b["metrics"] == backends["pytorch-fakequant"]["metrics"], name
            assert b["agreements_fakequant"][agreements[0]] >= 99.0, b
    assert ("entity f1 %" if task == TOKEN else "exact match %") in printed, printed


def test_gate_works_on_the_task_metric(workdir: Path, exported: dict[str, Path], tmp_path: Path) -> None:
    args = [str(exported[TOKEN]), "--checkpoint", str(workdir / f"run-{TOKEN}" / "model.pt"), "--data",
            str(workdir / "dev.conll")]
    assert validate_main([*args, "--write-baseline", str(tmp_path / "b.json")]) == 0
    baseline = json.loads((tmp_path / "b.json").read_text())
    for entry in baseline["backends"].values():
        entry["accuracy"] = min(100.0, entry["accuracy"] + 5.0)  # a baseline 5 points of entity F1 better
    (tmp_path / "raised.json").write_text(json.dumps(baseline))
    assert validate_main([*args, "--baseline", str(tmp_path / "raised.json"), "--max-drop", "1"]) == 1
    assert validate_main([*args, "--baseline", str(tmp_path / "raised.json"), "--max-drop", "6"]) == 0


# ---- bad inputs: one line, exit 2, nothing written ----

def test_bad_conll_squad_and_task_are_refused(workdir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model = ["--model", str(workdir / "model"), "--bits", "4"]
    conll, squad = workdir / "dev.conll", workdir / "dev.json"
    unknown = tmp_path / "unknown.conll"
    unknown.write_text("john B-PER\nvisits O\nrome B-CITY\n")
    _refused(capsys, [*model, "--train", str(conll), "--dev", str(unknown), "--labels", ",".join(TAGS)],
             tmp_path / "o1", "tag 'B-CITY' is not one of the model's tags")
    untagged = tmp_path / "untagged.txt"
    untagged.write_text("john B-PER\nvisits\n")
    _refused(capsys, [*model, "--train", str(untagged), "--dev", str(conll)], tmp_path / "o2", "has no tag")
    data = json.loads(squad.read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    (tmp_path / "shifted.json").write_text(json.dumps(data))
    _refused(capsys, [*model, "--train", str(squad), "--dev", str(tmp_path / "shifted.json")], tmp_path / "o3",
             "not at the answer text")
    del data["data"][0]["paragraphs"][0]["context"]
    (tmp_path / "nocontext.json").write_text(json.dumps(data))
    _refused(capsys, [*model, "--train", str(tmp_path / "nocontext.json"), "--dev", str(squad)], tmp_path / "o4",
             "has no context")
    torch.manual_seed(0)
    tagger = tmp_path / "tagger"
    save_hf_dir(BertForTokenClassification(tiny_config()), tagger)
    _refused(capsys, ["--model", str(tagger), "--bits", "4", "--task", "question-answering", "--train", str(squad),
                      "--dev", str(squad)], tmp_path / "o5", "contradicts the model's head")


def test_validate_refuses_data_of_another_task(workdir: Path, exported: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert validate_main([str(exported[TOKEN]), "--checkpoint", str(workdir / f"run-{TOKEN}" / "model.pt"),
                          "--data", str(workdir / "dev.json")]) == 2
    err = capsys.readouterr().err
    assert "question-answering data file, but the model is token-classification" in err, err


# ---- serving, Triton, Optimum ----

@pytest.fixture(scope="module")
def servers(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningServer]]:
    logs = tmp_path_factory.mktemp("serve-tasks")
    with running_server(exported[TOKEN], logs) as tagger, running_server(exported[QA], logs) as reader:
        yield {TOKEN: tagger, QA: reader}


def test_served_tag_agrees_with_in_process_ort(exported: dict[str, Path], servers: dict[str, RunningServer]) -> None:
    texts = ["john smith went to paris .", "in london mary met a friend"]
    response = httpx.post(f"{servers[TOKEN].url}/v2/models/qbert/tag", json={"text": texts}, timeout=30)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    local = ServedModel(exported[TOKEN])  # in-process ORT on the same file, with the same tokenizer
    encoded = local.encode(texts)
    logits = open_session(exported[TOKEN] / "model.onnx").run(["logits"], encoded.feeds)[0]
    for text, prediction, row, encoding in zip(texts, predictions, logits, encoded.encodings, strict=True):
        expected = local.tag(row, encoding, text, local.labels)
        got = prediction["entities"]
        assert [(e["entity"], e["start"], e["end"]) for e in got] == [(e["entity"], e["start"], e["end"])
                                                                       for e in expected]
        for e, x in zip(got, expected, strict=True):
            assert e["text"] == text[e["start"]:e["end"]] and abs(e["score"] - x["score"]) < 1e-5
    wrong = httpx.post(f"{servers[TOKEN].url}/v2/models/qbert/answer", json={"question": "a", "context": "b"})
    assert wrong.status_code == 400 and "use /tag" in wrong.json()["error"], wrong.text


def test_served_answer_agrees_with_in_process_ort(exported: dict[str, Path],
                                                  servers: dict[str, RunningServer]) -> None:
    qs = questions()
    body = {"question": [q.question for q in qs], "context": [q.context for q in qs]}
    response = httpx.post(f"{servers[QA].url}/v2/models/qbert/answer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    local = ServedModel(exported[QA])
    encoded = local.encode_questions(body["question"], body["context"])
    session = open_session(exported[QA] / "model.onnx")
    start, end = session.run(["start_logits", "end_logits"], encoded.feeds)
    expected = local.answers(np.stack([start, end], axis=-1), encoded, body["context"])
    assert len(predictions) == len(qs)
    for q, got, want in zip(qs, predictions, expected, strict=True):
        assert (got["answer"], got["start"], got["end"]) == (want.text, want.start, want.end)
        assert got["answer"] == q.context[got["start"]:got["end"]] and 0.0 <= got["score"] <= 1.0
        assert abs(got["score"] - want.score) < 1e-5
    # the KServe v2 tensors: both outputs, each [batch, sequence]
    feeds = {k: v[:2].tolist() for k, v in encoded.feeds.items()}
    infer = {"inputs": [{"name": k, "shape": [2, len(v[0])], "datatype": "INT64", "data": v}
                        for k, v in feeds.items()]}
    result = httpx.post(f"{servers[QA].url}/v2/models/qbert/infer", json=infer, timeout=30).json()
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in result["outputs"]}
    assert set(outputs) == {"start_logits", "end_logits"}
    assert np.abs(outputs["start_logits"] - start[:2]).max() < 1e-5


@pytest.mark.parametrize("task", [TOKEN, QA])
def test_triton_repo_names_the_task_outputs(exported: dict[str, Path], tmp_path: Path, task: str) -> None:
    repo = write_triton_repo(exported[task], tmp_path / "repo")
    text = repo.config.read_text()
    if task == TOKEN:
        assert 'name: "logits"' in text and f"dims: [ -1, {len(TAGS)} ]" in text and "label_filename" not in text
    else:
        assert 'name: "start_logits"' in text and 'name: "end_logits"' in text and "label_filename" not in text


@needs_optimum
def test_optimum_loads_both_exports_and_pipelines_run(exported: dict[str, Path], tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from optimum.onnxruntime import ORTModelForQuestionAnswering, ORTModelForTokenClassification

        tagger = ORTModelForTokenClassification.from_pretrained(shutil.copytree(exported[TOKEN], tmp_path / "t"))
        reader = ORTModelForQuestionAnswering.from_pretrained(shutil.copytree(exported[QA], tmp_path / "q"))
    tag = pipeline("token-classification", model=tagger, tokenizer=AutoTokenizer.from_pretrained(exported[TOKEN]))
    text = "john smith went to paris ."
    local = ServedModel(exported[TOKEN])
    encoded = local.encode([text])
    logits = open_session(exported[TOKEN] / "model.onnx").run(["logits"], encoded.feeds)[0][0]
    found = tag(text)
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for entity in found:  # every token the pipeline tags carries in-process ORT's probability for that tag
        assert abs(entity["score"] - expected[entity["index"]].max()) < 1e-5, (entity, expected[entity["index"]])
    answer = pipeline("question-answering", model=reader, tokenizer=AutoTokenizer.from_pretrained(exported[QA]))
    q = questions()[0]
    result = answer(question=q.question, context=q.context)
    assert result["answer"] == q.context[result["start"]:result["end"]] and 0 <= result["score"] <= 1


def test_checkpoint_records_the_task_and_old_files_are_classifiers(tmp_path: Path) -> None:
    from qbert_deploy.checkpoint import save_checkpoint
    from qbert_deploy.safetensors_format import save_safetensors_checkpoint
    from tests.tiny import tiny_checkpoint

    old = tiny_checkpoint()
    save_checkpoint(old, tmp_path / "old.pt")
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    assert "task" not in payload, "a sequence classifier's model.pt is written exactly as before"
    assert load_checkpoint(tmp_path / "old.pt").task == "sequence-classification"
    for task in (TOKEN, QA):
        model = BertForTokenClassification(tiny_config()) if task == TOKEN else None
        if model is None:
            from transformers import BertForQuestionAnswering

            model = BertForQuestionAnswering(tiny_config())
        from qbert_deploy.models.build import build_model, make_checkpoint

        checkpoint = make_checkpoint(model, old.recipe, ["O", "B-X"] if task == TOKEN else ["start", "end"],
                                     old.tokenizer_files, task=task)
        save_checkpoint(checkpoint, tmp_path / f"{task}.pt")
        save_safetensors_checkpoint(checkpoint, tmp_path / f"{task}-st")
        for path in (tmp_path / f"{task}.pt", tmp_path / f"{task}-st"):
            loaded = load_checkpoint(path)
            assert loaded.task == task and loaded.digest() == checkpoint.digest()
        assert type(build_model(loaded, quantized=False)).__name__ == type(model).__name__
    payload["task"] = "summarization"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="'task' must be one of"):
        load_checkpoint(tmp_path / "bad.pt")


def test_movie_task_labels_follow_the_valence_threshold() -> None:
    from qbert_deploy.data.movie_tasks import _word_tag

    lexicon = {"great": 3.1, "fine": 0.8, "dull": -1.7}
    assert _word_tag('"Great,', lexicon) == ("B-POS", 3.1, "Great")
    assert _word_tag("fine", lexicon)[0] == "O", "below the 1.0 threshold"
    assert _word_tag("dull.", lexicon)[:2] == ("B-NEG", -1.7)
    assert _word_tag("plot", lexicon) == ("O", 0.0, "plot")
