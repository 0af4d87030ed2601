"""Bit allocation: the budget holds, and more sensitive layers never get fewer bits."""

from __future__ import annotations

import itertools

import pytest

from qbert_deploy.models.allocation import BIT_CHOICES, allocate_bits, uniform_reason

OMEGA = [5.0, 0.3, 2.0, 0.1, 9.0, 1.0]
SIZES = [100, 100, 100, 100, 100, 100]


@pytest.mark.parametrize("average", [2.0, 2.5, 3.0, 3.4, 4.0, 5.0, 8.0])
def test_average_bits_budget_is_respected_and_monotone(average: float) -> None:
    bits = allocate_bits(OMEGA, SIZES, average_bits=average)
    assert sum(bits) / len(bits) <= average + 1e-9, (bits, average)
    for i, j in itertools.permutations(range(len(OMEGA)), 2):
        if OMEGA[i] > OMEGA[j]:
            assert bits[i] >= bits[j], f"layer {i} (Omega {OMEGA[i]}) got {bits[i]} < layer {j}'s {bits[j]}"


def test_size_budget_counts_fixed_bytes_and_layer_sizes() -> None:
    sizes = [1000, 4000, 1000]
    fixed = 500.0
    budget = fixed + (1000 * 8 + 4000 * 2 + 1000 * 4) / 8
    bits = allocate_bits([3.0, 0.5, 1.0], sizes, budget_bytes=budget, fixed_bytes=fixed)
    used = fixed + sum(n * b for n, b in zip(sizes, bits, strict=True)) / 8
    assert used <= budget, (bits, used, budget)
    # [8, 2, 4] fits exactly too, but its expected loss sum(Omega * 4^-bits) is higher than [4, 3, 4]'s.
    assert bits == [4, 3, 4], bits


def test_mixed_two_choices_split_the_layers() -> None:
    bits = allocate_bits(OMEGA, SIZES, average_bits=3.0, choices=(2, 4))
    assert sorted(bits) == [2, 2, 2, 4, 4, 4], bits
    assert [bits[i] for i in (4, 0, 2)] == [4, 4, 4], f"the three most sensitive layers get 4 bits: {bits}"


def test_impossible_budget_is_an_error() -> None:
    with pytest.raises(ValueError, match="no allocation"):
        allocate_bits(OMEGA, SIZES, average_bits=2.0, choices=(3, 4))
    with pytest.raises(ValueError, match="exactly one target"):
        allocate_bits(OMEGA, SIZES)


def test_uniform_reason_names_why_and_is_silent_for_a_mix() -> None:
    close = [1.0, 1.5, 2.0]
    bits = allocate_bits(close, [100] * 3, average_bits=3.0)
    assert bits == [3, 3, 3]
    reason = uniform_reason(bits, close, BIT_CHOICES, "an average of 3 bits")
    assert reason is not None and "differ by 2.0x" in reason and "--bit-choices 2,4" in reason, reason
    assert uniform_reason(allocate_bits(OMEGA, SIZES, average_bits=3.0), OMEGA, BIT_CHOICES, "x") is None
    assert "the widest" in (uniform_reason([8, 8], [1.0, 2.0], (2, 8), "9 MB") or "")
    assert "nothing wider fits" in (uniform_reason([2, 2], [1.0, 2.0], (2, 8), "1 MB") or "")
    assert uniform_reason([4, 4], [1.0, 2.0], (4,), "x") is None
