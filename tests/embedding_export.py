"""A tiny sentence-embedding export folder, laid out as qbert-export lays one out, for the serving tests.

A tiny random BertModel with mean pooling over the attention mask and L2 normalisation inside the graph, exported
with torch.onnx.export to model.onnx (outputs last_hidden_state and sentence_embedding), beside config.json
(architectures ["BertModel"]), the MiniLM tokenizer files, the sentence-transformers modules.json +
1_Pooling/config.json, and qbert_recipe.json recording the sha256 of model.onnx (what `verify_file` checks).
A stand-in for the real `qbert-export` output of a feature-extraction model until that exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import BertModel

from qbert_deploy.runtimes.export_dir import RECIPE_FILE, record_files
from tests.tiny import _tokenizer_texts, tiny_config

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


class MeanPooledEncoder(nn.Module):
    """sentence-transformers' mean pooling (the mask-weighted mean of the token vectors) and Normalize."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return hidden, nn.functional.normalize(mean, p=2.0, dim=1)


def pooling_config(hidden: int) -> dict[str, object]:
    """1_Pooling/config.json as sentence-transformers writes it for mean pooling."""
    return {"word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True}


def write_embedding_export(folder: Path, seed: int = 0, hidden: int = 64) -> Path:
    """`folder` as an embedding export of a tiny random BERT encoder (sequences up to 128 tokens)."""
    torch.manual_seed(seed)
    config = tiny_config(hidden=hidden)
    config._attn_implementation = "eager"  # what qbert-export exports: the plain attention ops
    encoder = BertModel(config, add_pooling_layer=False).eval()
    model = MeanPooledEncoder(encoder).eval()
    folder.mkdir(parents=True)
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long),
               torch.zeros(2, 8, dtype=torch.long))
    dims = {0: torch.export.Dim("batch", max=1 << 16), 1: torch.export.Dim("sequence", min=2, max=128)}
    names = ("input_ids", "attention_mask", "token_type_ids")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in ("torch", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(model, example, dynamo=True, input_names=list(names),
                                    output_names=["last_hidden_state", "sentence_embedding"],
                                    dynamic_shapes={name: dims for name in names}, verbose=False)
    assert program is not None
    program.save(str(folder / "model.onnx"))
    settings = config.to_dict()
    for key in ("id2label", "label2id", "num_labels"):  # a headless encoder has no labels
        settings.pop(key, None)
    settings["architectures"] = ["BertModel"]
    (folder / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    for name, text in _tokenizer_texts().items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "modules.json").write_text(json.dumps(MODULES, indent=2) + "\n")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config(hidden), indent=2) + "\n")
    (folder / "2_Normalize").mkdir()
    (folder / RECIPE_FILE).write_text("{}\n")
    record_files(folder, ["model.onnx"])
    return folder
