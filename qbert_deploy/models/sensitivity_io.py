"""Save the Hessian sensitivity as JSON and a bar plot, and read the JSON back."""

from __future__ import annotations

import json
from pathlib import Path

from qbert_deploy.atomic import atomic_file, write_text_atomic
from qbert_deploy.models.hessian import Sensitivity


def save_sensitivity(sens: Sensitivity, json_path: Path, png_path: Path | None = None,
                     bits: list[int] | None = None) -> None:
    data = sens.to_json()
    if bits is not None:
        data["bits"] = bits
    write_text_atomic(json_path, json.dumps(data, indent=1) + "\n")
    if png_path is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = list(range(len(sens.layers)))
    ax.bar(xs, sens.omega, color="#4c72b0", label="Omega = |mean| + std")
    for run in sens.eigenvalues:
        ax.plot(xs, run, "o", color="#dd8452", markersize=4)
    ax.plot([], [], "o", color="#dd8452", markersize=4, label="top eigenvalue per data subset")
    if bits is not None:
        for x, (b, omega) in enumerate(zip(bits, sens.omega, strict=True)):
            ax.annotate(f"{b} bit", (x, omega), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [str(i) for i in xs])
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("Hessian top eigenvalue")
    ax.set_title("Q-BERT layer sensitivity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def load_sensitivity(path: Path) -> Sensitivity:
    try:
        data = json.loads(Path(path).read_text())
        sens = Sensitivity([str(x) for x in data["layers"]], [[float(v) for v in run] for run in data["eigenvalues"]])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a sensitivity file ({type(err).__name__})") from None
    if not sens.eigenvalues or any(len(run) != len(sens.layers) for run in sens.eigenvalues):
        raise ValueError(f"{path}: eigenvalues do not match the layers")
    return sens
