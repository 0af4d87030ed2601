"""Side by side on the CPU: PyTorch fp32, ORT fp32 (plain and transformer-fused), ORT quantize_dynamic int8 (plain
and fused), and our export under each CPU lowering profile. One process, interleaved rounds, 2 pinned threads,
ORT thread spinning off (DESIGN.md §4), so every configuration sees the same machine state.

    python -m benchmarks.run            # writes docs/RESULTS.md (issue 4 section) and docs/issue4_latency.png
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.baselines import dynamic_int8, fused_fp32
from benchmarks.models import SEQUENCE, BenchModel, prepare
from qbert_deploy.runtimes.lowering import lower

Feed = dict[str, np.ndarray]
ROOT = Path(__file__).resolve().parent.parent
OURS_CPU = "ours cpu-w8a8"
OURS_SMALL = "ours cpu-small (memory-first)"
ANCHORS = ("ORT dynamic int8", "ORT dynamic int8 (fused)")
CORE = ("ORT fp32", *ANCHORS, OURS_CPU)  # what the targets compare: `--core` times only these


@dataclass
class Config:
    label: str
    kind: str  # "torch" or "ort"
    target: str  # ONNX path, or the model name for PyTorch
    file_bytes: int | None
    wall: dict[int, list[float]] = field(default_factory=dict)
    cpu: dict[int, list[float]] = field(default_factory=dict)
    peak_mib: dict[int, float] = field(default_factory=dict)
    ablation: bool = False  # timed, but no memory process or profile


def _feed(batch: int) -> Feed:
    ids = np.random.default_rng(batch).integers(1000, 30000, size=(batch, SEQUENCE)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def configs(model: BenchModel, cache: Path) -> list[Config]:
    folder = model.fp32_onnx.parent
    config: Any = model.torch_model.config
    heads, hidden = int(config.num_attention_heads), int(config.hidden_size)
    fused = fused_fp32(model.fp32_onnx, folder / "fp32-fused.onnx", heads, hidden)
    paths = {
        "ORT fp32": model.fp32_onnx,
        "ORT fp32 (fused)": fused,
        "ORT dynamic int8": dynamic_int8(model.fp32_onnx, folder / "dynamic-int8.onnx"),
        "ORT dynamic int8 (fused)": dynamic_int8(fused, folder / "dynamic-int8-fused.onnx"),
        "ours canonical QDQ (not lowered)": model.export_onnx,
        OURS_CPU: lower(model.export_onnx, "cpu-w8a8", folder / "model.cpu-w8a8.onnx"),
        # the file/memory trade-off of 3-bit packing, measured in the same run
        "ours cpu-w8a8 --pack-3bit": lower(model.export_onnx, "cpu-w8a8", folder / "model.cpu-w8a8-packed3.onnx",
                                           pack_3bit=True),
        OURS_SMALL: lower(model.export_onnx, "cpu-small", folder / "model.cpu-small.onnx"),
        "ours weight-only": lower(model.export_onnx, "weight-only", folder / "model.weight-only.onnx"),
    }
    out = [Config("PyTorch fp32 eager", "torch", model.name, None)]
    out += [Config(label, "ort", str(path), path.stat().st_size) for label, path in paths.items()]
    for label, path in ablations(model.export_onnx, folder).items():
        out.append(Config(label, "ort", str(path), path.stat().st_size, ablation=True))
    return out


_ABLATIONS = {  # cpu-w8a8 pass left out -> row label
    "residual_sum": "ablation: cpu-w8a8 without residual Sum (ORT forms SkipLayerNorm)",
    "fuse_attention": "ablation: cpu-w8a8 without attention fusion",
    "gather_then_dequantize": "ablation: cpu-w8a8 dequantizing whole embedding tables (no gather-then-dequantize)",
    "integer_matmuls": "ablation: cpu-w8a8 leaving the integer GEMMs to ORT's Q/DQ fusion (bias outside, "
                       "no shared Q/K/V quantizer)",
}


FLASH_BRANCH = "variant: cpu-w8a8 plus the If that runs unmasked attention (flash kernel) without padding"


def ablations(export: Path, folder: Path) -> dict[str, Path]:
    """cpu-w8a8 with one of its passes left out, to measure what each buys in the same run; and with the flash
    kernel's If added (it made answers depend on the batch, so the profile leaves it out)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes

    from qbert_deploy.runtimes.attention_fusion import fuse_attention, unmasked_attention_branch
    from qbert_deploy.runtimes.lowering import profile_info

    steps = profile_info("cpu-w8a8").passes
    with_flash: list[Callable[[ir.Model], int]] = []
    for step in steps:
        with_flash += [step, unmasked_attention_branch] if step is fuse_attention else [step]
    unknown = set(_ABLATIONS) - {step.__name__ for step in steps}
    if unknown:
        raise ValueError(f"ablations name passes cpu-w8a8 does not have: {sorted(unknown)}")
    out = {}
    for index, (left_out, label) in enumerate(_ABLATIONS.items()):
        path = folder / f"ablation-{index}.onnx"
        model = ir.load(export)
        for step in steps:
            if step.__name__ != left_out:
                step(model)
        common_passes.RemoveUnusedNodesPass()(model)
        ir.save(model, path)
        out[label] = path
    model = ir.load(export)
    for step in with_flash:
        step(model)
    common_passes.RemoveUnusedNodesPass()(model)
    ir.save(model, folder / "variant-flash-branch.onnx")
    out[FLASH_BRANCH] = folder / "variant-flash-branch.onnx"
    return out


