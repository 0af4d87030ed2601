"""cpu-w8a8 passes on the quantized GEMMs: weights without zero points, and ORT's integer GEMM written out.

Both keep the integers and scales of the canonical graph: DQ(q; s, z) == DQ(q - z; s, 0) whenever q - z fits in
int8, and com.microsoft.MatMulIntegerToFloat is the kernel ORT's own Q/DQ fusion picks for these MatMuls; writing
it ourselves lets the bias ride in the GEMM's output stage and lets Q, K and V share one activation quantizer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qbert_deploy.runtimes.graph_checks import (
    PACKED_TYPES,
    activation_qdq,
    axis,
    block_size,
    constant_source,
    weight_sites,
)
from qbert_deploy.runtimes.lowering_passes import LoweringError, _constant


def centre_weights(model: ir.Model) -> int:
    """cpu-w8a8: MatMulIntegerToFloat without a weight zero point, reading q - z where that fits in int8.

    Pre: `integer_matmuls` ran (int8 weights: a constant, or a Cast of a packed constant, with a zero point).
    Post: packed weights read Cast(Cast(q, int32) - Cast(z, int32), int8), which ORT folds at session start (the file
    stays packed); 8-bit weights become an int8 constant q - z; the kernel gets no b_zero_point. Always possible up
    to 7 bits; 8-bit asymmetric weights whose q - z leaves int8 keep their zero point. Returns the number rewritten.
    """
    graph = model.graph
    done = 0
    for node in [n for n in graph if n.op_type == "MatMulIntegerToFloat" and n.domain == "com.microsoft"]:
        weight, zero = node.inputs[1], _input(node, 5)
        if weight is None or zero is None or weight.dtype != ir.DataType.INT8:
            continue
        source, zp_source = constant_source(weight), constant_source(zero)
        q_tensor = source.const_value if source is not None else None
        zp_tensor = zp_source.const_value if zp_source is not None else None
        if source is None or zp_source is None or q_tensor is None or zp_tensor is None:
            raise LoweringError(f"{node.name}: weight or zero point is not a constant")
        q, zp = (np.asarray(t.numpy()).astype(np.int32) for t in (q_tensor, zp_tensor))
        centred = q - zp[None, :]  # the same for the stored and the widened (uint8 shifted by -128) integers
        if centred.min() < -128 or centred.max() > 127:
            continue
        if source.dtype in PACKED_TYPES:
            node.replace_input_with(1, _centred_casts(graph, node, source, zp_source))
        else:
            name = (node.name or "weight").removesuffix("/MatMulIntegerToFloat")
            node.replace_input_with(1, _constant(graph, f"{name}.weight_q_centred", centred.astype(np.int8)))
        node.replace_input_with(5, None)
        while node.inputs[-1] is None:
            node.resize_inputs(len(node.inputs) - 1)
        done += 1
    return done


def _centred_casts(graph: ir.Graph, user: ir.Node, q: ir.Value, zp: ir.Value) -> ir.Value:
    base = user.name or "weight"
    wide = [ir.node("Cast", [v], attributes={"to": ir.DataType.INT32}, name=f"{base}/centre_cast_{i}")
            for i, v in enumerate((q, zp))]
    sub = ir.node("Sub", [wide[0].outputs[0], wide[1].outputs[0]], name=f"{base}/centre_sub")
    narrow = ir.node("Cast", [sub.outputs[0]], attributes={"to": ir.DataType.INT8}, name=f"{base}/centre_int8")
    for node, dtype in ((wide[0], ir.DataType.INT32), (wide[1], ir.DataType.INT32), (sub, ir.DataType.INT32),
                        (narrow, ir.DataType.INT8)):
        node.outputs[0].dtype = dtype
    wide[0].outputs[0].shape = sub.outputs[0].shape = narrow.outputs[0].shape = q.shape
    wide[1].outputs[0].shape = zp.shape
    narrow.outputs[0].name = f"{q.name}_centred_int8"
    graph.insert_before(user, [*wide, sub, narrow])
    return narrow.outputs[0]


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
        inputs = [quantized, weight, scale, dq.inputs[1], zero, _input(dq, 2), bias]
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
