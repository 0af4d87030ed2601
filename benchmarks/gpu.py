"""Side by side on one NVIDIA GPU: PyTorch eager (fp32, fp16), ORT CUDA fp32 and the transformer-fused fp16 graph
(onnxruntime.transformers, ORT's own GPU recipe), and our export canonical and under the `cuda`, `cuda-fp16`,
`cuda-fused` and `cuda-fused-w8` profiles; the fp16 anchor and our fp16 profiles also with CUDA graphs (fixed
shape buckets, `qbert_deploy.runtimes.buckets`). Batch 1/8/32 at sequence 128; GPU memory; agreement with the
canonical graph (with PyTorch: qbert-validate); node counts and ORT's op profile (why a profile is slower).

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
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.run import Feed, _feed, time_interleaved
from qbert_deploy.models.hf_compat import ATTENTION

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- gpu benchmark start -->", "<!-- gpu benchmark end -->"
TF32 = "ablation: ours cuda with TF32 on (ORT's default)"
# `run --smoke-cpu` sets these to the CPU: every code path of a GPU run, on the CPU EP with tiny rounds, so the one
# GPU run cannot fail on a typo (its timings mean nothing; CUDA graphs become plain I/O binding there)
SMOKE = {"provider": "cuda", "torch": "cuda"}


def _torch_model(export_dir: Path, half: bool, device: str | None = None) -> Any:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig.from_json_file(str(export_dir / "config.json"))
    config._attn_implementation = ATTENTION
    model = BertForSequenceClassification(config).eval().to(device or SMOKE["torch"])
    return model.half() if half else model


def anchors(export_dir: Path, folder: Path) -> dict[str, Path]:
    """ORT CUDA fp32 (TorchScript export, as benchmarks.models) and the fused fp16 graph ORT recommends on GPUs."""
    from qbert_deploy.validation.ort_int8 import export_fp32_onnx

    config = json.loads((export_dir / "config.json").read_text())
    fp32 = folder / "fp32.onnx"
    if not fp32.is_file():
        export_fp32_onnx(_torch_model(export_dir, half=False, device="cpu"), fp32)
    fp16 = folder / "fp16-fused.onnx"
    if not fp16.is_file():
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(fp32), model_type="bert", num_heads=int(config["num_attention_heads"]),
                                   hidden_size=int(config["hidden_size"]), use_gpu=True)
        optimized.convert_float_to_float16(keep_io_types=True)
        optimized.save_model_to_file(str(fp16))
    return {"ORT CUDA fp32": fp32, "ORT CUDA fp16 (fused)": fp16}


GRAPH = " + CUDA graph"
ANCHOR16 = "ORT CUDA fp16 (fused)"
OURS_PROFILES = ("cuda", "cuda-fp16", "cuda-fused", "cuda-fused-w8")  # lowered files beside the anchors
GRAPHED = (ANCHOR16, "ours cuda-fp16", "ours cuda-fused", "ours cuda-fused-w8")  # also timed with CUDA graphs
BATCHES = (1, 8, 32)


def _ort_runner(path: Path, profile: str | None, cuda_graph: bool = False) -> Callable[[Feed], np.ndarray]:
    from qbert_deploy.runtimes.buckets import BucketedSession
    from qbert_deploy.runtimes.session import open_session

    on_gpu = SMOKE["provider"] == "cuda"
    session = open_session(path, providers=(SMOKE["provider"],), profile=profile if on_gpu else None,
                           cuda_graph=cuda_graph and on_gpu)
    if cuda_graph:  # fixed buffers per bucket (batch 1/8/32 x sequence 32..256): seq 128 runs unpadded
        bucketed = BucketedSession(session, io_binding=True)
        return lambda feed: bucketed.run(["logits"], feed)[0]
    return lambda feed: session.run(["logits"], feed)[0]


def _torch_runner(export_dir: Path, half: bool) -> Callable[[Feed], np.ndarray]:
    import torch

    model = _torch_model(export_dir, half)

    def run(feed: Feed) -> np.ndarray:
        with torch.inference_mode():
            logits = model(**{k: torch.from_numpy(v).to(SMOKE["torch"]) for k, v in feed.items()}).logits
            return logits.float().cpu().numpy()  # the copy back synchronizes

    return run


def ort_targets(export_dir: Path, folder: Path) -> dict[str, tuple[Path, str | None, bool]]:
    """label -> (ONNX file, lowering profile or None, CUDA graph) of every ORT configuration, files built here."""
    from qbert_deploy.runtimes.lowering import lower

    canonical = export_dir / "model.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    paths = anchors(export_dir, folder)
    targets: dict[str, tuple[Path, str | None, bool]] = {label: (path, None, False) for label, path in paths.items()}
    targets["ours canonical QDQ (not lowered)"] = (canonical, None, False)
    for profile in OURS_PROFILES:
        lowered = folder / f"model.{profile}.onnx"
        if not lowered.is_file():
            started = time.perf_counter()
            lower(canonical, profile, lowered)
            print(f"  lowered {profile} in {time.perf_counter() - started:.1f} s", flush=True)
        targets[f"ours {profile}"] = (lowered, profile, False)
    targets[TF32] = (folder / "model.cuda.onnx", None, False)  # the same file with ORT's default CUDA options
    for label in GRAPHED:
        path, profile, _ = targets[label]
        targets[label + GRAPH] = (path, profile, True)
    return targets


def runners(export_dir: Path, folder: Path) -> tuple[dict[str, Callable[[Feed], np.ndarray]], dict[str, int]]:
    targets = ort_targets(export_dir, folder)
    out: dict[str, Callable[[Feed], np.ndarray]] = {"PyTorch fp32 eager": _torch_runner(export_dir, half=False)}
    if SMOKE["torch"] == "cuda":  # fp16 on the CPU is the same code, only minutes slower
        out["PyTorch fp16 eager"] = _torch_runner(export_dir, half=True)
    for label, (path, profile, graph) in targets.items():
        try:
            runner = _ort_runner(path, profile, graph)
            for batch in BATCHES:  # a CUDA graph is captured on a bucket's first run: fail here, not mid-timing
                runner(_feed(batch))
            out[label] = runner
        except Exception as err:  # one configuration that cannot start must not cost the whole GPU run
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            print(f"  {label} did not start or run: {first}", file=sys.stderr, flush=True)
    sizes = {label: path.stat().st_size for label, (path, _, _) in targets.items()}
    return out, sizes


def fidelity(expected: np.ndarray, got: Callable[[Feed], np.ndarray], feed: Feed) -> dict[str, float]:
    """Logits against the canonical graph on the CPU with optimizations off (the spec reading of the export). The
    agreement with PyTorch is qbert-validate's (PyTorch fake-quant from model.pt, real data): the exports here carry
    no model.pt, and the anchors have random weights of their own."""
    logits = got(feed)
    step = (expected.max() - min(expected.min(), 0.0)) / 255
    return {"max_error_steps": float(np.abs(logits - expected).max() / step),
            "argmax_agreement": float((logits.argmax(-1) == expected.argmax(-1)).mean())}


def gpu_memory(kind: str, target: str, profile: str, cuda_graph: bool = False) -> dict[str, float]:
    """GPU memory of one configuration in a process of its own: device memory used after running batch 1 and 8,
    minus the same process's use with an idle CUDA context (ORT's arena and PyTorch's cache only grow)."""
    code = (f"from benchmarks.gpu import _memory_child; "
            f"_memory_child({kind!r}, {target!r}, {profile!r}, {cuda_graph!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if done.returncode != 0:
        print(f"  memory of {target} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _used_mib() -> float:
    import pynvml

    pynvml.nvmlInit()
    return float(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used) / 2**20


def _memory_child(kind: str, target: str, profile: str, cuda_graph: bool = False) -> None:
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
        run = _ort_runner(Path(target), profile or None, cuda_graph)
    peaks = {}
    for batch in BATCHES:
        run(_feed(batch))
        peaks[batch] = _used_mib() - baseline
    print(json.dumps(peaks))


def node_counts(path: Path, profile: str | None) -> dict[str, Any]:
    """Nodes in the graph ORT runs on the GPU (after its own optimizations): the launch count behind the latency."""
    import onnx

    from qbert_deploy.runtimes.session import open_session

    dump = path.with_suffix(".ort-optimized.onnx")
    on_gpu = SMOKE["provider"] == "cuda"
    open_session(path, providers=(SMOKE["provider"],), profile=profile if on_gpu else None,
                 optimized_model_path=dump)
    ops = Counter(node.op_type for node in onnx.load(str(dump), load_external_data=False).graph.node)
    dump.unlink()
    return {"nodes": sum(ops.values()), "top": ops.most_common(10)}


def measure(exports: Path, names: Sequence[str], rounds: int, work: Path, memory: Sequence[str] | None = None,
            save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Everything for each model; `memory` names the configurations whose GPU memory is measured (None: all);
    `save` gets the results after each model (a run stopped at its time limit keeps the models done)."""
    import onnxruntime as ort
    import torch

    from benchmarks.run import op_profile
    from qbert_deploy.runtimes.session import open_session

    if SMOKE["provider"] == "cuda":
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        device, driver = str(pynvml.nvmlDeviceGetName(handle)), str(pynvml.nvmlSystemGetDriverVersion())
    else:
        device, driver, memory = "CPU (smoke run: timings mean nothing)", "-", []
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": device, "driver": driver,
        "onnxruntime": ort.__version__, "torch": torch.__version__, "providers": ort.get_available_providers(),
        "tensorrt_libraries": ctypes.util.find_library("nvinfer"), "batches": list(BATCHES), "models": {}}
    for name in names:
        export_dir, folder = exports / name, work / name
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[{name}] building anchors and sessions", flush=True)
        runs, sizes = runners(export_dir, folder)
        model: dict[str, Any] = {"file_bytes": sizes, "wall": {}, "fidelity": {}, "gpu_mib": {}, "nodes": {},
                                 "op_profile": {}}
        for batch in BATCHES:
            print(f"[{name}] batch {batch}: {rounds} interleaved rounds of {len(runs)} configurations", flush=True)
            times = time_interleaved(runs, _feed(batch), rounds, warmup=3)
            model["wall"][batch] = {label: wall for label, (wall, _) in times.items()}
        feed = _feed(32)
        expected = open_session(export_dir / "model.onnx", optimize=False).run(["logits"], feed)[0]
        for label in runs:
            if label.startswith("ours"):
                model["fidelity"][label] = fidelity(expected, runs[label], feed)
        del runs
        targets = ort_targets(export_dir, folder)
        for label in (ANCHOR16, "ours cuda-fp16", "ours cuda-fused", "ours cuda-fused-w8"):
            path, profile, _ = targets[label]
            try:
                model["nodes"][label] = node_counts(path, profile)
                on_gpu = SMOKE["provider"] == "cuda"
                model["op_profile"][label] = {str(b): op_profile(
                    str(path), _feed(b), None, providers=(SMOKE["provider"],), profile=profile if on_gpu else None)
                    for b in (1, 8)}
            except Exception as err:  # a profile that does not start was reported above
                print(f"  [{name}] nodes/profile of {label} failed: {str(err)[:200]}", file=sys.stderr)
        if memory is None or memory:
            kinds = {"PyTorch fp32 eager": ("torch", str(export_dir), "", False),
                     "PyTorch fp16 eager": ("torch", str(export_dir), "fp16", False)}
            kinds |= {label: ("ort", str(path), profile or "", graph) for label, (path, profile, graph)
                      in targets.items() if label != TF32}
            for label, (kind, target, profile_name, graph) in kinds.items():
                if memory is not None and label not in memory:
                    continue
                print(f"[{name}] GPU memory: {label}", flush=True)
                model["gpu_mib"][label] = gpu_memory(kind, target, profile_name, graph)
        results["models"][name] = model
        if save is not None:
            save(results | {"finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return results


def _median_ms(values: list[float]) -> float:
    return float(np.median(values)) * 1000


def _ratio(model: dict[str, Any], ours: str, anchor: str, batch: str) -> float | None:
    walls = model["wall"].get(batch, {})
    if ours not in walls or anchor not in walls:
        return None
    return _median_ms(walls[ours]) / _median_ms(walls[anchor])


def report_lines(results: dict[str, Any]) -> list[str]:
    batches = [str(b) for b in results.get("batches", [1, 8])]
    lines = [START, "### Side-by-side GPU benchmark", "",
             f"Command (on the GPU machine): `{results['command']}`, run {results['started']} to "
             f"{results['finished']}; the section and chart written here by `python -m benchmarks.gpu report`.", "",
             f"Device: {results['device']} (driver {results['driver']}); onnxruntime-gpu {results['onnxruntime']}, "
             f"torch {results['torch']}. Sequence 128, random token ids, full attention mask; all configurations "
             "of a model in one process, round-robin, median wall-clock latency of `session.run` with numpy inputs "
             "and outputs (host-device copies included; with a CUDA graph, copies into and out of the bound "
             "buffers). GPU MiB: device memory used after running each batch, in a process of its own, minus that "
             "process's use with an idle CUDA context. "
             f"TensorRT's libraries on that machine: {results['tensorrt_libraries'] or 'none (not run)'}.", ""]
    for name, model in results["models"].items():
        head = " | ".join(f"b{b} median ms" for b in batches)
        mib = " / ".join(f"b{b}" for b in batches)
        lines += [f"#### {name}", "", f"| configuration | file MB | {head} | GPU MiB {mib} |",
                  "|---|---|" + "---|" * len(batches) + "---|"]
        for label in model["wall"][batches[0]]:
            cells = [f"{_median_ms(model['wall'][b][label]):.2f}" if label in model["wall"].get(b, {}) else "-"
                     for b in batches]
            size = model["file_bytes"].get(label)
            mem = model["gpu_mib"].get(label) or {}
            mem_text = " / ".join(f"{mem[b]:.0f}" for b in batches if b in mem) or "-"
            size_text = f"{size / 1e6:.1f}" if size else "-"
            lines.append(f"| {label} | {size_text} | {' | '.join(cells)} | {mem_text} |")
        pairs = [("ours cuda", "ORT CUDA fp32"), ("ours cuda-fp16", ANCHOR16)]
        pairs += [(f"ours {p}{g}", ANCHOR16) for p in ("cuda-fused", "cuda-fused-w8") for g in ("", GRAPH)]
        pairs += [(f"ours {p}{GRAPH}", ANCHOR16 + GRAPH) for p in ("cuda-fused", "cuda-fused-w8")]
        ratios = "; ".join(f"{ours} batch {b}: {r:.2f}x of {anchor}" for ours, anchor in pairs for b in batches
                           if (r := _ratio(model, ours, anchor, b)) is not None)
        anchor_mem = (model["gpu_mib"].get(ANCHOR16) or {}).get("8")
        memory = "; ".join(f"{label}: {mem['8'] / anchor_mem:.2f}x" for label, mem in model["gpu_mib"].items()
                           if label.startswith("ours") and mem and anchor_mem and "8" in mem)
        fidelity = "; ".join(
            f"{label}: max logit error {fid['max_error_steps']:.2f} output steps, argmax agreement "
            f"{fid['argmax_agreement'] * 100:.1f}%" for label, fid in model["fidelity"].items())
        nodes = "; ".join(f"{label}: {info['nodes']} nodes ({', '.join(f'{op} {n}' for op, n in info['top'][:6])})"
                          for label, info in model.get("nodes", {}).items())
        lines += ["", f"Latency ratios: {ratios}.", "",
                  f"GPU memory at batch 8 as a share of {ANCHOR16}'s: {memory or '-'}.", "",
                  f"Against the canonical graph on the CPU with optimizations off (batch 32): {fidelity}. Agreement "
                  "with PyTorch fake-quant: qbert-validate's, on the real MiniLM and the movie-review dev split.", "",
                  f"Graph ORT runs on the GPU: {nodes or '-'}.", ""]
        for label, by_batch in model.get("op_profile", {}).items():
            for batch, ops in by_batch.items():
                top = ", ".join(f"{op} {ms:.2f} ms ({share * 100:.0f}%)" for op, ms, share in ops)
                lines += [f"*{label}, batch {batch}* (ORT profiler, node time per run by op type, top 8): {top}", ""]
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
        batches = [str(b) for b in results.get("batches", [1, 8])]
        height = 0.8 / len(batches)
        for index, batch in enumerate(batches):
            axis.barh(y + (index - (len(batches) - 1) / 2) * height,
                      [_median_ms(walls[batch][label]) if label in walls[batch] else 0 for label in labels],
                      height=height, label=f"batch {batch}")
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
    run.add_argument("--smoke-cpu", action="store_true",
                     help="every code path on the CPU EP, no GPU memory: catches typos before the GPU run")
    run.add_argument("--memory", default="all",
                     help="configurations whose GPU memory is measured, ';'-separated labels, 'all' or 'none'")
    report = sub.add_parser("report")
    report.add_argument("results", type=Path)
    report.add_argument("--markdown", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args(argv)
    if args.command == "run":
        memory = None if args.memory == "all" else [] if args.memory == "none" else [
            label for label in args.memory.split(";") if label]
        if args.smoke_cpu:
            SMOKE.update(provider="cpu", torch="cpu")
        command = "python -m benchmarks.gpu run " + " ".join(sys.argv[2:] if argv is None else argv[1:])

        def save(results: dict[str, Any]) -> None:
            from qbert_deploy.atomic import write_text_atomic

            write_text_atomic(args.out, json.dumps(results | {"command": command}, indent=1))

        save(measure(args.exports, args.models.split(","), args.rounds, args.work, memory, save))
        print(f"wrote {args.out}")
    else:
        write_report(json.loads(args.results.read_text()), args.markdown, args.markdown.parent / "gpu_latency.png")
        print(f"wrote {args.markdown} and {args.markdown.parent / 'gpu_latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
