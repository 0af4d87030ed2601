"""Side by side on one NVIDIA GPU: PyTorch eager (fp32, fp16), ORT CUDA fp32 and the transformer-fused fp16 graph
(onnxruntime.transformers, ORT's own GPU recipe), and our export canonical and under the `cuda` profile.

The fp32 anchors are built on the GPU machine from the export's config.json with random weights (timing does not
depend on the values); our exports are the ones benchmarks.models builds for the CPU run, carried over unchanged.

    python -m benchmarks.gpu run EXPORTS_DIR OUT.json     # on the GPU machine, with onnxruntime-gpu
                                                          # EXPORTS_DIR/NAME: benchmarks/.cache/NAME/export-opset25
    python -m benchmarks.gpu report OUT.json              # here: docs/RESULTS.md GPU section + PNG
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.run import Feed, _feed, time_interleaved

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- gpu benchmark start -->", "<!-- gpu benchmark end -->"
TF32 = "ablation: ours cuda with TF32 on (ORT's default)"


def _torch_model(export_dir: Path, half: bool, device: str = "cuda") -> Any:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig.from_json_file(str(export_dir / "config.json"))
    config._attn_implementation = "eager"
    model = BertForSequenceClassification(config).eval().to(device)
    return model.half() if half else model


def anchors(export_dir: Path, folder: Path) -> dict[str, Path]:
    """ORT CUDA fp32 (TorchScript export, as benchmarks.models) and the fused fp16 graph ORT recommends on GPUs."""
    from benchmarks.models import _export_fp32

    config = json.loads((export_dir / "config.json").read_text())
    fp32 = folder / "fp32.onnx"
    if not fp32.is_file():
        _export_fp32(_torch_model(export_dir, half=False, device="cpu"), fp32)
    fp16 = folder / "fp16-fused.onnx"
    if not fp16.is_file():
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(fp32), model_type="bert", num_heads=int(config["num_attention_heads"]),
                                   hidden_size=int(config["hidden_size"]), use_gpu=True)
        optimized.convert_float_to_float16(keep_io_types=True)
        optimized.save_model_to_file(str(fp16))
    return {"ORT CUDA fp32": fp32, "ORT CUDA fp16 (fused)": fp16}


def _ort_runner(path: Path, profile: str | None) -> Callable[[Feed], np.ndarray]:
    from qbert_deploy.runtimes.session import open_session

    session = open_session(path, providers=("cuda",), profile=profile)
    return lambda feed: session.run(["logits"], feed)[0]


def _torch_runner(export_dir: Path, half: bool) -> Callable[[Feed], np.ndarray]:
    import torch

    model = _torch_model(export_dir, half)

    def run(feed: Feed) -> np.ndarray:
        with torch.inference_mode():
            logits = model(**{k: torch.from_numpy(v).cuda() for k, v in feed.items()}).logits
            return logits.float().cpu().numpy()  # the copy back synchronizes

    return run


def runners(export_dir: Path, folder: Path) -> tuple[dict[str, Callable[[Feed], np.ndarray]], dict[str, int]]:
    from qbert_deploy.runtimes.lowering import lower

    canonical = export_dir / "model.onnx"
    paths = anchors(export_dir, folder)
    cuda = lower(canonical, "cuda", folder / "model.cuda.onnx")
    out: dict[str, Callable[[Feed], np.ndarray]] = {
        "PyTorch fp32 eager": _torch_runner(export_dir, half=False),
        "PyTorch fp16 eager": _torch_runner(export_dir, half=True)}
    out |= {label: _ort_runner(path, None) for label, path in paths.items()}
    out["ours canonical QDQ (not lowered)"] = _ort_runner(canonical, None)
    out["ours cuda"] = _ort_runner(cuda, "cuda")
    out[TF32] = _ort_runner(cuda, None)  # the same file with ORT's default CUDA options
    cuda16 = lower(canonical, "cuda-fp16", folder / "model.cuda-fp16.onnx")
    out["ours cuda-fp16"] = _ort_runner(cuda16, "cuda-fp16")
    sizes = {label: path.stat().st_size for label, path in paths.items()}
    sizes |= {"ours canonical QDQ (not lowered)": canonical.stat().st_size, "ours cuda": cuda.stat().st_size,
              TF32: cuda.stat().st_size, "ours cuda-fp16": cuda16.stat().st_size}
    return out, sizes


def fidelity(canonical: Path, got: Callable[[Feed], np.ndarray], feed: Feed) -> dict[str, float]:
    """Logits against the canonical graph on the CPU with optimizations off (the spec reading of the export)."""
    from qbert_deploy.runtimes.session import open_session

    expected = open_session(canonical, optimize=False).run(["logits"], feed)[0]
    logits = got(feed)
    step = (expected.max() - min(expected.min(), 0.0)) / 255
    return {"max_error_steps": float(np.abs(logits - expected).max() / step),
            "argmax_agreement": float((logits.argmax(-1) == expected.argmax(-1)).mean())}


def gpu_memory(kind: str, target: str, profile: str) -> dict[str, float]:
    """GPU memory of one configuration in a process of its own: device memory used after running batch 1 and 8,
    minus the same process's use with an idle CUDA context (ORT's arena and PyTorch's cache only grow)."""
    code = f"from benchmarks.gpu import _memory_child; _memory_child({kind!r}, {target!r}, {profile!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if done.returncode != 0:
        print(f"  memory of {target} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _used_mib() -> float:
    import pynvml

    pynvml.nvmlInit()
    return float(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used) / 2**20


def _memory_child(kind: str, target: str, profile: str) -> None:
    if kind == "torch":
        import torch

        torch.zeros(1, device="cuda")
        baseline = _used_mib()
        run = _torch_runner(Path(target), half=profile == "fp16")
    else:
        import onnx
        from onnx import helper

        from qbert_deploy.runtimes.session import open_session

        identity = helper.make_model(helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "idle",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
            opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        idle = open_session(identity.SerializeToString(), providers=("cuda",))
        idle.run(None, {"x": np.zeros(1, np.float32)})
        baseline = _used_mib()
        session = open_session(target, providers=("cuda",), profile=profile or None)
        run = lambda feed: session.run(["logits"], feed)[0]  # noqa: E731
    peaks = {}
    for batch in (1, 8):
        run(_feed(batch))
        peaks[batch] = _used_mib() - baseline
    print(json.dumps(peaks))


def measure(exports: Path, names: Sequence[str], rounds: int, work: Path) -> dict[str, Any]:
    import onnxruntime as ort
    import pynvml
    import torch

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": str(pynvml.nvmlDeviceGetName(handle)), "driver": str(pynvml.nvmlSystemGetDriverVersion()),
        "onnxruntime": ort.__version__, "torch": torch.__version__, "providers": ort.get_available_providers(),
        "tensorrt_libraries": ctypes.util.find_library("nvinfer"), "models": {}}
    for name in names:
        export_dir, folder = exports / name, work / name
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[{name}] building anchors and sessions", flush=True)
        runs, sizes = runners(export_dir, folder)
        model: dict[str, Any] = {"file_bytes": sizes, "wall": {}, "fidelity": {}, "gpu_mib": {}}
        for batch in (1, 8):
            print(f"[{name}] batch {batch}: {rounds} interleaved rounds", flush=True)
            times = time_interleaved(runs, _feed(batch), rounds, warmup=3)
            model["wall"][batch] = {label: wall for label, (wall, _) in times.items()}
        for label in ("ours cuda", "ours cuda-fp16", TF32, "ours canonical QDQ (not lowered)"):
            model["fidelity"][label] = fidelity(export_dir / "model.onnx", runs[label], _feed(8))
        del runs
        targets = {"PyTorch fp32 eager": ("torch", str(export_dir), ""),
                   "PyTorch fp16 eager": ("torch", str(export_dir), "fp16"),
                   "ORT CUDA fp32": ("ort", str(folder / "fp32.onnx"), ""),
                   "ORT CUDA fp16 (fused)": ("ort", str(folder / "fp16-fused.onnx"), ""),
                   "ours canonical QDQ (not lowered)": ("ort", str(export_dir / "model.onnx"), ""),
                   "ours cuda": ("ort", str(folder / "model.cuda.onnx"), "cuda"),
                   "ours cuda-fp16": ("ort", str(folder / "model.cuda-fp16.onnx"), "cuda-fp16")}
        for label, (kind, target, profile) in targets.items():
            print(f"[{name}] GPU memory: {label}", flush=True)
            model["gpu_mib"][label] = gpu_memory(kind, target, profile)
        results["models"][name] = model
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return results


def _median_ms(values: list[float]) -> float:
    return float(np.median(values)) * 1000


def report_lines(results: dict[str, Any]) -> list[str]:
    lines = [START, "### Side-by-side GPU benchmark", "",
             f"Command (on the GPU machine): `{results['command']}`, run {results['started']} to "
             f"{results['finished']}; the section and chart written here by `python -m benchmarks.gpu report`.", "",
             f"Device: {results['device']} (driver {results['driver']}); onnxruntime-gpu {results['onnxruntime']}, "
             f"torch {results['torch']}. Sequence 128, random token ids, full attention mask; all configurations "
             "of a model in one process, round-robin, median wall-clock latency of `session.run` with numpy inputs "
             "and outputs (host-device copies included). GPU MiB: device memory used after running batch 1 / "
             "batch 8, in a process of its own, minus that process's use with an idle CUDA context. "
             f"TensorRT's libraries on that machine: {results['tensorrt_libraries'] or 'none (not run)'}.", ""]
    for name, model in results["models"].items():
        lines += [f"#### {name}", "",
                  "| configuration | file MB | b1 median ms | b1 seq/s | b8 median ms | b8 seq/s | GPU MiB b1 / b8 |",
                  "|---|---|---|---|---|---|---|"]
        for label, wall1 in model["wall"]["1"].items():
            b1, b8 = _median_ms(wall1), _median_ms(model["wall"]["8"][label])
            size = model["file_bytes"].get(label)
            mem = model["gpu_mib"].get(label) or {}
            mem_text = f"{mem['1']:.0f} / {mem['8']:.0f}" if mem else "-"
            size_text = f"{size / 1e6:.1f}" if size else "-"
            lines.append(f"| {label} | {size_text} | {b1:.2f} | {1000 / b1:.0f} | {b8:.2f} | {8000 / b8:.0f} | "
                         f"{mem_text} |")
        ratios = "; ".join(
            f"{ours} batch {b}: {_median_ms(model['wall'][b][ours]) / _median_ms(model['wall'][b][a]):.2f}x of {a}"
            for ours, a in (("ours cuda", "ORT CUDA fp32"), ("ours cuda-fp16", "ORT CUDA fp16 (fused)"))
            if ours in model["wall"]["1"] for b in ("1", "8"))
        fidelity = "; ".join(f"{label}: max logit error {fid['max_error_steps']:.2f} output steps, argmax "
                             f"agreement {fid['argmax_agreement'] * 100:.1f}%"
                             for label, fid in model["fidelity"].items())
        lines += ["", f"Latency ratios, each against the anchor of the same precision: {ratios}.", "",
                  f"Against the canonical graph on the CPU with optimizations off (batch 8): {fidelity}.", ""]
    lines += ["![GPU latency chart](gpu_latency.png)", "", END]
    return lines


def write_report(results: dict[str, Any], markdown: Path, chart: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qbert_deploy.atomic import atomic_file, write_text_atomic

    section = "\n".join(report_lines(results))
    text = markdown.read_text()
    if START in text:
        text = text[:text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    names = list(results["models"])
    figure, axes = plt.subplots(len(names), 1, figsize=(9, 3.5 * len(names)), squeeze=False)
    for axis, name in zip(axes[:, 0], names, strict=True):
        walls = results["models"][name]["wall"]
        labels = list(walls["1"])
        y = np.arange(len(labels))
        for offset, batch in ((-0.2, "1"), (0.2, "8")):
            axis.barh(y + offset, [_median_ms(walls[batch][label]) for label in labels], height=0.4,
                      label=f"batch {batch}")
        axis.set_yticks(y, labels)
        axis.invert_yaxis()
        axis.set_xscale("log")
        axis.set_xlabel("median latency, ms, log scale (lower is better)")
        axis.set_title(f"{name}, seq 128, {results['device']}")
        axis.legend()
    figure.tight_layout()
    with atomic_file(chart) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    write_text_atomic(markdown, text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("exports", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--models", default="bert-base,minilm")
    run.add_argument("--rounds", type=int, default=30)
    run.add_argument("--work", type=Path, default=Path("/tmp/qbert-gpu-bench"))
    report = sub.add_parser("report")
    report.add_argument("results", type=Path)
    report.add_argument("--markdown", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.command == "run":
        results = measure(args.exports, args.models.split(","), args.rounds, args.work)
        results["command"] = "python -m benchmarks.gpu run " + " ".join(sys.argv[2:] if argv is None else argv[1:])
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    else:
        write_report(json.loads(args.results.read_text()), args.markdown, args.markdown.parent / "gpu_latency.png")
        print(f"wrote {args.markdown} and {args.markdown.parent / 'gpu_latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
