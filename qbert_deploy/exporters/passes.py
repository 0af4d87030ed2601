"""Small graph passes over the exported ONNX IR, each with one job."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer, rewriter

from qbert_deploy.recipe import WeightQuant

_CONTAINERS = {
    (2, True): (ir.DataType.INT2, ml_dtypes.int2), (2, False): (ir.DataType.UINT2, ml_dtypes.uint2),
    (4, True): (ir.DataType.INT4, ml_dtypes.int4), (4, False): (ir.DataType.UINT4, ml_dtypes.uint4),
    (8, True): (ir.DataType.INT8, np.int8), (8, False): (ir.DataType.UINT8, np.uint8),
}


def container_bits(bits: int, opset: int) -> int:
    """Storage width: int2 needs opset 25 and there is no int3 type, so 3 bits live in int4."""
    if bits == 2 and opset >= 25:
        return 2
    return 4 if bits <= 4 else 8


def _retype(value: ir.Value, dtype: ir.DataType, np_dtype: type) -> None:
    tensor = value.const_value
    if tensor is None:
        raise ValueError(f"initializer {value.name} has no data")
    values = tensor.numpy().astype(np.int32)
    value.const_value = ir.tensor(values.astype(np_dtype), dtype=dtype, name=value.name)
    value.dtype = dtype


def pack_weights(model: ir.Model, specs: Mapping[str, WeightQuant], opset: int) -> None:
    """Store each quantized weight and its zero point in the narrowest ONNX integer type that holds it."""
    inits = model.graph.initializers
    for module, spec in specs.items():
        dtype, np_dtype = _CONTAINERS[(container_bits(spec.bits, opset), spec.symmetric)]
        for suffix in ("weight_q", "weight_zero_point"):
            name = f"{module}.{suffix}"
            if name not in inits:
                raise ValueError(f"the exported graph lost initializer {name}")
            _retype(inits[name], dtype, np_dtype)


def _keep_quant_nodes(node: ir.Node) -> bool | None:
    return False if node.op_type in ("QuantizeLinear", "DequantizeLinear") else None


def simplify(model: ir.Model) -> None:
    """onnxscript's clean-up without initializer de-duplication or CSE, which would merge per-module tensors.

    Q/DQ nodes are never constant-folded: the packed integers must reach the file as integers.
    """
    for _ in range(2):
        optimizer.fold_constants_ir(model, should_fold=_keep_quant_nodes)
        rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES)(model)
        common_passes.RemoveUnusedNodesPass()(model)
    ir.passes.Sequential(
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)


def strip_prefix(model: ir.Model, prefix: str) -> None:
    """Drop a wrapper's module prefix so initializer names are the PyTorch model's own module names."""
    for value in list(model.graph.initializers.values()):
        if value.name and value.name.startswith(prefix):
            model.graph.initializers.pop(value.name)
            value.name = value.name[len(prefix):]
            model.graph.register_initializer(value)


def dedicate_input_quant(model: ir.Model) -> None:
    """Give every MatMul its own activation Q/DQ pair: one pair shared by Q, K and V blocks ORT's fusions."""
    graph = model.graph
    for dq in [n for n in graph if n.op_type == "DequantizeLinear"]:
        q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        uses = list(dq.outputs[0].uses())
        for use in uses[1:]:
            q_copy = ir.Node("", "QuantizeLinear", list(q.inputs), attributes=list(q.attributes.values()))
            dq_copy = ir.Node("", "DequantizeLinear", [q_copy.outputs[0], *dq.inputs[1:]],
                              attributes=list(dq.attributes.values()))
            for out, src in ((q_copy.outputs[0], q.outputs[0]), (dq_copy.outputs[0], dq.outputs[0])):
                out.type, out.shape = src.type, src.shape
            graph.insert_after(dq, [q_copy, dq_copy])
            use.node.replace_input_with(use.idx, dq_copy.outputs[0])


def name_quant_nodes(model: ir.Model, specs: Mapping[str, WeightQuant]) -> None:
    """Name each weight DequantizeLinear, its consumer and the input Q/DQ pair after the PyTorch module."""
    inits = model.graph.initializers
    for module in specs:
        for dq in {use.node for use in inits[f"{module}.weight_q"].uses()}:
            dq.name = f"{module}/weight_dequantize"
            for use in dq.outputs[0].uses():
                consumer = use.node
                consumer.name = f"{module}/{consumer.op_type}"
                if consumer.op_type == "MatMul" and use.idx == 1:
                    _name_input_quant(consumer.inputs[0], module, inits)


def _name_input_quant(activation: ir.Value | None, module: str, inits: Mapping[str, ir.Value]) -> None:
    act_dq = activation.producer() if activation is not None else None
    if act_dq is None or act_dq.op_type != "DequantizeLinear":
        return
    act_dq.name = f"{module}/input_dequantize"
    act_q = act_dq.inputs[0].producer() if act_dq.inputs[0] is not None else None
    if act_q is not None and act_q.op_type == "QuantizeLinear":
        act_q.name = f"{module}/input_quantize"
    _name_constant(act_dq.inputs[1], f"{module}.input_scale", inits)
    _name_constant(act_dq.inputs[2], f"{module}.input_zero_point", inits)


def strip_metadata(model: ir.Model) -> None:
    """Drop the exporter's per-node stack traces: they bloat the file and make it depend on source paths."""
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        node.metadata_props.clear()
        node.doc_string = None
    for value in model.graph.initializers.values():
        value.metadata_props.clear()


def _name_constant(value: ir.Value | None, name: str, inits: Mapping[str, ir.Value]) -> None:
    """Rename an anonymous initializer that only this module uses."""
    if value is None or value.name is None or value.name not in inits or value.name == name or name in inits:
        return
    consumers = {use.node.name for use in value.uses()}
    if all(c and c.startswith(name.rsplit(".", 1)[0] + "/") for c in consumers):
        graph = value.graph
        if graph is not None:
            graph.initializers.pop(value.name)
            value.name = name
            graph.register_initializer(value)
