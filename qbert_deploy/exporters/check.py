"""Verify an export directory before deployment, with onnx and onnxruntime only (no torch).

Each check is one small function returning a `CheckResult`; `check_export` runs them all and never raises on a
bad directory: a corrupt or tampered file is a failed check with a one-line reason. Every model file is checked,
the canonical graph and each lowered file (the one qbert-serve runs by default): the onnx checker, the
onnxruntime load and the sha256 recorded at export. What qbert-serve needs of the directory (config.json's types,
the tokenizer, the graph's inputs and outputs) is checked by the same code qbert-serve runs at start
(`qbert_deploy.runtimes.export_dir`), so a directory that passes here is one qbert-serve starts on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxruntime as ort  # imported here, not mid-check: a Ctrl-C inside an import is not a KeyboardInterrupt

from qbert_deploy.recipe import Recipe
from qbert_deploy.runtimes import export_dir
from qbert_deploy.runtimes.export_dir import ExportConfig

REQUIRED_METADATA = ("qbert.format_version", "qbert.recipe", "qbert.recipe_sha256", "qbert.checkpoint_sha256",
                     "qbert.weights_sha256", "qbert.labels", "qbert.versions")
# qbert_recipe.json holds the recipe plus the digests that tie it to the checkpoint, the weights and the files (and
# a deployment folder's profile).
RECIPE_FILE_DIGESTS = ("checkpoint_sha256", "weights_sha256", export_dir.FILES_KEY, export_dir.DEPLOYED_KEY)
TOKENIZER_REQUIRED = ("tokenizer.json", "tokenizer_config.json")  # qbert-serve tokenizes with tokenizer.json


def weights_sha256(model: ir.Model) -> str:
    """Hash of every initializer (name, type, shape, stored bytes) in name order: what the graph computes with."""
    h = hashlib.sha256()
    for name in sorted(model.graph.initializers):
        tensor = model.graph.initializers[name].const_value
        if tensor is None:
            h.update(f"{name}:none".encode())
            continue
        h.update(f"{name}:{tensor.dtype.name}:{list(tensor.shape)}".encode())
        h.update(tensor.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


@dataclass
class _Context:
    folder: Path
    files: export_dir.ModelFiles  # the canonical graph (model.canonical.onnx in a deployment folder), lowered ones
    model: ir.Model | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    recipe_file: dict[str, Any] = field(default_factory=dict)
    session: Any = None  # onnxruntime's session on model.onnx, once loaded
    config: ExportConfig | None = None  # config.json as qbert-serve reads it, once validated

    @property
    def canonical(self) -> Path:
        return self.files.canonical


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:400]}" if text else type(err).__name__


def _files(ctx: _Context) -> str:
    names = (ctx.canonical.name, export_dir.CANONICAL_FILE, "config.json", "qbert_recipe.json", *TOKENIZER_REQUIRED)
    missing = [n for n in dict.fromkeys(names) if not (ctx.folder / n).is_file()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    deployed = ctx.files.deployed
    layout = f"; a deployment folder: model.onnx is lowered for {deployed}" if deployed else ""
    return f"{ctx.canonical.name}, config.json, qbert_recipe.json and tokenizer files present{layout}"


def _onnx_checker(ctx: _Context) -> str:
    onnx.checker.check_model(str(ctx.canonical), full_check=True)
    ctx.model = ir.load(ctx.canonical)
    ctx.metadata = dict(ctx.model.metadata_props)
    return "onnx.checker.check_model(full_check=True) passes"


def _recipe_hash(ctx: _Context) -> str:
    missing = [k for k in REQUIRED_METADATA if k not in ctx.metadata]
    if missing:
        raise ValueError(f"model.onnx metadata lacks {', '.join(missing)}")
    data = json.loads((ctx.folder / "qbert_recipe.json").read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("qbert_recipe.json is not a JSON object")
    ctx.recipe_file = data
    file_recipe = Recipe.from_json({k: v for k, v in data.items() if k not in RECIPE_FILE_DIGESTS})
    meta_recipe = Recipe.loads(ctx.metadata["qbert.recipe"])
    declared = ctx.metadata["qbert.recipe_sha256"]
    if meta_recipe.digest() != declared:
        raise ValueError(f"metadata recipe hashes to {meta_recipe.digest()[:12]}, metadata says {declared[:12]}")
    if file_recipe.digest() != declared:
        raise ValueError(f"qbert_recipe.json hashes to {file_recipe.digest()[:12]}, model.onnx says {declared[:12]}")
    if data.get("checkpoint_sha256") != ctx.metadata["qbert.checkpoint_sha256"]:
        raise ValueError("qbert_recipe.json and model.onnx name different checkpoints (checkpoint_sha256)")
    return f"recipe sha256 {declared[:12]} matches qbert_recipe.json and metadata"


def _weights_hash(ctx: _Context) -> str:
    if ctx.model is None:
        raise ValueError("model.onnx could not be read")
    actual = weights_sha256(ctx.model)
    declared = ctx.metadata.get("qbert.weights_sha256")
    if actual != declared:
        raise ValueError(f"initializers hash to {actual[:12]}, metadata says {str(declared)[:12]}: weights changed")
    if ctx.recipe_file.get("weights_sha256") != actual:
        raise ValueError("qbert_recipe.json's weights_sha256 differs from the weights in model.onnx")
    return f"weights sha256 {actual[:12]} matches metadata and qbert_recipe.json"


def _labels(ctx: _Context) -> str:
    labels = json.loads(ctx.metadata["qbert.labels"])
    from_config = export_dir.read_config(ctx.folder).labels  # none for a headless embedding export
    if from_config != labels:
        raise ValueError(f"config.json labels {from_config} differ from model.onnx labels {labels}")
    return f"{len(labels)} labels agree between config.json and model.onnx"


def _file_hashes(ctx: _Context) -> str:
    """Every model file against the sha256 recorded at export, and every recorded file present."""
    records = export_dir.recorded_files(ctx.folder)
    files = [ctx.canonical, *ctx.files.lowered.values()]
    for path in files:
        export_dir.verify_file(ctx.folder, path)
    gone = sorted(set(records) - {p.name for p in files})
    if gone:
        raise ValueError(f"qbert_recipe.json records {', '.join(gone)}, which the directory lacks")
    return f"sha256 of {', '.join(p.name for p in files)} match qbert_recipe.json"


def _ort_load(path: Path) -> Any:
    """An onnxruntime session on a model file (optimizations off: this checks the file, not ORT's rewrites)."""
    from qbert_deploy.runtimes.session import load_error

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped exceptions
        raise ValueError(load_error(err)) from None


def _servable(ctx: _Context) -> str:
    """What qbert-serve checks at start, by the same code: config.json, the tokenizer, model.onnx's signature."""
    ctx.config = export_dir.read_config(ctx.folder)
    export_dir.load_tokenizer(ctx.folder, ctx.config)
    if ctx.session is None:
        raise ValueError("model.onnx does not load in onnxruntime (see the opset check)")
    export_dir.check_signature(ctx.config, ctx.session.get_inputs(), ctx.session.get_outputs(), ctx.canonical)
    c = ctx.config
    return (f"config.json, tokenizer.json and model.onnx's inputs and outputs fit qbert-serve ({c.family.model_type}, "
            f"{c.task}, {len(c.labels)} labels, up to {c.max_length} tokens)")


def _lowered(profile: str, path: Path) -> Callable[[_Context], str]:
    def check(ctx: _Context) -> str:
        """A lowered file: the onnx checker, the export it came from, its profile, the onnxruntime load and the
        signature qbert-serve needs (its sha256 is the file hashes check)."""
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        for key in ("qbert.recipe_sha256", "qbert.checkpoint_sha256"):
            if props.get(key) != ctx.metadata.get(key):
                raise ValueError(f"its {key} differs from model.onnx's: lowered from another export")
        lowered = json.loads(props.get("qbert.lowering", "{}")).get("profile")
        if lowered != profile:
            raise ValueError(f"lowered for profile {lowered!r}, but named for {profile!r}")
        session = _ort_load(path)
        if ctx.config is None:
            raise ValueError("its inputs and outputs are not checked: config.json is not valid (see servable)")
        export_dir.check_signature(ctx.config, session.get_inputs(), session.get_outputs(), path)
        return f"onnx checker, onnxruntime load and qbert-serve's signature pass (profile {profile})"
    return check


def _ort_opset(ctx: _Context) -> str:
    """Probe the installed onnxruntime with a one-node model at the same opset, then load the real model."""
    from onnx import TensorProto, helper

    if ctx.model is None:
        raise ValueError("model.onnx could not be read")
    opset = ctx.model.opset_imports.get("", 0)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    try:
        ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT's own exception classes derive from Exception only
        raise ValueError(f"opset {opset} is not supported by onnxruntime {ort.__version__}") from err
    ctx.session = _ort_load(ctx.canonical)
    return f"opset {opset} supported; onnxruntime {ort.__version__} loads the model"


def _checkpoint(path: Path) -> Callable[[_Context], str]:
    def check(ctx: _Context) -> str:
        from qbert_deploy.checkpoint import load_checkpoint  # torch, only when asked

        digest = load_checkpoint(path).digest()
        declared = ctx.metadata.get("qbert.checkpoint_sha256")
        if digest != declared:
            raise ValueError(f"{path} digests to {digest[:12]}, the export was made from {str(declared)[:12]}")
        return f"{path.name} digest {digest[:12]} matches the export"
    return check


def check_export(folder: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) \
        -> list[CheckResult]:
    """Run every check on an export directory; later checks are skipped once the model cannot be read."""
    folder = Path(folder)
    if not folder.is_dir():
        return [CheckResult("export directory", False, f"{folder}: not a directory")]
    try:
        files = export_dir.model_files(folder)
    except export_dir.ExportDirError as err:  # an unreadable qbert_recipe.json: the plain layout, and say why
        files = export_dir.ModelFiles(folder / export_dir.CANONICAL_FILE, {}, None)
        layout_error: str | None = str(err)
    else:
        layout_error = None
    ctx = _Context(folder, files)
    checks: list[tuple[str, Callable[[_Context], str]]] = [
        ("files", _files), ("onnx checker", _onnx_checker), ("recipe hash", _recipe_hash),
        ("weights hash", _weights_hash), ("file hashes", _file_hashes), ("labels", _labels),
        ("onnxruntime opset", _ort_opset), ("servable", _servable)]
    checks += [(f"lowered {path.name}", _lowered(profile, path)) for profile, path in files.lowered.items()]
    if checkpoint is not None:
        checks.append(("checkpoint digest", _checkpoint(Path(checkpoint))))
    results = [] if layout_error is None else [CheckResult("layout", False, layout_error)]
    for name, check in checks:
        if name not in ("files", "onnx checker") and ctx.model is None:
            results.append(CheckResult(name, False, "skipped: model.onnx could not be read"))
            continue
        try:
            results.append(CheckResult(name, True, check(ctx)))
        except Exception as err:  # protobuf, onnx and onnxruntime raise many unrelated types on corrupt input
            results.append(CheckResult(name, False, _first_line(err)))
    return results


__all__ = ["CheckResult", "check_export", "weights_sha256"]
