"""cpu-w8a8: ORT's integer GEMM written out, with the integers and scales of the canonical graph.

com.microsoft.MatMulIntegerToFloat is the kernel ORT's own Q/DQ fusion picks for these MatMuls; writing it ourselves
lets the bias ride in the GEMM's output stage and lets Q, K and V share one activation quantizer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qbert_deploy.runtimes.graph_checks import (
    activation_qdq,
    axis,
    block_size,
    constant_source,
    weight_sites,
)


def _zero_point(dq: ir.Node) -> ir.Value | None:
    """The weight zero point to hand the GEMM: None when absent or all zeros (symmetric weights)."""
    zero = _input(dq, 2)
    source = constant_source(zero)
    if source is not None and source.const_value is not None and not np.asarray(source.const_value.numpy()).any():
        return None
    return zero


def _const_bytes(value: ir.Value | None) -> bytes | None:
    """A constant's type and raw values (b"" for an absent input), to compare quantizers exactly."""
    if value is None:
        return b""
    if value.const_value is None or value.dtype is None:
        return None
    return value.dtype.name.encode() + np.asarray(value.const_value.numpy()).tobytes()


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _bias_after(matmul: ir.Node, width: int) -> tuple[ir.Node | None, ir.Value | None]:
    """(the Add, its constant [N] float bias) when the MatMul's only use adds one; else (None, None)."""
    uses = list(matmul.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or uses[0].node.domain not in ("", "ai.onnx"):
        return None, None
    add = uses[0].node
    bias = add.inputs[1 - uses[0].idx]
    if (bias is None or bias.const_value is None or bias.dtype != ir.DataType.FLOAT
            or tuple(bias.const_value.shape.numpy()) != (width,)):
        return None, None
    return add, bias


def integer_matmuls(model: ir.Model) -> int:
    """cpu-w8a8: DQ(Q(x)) x DQ(int8 weight) [+ bias] -> com.microsoft.MatMulIntegerToFloat(Q(x), weight, ..., bias).

    Pre: widened sites (int8 weight per output channel, optional zero point) behind a constant activation Q/DQ.
    Post: the kernel ORT's Q/DQ fusion would pick, with the constant bias Add that follows moved into it (ORT then
    runs Gelu instead of its slower BiasGelu, and residual sums lose an operand); MatMuls quantizing the same
    tensor with bitwise-equal scale and zero point (BERT's Q, K, V) share one QuantizeLinear. Same integers,
    scales and bias; the float result is scale * integer sum + bias, as in ORT's fused kernel. Returns the number
    of MatMuls rewritten.
    """
    graph = model.graph
    quantizers: dict[tuple[ir.Value, bytes, bytes], ir.Value] = {}
    done = 0
    for site in list(weight_sites(graph)):
        dq, matmul = site.dq, site.matmul
        weight, pair = dq.inputs[0], activation_qdq(matmul.inputs[0])
        if (pair is None or weight is None or weight.dtype != ir.DataType.INT8 or block_size(dq) or axis(dq) != 1
                or weight.shape is None or len(weight.shape) != 2 or not isinstance(weight.shape[1], int)):
            continue
        q, act_dq = pair
        scale, zero = q.inputs[1], _input(q, 2)
        keys = [_const_bytes(v) for v in (scale, zero, act_dq.inputs[1], _input(act_dq, 2))]
        if q.inputs[0] is None or scale is None or None in keys or keys[:2] != keys[2:]:
            continue
        quantized = quantizers.setdefault((q.inputs[0], keys[0] or b"", keys[1] or b""), q.outputs[0])
        add, bias = _bias_after(matmul, int(weight.shape[1]))
        inputs = [quantized, weight, scale, dq.inputs[1], zero, _zero_point(dq), bias]
        while inputs[-1] is None:
            inputs.pop()
        module = dq.name.removesuffix("/weight_dequantize") if dq.name else site.module
        fused = ir.node("MatMulIntegerToFloat", inputs, domain="com.microsoft", name=f"{module}/MatMulIntegerToFloat")
        out = (add or matmul).outputs[0]
        fused.outputs[0].type, fused.outputs[0].shape = out.type, out.shape
        graph.insert_before(matmul, fused)
        out.replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
        fused.outputs[0].name, out.name = out.name, None
        for node in (add, matmul, dq, act_dq, q):
            if node is not None and node.graph is graph and not any(list(o.uses()) for o in node.outputs):
                graph.remove(node, safe=True)
        done += 1
    if done:
        model.opset_imports.setdefault("com.microsoft", 1)
    return done
