"""Fuse the float attention core into com.microsoft.MultiHeadAttention, leaving the quantized GEMMs alone.

Two eager forms are recognised: BERT's and RoBERTa's (scores = QK^T / sqrt(d) + additive mask) and DistilBERT's
(scores = (Q / sqrt(d)) K^T, masked_fill where attention_mask == 0).

ORT's own attention fusion does not fire on a Q/DQ graph (DESIGN.md §4), so the core (reshape to heads,
transposes, QK^T, scaling, mask, softmax, times V, merge heads) runs as ~10 small ops per layer. The Q, K and V
projections stay MatMul(Q/DQ, DQ) for the integer kernels; only what sits between them and the output projection's
input quantizer is rewritten. Numerics: the same float math in one kernel (masked keys get ORT's -10000 filter
instead of float32's lowest value: both become exactly 0 after the softmax).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qbert_deploy.runtimes.graph_checks import producer


def _only_use(value: ir.Value | None) -> ir.Node | None:
    uses = list(value.uses()) if value is not None else []
    return uses[0].node if len(uses) == 1 else None


def _perm(node: ir.Node | None) -> tuple[int, ...] | None:
    if node is None or node.op_type != "Transpose" or "perm" not in node.attributes:
        return None
    return tuple(node.attributes["perm"].as_ints())


def _heads(value: ir.Value | None, perm: tuple[int, ...]) -> tuple[ir.Value, ir.Node, ir.Node] | None:
    """(projection output [B, S, D], its Reshape to heads, the Transpose) feeding an attention MatMul."""
    transpose = producer(value)
    if _perm(transpose) != perm:
        return None
    assert transpose is not None
    reshape = producer(transpose.inputs[0])
    if reshape is None or reshape.op_type != "Reshape" or reshape.inputs[0] is None:
        return None
    return reshape.inputs[0], reshape, transpose


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(np.asarray(value.const_value.numpy()).reshape(()))


def _from_mask(value: ir.Value | None, mask: ir.Value) -> bool:
    """Whether an additive mask is computed from the attention_mask input alone (Unsqueeze/Cast/Sub/Mul)."""
    seen = 0
    while value is not None and seen < 8:
        if value is mask:
            return True
        node = producer(value)
        if node is None or node.op_type not in ("Unsqueeze", "Cast", "Sub", "Mul"):
            return False
        variables = [i for i in node.inputs if i is not None and i.const_value is None]
        if len(variables) != 1:
            return False
        value, seen = variables[0], seen + 1
    return False


def _mask_condition(value: ir.Value | None, mask: ir.Value) -> bool:
    """Whether a boolean is `attention_mask == 0`, reshaped or broadcast (DistilBERT's masked_fill condition)."""
    node = producer(value)
    for _ in range(8):
        if node is None or node.op_type not in ("Reshape", "Expand", "Unsqueeze"):
            break
        node = producer(node.inputs[0])
    if node is None or node.op_type != "Equal" or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    zero = _scalar(b) if a is mask else _scalar(a) if b is mask else None
    return zero == 0.0


def _scaled_scores(softmax: ir.Node, mask: ir.Value) -> tuple[ir.Node, ir.Value | None, float, list[ir.Node]] | None:
    """(QK^T MatMul, the query heads, the divisor 1/scale, the nodes from that MatMul to the Softmax) or None.

    BERT: Softmax(Add(Div(MatMul(q, k), c), additive mask)). DistilBERT: Softmax(Where(mask == 0, lowest,
    MatMul(Div(q, c), k))). A fill value above -1e4 would not mask like MultiHeadAttention does, so it is left.
    """
    first = producer(softmax.inputs[0])
    if first is not None and first.op_type == "Add" and _from_mask(first.inputs[1], mask):
        div = producer(first.inputs[0])
        scores = producer(div.inputs[0]) if div is not None and div.op_type == "Div" else None
        divisor = _scalar(div.inputs[1]) if div is not None else None
        if scores is None or scores.op_type != "MatMul" or not divisor or div is None:
            return None
        return scores, scores.inputs[0], divisor, [first, div, scores]
    if first is not None and first.op_type == "Where" and _mask_condition(first.inputs[0], mask):
        fill = _scalar(first.inputs[1])
        scores = producer(first.inputs[2])
        div = producer(scores.inputs[0]) if scores is not None and scores.op_type == "MatMul" else None
        divisor = _scalar(div.inputs[1]) if div is not None and div.op_type == "Div" else None
        if fill is None or fill > -1e4 or scores is None or div is None or not divisor \
                or _only_use(div.outputs[0]) is not scores:
            return None
        return scores, div.inputs[0], divisor, [first, scores, div]
    return None


def _split_biases(graph: ir.Graph, values: list[ir.Value], name: str) -> tuple[list[ir.Value], ir.Value | None]:
    """Q, K, V without their bias Adds plus the biases concatenated, which MultiHeadAttention adds itself."""
    adds = [producer(v) for v in values]
    biases = []
    for add, value in zip(adds, values, strict=True):
        if add is None or add.op_type != "Add" or _only_use(value) is None or add.inputs[1] is None \
                or add.inputs[1].const_value is None or add.inputs[1].shape is None or len(add.inputs[1].shape) != 1:
            return values, None
        biases.append(np.asarray(add.inputs[1].const_value.numpy(), np.float32))
    tensor = ir.tensor(np.concatenate(biases), name=f"{name}.qkv_bias")
    bias = ir.val(tensor.name, tensor.dtype, ir.Shape(tensor.shape.numpy()), const_value=tensor)
    graph.register_initializer(bias)
    inputs = [add.inputs[0] for add in adds if add is not None]
    return [i for i in inputs if i is not None], bias


def _layer_name(query: ir.Value) -> str:
    """`bert.encoder.layer.N.attention` from the query projection's MatMul (behind its bias Add)."""
    node = producer(query)
    if node is not None and node.op_type == "Add":
        node = producer(node.inputs[0]) or node
    name = node.name if node is not None and node.name else "attention"
    return name.split(".attention.")[0] + ".attention" if ".attention." in name else name


def fuse_attention(model: ir.Model) -> int:
    """Rewrite each self-attention core into MultiHeadAttention; returns how many were fused.

    Pre: the exporter's eager-attention pattern (heads as Reshape+Transpose, Div by sqrt(head size) of the scores
    or of the query, an additive mask or a masked_fill from the `attention_mask` input, Softmax on the last axis).
    A layer that differs is left as it is.
    Post: MultiHeadAttention(query, key, value, key_padding_mask=int32 attention_mask) with output [B, S, D].
    """
    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if mask is None:
        return 0
    mask_i32: ir.Value | None = None
    fused = 0
    for softmax in [n for n in graph if n.op_type == "Softmax"]:
        found = _scaled_scores(softmax, mask)
        if found is None:
            continue
        scores, query, divisor, core = found
        q = _heads(query, (0, 2, 1, 3))
        k = _heads(scores.inputs[1], (0, 2, 3, 1))
        context = _only_use(softmax.outputs[0])
        if q is None or k is None or context is None or context.op_type != "MatMul":
            continue
        v = _heads(context.inputs[1], (0, 2, 1, 3))
        merge = _only_use(context.outputs[0])
        reshape = _only_use(merge.outputs[0]) if _perm(merge) == (0, 2, 1, 3) and merge is not None else None
        shape = q[2].outputs[0].shape
        if v is None or merge is None or reshape is None or reshape.op_type != "Reshape" \
                or shape is None \
                or not isinstance(shape[1], int):
            continue
        heads = int(shape[1])
        if mask_i32 is None:
            cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT32}, name="attention_mask/int32")
            graph.insert_before(next(iter(graph)), cast)
            mask_i32 = cast.outputs[0]
            mask_i32.name = "attention_mask_int32"
        name = _layer_name(q[0])
        projections, bias = _split_biases(graph, [q[0], k[0], v[0]], name)
        mha = ir.node("MultiHeadAttention", [*projections, bias, mask_i32], domain="com.microsoft",
                      attributes={"num_heads": heads, "scale": 1.0 / divisor}, name=f"{name}/MultiHeadAttention")
        out = reshape.outputs[0]
        mha.outputs[0].type, mha.outputs[0].shape = out.type, out.shape
        graph.insert_before(reshape, mha)
        out.replace_all_uses_with(mha.outputs[0], replace_graph_outputs=True)
        graph.remove([reshape, merge, context, softmax, *core, *q[1:], *k[1:], *v[1:]], safe=True)
        if bias is not None:
            graph.remove([n for n in (producer(x) for x in (q[0], k[0], v[0])) if n is not None], safe=True)
        fused += 1
    if fused:
        model.opset_imports.setdefault("com.microsoft", 1)
    return fused


