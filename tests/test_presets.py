"""The JSON presets in models/ load as recipes and equal the built-in presets; method ids parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from qbert_deploy.models.methods import parse_method
from qbert_deploy.models.presets import PRESETS, preset_recipe
from qbert_deploy.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_file_is_the_built_in_recipe(name: str) -> None:
    recipe = Recipe.loads((ROOT / "models" / f"qbert-{name}.json").read_text())
    assert recipe == preset_recipe(name), f"models/qbert-{name}.json differs from the built-in preset"
    assert recipe.default.groups == 128 and recipe.activation_bits == 8
    assert recipe.embedding is not None and recipe.embedding.bits == 8


@pytest.mark.parametrize(("method_id", "family", "bits", "groups", "qat"), [
    ("qbert-w4-g12", "qbert", 4, 12, True), ("q8bert", "q8bert", 8, 1, True), ("directq-w2", "directq", 2, 1, False),
    ("ptq-ocs-w3", "ptq-ocs", 3, 128, False), ("qbert-mp23", "qbert", 2, 128, True),
    ("qbert-mp34", "qbert", 3, 128, True),
])
def test_method_ids(method_id: str, family: str, bits: int, groups: int, qat: bool) -> None:
    method = parse_method(method_id)
    assert (method.family, method.bits, method.groups, method.qat) == (family, bits, groups, qat), method
    if method_id == "qbert-mp34":
        assert method.mixed == ((3, 4), 3.5), method


def test_q8bert_is_symmetric_per_tensor() -> None:
    recipe = parse_method("q8bert").recipe()
    assert recipe.default.symmetric and recipe.default.groups == 1 and recipe.embedding == recipe.default


@pytest.mark.parametrize("bad", ["qbert-w9", "ptq-mp24", "fp16", "qbert-w4-g0", "directq-mp23"])
def test_bad_method_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_method(bad)
