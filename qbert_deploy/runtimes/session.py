"""ONNX Runtime sessions by execution-provider name and lowering profile. Imports neither torch nor transformers."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
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


def first_available(providers: Sequence[str]) -> str:
    """The first of `providers` (short names) that this onnxruntime build has: the one a session will start on."""
    available = set(ort.get_available_providers())
    for name, full in zip(providers, provider_names(providers), strict=True):
        if full in available:
            return name
    raise SessionError(f"none of {', '.join(providers)} is available in this onnxruntime build "
                       f"(available: {', '.join(sorted(available))})")


def session_options(threads: int | None = None, optimize: bool = True,
                    optimized_model_path: str | os.PathLike[str] | None = None,
                    config: Mapping[str, str] | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Idle spinning threads steal the CPU from the next session in the same process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def _short(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


TESTED_ORT = "1.32.0"  # the newest onnxruntime the test suite ran on
# How ORT says it lacks an operator: no kernel for a (domain:)op at some version, or an op it does not know at all.
_MISSING_OP = (re.compile(r"Could not find an implementation for (\S+?)\((\d+)\)"),
               re.compile(r"(\S+?)\((-?\d+)\) is not a registered function/op"),
               re.compile(r"No Op registered for (\S+) with domain_version of (\d+)"))


def load_error(err: Exception) -> str:
    """One line for ORT's refusal of a model, naming the installed onnxruntime; an operator this ORT lacks (an
    older release than the profiles were written for) is named with the upgrade to make."""
    text = str(err)
    for pattern in _MISSING_OP:
        match = pattern.search(text)
        if match:
            version = f" (opset {match.group(2)})" if not match.group(2).startswith("-") else ""
            return (f"onnxruntime {ort.__version__} has no kernel for {match.group(1)}{version}, which this model "
                    f"needs; upgrade onnxruntime (pip install -U onnxruntime; tested with {TESTED_ORT})")
    return f"onnxruntime {ort.__version__} could not load the model: {_short(err)}"


def model_lowering(model: str | os.PathLike[str] | bytes) -> str | None:
    """The lowering profile recorded in a model file, or None for a canonical (unlowered) model."""
    import onnx

    try:
        proto = (onnx.load_from_string(model) if isinstance(model, bytes)
                 else onnx.load(os.fspath(model), load_external_data=False))
    except Exception as err:  # protobuf raises DecodeError for a file that is not a model
        raise SessionError(f"not a readable ONNX model: {_short(err)}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "qbert.lowering" not in props:
        return None
    profile: str = json.loads(props["qbert.lowering"]).get("profile", "")
    return profile


def _profiled_model(model: str | os.PathLike[str] | bytes, profile: str, provider: str) -> str | bytes:
    """The model to open for `profile`: the file itself when lowered so, else lowered in memory."""
    from qbert_deploy.runtimes.lowering import LoweringError, lower_model, profile_info

    try:
        info = profile_info(profile)
    except LoweringError as err:
        raise SessionError(str(err)) from None
    if provider not in info.providers:
        raise SessionError(f"profile {profile!r} is for {', '.join(info.providers)}, not {provider}; "
                           f"lower with a profile for {provider}")
    done = model_lowering(model)
    if done == profile:
        return model if isinstance(model, bytes) else os.fspath(model)
    if done is not None:
        raise SessionError(f"the model is lowered for {done!r}, not {profile!r}; lower the canonical model.onnx")
    import onnx
    import onnx_ir as ir

    loaded = ir.from_proto(onnx.load_from_string(model)) if isinstance(model, bytes) else ir.load(os.fspath(model))
    try:
        lower_model(loaded, profile, for_file=False)
    except LoweringError as err:
        raise SessionError(f"cannot lower for {profile}: {err}") from None
    return ir.to_proto(loaded).SerializeToString()


def open_session(model: str | os.PathLike[str] | bytes, providers: Sequence[str] = ("cpu",),
                 threads: int | None = None, optimize: bool = True, allow_fallback: bool = False,
                 optimized_model_path: str | os.PathLike[str] | None = None,
                 profile: str | None = None, cuda_graph: bool = False) -> ort.InferenceSession:
    """A session on the first provider of `providers` that this onnxruntime build has.

    Falling back to a later provider (the CPU, say) happens only with `allow_fallback`, and warns.
    `profile` (see `qbert_deploy.runtimes.lowering.PROFILES`, or "auto" for the provider's default) lowers a
    canonical model in memory, or checks that a lowered file was lowered for it, and applies the profile's
    session settings. `optimized_model_path` dumps the graph ORT actually runs. `cuda_graph` turns on ORT's CUDA
    graphs (CUDA only): run such a session through `qbert_deploy.runtimes.buckets.BucketedSession`, which binds
    fixed buffers per shape bucket, as CUDA graphs need.
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
    config: dict[str, str] = {}
    disabled: list[str] = []
    provider_options: list[dict[str, str]] = [{} for _ in usable]
    if profile is not None:
        from qbert_deploy.runtimes.lowering import default_profile, profile_info

        provider = next(name for name, full in PROVIDERS.items() if full == usable[0])
        profile = default_profile(provider) if profile == "auto" else profile
        model = _profiled_model(model, profile, provider)
        info = profile_info(profile)
        config = dict(info.session_config)
        disabled = list(info.disabled_optimizers)
        provider_options = [dict(info.provider_options.get(p, {})) for p in usable]
    if cuda_graph:
        if usable[0] != PROVIDERS["cuda"]:
            raise SessionError(f"CUDA graphs need the cuda provider, not {usable[0]}")
        provider_options[0]["enable_cuda_graph"] = "1"
    options = session_options(threads, optimize, optimized_model_path, config)
    try:
        session = ort.InferenceSession(model, options, providers=usable, provider_options=provider_options,
                                       disabled_optimizers=disabled)
    except Exception as err:  # onnxruntime raises its own untyped exceptions
        raise SessionError(load_error(err)) from None
    # A listed provider can still fail to start (no libcudnn, no libnvinfer): ORT then quietly uses the CPU.
    running = session.get_providers()[0]
    if running != usable[0] and not allow_fallback:
        raise SessionError(f"{usable[0]} is in this onnxruntime build but did not start (its libraries are "
                           f"missing or the device is unusable); ONNX Runtime would run on {running}")
    if running != usable[0]:
        warnings.warn(f"{usable[0]} did not start; falling back to {running}", stacklevel=2)
    return session