def _runner(config: Config, model: BenchModel, threads: int) -> Callable[[Feed], object]:
    if config.kind == "torch":
        import torch

        torch_model = model.torch_model

        def run_torch(feed: Feed) -> object:
            with torch.inference_mode():
                return torch_model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits

        return run_torch
    from qbert_deploy.runtimes.session import open_session

    session = open_session(config.target, threads=threads)
    return lambda feed: session.run(["logits"], feed)


def time_interleaved(runners: dict[str, Callable[[Feed], object]], feed: Feed, rounds: int, warmup: int = 1,
                     ) -> dict[str, tuple[list[float], list[float]]]:
    """Round-robin over all configurations (start rotated each round); (wall, process CPU) seconds per run."""
    for run in runners.values():
        for _ in range(warmup):
            run(feed)  # allocations, prepacking (on a GPU also cuBLAS/cuDNN algorithm search)
    times: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for label in runners}
    labels = list(runners)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            wall, cpu = time.perf_counter(), time.process_time()
            runners[label](feed)
            times[label][0].append(time.perf_counter() - wall)
            times[label][1].append(time.process_time() - cpu)
    return times


def peak_memory(config: Config, threads: int) -> dict[int, float]:
    """Peak RSS minus the same imports' baseline, from a process of its own (benchmarks.memory)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", config.kind, config.target, str(threads)],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=600)
    if done.returncode != 0:
        print(f"  memory of {config.label} failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {}
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return {int(b): peak - data["baseline_mib"] for b, peak in data["peak_mib"].items()}


def op_profile(path: str, feed: Feed, threads: int | None, runs: int = 3, providers: Sequence[str] = ("cpu",),
               profile: str | None = None) -> list[tuple[str, float, float]]:
    """ORT's own per-op-type kernel time: (op type, ms per run, share); `profile` applies a lowering profile's
    session and provider settings (the file must already be lowered for it)."""
    import onnxruntime as ort

    from qbert_deploy.runtimes.lowering import profile_info
    from qbert_deploy.runtimes.session import provider_names, session_options

    full = provider_names(providers)
    info = profile_info(profile) if profile else None
    options = session_options(threads, config=info.session_config if info else None)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(path).parent / "ort-profile")
    session = ort.InferenceSession(path, options, providers=full, provider_options=[
        dict(info.provider_options.get(p, {})) if info else {} for p in full])
    session.run(["logits"], feed)
    for _ in range(runs):
        session.run(["logits"], feed)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    totals: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            if event["args"]["op_name"] in ("If", "Loop", "Scan"):
                continue  # control flow: the nodes of its branches are in the trace themselves
            totals[event["args"]["op_name"]] += event["dur"]
    # the warm-up run is in the trace too
    whole = sum(totals.values()) or 1
    return [(op, us / 1000 / (runs + 1), us / whole) for op, us in totals.most_common(8)]


def measure(names: Sequence[str], batches: Sequence[int], rounds: dict[int, int], threads: int, cache: Path,
            memory: bool, core: bool = False, extra: Sequence[tuple[str, Path]] = ()) -> dict[str, object]:
    import torch

    torch.set_num_threads(threads)
    results: dict[str, object] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                  "load_before": os.getloadavg(), "nice": os.nice(0), "models": {}}
    for name in names:
        print(f"[{name}] preparing models", flush=True)
        model = prepare(name, cache)
        items = [c for c in configs(model, cache) if not core or c.label in CORE]
        for label, path in extra:  # another ONNX file in the same rounds (e.g. lowered by an older version)
            items.append(Config(label, "ort", str(path), path.stat().st_size, ablation=True))
        runners = {c.label: _runner(c, model, threads) for c in items}
        for batch in batches:
            print(f"[{name}] batch {batch}: {rounds[batch]} interleaved rounds", flush=True)
            times = time_interleaved(runners, _feed(batch), rounds[batch])
            for c in items:
                c.wall[batch], c.cpu[batch] = times[c.label]
        del runners
        if memory:
            for c in items:
                if c.ablation:
                    continue
                print(f"[{name}] peak memory: {c.label}", flush=True)
                c.peak_mib = peak_memory(c, threads)
        ours = next(c for c in items if c.label == OURS_CPU)
        anchor_paths = {c.label: c.target for c in items if c.label in ANCHORS}
        profiles = {}
        for batch in batches:
            anchor = min(ANCHORS, key=lambda a: float(np.median(next(c for c in items if c.label == a).wall[batch])))
            profiles[str(batch)] = {OURS_CPU: op_profile(ours.target, _feed(batch), threads),
                                    anchor: op_profile(anchor_paths[anchor], _feed(batch), threads)}
        results["models"][name] = {  # type: ignore[index]
            "configs": [{"label": c.label, "file_bytes": c.file_bytes, "wall": c.wall, "cpu": c.cpu,
                         "peak_mib": c.peak_mib} for c in items],
            "profiles": profiles}
    results["load_after"] = os.getloadavg()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert-base,minilm")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds at batch 1")
    parser.add_argument("--rounds-large", type=int, default=3, help="interleaved rounds at larger batches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    parser.add_argument("--core", action="store_true",
                        help="time only the targets' configurations (ORT fp32, ORT dynamic int8, ours cpu-w8a8), "
                             "so more rounds fit in the same time on a busy machine")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=PATH",
                        help="also time this ONNX file in the same rounds (repeatable)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args(argv)
    from benchmarks.report import write_report

    extra = []
    for spec in args.extra:
        label, _, path = spec.partition("=")
        if not label or not Path(path).is_file():
            parser.error(f"--extra {spec!r}: expected LABEL=PATH of an existing ONNX file")
        extra.append((label, Path(path)))
    batches = [int(b) for b in args.batches.split(",")]
    rounds = {b: args.rounds if b == 1 else args.rounds_large for b in batches}
    results = measure(args.models.split(","), batches, rounds, args.threads, args.cache, not args.no_memory,
                      args.core, extra)
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    results["command"] = command.strip()
    (args.cache / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, args.results, args.results.parent / "issue4_latency.png")
    print(f"wrote {args.results} and {args.results.parent / 'issue4_latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
