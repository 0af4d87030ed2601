"""The lowering passes: each rewrites one kind of site of a canonical QDQ graph, in place.

Each pass states what it expects (precondition) and what holds afterwards (postcondition). All but
`symmetric_activations` leave the dequantized values exactly as they were; that one is TensorRT's and says so.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from qbert_deploy.runtimes.graph_checks import (
    BYTE_TYPES,
    PACKED_TYPES,
    activation_qdq,
    axis,
    block_size,
    constant_source,
    embedding_sites,
    weight_sites,
)


class LoweringError(ValueError):
    """A graph that a lowering profile cannot handle (with the reason)."""


def _integers(value: ir.Value) -> np.ndarray:
    tensor = value.const_value
    if tensor is None:
        raise LoweringError(f"{value.name}: expected a constant tensor")
    return np.asarray(tensor.numpy()).astype(np.int32)


def weight_bits(model: ir.Model) -> dict[str, int]:
    """The export's `qbert.weight_bits` metadata: quantized module name -> weight bits."""
    try:
        bits = json.loads(model.metadata_props.get("qbert.weight_bits", "{}"))
    except json.JSONDecodeError:
        raise LoweringError("qbert.weight_bits metadata is not JSON") from None
    try:
        return {str(k): int(v) for k, v in bits.items()}
    except (AttributeError, TypeError, ValueError):
        raise LoweringError("qbert.weight_bits metadata is not a JSON object of module -> bits") from None


