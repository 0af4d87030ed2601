"""Property tests of the one quantizer and of the exporter's int4/int2 packing (hypothesis, bounded examples)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import numpy_helper

from qbert_deploy.exporters.passes import _CONTAINERS, _retype, container_bits
from qbert_deploy.models.quantizer import (
    dequantize_rows,
    fake_quant_weight,
    group_qparams,
    int_range,
    quantize_rows,
)

# Example counts are part of the reliability table in docs/RESULTS.md (benchmarks/reliability.py reads them).
EXAMPLES = {"round_trip": 200, "degenerate": 100, "clipping": 100, "packing": 200}
BASE = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def weights(draw: st.DrawFn, max_magnitude: float = 1e30) -> tuple[np.ndarray, int | None]:
    """A float32 weight [groups * rows_per_group, cols] and a group count that divides its rows (None = per row)."""
    groups = draw(st.integers(1, 8))
    rows = groups * draw(st.integers(1, 6))
    cols = draw(st.integers(1, 9))
    magnitude = draw(st.sampled_from([1e-30, 1e-6, 1e-2, 1.0, 50.0, 1e6, max_magnitude]))
    values = draw(hnp.arrays(np.float32, (rows, cols), elements=st.floats(-1.0, 1.0, width=32)))
    w = (values.astype(np.float64) * magnitude).astype(np.float32)
    return w, draw(st.sampled_from([groups, None]))


BITS = st.integers(2, 8)


def _check_round_trip(w: np.ndarray, groups: int | None, bits: int, symmetric: bool) -> None:
    weight = torch.from_numpy(w)
    params = group_qparams(weight, bits, groups, symmetric)
    q = quantize_rows(weight, params)
    qmin, qmax = int_range(bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax, f"integers {int(q.min())}..{int(q.max())} leave " \
        f"[{qmin}, {qmax}]"
    assert torch.isfinite(params.scale).all() and (params.scale > 0).all(), f"bad scales {params.scale}"
    back = dequantize_rows(q, params)
    scale, _ = params.per_row(w.shape[0])
    # every weight lies inside its group's range by construction: error <= half a step (+ float32 rounding)
    step = scale.view(-1, 1).double()
    error = (back.double() - weight.double()).abs()
    bound = 0.5 * step * (1 + 1e-5) + 1e-6 * weight.double().abs()
    worst = float((error - bound).max())
    assert worst <= 0, f"error exceeds half a step by {worst:.3g} (bits={bits}, symmetric={symmetric}, " \
        f"groups={groups}, rows={w.shape[0]})"
    # the fake-quant path used in training is the same function: bit for bit
    fake = fake_quant_weight(weight, bits, groups, symmetric)
    assert torch.equal(fake, back), "fake_quant_weight differs from quantize + dequantize"


@settings(max_examples=EXAMPLES["round_trip"], parent=BASE)
@given(weights(), BITS, st.booleans())
def test_round_trip_within_half_step(case: tuple[np.ndarray, int | None], bits: int, symmetric: bool) -> None:
    w, groups = case
    _check_round_trip(w, groups, bits, symmetric)


@settings(max_examples=EXAMPLES["degenerate"], parent=BASE)
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from([0.0, 1e-30, -3.5, 7.0, 1e30, -1e30]), BITS,
       st.booleans())
def test_constant_rows_and_zeros(groups: int, cols: int, value: float, bits: int, symmetric: bool) -> None:
    """Constant rows (zeros included) keep a positive finite scale and come back within half a step."""
    w = np.full((groups * 2, cols), value, dtype=np.float32)
    _check_round_trip(w, groups, bits, symmetric)
    if value == 0.0:
        params = group_qparams(torch.from_numpy(w), bits, groups, symmetric)
        assert torch.equal(dequantize_rows(quantize_rows(torch.from_numpy(w), params), params),
                           torch.zeros_like(torch.from_numpy(w))), "zeros do not come back exactly"


@settings(max_examples=EXAMPLES["clipping"], parent=BASE)
@given(weights(max_magnitude=1e3), BITS, st.booleans(), st.floats(1.5, 100.0))
def test_values_outside_the_range_clip_to_its_ends(case: tuple[np.ndarray, int | None], bits: int,
                                                   symmetric: bool, factor: float) -> None:
    """Quantizing with another tensor's parameters clamps to [qmin, qmax]; never wraps around."""
    w, groups = case
    weight = torch.from_numpy(w)
    params = group_qparams(weight, bits, groups, symmetric)
    q = quantize_rows(weight * factor, params)
    assert int(q.min()) >= params.qmin and int(q.max()) <= params.qmax
    big = quantize_rows(torch.full_like(weight, 1e30), params)
    assert (big == params.qmax).all(), "a huge positive value must clip to qmax"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("symmetric", [False, True])
