"""PNG plots of a validation report: per-layer error by backend, bits per layer beside sensitivity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from qbert_deploy.families import short_name
from qbert_deploy.validation.layerwise import LayerError


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _short(module: str) -> str:
    return short_name(module)


def layer_error_plot(path: Path, layers: Mapping[str, Sequence[LayerError]], tolerance_steps: float) -> None:
    """Median |error| in 8-bit steps per watched module (execution order), one line per backend, log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(8.0, 0.22 * max((len(v) for v in layers.values()), default=1)), 4.5))
    names: list[str] = []
    for backend, errors in layers.items():
        names = names or [e.module for e in errors]
        ys = [max(e.error.median_steps, 1e-7) if e.error is not None else float("nan") for e in errors]
        ax.plot(range(len(ys)), ys, marker=".", label=backend)
    ax.axhline(tolerance_steps, color="red", linestyle="--", linewidth=1, label=f"tolerance {tolerance_steps:g}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("median |error| vs PyTorch fake-quant (8-bit steps)")
    ax.set_title("Per-layer error by backend")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def bits_plot(path: Path, bits: Mapping[int, float], sensitivity: Mapping[int, float]) -> None:
    """Mean weight bits per encoder layer as bars; the checkpoint's sensitivity on a second axis when known."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = sorted(bits)
    ax.bar(layers, [bits[i] for i in layers], color="tab:blue", alpha=0.7, label="weight bits")
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("mean weight bits")
    ax.set_xticks(layers)
    if sensitivity:
        other = ax.twinx()
        keys = sorted(sensitivity)
        other.plot(keys, [sensitivity[i] for i in keys], color="tab:red", marker="o", label="sensitivity")
        other.set_ylabel("sensitivity (from the checkpoint)")
        ax.set_title("Bits per layer beside sensitivity")
    else:
        ax.set_title("Bits per layer (the checkpoint records no sensitivity)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
