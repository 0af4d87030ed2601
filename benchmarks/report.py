"""The issue-4 section of docs/RESULTS.md (Markdown tables) and its PNG chart, from benchmarks.run's results."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from qbert_deploy.atomic import atomic_file, write_text_atomic

START, END = "<!-- issue-4 benchmark start -->", "<!-- issue-4 benchmark end -->"
OURS = "ours cpu-w8a8"
ANCHORS = ("ORT dynamic int8", "ORT dynamic int8 (fused)")
SEQ = 128


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _by_label(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["label"]: c for c in model["configs"]}


def _latency(config: dict[str, Any], batch: int, key: str = "wall") -> float:
    return _median(_series(config, key, batch)) * 1000


def _series(config: dict[str, Any], key: str, batch: int) -> list[float]:
    data = config[key]
    return list(data.get(str(batch), data.get(batch, [])))


def _model_table(model: dict[str, Any], batches: list[int]) -> list[str]:
    head = ["configuration", "file MB"]
    for b in batches:
        head += [f"b{b} median ms (p25-p75)", f"b{b} seq/s", f"b{b} CPU ms", f"b{b} peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in model["configs"]:
        row = [c["label"], f"{c['file_bytes'] / 1e6:.1f}" if c["file_bytes"] else "-"]
        for b in batches:
            wall = np.array(_series(c, "wall", b)) * 1000
            cpu = np.array(_series(c, "cpu", b)) * 1000
            peak = c["peak_mib"].get(str(b), c["peak_mib"].get(b))
            row += [f"{np.median(wall):.1f} ({np.percentile(wall, 25):.1f}-{np.percentile(wall, 75):.1f})",
                    f"{b / np.median(wall) * 1000:.1f}", f"{np.median(cpu):.1f}",
                    f"{peak:.0f}" if peak is not None else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _targets(model: dict[str, Any], batches: list[int]) -> list[str]:
    """Each ratio on median wall time and on median process CPU time (the latter is steadier on a busy machine)."""
    by = _by_label(model)
    lines = ["| target | batch | on wall time | on CPU time | goal | met (wall / CPU) |", "|---|---|---|---|---|---|"]

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    for b in batches:
        anchor = min(ANCHORS, key=lambda a: _latency(by[a], b))
        cpu_anchor = min(ANCHORS, key=lambda a: _latency(by[a], b, "cpu"))
        ratio = [_latency(by[OURS], b, k) / _latency(by[a], b, k) for k, a in (("wall", anchor), ("cpu", cpu_anchor))]
        lines.append(f"| latency ours cpu-w8a8 / faster ORT dynamic int8 (wall: {anchor}; CPU: {cpu_anchor}) | {b} | "
                     f"{ratio[0]:.2f}x | {ratio[1]:.2f}x | <= 0.75x | "
                     f"{yes(ratio[0] <= 0.75)} / {yes(ratio[1] <= 0.75)} |")
        speed = [_latency(by["ORT fp32"], b, k) / _latency(by[OURS], b, k) for k in ("wall", "cpu")]
        lines.append(f"| speed-up of ours cpu-w8a8 over ORT fp32 | {b} | {speed[0]:.2f}x | {speed[1]:.2f}x | >= 3x | "
                     f"{yes(speed[0] >= 3)} / {yes(speed[1] >= 3)} |")
    size = by[OURS]["file_bytes"] / by["ORT fp32"]["file_bytes"]
    lines.append(f"| file ours cpu-w8a8 / fp32 ONNX | - | 1/{1 / size:.2f} | | <= 1/8 | {yes(size <= 1 / 8)} |")
    return lines


def _profiles(model: dict[str, Any]) -> list[str]:
    lines = []
    for batch, per_config in model["profiles"].items():
        for label, rows in per_config.items():
            lines.append(f"*{label}, batch {batch}* (ORT profiler after the timed rounds, kernel time per run by op "
                         "type, top 8): " + ", ".join(
                f"{op} {ms:.1f} ms ({100 * share:.0f}%)" for op, ms, share in rows))
            lines.append("")
    return lines


def section(results: dict[str, Any], chart: Path) -> str:
    batches = sorted({int(b) for m in results["models"].values() for c in m["configs"] for b in c["wall"]})
    versions = {p: metadata.version(p) for p in ("onnxruntime", "torch", "transformers")}
    load = results["load_before"], results["load_after"]
    out = [START, "### Side-by-side CPU benchmark", "",
           f"Command: `{results['command']}` (also `make bench`), run {results['started']} to "
           f"{results['finished']}.", "",
           f"Machine: {_cpu_name()}, {os.cpu_count()} cores visible, 2 intra-op threads pinned, ORT thread spinning "
           f"off; onnxruntime {versions['onnxruntime']}, torch {versions['torch']}, transformers "
           f"{versions['transformers']}. Sequence {SEQ}, random token ids, full attention mask.", "",
           "How it was measured: all configurations of a model live in one process and run round-robin (start "
           "rotated each round); the table gives the median wall-clock latency over the rounds with its "
           "inter-quartile range, throughput = batch / median, and the median process CPU time per run (both "
           "threads; less sensitive than wall time to other work on the machine). Peak RSS: each configuration "
           "in a process of its own (`benchmarks/memory.py`): peak RSS (`VmHWM`) after loading and running "
           "batch 1, then batch 8, minus the same process's peak after its imports. File: bytes on disk.", "",
           f"Noise: the 2-core machine was shared with other agents (load average "
           f"{load[0][0]:.1f} before, {load[1][0]:.1f} after; the run itself at niceness {results.get('nice', 0)}, as "
           "long jobs here must be); absolute figures are inflated and only the "
           "ratios within one run are comparable. PyTorch suffers most: its OpenMP threads wait at every barrier for a "
           "descheduled partner.", "",
           "Models: BERT-base (`BertConfig()`, random weights; our export MP 2/3: layers 0-5 3-bit, 6-11 2-bit, "
           "128 groups, 8-bit embeddings and activations, opset 25 so 2-bit weights are stored as int2) and "
           "MiniLM-L6 (all-MiniLM-L6-v2, the demo's 8/4/4/3/3/2-bit allocation, 128 groups). "
           "ORT dynamic int8 = `quantize_dynamic(weight_type=QInt8)` on the plain and on the "
           "`onnxruntime.transformers` fused graph; the anchor is the faster of the two at each batch size.", ""]
    for name, model in results["models"].items():
        out += [f"#### {name}", "", *_model_table(model, batches), "",
                "Targets (set for BERT-base; shown for every model), as ratios from this run:", "",
                *_targets(model, batches), "", *_profiles(model)]
    out += [f"![latency chart]({chart.name})", "", END]
    return "\n".join(out)



def _short(label: str) -> str:
    """Chart labels: the ablations' long names cut down to what they leave out."""
    if label.startswith("ablation: cpu-w8a8 "):
        label = "ablation: " + label.removeprefix("ablation: cpu-w8a8 ").split(" (")[0]
    return label if len(label) <= 44 else label[:43] + "…"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"].items())
    batches = sorted({int(b) for _, m in models for c in m["configs"] for b in c["wall"]})
    fig, axes = plt.subplots(len(models), len(batches), figsize=(5 * len(batches) + 4, 4 * len(models)),
                             squeeze=False, sharey="row")
    for row, (name, model) in enumerate(models):
        for col, batch in enumerate(batches):
            ax = axes[row][col]
            labels = [_short(c["label"]) for c in model["configs"]]
            values = [_latency(c, batch) for c in model["configs"]]
            colors = ["tab:green" if label.startswith("ours") else "tab:olive" if label.startswith("ablation")
                      else "tab:gray" for label in labels]
            ax.barh(labels, values, color=colors)
            if col == 0:  # shared within the row: inverting twice would undo it
                ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_xlabel("median latency, ms (log scale)")
            ax.set_title(f"{name}, batch {batch}, seq {SEQ}, 2 threads")
            for y, v in enumerate(values):
                ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], results_md: Path, chart_path: Path) -> None:
    chart(results, chart_path)
    text = results_md.read_text(encoding="utf-8") if results_md.is_file() else "# Results\n"
    new = section(results, chart_path)
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: new, text) if pattern.search(text) else text.rstrip() + "\n\n" + new + "\n"
    write_text_atomic(results_md, text)
