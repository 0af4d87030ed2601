"""A Triton Inference Server model repository from an export directory (onnxruntime backend).

Layout (Triton loads every sub-folder of the repository as a model, so nothing else goes beside the model folder):

    REPO/README.md
    REPO/<name>/config.pbtxt        onnxruntime backend, dynamic batching, instance group, tensor shapes
    REPO/<name>/labels.txt          label names for Triton's classification extension
    REPO/<name>/1/model.onnx        the device's fast profile (cpu-w8a8 for CPU, cuda for GPU) by default: the
                                    export's model.<profile>.onnx, else its model.onnx lowered while writing;
                                    the canonical model.onnx only with profile="canonical"

Lives in runtimes/, not exporters/: it copies an ONNX file and writes text, with neither torch nor transformers.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from qbert_deploy.atomic import atomic_dir
from qbert_deploy.runtimes.export_dir import read_config
from qbert_deploy.runtimes.lowering import lower
from qbert_deploy.runtimes.serving.model import INPUT_NAMES, ModelDirError, served_file
from qbert_deploy.tasks import DEFAULT_TASK, FEATURE, SEQUENCE, output_dims, served_outputs

DEVICES = {"cpu": ("KIND_CPU", "cpu"), "gpu": ("KIND_GPU", "cuda")}  # instance group kind, execution provider
ONNX_TO_TRITON = {7: "TYPE_INT64", 6: "TYPE_INT32", 1: "TYPE_FP32", 10: "TYPE_FP16"}  # onnx.TensorProto codes


@dataclass(frozen=True)
class TritonRepo:
    root: Path
    config: Path
    model: Path
    source: Path  # the export-dir file it was copied (or lowered) from
    profile: str  # the lowering profile shipped, or "canonical"
    lowered: bool  # lowered from model.onnx while writing (the export had no model.<profile>.onnx)


def _tensor_specs(path: Path, task: str = DEFAULT_TASK) -> tuple[dict[str, str], dict[str, str], list[str], int]:
    """Input types, the task's output types, external data files and opset of an ONNX model, without loading its
    weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name: ONNX_TO_TRITON.get(i.type.tensor_type.elem_type, "") for i in model.graph.input}
    found = {o.name: ONNX_TO_TRITON.get(o.type.tensor_type.elem_type, "") for o in model.graph.output}
    names = served_outputs(task)
    if any(n not in found for n in names) or "input_ids" not in inputs or not set(inputs) <= set(INPUT_NAMES):
        raise ModelDirError(f"{path}: expected inputs among {list(INPUT_NAMES)} and outputs {list(names)} "
                            f"({task})")
    outputs = {n: found[n] for n in names}
    unknown = [n for n, t in {**inputs, **outputs}.items() if not t]
    if unknown:
        raise ModelDirError(f"{path}: tensor {unknown[0]!r} has a type Triton's config here does not cover")
    external = sorted({entry.value for tensor in model.graph.initializer
                       if tensor.data_location == onnx.TensorProto.EXTERNAL
                       for entry in tensor.external_data if entry.key == "location"})
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return inputs, outputs, external, opset


def _embedding_size(path: Path) -> int:
    """The fixed last axis of an embedding graph's sentence_embedding output."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    output = next(o for o in model.graph.output if o.name == "sentence_embedding")
    size = output.type.tensor_type.shape.dim[-1].dim_value
    if size <= 0:
        raise ModelDirError(f"{path}: sentence_embedding has no fixed embedding size")
    return int(size)


def config_pbtxt(name: str, inputs: dict[str, str], outputs: dict[str, str], labels: int, device: str,
                 max_batch: int, max_delay_ms: float, instances: int, source: str, task: str = DEFAULT_TASK) -> str:
    kind = DEVICES[device][0]
    tensors = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ -1 ]\n  }}'
                         for n, t in inputs.items())
    dims = ", ".join(str(d) for d in output_dims(task, labels))
    label_file = '    label_filename: "labels.txt"\n' if task == SEQUENCE else ""  # the classification extension
    results = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {dims} ]\n{label_file}  }}'
                          for n, t in outputs.items())
    return (f"# Written by qbert-deploy from {source}. Triton Inference Server, onnxruntime backend.\n"
            f"# dims leave out the batch dimension (max_batch_size > 0); -1 is the sequence length.\n"
            f'name: "{name}"\n'
            f'backend: "onnxruntime"\n'
            f"max_batch_size: {max_batch}\n"
            f"input [\n{tensors}\n]\n"
            f"output [\n{results}\n]\n"
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {round(max_delay_ms * 1000)}\n}}\n"
            f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n")


README = """# Triton model repository for `{name}`