def _constant(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    """A new initializer (named uniquely) holding `array`."""
    unique, n = name, 1
    while unique in graph.initializers:
        unique, n = f"{name}_{n}", n + 1
    tensor = ir.tensor(array, dtype=dtype, name=unique) if dtype is not None else ir.tensor(array, name=unique)
    value = ir.val(unique, tensor.dtype, ir.Shape(tensor.shape.numpy()), const_value=tensor)
    graph.register_initializer(value)
    return value


def _zero_point(dq: ir.Node) -> ir.Value | None:
    return dq.inputs[2] if len(dq.inputs) > 2 else None


def _site_arrays(dq: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(integers, per-channel scale, per-channel zero point) of a weight DequantizeLinear, as stored."""
    source = constant_source(dq.inputs[0])
    scale = dq.inputs[1]
    if source is None or scale is None or scale.const_value is None:
        raise LoweringError(f"{dq.name}: weight or scale is not a constant")
    q = _integers(source)
    zp_value = _zero_point(dq)
    zp = _integers(zp_value) if zp_value is not None else np.zeros(scale.const_value.shape.numpy(), np.int32)
    return q, np.asarray(scale.const_value.numpy(), np.float32), zp


def _per_output_channel(dq: ir.Node) -> None:
    """Precondition shared by the weight passes: a [in, out] weight with one scale per output column."""
    if block_size(dq) or axis(dq) != 1 or dq.inputs[1] is None or dq.inputs[1].shape is None \
            or len(dq.inputs[1].shape) != 1:
        raise LoweringError(f"{dq.name}: expected a per-output-channel DequantizeLinear (axis=1, no block_size); "
                            "blocked or per-tensor weights are not lowered")


def widen_weights_to_int8(model: ir.Model) -> int:
    """cpu-w8a8: every MatMul weight DequantizeLinear reads signed int8, with the same integers and scales.

    Pre: weights are per-output-channel (axis 1) in int2/uint2/int4/uint4/int8/uint8.
    Post: each weight DQ reads int8 (packed constants through a Cast that ORT folds at session start, so the file
    stays packed; uint8 shifted by -128 in weight and zero point alike, which leaves q - zp unchanged).
    Returns the number of weights touched.
    """
    graph = model.graph
    done = 0
    for site in list(weight_sites(graph)):
        dq = site.dq
        _per_output_channel(dq)
        weight = dq.inputs[0]
        assert weight is not None
        if weight.dtype == ir.DataType.INT8:
            continue
        if weight.dtype in PACKED_TYPES:
            for index in (0, 2):
                if index < len(dq.inputs) and dq.inputs[index] is not None:
                    _cast_input(graph, dq, index, ir.DataType.INT8)
        elif weight.dtype == ir.DataType.UINT8:
            q, _, zp = _site_arrays(dq)
            dq.replace_input_with(0, _constant(graph, f"{site.module}.weight_q_s8", (q - 128).astype(np.int8)))
            dq.replace_input_with(2, _constant(graph, f"{site.module}.weight_zero_point_s8",
                                               (zp - 128).astype(np.int8)))
        else:
            raise LoweringError(f"{dq.name}: weight type {weight.dtype} cannot be widened to int8")
        done += 1
    return done


def _cast_input(graph: ir.Graph, node: ir.Node, index: int, dtype: ir.DataType) -> None:
    value = node.inputs[index]
    assert value is not None
    cast = ir.node("Cast", [value], attributes={"to": dtype}, name=f"{node.name}/widen_{index}")
    cast.outputs[0].dtype, cast.outputs[0].shape = dtype, value.shape
    cast.outputs[0].name = f"{value.name}_{dtype.name.lower()}"
    graph.insert_before(node, cast)
    node.replace_input_with(index, cast.outputs[0])


def gather_then_dequantize(model: ir.Model) -> int:
    """Embeddings: pick the rows first, then dequantize only them (not the whole table on every run).

    Pre: DequantizeLinear(table, per-row scale, axis 0) whose one consumer is Gather(axis 0).
    Post: Gather on the integer table, scale and zero point, then (float(q) - float(zp)) * scale: the same values
    DequantizeLinear gives (an exact integer difference, one rounding in the product).
    """
    graph = model.graph
    done = 0
    for dq, gather in list(embedding_sites(graph)):
        table, scale, zero_point = dq.inputs[0], dq.inputs[1], _zero_point(dq)
        ids = gather.inputs[1]
        assert table is not None and scale is not None and ids is not None
        if scale.shape is None or len(scale.shape) != 1:
            continue  # a per-tensor table is cheap to dequantize whole; leave it
        name = dq.name.removesuffix("/weight_dequantize") if dq.name else "embedding"
        last = _constant(graph, f"{name}.unsqueeze_axes", np.array([-1], np.int64))
        nodes = [ir.node("Gather", [table, ids], attributes={"axis": 0}, name=f"{name}/gather_q")]
        rows = ir.node("Cast", [nodes[0].outputs[0]], attributes={"to": ir.DataType.FLOAT},
                       name=f"{name}/cast_q")
        nodes.append(rows)
        centred = rows.outputs[0]
        if zero_point is not None:
            zp_rows = ir.node("Gather", [zero_point, ids], attributes={"axis": 0}, name=f"{name}/gather_zp")
            zp_float = ir.node("Cast", [zp_rows.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                               name=f"{name}/cast_zp")
            zp_col = ir.node("Unsqueeze", [zp_float.outputs[0], last], name=f"{name}/unsqueeze_zp")
            sub = ir.node("Sub", [centred, zp_col.outputs[0]], name=f"{name}/sub_zp")
            nodes += [zp_rows, zp_float, zp_col, sub]
            centred = sub.outputs[0]
        scale_rows = ir.node("Gather", [scale, ids], attributes={"axis": 0}, name=f"{name}/gather_scale")
        scale_col = ir.node("Unsqueeze", [scale_rows.outputs[0], last], name=f"{name}/unsqueeze_scale")
        mul = ir.node("Mul", [centred, scale_col.outputs[0]], name=f"{name}/dequantize_rows")
        nodes += [scale_rows, scale_col, mul]
        graph.insert_before(gather, nodes)
        mul.outputs[0].type, mul.outputs[0].shape = gather.outputs[0].type, gather.outputs[0].shape
        gather.outputs[0].replace_all_uses_with(mul.outputs[0], replace_graph_outputs=True)
        graph.remove([gather, dq], safe=True)
        done += 1
    return done


def nbits_block_size(k: int, largest: int = 128) -> int:
    """The largest power of two (16..`largest`) dividing K: per-channel scales repeat over K's blocks.

    A K that no such power divides gets blocks of 16 and a last block padded with the zero point (MatMulNBits
    stores ceil(K / block) blocks per column and reads only K values of each).
    """
    size = largest
    while size >= 16:
        if k % size == 0:
            return size
        size //= 2
    return 16


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers along the last axis, lowest bits first (MatMulNBits' byte layout)."""
    per_byte = 8 // bits
    if values.shape[-1] % per_byte:
        pad = per_byte - values.shape[-1] % per_byte
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), values.dtype)], axis=-1)
    grouped = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        packed |= (grouped[..., i] << (bits * i)).astype(np.uint8)
    return packed


