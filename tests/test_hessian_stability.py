"""benchmarks.hessian_stability's measure of seed-to-seed allocation changes, on a tiny random BERT in seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from benchmarks.hessian_stability import Setting, bit_changes, layer_bits, stability, subset_runs
from qbert_deploy.models.hessian import Sensitivity, sensitivity
from tests.tiny import tiny_config

LAYERS = [f"bert.encoder.layer.{i}" for i in range(4)]


def _model() -> BertForSequenceClassification:
    config = tiny_config(hidden=16, layers=4, heads=2, intermediate=16)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def _batches(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, 2000, (3, 5), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (3,), generator=generator)})
    return out


def test_bit_changes_count_layers_pairwise_and_against_the_first_seed() -> None:
    changes = bit_changes([[3, 3, 2, 2], [3, 2, 3, 2], [3, 3, 2, 2]])
    assert changes == {"vs_first": [2, 0], "pairwise": {"0-1": 2, "0-2": 0, "1-2": 2}, "max_changed_layers": 2,
                       "identical": False}, changes
    same = bit_changes([[4, 2, 4], [4, 2, 4], [4, 2, 4]])
    assert same["identical"] and same["max_changed_layers"] == 0 and same["vs_first"] == [0, 0], same
    with pytest.raises(ValueError, match="one length"):
        bit_changes([[2, 3], [2]])


def test_identical_seeds_give_no_changes_and_the_first_subsets_are_sensitivitys_own() -> None:
    model = _model()
    batches = _batches(3, seed=0)
    once, again = (subset_runs(model, batches, iters=3) for _ in range(2))  # the same data twice: one seed
    runs = [once, again, once]
    first_two, seconds = runs[0].first(2)
    assert first_two.eigenvalues == sensitivity(model, batches[:2], iters=3).eigenvalues, \
        "a smaller subset count must be the larger run's first subsets, exactly"
    assert seconds > 0.0
    rest = subset_runs(model, batches[2:], iters=3, start=2)  # a later round continues the same draw
    assert first_two.eigenvalues + rest.eigenvalues == runs[0].eigenvalues
    result = stability(model, [r.first(3)[0] for r in runs])
    assert result["stable"], result["methods"]
    assert all(m["max_changed_layers"] == 0 for m in result["methods"].values()), result["methods"]
    assert result["omega_spread"] == [0.0] * 4, result["omega_spread"]
    with pytest.raises(ValueError, match="only 3 subsets"):
        runs[0].first(4)


def test_a_reversed_ranking_moves_every_layer_and_other_data_is_counted() -> None:
    model = _model()
    rising = Sensitivity(LAYERS, [[1.0, 2.0, 3.0, 4.0]])
    falling = Sensitivity(LAYERS, [[4.0, 3.0, 2.0, 1.0]])
    assert layer_bits(model, rising, "qbert-mp23") == [2, 2, 3, 3]  # the most sensitive half gets 3 bits
    assert layer_bits(model, falling, "qbert-mp24") == [4, 4, 2, 2]
    result = stability(model, [rising, falling, rising])
    for method in ("qbert-mp23", "qbert-mp24"):
        assert result["methods"][method]["vs_first"] == [4, 0], result["methods"][method]
        assert result["methods"][method]["pairwise"] == {"0-1": 4, "0-2": 0, "1-2": 4}
    assert not result["stable"]
    assert result["omega_spread"][0] == pytest.approx(3.0 / 2.0), result["omega_spread"]  # (4 - 1) / mean 2
    with pytest.raises(ValueError, match="not a mixed-precision method"):
        layer_bits(model, rising, "qbert-w4")


def test_setting_parses_subsets_batch_iters_and_refuses_nonsense() -> None:
    assert Setting.parse("4x16x10") == Setting(4, 16, 10) and Setting(4, 16, 10).label == "4x16x10"
    for bad in ("4x16", "0x16x10", "ax16x10"):
        with pytest.raises(ValueError, match="SUBSETSxBATCHxITERS"):
            Setting.parse(bad)


def test_qbert_quantize_defaults_are_the_measured_cheapest_stable_setting() -> None:
    from qbert_deploy.cli.quantize import build_parser
    from qbert_deploy.models.pipeline import Job
    from qbert_deploy.quantize_run import HESSIAN_DATA

    measured = json.loads((Path(__file__).parents[1] / "docs/results/hessian_stability.json").read_text())
    parser = build_parser()
    # subsets and batch are resolved per task (an embedding model reads more); a classifier's are HESSIAN_DATA
    assert parser.get_default("hessian_subsets") is None and parser.get_default("hessian_batch") is None
    cli = Setting(*HESSIAN_DATA, parser.get_default("hessian_iters"))
    job = {f.name: f.default for f in dataclasses.fields(Job)}
    assert cli == Setting.parse(measured["cheapest_stable"]), (cli, measured["cheapest_stable"])
    assert cli == Setting(job["hessian_subsets"], job["hessian_batch"], job["hessian_iters"]), job
