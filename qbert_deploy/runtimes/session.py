"""ONNX Runtime sessions by execution-provider name. Imports neither torch nor transformers."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class SessionError(RuntimeError):
    """An execution provider or model that ONNX Runtime cannot run as asked."""


def provider_names(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise SessionError(f"unknown execution provider {unknown[0]!r}; choose from {', '.join(PROVIDERS)}")
    return [PROVIDERS[n] for n in names]


def session_options(threads: int | None = None, optimize: bool = True,
                    optimized_model_path: str | os.PathLike[str] | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Idle spinning threads steal the CPU from the next session in the same process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def open_session(model: str | os.PathLike[str] | bytes, providers: Sequence[str] = ("cpu",),
                 threads: int | None = None, optimize: bool = True, allow_fallback: bool = False,
                 optimized_model_path: str | os.PathLike[str] | None = None) -> ort.InferenceSession:
    """A session on the first provider of `providers` that this onnxruntime build has.

    Falling back to a later provider (the CPU, say) happens only with `allow_fallback`, and warns.
    """
    wanted = provider_names(providers)
    available = set(ort.get_available_providers())
    usable = [p for p in wanted if p in available]
    if not usable or (usable[0] != wanted[0] and not allow_fallback):
        raise SessionError(f"{wanted[0]} is not available in this onnxruntime build "
                           f"(available: {', '.join(sorted(available))})")
    if usable[0] != wanted[0]:
        warnings.warn(f"{wanted[0]} is not available; falling back to {usable[0]}", stacklevel=2)
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_file():
        raise SessionError(f"{model}: no such model file")
    try:
        return ort.InferenceSession(model, session_options(threads, optimize, optimized_model_path),
                                    providers=usable)
    except Exception as err:  # onnxruntime raises its own untyped exceptions
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SessionError(f"onnxruntime could not load the model: {first[:300]}") from None
