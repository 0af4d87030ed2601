"""What differs between transformers 4.45-4.57 and 5.x, in one place; every other module has one code path.

- The exported graph. transformers 5 builds the attention mask through `masking_utils` (a GreaterOrEqual/Where/
  GatherND subgraph in ONNX) and scales the scores by a Mul inside a pluggable attention function. Under 5.x the
  export runs a registered attention function of ours with 4.x's eager form (QK^T / sqrt(d) + additive mask) and
  hands the model 4.x's extended mask (a prepared 4-D mask, which 5.x takes as it is), so both lines write the
  same graph, the one our attention fusion and ORT's BERT fusions know.
- Training. 5.x's eager attention multiplies the scores by 1/sqrt(d) where 4.x divides by sqrt(d): a rounding
  difference that a fine-tune amplifies into a different model (0.5 points on the CI gate's 60-step run). Models
  are therefore built with `ATTENTION`: 4.x's "eager" there, the same 4.x form registered under 5.x, with 5.x's
  eager mask (the same additive values as 4.x's). Both lines then train the same model.
- `head_mask` is gone in 5.x. The AQ-BERT search's relaxed head mask is applied to the self-attention output
  instead (`head_gate_hook`): P·V is linear in P, so scaling a head's context equals scaling its probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from torch import nn

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
EXPORT_ATTENTION = "qbert_eager"


def extended_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers 4.x's additive mask: 0 where a key is attended, the dtype's lowest value where it is padding."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def _eager_4x(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
              **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """4.x BERT's eager attention core: divide by sqrt(d), add the mask, softmax, dropout, times V."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / (query.size(-1) ** 0.5)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    context = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return context, probs


def _register() -> str:
    """The attention implementation every model is built with (see the module docstring)."""
    if TRANSFORMERS_MAJOR < 5:
        return "eager"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EXPORT_ATTENTION, _eager_4x)
    AttentionMaskInterface.register(EXPORT_ATTENTION, eager_mask)
    return EXPORT_ATTENTION


ATTENTION = _register()


def _set_attention(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:
        model.config._attn_implementation = name  # type: ignore[union-attr]


@contextmanager
def export_attention(model: nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """While exporting: the function that turns the graph's 2-D attention_mask into what the model is given."""
    if TRANSFORMERS_MAJOR < 5:
        yield lambda mask: mask
        return
    before = str(model.config._attn_implementation)  # type: ignore[union-attr]
    _set_attention(model, EXPORT_ATTENTION)
    try:
        yield extended_mask
    finally:
        _set_attention(model, before)


def head_gate_hook(gate: Callable[[], torch.Tensor | None], head_size: int
                   ) -> Callable[[nn.Module, Any, Any], Any]:
    """A forward hook for a self-attention module that scales each head's context by `gate()` ([heads], or None
    for no gating): the `head_mask` of transformers 4.x, which 5.x removed."""
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        weights = gate()
        if weights is None:
            return output
        context = output[0] if isinstance(output, tuple) else output
        gated = context * weights.to(context.dtype).repeat_interleave(head_size)
        return (gated, *output[1:]) if isinstance(output, tuple) else gated
    return hook