def unmasked_attention_branch(model: ir.Model) -> int:
    """Run each MultiHeadAttention without its key padding mask when the batch has no padding.

    ORT's CPU MultiHeadAttention takes its flash-attention kernel (~14% faster here) only without a mask, and an
    all-ones mask masks nothing. In no lowering profile: the flash kernel sums the softmax in another order than the
    masked one, so a request's logits would depend on whether its batch has padding (up to 0.08 in a fine-tuned MiniLM's
    logit once 8-bit activations round the other way; docs/results/serving.md). Kept for the latency ablation.
    Pre: MultiHeadAttention(q, k, v, bias, mask) from `fuse_attention`, the mask the
    int32 cast of the `attention_mask` input. Post: If(min(attention_mask) == 1, then: MultiHeadAttention(q, k, v,
    bias), else: the node as it was). Numerics: the same attention, the softmax evaluated in another float order.
    """
    graph = model.graph
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    nodes = [n for n in graph if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"
             and len(n.inputs) == 5 and n.inputs[4] is not None]
    if mask is None or not nodes:
        return 0
    one = ir.val("attention_mask.one", const_value=ir.tensor(np.array(1, np.int64), name="attention_mask.one"))
    graph.register_initializer(one)
    smallest = ir.node("ReduceMin", [mask], attributes={"keepdims": 0}, name="attention_mask/min")
    unpadded = ir.node("Equal", [smallest.outputs[0], one], name="attention_mask/unpadded")
    smallest.outputs[0].name, unpadded.outputs[0].name = "attention_mask_min", "attention_mask_unpadded"
    graph.insert_before(nodes[0], [smallest, unpadded])
    for index, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None and not value.name:
                value.name = f"{node.name}/input_{index}"
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        out = node.outputs[0]
        out.name = out.name or f"{node.name}/output"
        branches = []
        for kind, inputs in (("unmasked", node.inputs[:4]), ("masked", node.inputs)):
            inner = ir.node("MultiHeadAttention", list(inputs), attributes=attributes, domain="com.microsoft",
                            name=f"{node.name}/{kind}")
            inner.outputs[0].name, inner.outputs[0].type = f"{out.name}_{kind}", out.type
            branches.append(ir.Graph([], inner.outputs, nodes=[inner], name=f"{node.name}/{kind}_branch"))
        choose = ir.node("If", [unpadded.outputs[0]], attributes={"then_branch": branches[0],
                                                                   "else_branch": branches[1]},
                         name=f"{node.name}/If")
        choose.outputs[0].type, choose.outputs[0].shape = out.type, out.shape
        graph.insert_before(node, choose)
        out.replace_all_uses_with(choose.outputs[0], replace_graph_outputs=True)
        choose.outputs[0].name, out.name = out.name, None
        graph.remove(node, safe=True)
    return len(nodes)
