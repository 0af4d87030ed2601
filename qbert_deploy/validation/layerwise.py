"""Layerwise comparison: PyTorch forward hooks against the same tensors exposed as ONNX graph outputs.

The export names things after PyTorch modules (see the export contract), so a quantized Linear `M` is the
output of the node that consumes the initializer `M.bias` (the bias Add after `M/MatMul`), and encoder layer `L`
ends at the node that consumes its family's closing LayerNorm weight (`L.output.LayerNorm.weight` in BERT).
Those tensors become extra graph outputs on a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from qbert_deploy.families import FAMILIES, is_layer
from qbert_deploy.models.wrap import quantizable_linears
from qbert_deploy.runtimes.session import open_session
from qbert_deploy.validation.backends import BackendSpec, Batch
from qbert_deploy.validation.stats import ErrorStats, error_stats

# Median |error| in 8-bit steps of the reference tensor's range. The median, not a tail statistic: an activation
# that sits on a rounding boundary flips by one step between runtimes and perturbs a whole token downstream, so
# tails grow with depth even between two correct runtimes, while a wrong layer moves the bulk of its outputs.
DEFAULT_TOLERANCE_STEPS = 0.1


def encoder_layers(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if is_layer(name)]


def watched_modules(model: nn.Module) -> list[str]:
    return quantizable_linears(model) + encoder_layers(model)


@torch.no_grad()
def capture_torch(model: nn.Module, batch: Batch, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Outputs of the named modules, in the order their forward passes finish."""
    captured: dict[str, np.ndarray] = {}
    handles = []
    for name in names:
        def hook(_module: nn.Module, _inputs: Any, output: Any, name: str = name) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            captured[name] = tensor.detach().float().numpy().copy()
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _anchors(module: str, linears: set[str]) -> list[str]:
    if module in linears:
        return [f"{module}.bias"]
    return [f"{module}.{norm}.weight" for norm in dict.fromkeys(f.layer_norm for f in FAMILIES.values())]


def exposed_model(model_path: Path, modules: Sequence[str], linears: set[str]) -> tuple[bytes, dict[str, str]]:
    """A copy of the model with each module's output added as a graph output; module -> output name."""
    model = ir.load(model_path)
    graph = model.graph
    found: dict[str, str] = {}
    outputs = {v.name for v in graph.outputs}
    for module in modules:
        init = next((graph.initializers[a] for a in _anchors(module, linears) if a in graph.initializers), None)
        consumers = {use.node for use in init.uses()} if init is not None else set()
        if len(consumers) != 1:
            continue
        value = next(iter(consumers)).outputs[0]
        if value.name is None:
            continue
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        if value.name not in outputs:
            graph.outputs.append(value)
            outputs.add(value.name)
        found[module] = value.name
    return ir.to_proto(model).SerializeToString(), found


def capture_onnx(model_path: Path, spec: BackendSpec, batch: Batch, modules: Sequence[str], linears: set[str],
                 threads: int | None) -> dict[str, np.ndarray]:
    data, names = exposed_model(model_path, modules, linears)
    session = open_session(data, providers=(spec.provider,), threads=threads, optimize=spec.optimize)
    wanted = list(dict.fromkeys(names.values()))
    values = dict(zip(wanted, session.run(wanted, batch), strict=True))
    return {module: np.asarray(values[name]) for module, name in names.items()}


@dataclass(frozen=True)
class LayerError:
    module: str
    error: ErrorStats | None  # None: the backend's graph does not expose this tensor

    def departs(self, tolerance_steps: float) -> bool:
        return self.error is not None and not (self.error.median_steps <= tolerance_steps)

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "error": None if self.error is None else self.error.to_json()}


def _tokens(tensor: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Only the real tokens of a [batch, sequence, ...] tensor: padding positions carry no meaning."""
    if tensor.ndim >= 2 and tensor.shape[:2] == mask.shape:
        return tensor[mask.astype(bool)]
    return tensor


def compare_layers(reference: dict[str, np.ndarray], other: dict[str, np.ndarray],
                   mask: np.ndarray) -> list[LayerError]:
    out = []
    for module, ref in reference.items():
        got = other.get(module)
        if got is None or got.shape != ref.shape:
            out.append(LayerError(module, None))
            continue
        out.append(LayerError(module, error_stats(_tokens(ref, mask), _tokens(got, mask))))
    return out


def first_departure(layers: Sequence[LayerError], tolerance_steps: float) -> str | None:
    """The first module, in execution order, whose error is beyond tolerance."""
    return next((layer.module for layer in layers if layer.departs(tolerance_steps)), None)
