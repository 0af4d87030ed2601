"""Issue 20 (4): --augment's word replacement and deletion, from the training split only, for distillation only."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from qbert_deploy.checkpoint import load_checkpoint
from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.data.augment import WORD, augment, vocabulary
from qbert_deploy.data.tsv import Example, write_tsv
from qbert_deploy.models.task import Task, with_augmented_text
from tests.task_files import quantize_refused
from tests.tiny import SENTENCES, tokenizer, write_tiny_task

FAST = ["--finetune-steps", "2", "--calibration-batches", "1", "--batch-size", "4", "--groups", "4"]
DEV_ONLY = ["zeppelin", "quixotic", "marzipan"]  # words no training sentence has


def _words(text: str) -> set[str]:
    return {m[2].lower() for token in text.split() if (m := WORD.match(token))}


def test_variants_differ_from_their_sentence_and_use_only_training_words() -> None:
    variants = augment(SENTENCES, 3, seed=0)
    train_words = set(vocabulary(SENTENCES))
    assert train_words == set().union(*map(_words, SENTENCES)) and "gorgeous" in train_words
    assert [len(v) for v in variants] == [3] * len(SENTENCES)
    for sentence, own in zip(SENTENCES, variants, strict=True):
        for variant in own:
            assert variant != sentence and variant.split()
            assert _words(variant) <= train_words, variant
    assert augment(["Horrible."], 1)[0][0].endswith("."), "the punctuation around a replaced word stays"
    assert augment(SENTENCES, 3, seed=0) == variants, "the same seed gives the same variants"
    assert augment(SENTENCES, 3, seed=1) != variants
    assert augment(SENTENCES, 0) == [[] for _ in SENTENCES]


def test_both_edits_happen_at_about_the_asked_rate() -> None:
    names = [f"{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(400)]  # 400 distinct letter words
    sentence, other = " ".join(names[:200]), " ".join(names[200:])
    (variant,) = augment([sentence, other], 1, probability=0.3, seed=0)[0]
    words = variant.split()
    assert 0.85 * 200 < len(words) < 0.98 * 200, "about 0.3 x 1/4 = 7.5% of the words are deleted"
    # 0.3 x 3/4 of the words are replaced, half of them by one of the other sentence's words: about 22
    assert 10 < len(set(words) - set(names[:200])) < 40


def test_augmentation_never_sees_the_dev_data() -> None:
    # The function takes the training texts and nothing else: no path, no dev split, no task.
    assert list(inspect.signature(augment).parameters) == ["train_texts", "copies", "probability", "seed"]
    train = [Example(s, i % 2) for i, s in enumerate(SENTENCES)]
    dev = [Example(f"{word} is a {word}", 0) for word in DEV_ONLY]
    task = Task(tokenizer(), train, dev, ["negative", "positive"], batch_size=4)
    augmented = with_augmented_text(task, 4, 1.0, seed=0)  # every word changed: the vocabulary shows itself
    assert len(augmented.distill_only) == 4 * len(train)
    seen = set().union(*(_words(e.text) for e in augmented.distill_only))
    assert not seen & set(DEV_ONLY)
    assert seen <= set(vocabulary(SENTENCES))
    assert not [e for e in augmented.distill_only if any(word in e.text for word in DEV_ONLY)]
    assert augmented.dev == dev and augmented.train == train
    assert augmented.steps_per_epoch() == 5 * task.steps_per_epoch()
    assert sum(len(labels) for _, labels in augmented.train_batches(0)) == 5 * len(train)
    assert augmented.input_batches(1, 0)[0]["input_ids"].shape[0] == 4, "calibration draws on the originals"
    assert augmented.cache_key() != task.cache_key()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_tiny_task(tmp_path_factory.mktemp("augment"))
    write_tsv(root / "dev.tsv", [Example(f"a {word} film", i % 2) for i, word in enumerate(DEV_ONLY)])
    return root


def _data(tiny_dir: Path) -> list[str]:
    return ["--model", str(tiny_dir / "model"), "--train", str(tiny_dir / "train.tsv"),
            "--dev", str(tiny_dir / "dev.tsv")]


def test_qbert_distils_on_augmented_text(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert quantize_main([*_data(tiny_dir), *FAST, "--bits", "8", "--epochs", "1", "--augment", "1",
                          "-o", str(out)]) == 0
    log = (out / "quantize.log").read_text()
    assert "--augment 1: 32 variants of the 32 training examples (p = 0.3) join the distillation batches" in log
    assert load_checkpoint(out / "model.pt").metrics["qat_steps"] == 16, "an epoch covers the variants too"


@pytest.mark.parametrize("args, message", [
    (["--bits", "4", "--augment", "1", "--distill", "none"], "--augment adds text for the distillation loss, and "
                                                             "this run does not distil"),
    (["--method", "q8bert", "--bits", "8", "--augment", "2"], "this run does not distil"),
    (["--method", "ptq-mse", "--bits", "4", "--augment", "1"], "--method ptq-mse does not train"),
    (["--method", "directq", "--bits", "4", "--augment", "1"], "--method directq does not train"),
])
def test_augment_without_distillation_is_refused_in_one_line(tiny_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str], args: list[str],
                                                              message: str) -> None:
    quantize_refused(capsys, [*_data(tiny_dir), *args], tmp_path / "out", message)


@pytest.mark.parametrize("args, message", [
    (["--augment", "-1"], "argument --augment: must be at least 0, got -1"),
    (["--augment", "1", "--augment-probability", "0"], "argument --augment-probability: must be in (0, 1], got 0"),
])
def test_bad_augment_values_are_refused_by_the_parser(tiny_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], args: list[str],
                                                      message: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        quantize_main([*_data(tiny_dir), "--bits", "4", *args, "-o", str(out)])
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()
