"""cpu-w8a8: 3-bit weights stored at 3 bits per value, unpacked by standard ONNX ops that ORT folds at session start.

ONNX has no int3, so the exporter keeps 3-bit weights in int4/uint4 containers: a quarter of their bytes is
padding. Here each 3-bit weight is stored densely (8 values in 3 bytes), values flattened in row-major order,
unsigned (signed int4 stored offset by +4) and zero-padded to a multiple of 8, as two planes:

- `M.weight_q3_high` uint8 [N/8, 1, 1]: byte j holds bit 2 of values 8j..8j+7, value 8j+i at bit i;
- `M.weight_q3_low` [N/8, 2, 4]: bits 0-1 of each value, XORed with the two bits below its high bit in byte j
  (bits i-1 and i-2, which the unpacking drags along); uint2 when the model's opset is >= 25, else uint8
  [N/8, 2, 1] with value 8j+4h+i at bits 2i, 2i+1 of byte (j, h).

Unpacking: `((high << (7 - i)) >> 5) XOR low` (uint8 shifts drop the bits above bit i; no mask needed), then
Reshape (and Slice off the padding, Cast + Sub for signed). Every input is a constant, so ORT's constant folding
replaces the chain with one initializer at session start and the int8 weight DequantizeLinear fuses into
MatMulIntegerToFloat as before. Every op is uint8 (or a Cast from uint2), which ORT's CPU kernels cover.

The cost is paid at session start: ORT holds each folded intermediate (one weight-sized uint8 tensor per op) until
folding ends, and glibc keeps the freed pages, so opening BERT-base MP 2/3 takes ~0.2 s and ~200 MiB more
(`python -m benchmarks.bitpack`); the graph that runs, and its speed, are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qbert_deploy.runtimes.lowering_passes import LoweringError, weight_bits

__all__ = ["pack_3bit", "pack_3bit_weights", "unpack_3bit", "unpack_3bit_nodes"]

UINT2_OPSET = 25  # Cast from uint2 exists from this opset on
_LOW_SHIFTS = np.array([0, 2, 4, 6], np.uint8)  # uint8 low plane: value 4h+i of a group at bits 2i, 2i+1 of byte h
_HIGH_LEFT = (7 - np.arange(8, dtype=np.uint8)).reshape(2, 4)  # value i's high bit (bit i) to bit 7 ...
_HIGH_RIGHT = 5  # ... then to bit 2, with bits i-1 and i-2 in bits 1 and 0
_OFFSET = {ir.DataType.UINT4: 0, ir.DataType.INT4: 4}  # signed 3-bit values -4..3 are stored as 0..7


def _high_part(high: np.ndarray) -> np.ndarray:
    """[G, 1, 1] high bytes -> [G, 2, 4]: what the two BitShifts make of them (bit 2: the value's high bit)."""
    return (high << _HIGH_LEFT) >> _HIGH_RIGHT  # uint8: the left shift drops what passes bit 7


def pack_3bit(values: np.ndarray, uint2: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Integers 0..7 (any shape) -> (low plane, high plane uint8 [N/8, 1, 1]), N = size padded to 8.

    The low plane is ml_dtypes.uint2 [N/8, 2, 4] with `uint2`, else uint8 [N/8, 2, 1]; the unpack shifts
    broadcast both to [N/8, 2, 4], i.e. the N values in order.
    """
    flat = np.asarray(values).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() > 7):
        raise LoweringError(f"values {flat.min()}..{flat.max()} do not fit in 3 unsigned bits")
    padded = np.zeros(-(-flat.size // 8) * 8, np.uint8)
    padded[:flat.size] = flat
    groups = padded.reshape(-1, 2, 4)
    high = np.bitwise_or.reduce((groups >> 2).reshape(-1, 8) << np.arange(8, dtype=np.uint8), axis=1)
    high = high.astype(np.uint8)[:, None, None]
    low = (groups & 3) ^ (_high_part(high) & 3)  # cancels the two bits the high part brings along
    if uint2:
        return low.astype(ml_dtypes.uint2), high
    return np.bitwise_or.reduce(low << _LOW_SHIFTS, axis=2).astype(np.uint8)[:, :, None], high


def unpack_3bit(low: np.ndarray, high: np.ndarray, size: int) -> np.ndarray:
    """The inverse of `pack_3bit` in numpy, flat: what the ONNX unpack chain computes (before offset/reshape)."""
    low_bits = low.astype(np.uint8) if low.dtype == ml_dtypes.uint2 else (low >> _LOW_SHIFTS) & 3
    return (low_bits ^ _high_part(high)).reshape(-1)[:size].astype(np.uint8)


class _Builder:
    """Appends unpack nodes to a list; small constants (shifts, masks, shapes) are shared by every site."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix = graph, prefix
        self.nodes: list[ir.Node] = []

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        name = f"unpack3.{name}"
        if name in self.graph.initializers:
            return self.graph.initializers[name]
        tensor = ir.tensor(array, name=name)
        value = ir.val(name, tensor.dtype, ir.Shape(tensor.shape.numpy()), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: Sequence[ir.Value], dtype: ir.DataType, shape: Sequence[int],
           step: str, **attributes: int | str) -> ir.Value:
        # short names, as each appears up to four times in the file; the planes' names tell the module
        node = ir.node(op_type, inputs, attributes=attributes or None, name=f"{self.prefix}/{step}")
        out = node.outputs[0]
        out.dtype, out.shape, out.name = dtype, ir.Shape(shape), node.name
        self.nodes.append(node)
        return out


def unpack_3bit_nodes(graph: ir.Graph, low: ir.Value, high: ir.Value, shape: Sequence[int], offset: int,
                      prefix: str) -> tuple[list[ir.Node], ir.Value]:
    """Nodes (not yet in the graph) that turn `pack_3bit`'s planes back into `shape` integers minus `offset`.

    The result is uint8 when `offset` is 0, else int8. Nodes and their outputs are named `prefix/step` (`prefix`
    unique in the graph); shared constants are registered in `graph` as initializers.
    """
    u8 = ir.DataType.UINT8
    b = _Builder(graph, prefix)
    size = int(np.prod(shape))
    groups = [-(-size // 8), 2, 4]  # groups of 8 values (3 bytes)
    if low.dtype == ir.DataType.UINT2:
        lo = b.op("Cast", [low], u8, groups, "low", to=u8)
    else:
        lo = b.op("BitShift", [low, b.const("shift_low", _LOW_SHIFTS)], u8, groups, "low_shift", direction="RIGHT")
        lo = b.op("BitwiseAnd", [lo, b.const("mask_low", np.array(3, np.uint8))], u8, groups, "low")
    hi = b.op("BitShift", [high, b.const("high_left", _HIGH_LEFT)], u8, groups, "high_left", direction="LEFT")
    hi = b.op("BitShift", [hi, b.const("high_right", np.array(_HIGH_RIGHT, np.uint8))], u8, groups, "high",
              direction="RIGHT")
    out = b.op("BitwiseXor", [lo, hi], u8, groups, "values")
    if size != groups[0] * 8:  # drop the zero padding
        out = b.op("Reshape", [out, b.const("flat", np.array([-1], np.int64))], u8, [groups[0] * 8], "flat")
        out = b.op("Slice", [out, b.const("zero", np.array([0], np.int64)),
                             b.const(f"size_{size}", np.array([size], np.int64))], u8, [size], "unpadded")
    out = b.op("Reshape", [out, b.const("shape_" + "x".join(map(str, shape)), np.array(shape, np.int64))], u8,
               list(shape), "shaped")
    if offset:  # in int8, where the values -offset..7-offset fit exactly
        out = b.op("Cast", [out], ir.DataType.INT8, list(shape), "int8", to=ir.DataType.INT8)
        out = b.op("Sub", [out, b.const(f"offset_{offset}", np.array(offset, np.int8))], ir.DataType.INT8,
                   list(shape), "signed")
    return b.nodes, out


def _weight_casts(graph: ir.Graph, bits: dict[str, int]) -> list[tuple[str, ir.Node, np.ndarray, int]]:
    """(module, Cast, integers, offset) for each Cast that reads a 3-bit module's int4/uint4 `M.weight_q`."""
    found = []
    for node in graph:
        source = node.inputs[0] if node.op_type == "Cast" and node.inputs else None
        if source is None or source.const_value is None or not (source.name or "").endswith(".weight_q"):
            continue
        module = (source.name or "").removesuffix(".weight_q")
        if bits.get(module) == 3 and source.dtype is not None and source.dtype in _OFFSET:
            offset = _OFFSET[source.dtype]
            found.append((module, node, np.asarray(source.const_value.numpy()).astype(np.int32) + offset, offset))
    return found


def pack_3bit_weights(model: ir.Model) -> int:
    """cpu-w8a8: every 3-bit weight (per `qbert.weight_bits`) stored as 3-bit planes plus an unpack chain.

    Pre: the weights are read through Casts of their int4/uint4 initializer (`widen_weights_to_int8`, whether a
    DequantizeLinear or an integer GEMM reads the Cast); other containers are left as they are.
    Post: those Casts read the unpack chain of `M.weight_q3_low`/`M.weight_q3_high` instead, which yields the same
    integers; the int4 initializer is left unused (removed by `lower_model`). Signed weights take a Cast and a
    Sub more. Zero points stay in their container: one per output column, packing them would save ~5 KB on
    BERT-base, less than their unpack nodes would cost. Run it after every pass that reads weight integers: the
    weight is no longer a constant behind Casts only, so `weight_sites` and `constant_source` do not see it.
    Returns the number of weights packed.
    """
    graph = model.graph
    unpacked: dict[str, ir.Value] = {}
    for module, cast, values, offset in _weight_casts(graph, weight_bits(model)):
        if module not in unpacked:
            try:
                low, high = pack_3bit(values, uint2=model.opset_imports.get("", 0) >= UINT2_OPSET)
            except LoweringError as err:
                kind = "int4" if offset else "uint4"
                raise LoweringError(f"{module}: recipe says 3 bits, but its {kind} {err}") from None
            planes = []
            for plane, array in (("low", low), ("high", high)):
                name = f"{module}.weight_q3_{plane}"
                tensor = ir.tensor(array, name=name)
                value = ir.val(name, tensor.dtype, ir.Shape(array.shape), const_value=tensor)
                graph.register_initializer(value)
                planes.append(value)
            nodes, unpacked[module] = unpack_3bit_nodes(graph, planes[0], planes[1], values.shape, offset,
                                                        f"unpack3_{len(unpacked)}")
            graph.insert_before(cast, nodes)
        cast.replace_input_with(0, unpacked[module])
    return len(unpacked)