Written by qbert-deploy from `{source}` ({device} instance group, dynamic batching up to {max_batch} rows,
{max_delay_ms} ms queue delay). Run it with NVIDIA's Triton container (its onnxruntime backend):

```bash
docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -p 8002:8002 \\
  -v "$PWD/{repo}:/models" nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
  tritonserver --model-repository=/models
curl localhost:8000/v2/models/{name}/ready
```

Clients speak the same KServe v2 protocol as `qbert-serve`, so `tritonclient.http` code written against
`qbert-serve EXPORT_DIR --model-name {name}` works unchanged: inputs {inputs} (INT64, [batch, sequence]),
outputs {output} (FP32, [batch, {dims}]); `labels.txt` holds the label names ({task}).

Notes:
- Tokenize on the client with the export directory's `tokenizer.json` (or use `qbert-serve`'s text endpoint).
- Triton's dynamic batcher merges only requests of the same shape; pad sequences on the client to a fixed length
  (e.g. the model maximum, or a few length buckets) so that requests can share a batch. `qbert-serve` pads per batch.
- The model's ONNX Runtime version matters: pick a Triton release whose onnxruntime backend runs opset {opset}
  (see Triton's framework support matrix).
"""


def write_triton_repo(export_dir: str | os.PathLike[str], repo_dir: str | os.PathLike[str], *,
                      model_name: str = "qbert", device: str = "cpu", profile: str | None = None,
                      max_batch: int = 32, max_delay_ms: float = 5.0, instances: int = 1) -> TritonRepo:
    """Write (or replace whole) a Triton repository serving the export's model, lowered for `device`.

    `profile` None ships the device's fast profile (`qbert_deploy.runtimes.lowering.default_profile`), "canonical"
    the canonical model.onnx; a profile's model.<profile>.onnx is copied when the export holds it, else model.onnx
    is lowered into the repository.
    """
    if device not in DEVICES:
        raise ModelDirError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if max_batch < 1 or instances < 1 or max_delay_ms < 0:
        raise ModelDirError("max batch and instances must be at least 1 and the delay not negative")
    if not model_name or any(c in model_name for c in "/\\\"\n") or model_name.startswith("."):
        raise ModelDirError(f"model name {model_name!r} is not a plain folder name")
    export = Path(export_dir)
    served = served_file(export, profile, DEVICES[device][1])
    source = served.path
    config = read_config(export)  # the same validation as qbert-serve and qbert-export --check
    task = config.task
    inputs, outputs, external, opset = _tensor_specs(source, task)
    labels = config.labels
    # an embedding model's output width is its embedding size, from the graph's sentence_embedding shape
    width = _embedding_size(source) if task == FEATURE else len(labels)
    described = f"{export.name}/{source.name}" + (f" lowered to {served.profile}" if served.lowered_in_memory else "")
    with atomic_dir(repo_dir) as tmp:
        folder = tmp / model_name
        (folder / "1").mkdir(parents=True)
        if served.lowered_in_memory:
            lower(source, served.profile, folder / "1" / "model.onnx")
        else:
            shutil.copyfile(source, folder / "1" / "model.onnx")
            for name in external:  # external weights keep their file name: the ONNX file refers to it
                shutil.copyfile(source.parent / name, folder / "1" / name)
        if task != FEATURE:  # an embedding model has no labels
            (folder / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        text = config_pbtxt(model_name, inputs, outputs, width, device, max_batch, max_delay_ms,
                            instances, described, task)
        (folder / "config.pbtxt").write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(README.format(
            name=model_name, source=described, device=device.upper(), max_batch=max_batch,
            max_delay_ms=max_delay_ms, gpus="--gpus=all " if device == "gpu" else "", repo=Path(repo_dir).name,
            inputs=", ".join(f"`{n}`" for n in inputs), output=", ".join(f"`{n}`" for n in outputs), task=task,
            dims=", ".join("sequence" if d < 0 else str(d) for d in output_dims(task, width)), opset=opset),
            encoding="utf-8")
    root = Path(repo_dir)
    return TritonRepo(root, root / model_name / "config.pbtxt", root / model_name / "1" / "model.onnx", source,
                      served.profile, served.lowered_in_memory)
