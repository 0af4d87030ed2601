"""Issue 20 (1, 2): the pruned model's epoch budget, and the search's target on Zhu & Gupta's cubic schedule."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qbert_deploy.cli.quantize import main as quantize_main
from qbert_deploy.models.aqbert import RAMP_FRACTION, CostModel, Target, ramp_steps, scheduled_target, search
from tests.test_aqbert_search import SETTINGS, _batches, _calibration, _fp32
from tests.tiny import write_tiny_task

FAST = ["--finetune-steps", "2", "--calibration-batches", "1", "--batch-size", "4", "--groups", "4",
        "--search-steps", "2"]


@pytest.mark.parametrize("final", [0.3, 0.5, 1.0])
def test_the_schedule_starts_whole_falls_monotonically_and_stays_at_the_final_value(final: float) -> None:
    ramp = ramp_steps(100)
    assert ramp == round(RAMP_FRACTION * 100) == 70
    values = [scheduled_target(final, step, ramp) for step in range(100)]
    assert values[0] == 1.0
    assert all(b <= a for a, b in itertools.pairwise(values)), "never rises"
    assert values[ramp] == final and all(v == final for v in values[ramp:]), "exactly the final value from T_ramp"
    if final < 1:
        assert values[ramp - 1] > final and values[ramp // 2] < (1 + final) / 2, "cubic: most of the fall comes early"
    assert ramp_steps(1) == 1 and scheduled_target(final, 1, ramp_steps(1)) == final


@pytest.mark.parametrize("target", [Target(keep_macs=0.5), Target(keep_macs=0.3)], ids=["work0.5", "work0.3"])
def test_a_short_search_ends_with_its_expected_work_within_the_target(target: Target) -> None:
    result, _ = search(_fp32(), _batches(4, 0), _batches(4, 1), _calibration(), target, SETTINGS)
    assert result.ramp_steps == ramp_steps(SETTINGS.steps) < SETTINGS.steps
    assert target.keep_macs is not None
    assert result.expected[1] <= target.keep_macs, f"the relaxed choice keeps {result.expected[1]:.3f} of the work"
    assert result.macs_kept <= target.keep_macs


def test_the_first_step_asks_for_no_pruning() -> None:
    one_step = replace(SETTINGS, steps=1)
    runs = [search(_fp32(), _batches(4, 0), _batches(4, 1), _calibration(), Target(keep_macs=keep), one_step)[0]
            for keep in (0.3, 1.0)]
    assert runs[0].expected == runs[1].expected, "at step 0 the target is the whole model, whatever the final one"


def test_a_size_target_is_scheduled_too() -> None:
    fp32 = _fp32()
    cost = CostModel.of(fp32, SETTINGS.ffn_block, SETTINGS.column_bits, 8)
    budget = (cost.min_size_mb + cost.full_size_mb) / 2
    result, _ = search(fp32, _batches(4, 0), _batches(4, 1), _calibration(), Target(budget_mb=budget), SETTINGS)
    assert result.expected[0] <= budget and result.size_mb <= budget
    # the schedule starts at the whole model: the same search with a target of the whole model's size prunes less
    whole, _ = search(fp32, _batches(4, 0), _batches(4, 1), _calibration(), Target(budget_mb=10.0),
                      replace(SETTINGS, steps=4))
    assert whole.expected[0] > result.expected[0]
    assert np.array_equal(whole.head_choices > 0, np.ones_like(whole.head_choices, dtype=bool))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_task(tmp_path_factory.mktemp("schedule"))


def _data(tiny_dir: Path) -> list[str]:
    return ["--model", str(tiny_dir / "model"), "--train", str(tiny_dir / "train.tsv"),
            "--dev", str(tiny_dir / "dev.tsv"), "--method", "aqbert", "--keep-macs", "0.6"]


def test_aqbert_distils_five_epochs_by_default_and_records_the_budget(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert quantize_main([*_data(tiny_dir), *FAST, "-o", str(out)]) == 0
    budget = json.loads((out / "aqbert.json").read_text())["budget"]
    # 32 training rows in batches of 4: 8 steps an epoch
    assert budget == {"search_steps": 2, "ramp_steps": 1, "qat_epochs": 5.0, "qat_steps": 40, "steps_per_epoch": 8,
                      "augment": 0, "augment_probability": None, "distillation_examples": 32}
    assert "then 5 epochs of distillation = 40 steps of 32 examples" in (out / "quantize.log").read_text()


def test_aqbert_epochs_count_the_augmented_sentences_and_qat_steps_override(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert quantize_main([*_data(tiny_dir), *FAST, "--epochs", "0.5", "--augment", "1", "-o", str(out)]) == 0
    summary = json.loads((out / "aqbert.json").read_text())
    assert summary["budget"]["qat_steps"] == 8 and summary["budget"]["steps_per_epoch"] == 16
    assert summary["budget"]["distillation_examples"] == 64 and summary["budget"]["augment_probability"] == 0.3
    assert set(summary["expected_at_end"]) == {"size_mb", "macs_kept"}  # 2 steps are too few to reach the target
    out = tmp_path / "steps"
    assert quantize_main([*_data(tiny_dir), *FAST, "--epochs", "3", "--qat-steps", "4", "-o", str(out)]) == 0
    budget = json.loads((out / "aqbert.json").read_text())["budget"]
    assert budget["qat_steps"] == 4 and budget["qat_epochs"] == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_an_epoch_budget_of_zero_or_less_is_refused(tiny_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], value: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        quantize_main([*_data(tiny_dir), "--epochs", value, "-o", str(out)])
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "argument --epochs: the epoch count must be greater than 0" in errors[0], errors
    assert not out.exists()