def weights_to_matmulnbits(model: ir.Model, accuracy_level: int, widen_2bit: bool = True,
                           widen_to_8bit: bool = False) -> int:
    """weight-only / cuda: DequantizeLinear(weight) + MatMul -> com.microsoft.MatMulNBits, accuracy level pinned.

    Pre: per-output-channel weights [K, N].
    Post: MatMulNBits(A, packed B [N, ceil(K/bs), bs*bits/8], scales [N*K/bs], zero points) computing the same
    (q - zp) * scale weights; 2- and 3-bit weights use the 4-bit kernel (same integers), signed integers are
    offset to unsigned with the zero point offset alike. Activation Q/DQ in front stay, so the activations are
    what the canonical graph computes; only the GEMM's float summation differs. `widen_to_8bit` puts every weight
    in the 8-bit kernel (same integers), for GPUs where it is the faster one.
    """
    graph = model.graph
    done = 0
    for site in list(weight_sites(graph)):
        dq, matmul = site.dq, site.matmul
        _per_output_channel(dq)
        source = constant_source(dq.inputs[0])
        assert source is not None
        if source.dtype in PACKED_TYPES:
            bits = 2 if source.dtype in (ir.DataType.INT2, ir.DataType.UINT2) and not widen_2bit else 4
        elif source.dtype in BYTE_TYPES:
            bits = 8
        else:
            raise LoweringError(f"{dq.name}: weight type {source.dtype} has no MatMulNBits form")
        bits = 8 if widen_to_8bit else bits
        q, scale, zp = _site_arrays(dq)
        k, n = q.shape
        offset = 1 << (bits - 1) if source.dtype in (ir.DataType.INT2, ir.DataType.INT4, ir.DataType.INT8) else 0
        block = nbits_block_size(k)
        blocks = -(-k // block)
        q_u = (q + offset).T  # [N, K]
        if blocks * block != k:  # pad K to whole blocks with the zero point: the padding dequantizes to 0
            pad = np.repeat((zp + offset)[:, None], blocks * block - k, axis=1)
            q_u = np.concatenate([q_u, pad.astype(q_u.dtype)], axis=1)
        q_u = q_u.reshape(n, blocks, block)  # [N, blocks, block]
        packed_b = _pack(q_u, bits)
        scales = np.repeat(scale[:, None], blocks, axis=1).reshape(-1).astype(np.float32)
        zps = np.repeat((zp + offset)[:, None], blocks, axis=1)  # [N, blocks]
        packed_zp = _pack(zps, bits).reshape(-1)
        name = site.module
        inputs = [matmul.inputs[0], _constant(graph, f"{name}.weight_nbits", packed_b),
                  _constant(graph, f"{name}.weight_nbits_scale", scales),
                  _constant(graph, f"{name}.weight_nbits_zero_point", packed_zp)]
        fused = ir.node("MatMulNBits", inputs, domain="com.microsoft", name=f"{name}/MatMulNBits", attributes={
            "K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": accuracy_level})
        fused.outputs[0].type, fused.outputs[0].shape = matmul.outputs[0].type, matmul.outputs[0].shape
        fused.outputs[0].name = matmul.outputs[0].name
        matmul.outputs[0].name = None
        graph.insert_before(matmul, fused)
        matmul.outputs[0].replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
        graph.remove(matmul, safe=True)
        if not list(dq.outputs[0].uses()):
            graph.remove(dq, safe=True)
        done += 1
    model.opset_imports.setdefault("com.microsoft", 1)
    return done


def symmetric_weights(model: ir.Model) -> int:
    """tensorrt: weights as signed int8 with zero point 0 (TensorRT has no zero points), exactly.

    Pre: per-output-channel weights whose q - zp fits in [-127, 127] (always true up to 7 bits).
    Post: each weight DQ reads an int8 constant q - zp with an all-zero int8 zero point and the same scale.
    """
    graph = model.graph
    done = 0
    for site in list(weight_sites(graph)):
        dq = site.dq
        _per_output_channel(dq)
        q, _, zp = _site_arrays(dq)
        centred = q - zp[None, :]
        if centred.min() < -127 or centred.max() > 127:
            raise LoweringError(f"{site.module}: 8-bit asymmetric weights do not fit symmetric int8 exactly; "
                                "TensorRT needs zero points of 0 (quantize 8-bit layers with symmetric=true)")
        dq.replace_input_with(0, _constant(graph, f"{site.module}.weight_q_sym", centred.astype(np.int8)))
        if len(dq.inputs) < 3:
            raise LoweringError(f"{dq.name}: expected an explicit zero point")
        dq.replace_input_with(2, _constant(graph, f"{site.module}.weight_zero_point_sym", np.zeros(zp.shape, np.int8)))
        done += 1
    return done


def symmetric_activations(model: ir.Model) -> int:
    """tensorrt: uint8 asymmetric activation Q/DQ become int8 symmetric over the same clipping range.

    This one changes numerics (TensorRT has no zero points): scale' = max(|lo|, |hi|) / 127 where [lo, hi] is the
    canonical range. Pre: per-tensor uint8 activation Q/DQ pairs. Post: int8 Q/DQ with zero point 0.
    """
    graph = model.graph
    done = 0
    for q in [n for n in graph if n.op_type == "QuantizeLinear"]:
        dq_uses = [u.node for u in q.outputs[0].uses()]
        if len(dq_uses) != 1 or activation_qdq(dq_uses[0].outputs[0]) is None:
            continue
        dq = dq_uses[0]
        scale, zp = q.inputs[1], q.inputs[2] if len(q.inputs) > 2 else None
        if scale is None or scale.const_value is None or zp is None or zp.const_value is None:
            raise LoweringError(f"{q.name}: activation scale and zero point must be constants")
        if zp.dtype != ir.DataType.UINT8 or scale.const_value.size != 1:
            raise LoweringError(f"{q.name}: expected a per-tensor uint8 activation quantizer")
        s = float(np.asarray(scale.const_value.numpy()).reshape(()))
        z = int(np.asarray(zp.const_value.numpy()).reshape(()))
        bound = max(abs(s * (0 - z)), abs(s * (255 - z)))
        base = q.name.removesuffix("/input_quantize") if q.name else "activation"
        new_scale = _constant(graph, f"{base}.input_scale_sym", np.array(bound / 127.0, np.float32))
        new_zp = _constant(graph, f"{base}.input_zero_point_sym", np.array(0, np.int8))
        for node in (q, dq):
            node.replace_input_with(1, new_scale)
            node.replace_input_with(2, new_zp)
        q.outputs[0].dtype = ir.DataType.INT8
        done += 1
    return done


def residual_sum(model: ir.Model) -> int:
    """cpu-w8a8: write each residual Add before a LayerNormalization as Sum, which ORT does not fuse.

    ORT 1.32 fuses Add + LayerNormalization into SkipLayerNormalization, about 5x slower than the two ops on this
    CPU (DESIGN.md §4). Pre: LayerNormalization(Add(a, b)) with a and b computed tensors, the sum used only there.
    Post: LayerNormalization(Sum(a, b)), or Sum(x, bias, b) when a = Add(x, constant bias) is used only here:
    the same additions in the same order, so bit-identical values.
    """
    graph = model.graph
    done = 0
    for norm in [n for n in graph if n.op_type == "LayerNormalization"]:
        add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
        if add is None or add.op_type != "Add" or len(list(add.outputs[0].uses())) != 1:
            continue
        a, b = add.inputs[0], add.inputs[1]
        if a is None or b is None or a.const_value is not None or b.const_value is not None:
            continue
        terms = [a, b]
        inner = a.producer()
        if (inner is not None and inner.op_type == "Add" and len(list(a.uses())) == 1
                and inner.inputs[1] is not None and inner.inputs[1].const_value is not None
                and inner.inputs[0] is not None):
            terms = [inner.inputs[0], inner.inputs[1], b]
        total = ir.node("Sum", terms, name=f"{norm.name}/residual_sum")
        total.outputs[0].type, total.outputs[0].shape = add.outputs[0].type, add.outputs[0].shape
        graph.insert_before(add, total)
        add.outputs[0].replace_all_uses_with(total.outputs[0])
        graph.remove(add, safe=True)
        if len(terms) == 3 and inner is not None:
            graph.remove(inner, safe=True)
        done += 1
    return done


def fold_activation_qdq(model: ir.Model) -> int:
    """cuda-fused: drop every 8-bit activation QuantizeLinear -> DequantizeLinear pair; activations stay float.

    This changes numerics, by design (the profile says so and the accuracy gate checks it): the canonical graph
    rounds and clips each Linear's input to 8 bits, the folded one feeds the float value. On a GPU the pair is two
    launches per Linear that no fused kernel absorbs, and ORT's transformer fusions do not match through it.
    Pre: per-tensor activation Q/DQ pairs (a QuantizeLinear whose every consumer is a DequantizeLinear).
    Post: no QuantizeLinear on a computed tensor; the weights' DequantizeLinear are untouched.
    Returns the number of QuantizeLinear removed.
    """
    graph = model.graph
    done = 0
    for q in [n for n in graph if n.op_type == "QuantizeLinear"]:
        source = q.inputs[0]
        if source is None or constant_source(source) is not None:
            continue
        dqs = [use.node for use in q.outputs[0].uses()]
        if not dqs or any(dq.op_type != "DequantizeLinear" or activation_qdq(dq.outputs[0]) is None for dq in dqs):
            continue
        for dq in dqs:
            dq.outputs[0].replace_all_uses_with(source, replace_graph_outputs=True)
        graph.remove([*dqs, q], safe=True)
        done += 1
    return done


def pack_qkv_matmulnbits(model: ir.Model) -> int:
    """cuda-fused: the Q, K and V projections of each attention as one MatMulNBits over the three weights side by
    side, then a Split: one GEMM launch instead of three, on a wider N that fills the GPU better at small batches.

    Pre: MultiHeadAttention whose query, key and value are each the only use of a MatMulNBits, all three reading the
    same input with the same K, bits, block size and accuracy level (the layer's weights as `weights_to_matmulnbits`
    wrote them). Post: MatMulNBits(A, [B_q; B_k; B_v], [s_q; s_k; s_v], [zp_q; zp_k; zp_v]) with N = N_q + N_k + N_v,
    Split on the last axis into the three projections. Each output column is computed from its own packed row,
    scales and zero points, exactly as before. Returns the number of attentions packed.
    """
    graph = model.graph
    done = 0
    for mha in [n for n in graph if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]:
        if len(mha.inputs) < 3:
            continue
        nodes = [value.producer() if value is not None else None for value in mha.inputs[:3]]
        if any(n is None or n.op_type != "MatMulNBits" or len(n.inputs) != 4 for n in nodes):
            continue
        q, k, v = (n for n in nodes if n is not None)
        same = ("K", "bits", "block_size", "accuracy_level")
        if any(n.inputs[0] is not q.inputs[0] or len(list(n.outputs[0].uses())) != 1
               or any(n.attributes[a].as_int() != q.attributes[a].as_int() for a in same) for n in (q, k, v)):
            continue
        arrays = []
        for index in (1, 2, 3):
            values = [n.inputs[index] for n in (q, k, v)]
            if any(x is None or x.const_value is None for x in values):
                break
            arrays.append(np.concatenate([np.asarray(x.const_value.numpy()) for x in values if x is not None
                                          and x.const_value is not None], axis=0))
        if len(arrays) != 3:
            continue
        widths = [n.attributes["N"].as_int() for n in (q, k, v)]
        name = (mha.name or "attention").removesuffix("/MultiHeadAttention")
        inputs = [q.inputs[0], _constant(graph, f"{name}.qkv_weight_nbits", arrays[0]),
                  _constant(graph, f"{name}.qkv_weight_nbits_scale", arrays[1]),
                  _constant(graph, f"{name}.qkv_weight_nbits_zero_point", arrays[2])]
        attributes = {a: q.attributes[a].as_int() for a in same} | {"N": sum(widths)}
        fused = ir.node("MatMulNBits", inputs, domain="com.microsoft", attributes=attributes,
                        name=f"{name}/qkv_MatMulNBits")
        fused.outputs[0].name, fused.outputs[0].type = f"{name}_qkv", q.outputs[0].type
        split = ir.node("Split", [fused.outputs[0], _constant(graph, f"{name}.qkv_split", np.array(widths, np.int64))],
                        attributes={"axis": -1}, num_outputs=3, name=f"{name}/qkv_split")
        graph.insert_before(q, [fused, split])
        for old, new in zip((q, k, v), split.outputs, strict=True):
            new.name, new.type, new.shape = f"{old.outputs[0].name}_packed", old.outputs[0].type, old.outputs[0].shape
            old.outputs[0].replace_all_uses_with(new)
        graph.remove([q, k, v], safe=True)
        done += 1
    return done


def unpacked_weight_copies(model: ir.Model) -> list[str]:
    """Postcondition of the memory-first profile: what would hold an encoder matrix wider than its bits in RAM.

    Every quantized Linear must be a MatMulNBits whose packed bits are at most 4 for a weight of at most 4 bits
    (2-bit weights in the 2-bit kernel), and no DequantizeLinear or unpacked initializer of a quantized Linear may
    remain that ORT could fold into an int8 or fp32 copy of its matrix (unquantized Linears, such as the pooler,
    stay fp32 as in the canonical graph). Returns one line per problem (empty: the postcondition holds).
    """
    graph = model.graph
    problems = [f"{site.module}: weight still behind DequantizeLinear -> MatMul" for site in weight_sites(graph)]
    bits = weight_bits(model)
    for node in graph:
        if node.op_type != "MatMulNBits":
            continue
        module = (node.name or "").removesuffix("/MatMulNBits")
        wanted = bits.get(module)
        packed = node.attributes["bits"].as_int()
        smallest_kernel = 2 if wanted is not None and wanted <= 2 else 4 if wanted is not None and wanted <= 4 else 8
        if wanted is not None and packed > smallest_kernel:
            problems.append(f"{module}: {wanted}-bit weight held at {packed} bits")
    quantized = tuple(f"{name}." for name in bits if ".embeddings." not in f".{name}.")
    for value in graph.initializers.values():
        shape = value.shape
        if value.dtype != ir.DataType.UINT8 and shape is not None and len(shape) >= 2 \
                and (value.name or "").startswith(quantized):
            problems.append(f"{value.name}: {value.dtype} matrix {list(shape)} of a quantized Linear in the file")
    return problems
