"""Read-only questions about an ONNX graph: where the quantized weights are, and which known ORT pitfalls it holds.

The lowering passes use these to find their sites, and `lower` uses the checks as postconditions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import onnx_ir as ir

PACKED_TYPES = (ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT2, ir.DataType.UINT2)
BYTE_TYPES = (ir.DataType.INT8, ir.DataType.UINT8)
INTEGER_GEMMS = ("MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm",
                 "QAttention")


@dataclass(frozen=True)
class WeightSite:
    """A constant weight's DequantizeLinear feeding the weight input of one MatMul (`module` names it)."""

    module: str
    dq: ir.Node
    matmul: ir.Node


def producer(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def constant_source(value: ir.Value | None) -> ir.Value | None:
    """The initializer behind `value`, looking through Casts (a Cast of a constant folds at session start)."""
    while value is not None:
        if value.const_value is not None:
            return value
        node = value.producer()
        if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return None
        value = node.inputs[0]
    return None


def quantized_dtype(value: ir.Value | None) -> ir.DataType | None:
    """The integer type a dequantized value comes from (after any Cast), or None."""
    return value.dtype if value is not None else None


def block_size(dq: ir.Node) -> int:
    attr = dq.attributes.get("block_size")
    return int(attr.as_int()) if attr is not None else 0


def axis(node: ir.Node, default: int = 1) -> int:
    attr = node.attributes.get("axis")
    return int(attr.as_int()) if attr is not None else default


def _module_name(dq: ir.Node) -> str:
    source = constant_source(dq.inputs[0])
    name = source.name if source is not None and source.name else dq.name or ""
    return name.removesuffix(".weight_q")


def weight_sites(graph: ir.Graph) -> Iterator[WeightSite]:
    """Every constant-weight DequantizeLinear whose only consumers are MatMul weight inputs."""
    for dq in list(graph):
        if dq.op_type != "DequantizeLinear" or constant_source(dq.inputs[0]) is None:
            continue
        uses = list(dq.outputs[0].uses())
        if uses and all(u.node.op_type == "MatMul" and u.idx == 1 for u in uses):
            for use in uses:
                yield WeightSite(_module_name(dq), dq, use.node)


def embedding_sites(graph: ir.Graph) -> Iterator[tuple[ir.Node, ir.Node]]:
    """(DequantizeLinear of a whole table on axis 0, the Gather that picks rows from it)."""
    for dq in list(graph):
        if dq.op_type != "DequantizeLinear" or constant_source(dq.inputs[0]) is None:
            continue
        uses = list(dq.outputs[0].uses())
        if (len(uses) == 1 and uses[0].node.op_type == "Gather" and uses[0].idx == 0
                and axis(uses[0].node, 0) == 0 and axis(dq, 1) == 0 and block_size(dq) == 0):
            yield dq, uses[0].node


def activation_qdq(value: ir.Value | None) -> tuple[ir.Node, ir.Node] | None:
    """(QuantizeLinear, DequantizeLinear) when `value` is a fake-quantized activation."""
    dq = producer(value)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producer(dq.inputs[0])
    if q is None or q.op_type != "QuantizeLinear" or constant_source(q.inputs[0]) is not None:
        return None
    return q, dq


def blocked_int8_pitfalls(graph: ir.Graph) -> list[str]:
    """MatMuls that ORT 1.32 fuses into MatMulIntegerToFloat with wrong results (DESIGN.md §4).

    The pattern: a blocked 8-bit weight DequantizeLinear and a Q/DQ activation into a MatMul whose output is not
    quantized again. A lowered graph must hold none.
    """
    bad = []
    for node in graph:
        if node.op_type != "MatMul":
            continue
        weight_dq = producer(node.inputs[1])
        if (weight_dq is None or weight_dq.op_type != "DequantizeLinear" or block_size(weight_dq) == 0
                or quantized_dtype(weight_dq.inputs[0]) not in BYTE_TYPES):
            continue
        if activation_qdq(node.inputs[0]) is None:
            continue
        if not any(u.node.op_type == "QuantizeLinear" for u in node.outputs[0].uses()):
            bad.append(node.name or "(unnamed MatMul)")
    return bad


def cuda_violations(graph: ir.Graph) -> list[str]:
    """What the CUDA EP cannot run: int2 tensors, blocked Q/DQ other than int4, integer GEMM kernels."""
    problems = []
    for value in graph.initializers.values():
        if value.dtype in (ir.DataType.INT2, ir.DataType.UINT2):
            problems.append(f"{value.name}: int2 tensor (the CUDA EP has no int2)")
    for node in graph:
        if node.op_type in INTEGER_GEMMS:
            problems.append(f"{node.name}: {node.op_type} (the CUDA EP has no integer GEMM kernel)")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and block_size(node):
            dtype = quantized_dtype(node.inputs[0] if node.op_type == "DequantizeLinear" else node.outputs[0])
            if dtype not in (ir.DataType.INT4, ir.DataType.UINT4):
                problems.append(f"{node.name}: blocked {node.op_type} on {dtype} (the CUDA EP blocks only int4)")
        for io in (*node.inputs, *node.outputs):
            if io is not None and io.dtype in (ir.DataType.INT2, ir.DataType.UINT2):
                problems.append(f"{node.name}: int2 value {io.name} (the CUDA EP has no int2)")
                break
        if node.op_type == "MatMulNBits":
            bits = node.attributes.get("bits")
            if bits is None or bits.as_int() not in (4, 8):
                problems.append(f"{node.name}: MatMulNBits with {bits.as_int() if bits else '?'} bits")
    return problems


def op_histogram(graph: ir.Graph) -> Counter[str]:
    return Counter(n.op_type for n in graph)