def test_nan_and_inf_are_rejected(bad: float, symmetric: bool) -> None:
    w = torch.ones(4, 3)
    w[2, 1] = bad
    with pytest.raises(ValueError, match="weights contain NaN or Inf"):
        group_qparams(w, 4, 2, symmetric)


@pytest.mark.parametrize("rows, groups", [(6, 4), (5, 2), (3, 0)])
def test_groups_that_do_not_divide_are_rejected(rows: int, groups: int) -> None:
    with pytest.raises(ValueError, match=f"{groups} groups do not divide {rows} output rows"):
        group_qparams(torch.ones(rows, 2), 4, groups, False)


def _pack_and_read_back(values: np.ndarray, bits: int, symmetric: bool, opset: int) -> tuple[np.ndarray, int]:
    """Pack as the exporter does (passes._retype), serialize to a TensorProto, read back with onnx."""
    dtype, np_dtype = _CONTAINERS[(container_bits(bits, opset), symmetric)]
    value = ir.Value(name="w", const_value=ir.tensor(values.astype(np.int32), name="w"))
    _retype(value, dtype, np_dtype)
    assert value.const_value is not None
    proto = ir.serde.serialize_tensor(value.const_value)
    return numpy_helper.to_array(proto).astype(np.int32), len(proto.raw_data)


@settings(max_examples=EXAMPLES["packing"], parent=BASE)
@given(st.sampled_from([(2, 25), (3, 21), (4, 21), (2, 21)]), st.booleans(), st.integers(1, 7), st.integers(1, 9),
       st.data())
def test_low_bit_packing_is_exact(target: tuple[int, int], symmetric: bool, rows: int, cols: int,
                                  data: st.DataObject) -> None:
    """Every integer of the quantizer's range survives int4/uint4/int2/uint2 packing and reading back, odd sizes too."""
    bits, opset = target
    qmin, qmax = int_range(bits, symmetric)
    values = np.asarray(data.draw(st.lists(st.integers(qmin, qmax), min_size=rows * cols, max_size=rows * cols)),
                        dtype=np.int32).reshape(rows, cols)
    back, nbytes = _pack_and_read_back(values, bits, symmetric, opset)
    assert back.shape == values.shape and np.array_equal(back, values), f"{values} -> {back}"
    per_byte = 8 // container_bits(bits, opset)
    assert nbytes == -(-values.size // per_byte), f"{values.size} values packed into {nbytes} bytes"
    # and back the other way: the read-back array packs to the same bytes
    again, _ = _pack_and_read_back(back, bits, symmetric, opset)
    assert np.array_equal(again, values)


def test_packing_covers_every_code() -> None:
    """The full code range of each container, in one tensor, both ways (no sampling luck)."""
    for (bits, signed), (_, np_dtype) in _CONTAINERS.items():
        info = ml_dtypes.iinfo(np_dtype) if bits < 8 else np.iinfo(np_dtype)
        values = np.arange(int(info.min), int(info.max) + 1, dtype=np.int32)
        opset = 25 if bits == 2 else 21
        back, _ = _pack_and_read_back(values, bits, signed, opset)
        assert np.array_equal(back, values), f"{bits}-bit signed={signed}: {values} -> {back}"
