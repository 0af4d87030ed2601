"""Distillation from the fine-tuned fp32 model during QAT: logits, hidden states and attention scores.

loss = w_logits * T^2 * KL(teacher(T) || student(T))       soft cross-entropy, less the teacher's entropy,
     + w_hidden * mean over layers of MSE(hidden states)     embeddings output included
     + w_attention * mean over layers of MSE(Q K^T / sqrt(d)) attention scores before the softmax
     + w_own * the model's own loss on the batch's labels     (embeddings: the distance to the fp32 embedding)

The KL form of the soft cross-entropy has the same gradient and is zero when the student matches the teacher.
MSE terms only count real tokens (the attention mask), so padding never pulls on the student, and are averaged
per example first, so that every term is a mean over examples (what a batch split over processes assumes).
Attention scores are rebuilt from the query and key projections' outputs (forward hooks), which is what any
attention implementation multiplies, so this works with eager and fused attention alike.
A student with fewer layers than its teacher (--keep-layers) is matched through `Distiller.layer_map`: student
layer i against teacher layer layer_map[i], for its output hidden state and its attention scores; the embeddings
output (hidden_states[0]) against the teacher's. The default is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from qbert_deploy.families import family
from qbert_deploy.models.train import label_arguments
from qbert_deploy.models.wrap import quantizable_linears


class DistillError(ValueError):
    """A teacher or a set of weights that cannot drive distillation."""


@dataclass(frozen=True)
class DistillWeights:
    logits: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0
    temperature: float = 1.0
    own: float = 0.0  # the model's own loss: an embedding model's targets are the fp32 embeddings themselves

    def __post_init__(self) -> None:
        values = (self.logits, self.hidden, self.attention, self.own)
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise DistillError(f"distillation weights must be finite and >= 0, got logits={self.logits:g} "
                               f"hidden={self.hidden:g} attention={self.attention:g}")
        if not any(v > 0 for v in values):
            raise DistillError("distillation weights are all zero: use --distill none for plain QAT")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise DistillError(f"distillation temperature must be > 0, got {self.temperature:g}")


# `--distill` presets; explicit weight flags override a preset's values.
PRESETS: dict[str, DistillWeights | None] = {
    "none": None,
    "logits": DistillWeights(logits=1.0, hidden=0.0, attention=0.0),
    "full": DistillWeights(logits=1.0, hidden=1.0, attention=1.0),
}
DEFAULT_PRESET = "full"


def resolve_weights(preset: str, logits: float | None = None, hidden: float | None = None,
                    attention: float | None = None, temperature: float | None = None) -> DistillWeights | None:
    """The preset's weights with any explicit values put in; None means no distillation."""
    if preset not in PRESETS:
        raise DistillError(f"unknown distillation preset {preset!r}; choose from {', '.join(PRESETS)}")
    base = PRESETS[preset]
    explicit = {k: v for k, v in {"logits": logits, "hidden": hidden, "attention": attention,
                                  "temperature": temperature}.items() if v is not None}
    if base is None:
        if explicit:
            raise DistillError("distillation weights were given with --distill none")
        return None
    values = {**base.__dict__, **explicit}
    return DistillWeights(**values)


def check_teacher(teacher_config: dict[str, Any], student_config: dict[str, Any], labels: list[str],
                  weights: DistillWeights, layer_map: Sequence[int] | None = None) -> None:
    """A teacher must predict the same labels and, for the hidden/attention terms, have the student's shape
    (its layer count only without a `layer_map`, which is checked against the teacher's layers on its own)."""
    count = len(teacher_config.get("id2label") or {}) or int(teacher_config.get("num_labels", 2))
    if count != len(labels):
        raise DistillError(f"the teacher predicts {count} labels, the task has {len(labels)}")
    teacher_labels = [str(v) for _, v in sorted((int(k), v) for k, v in (teacher_config.get("id2label") or {}).items())]
    generic = all(name.startswith("LABEL_") for name in teacher_labels)
    if teacher_labels and not generic and teacher_labels != list(labels):
        raise DistillError(f"the teacher's labels {teacher_labels} are not the task's {list(labels)}")
    keys = ["hidden_size"] + (["num_hidden_layers"] if layer_map is None else []) \
        + (["num_attention_heads"] if weights.attention else [])
    if weights.hidden or weights.attention:
        for key in keys:
            if teacher_config.get(key) != student_config.get(key):
                raise DistillError(f"the teacher's {key} is {teacher_config.get(key)}, the student's "
                                   f"{student_config.get(key)}: hidden-state and attention distillation need "
                                   "equal shapes (use --distill logits)")


class Distiller:
    """`loss_fn(model, inputs, labels)` for `train()`: the distillation loss against a frozen teacher."""

    def __init__(self, teacher: nn.Module, weights: DistillWeights, layer_map: Sequence[int] | None = None) -> None:
        self.teacher = teacher.eval()  # run under no_grad; its requires_grad flags stay (callers copy it)
        self.weights = weights
        # student layer i is distilled against teacher layer layer_map[i]; None: the identity (equal depths)
        self.layer_map = tuple(int(i) for i in layer_map) if layer_map is not None else None
        self._captured: dict[int, list[torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, model: nn.Module) -> None:
        store = self._captured.setdefault(id(model), [])
        query_key = tuple(family(getattr(model.config, "model_type", None)).linears[:2])
        for name in quantizable_linears(model):
            if name.endswith(query_key):
                def keep(_m: nn.Module, _i: Any, out: torch.Tensor, store: list[torch.Tensor] = store) -> None:
                    store.append(out)
                self._handles.append(model.get_submodule(name).register_forward_hook(keep))

    @contextmanager
    def attached(self, student: nn.Module) -> Iterator[Distiller]:
        """Hooks on the teacher's and the student's query/key projections while training runs."""
        if self.weights.attention:
            self._hook(self.teacher)
            self._hook(student)
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._captured.clear()

    def _scores(self, model: nn.Module) -> list[torch.Tensor]:
        """Pre-softmax attention scores [batch, heads, query, key] of every layer from the captured Q and K."""
        model = getattr(model, "module", model)  # under DDP, train() hands us the wrapper; hooks sit on the model
        store = self._captured.get(id(model), [])
        # Emptied in place: the hooks append to this very list. Left full, it would keep every step's Q and K, with
        # the autograd graph of each step's forward, and the next step would find no scores of its own.
        captured, store[:] = list(store), []
        config: Any = model.config
        heads = int(family(getattr(config, "model_type", None)).config_value(config.to_dict(), "num_attention_heads"))
        scores = []
        for q, k in zip(captured[0::2], captured[1::2], strict=True):
            b, n, width = q.shape
            qh = q.view(b, n, heads, width // heads).transpose(1, 2)
            kh = k.view(b, n, heads, width // heads).transpose(1, 2)
            scores.append(qh @ kh.transpose(-1, -2) / math.sqrt(width // heads))
        return scores

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        w = self.weights
        hidden = bool(w.hidden)
        device = labels.device  # train() moves the student to its device (a GPU per rank)
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher = self.teacher(**inputs, output_hidden_states=hidden)
            teacher_scores = self._scores(self.teacher) if w.attention else []
        own = label_arguments(model, labels) if w.own else {}
        student = model(**inputs, output_hidden_states=hidden, **own)
        student_scores = self._scores(model) if w.attention else []
        teacher_hidden = teacher.hidden_states if hidden else None
        if self.layer_map is not None:
            if teacher_hidden is not None:  # [0] is the embeddings output; layer i's output is [i + 1]
                teacher_hidden = (teacher_hidden[0], *(teacher_hidden[i + 1] for i in self.layer_map))
            teacher_scores = [teacher_scores[i] for i in self.layer_map] if teacher_scores else teacher_scores
        loss = distill_loss(head_logits(student), head_logits(teacher), inputs.get("attention_mask"), w,
                            student.hidden_states if hidden else None, teacher_hidden,
                            student_scores, teacher_scores)
        return loss + w.own * student.loss if w.own else loss


def head_logits(out: Any) -> torch.Tensor:
    """The head's logits with the class axis last: a QA head's start and end logits stacked as [batch, 2, tokens],
    so the soft cross-entropy runs over token positions, as the QA loss does."""
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits], dim=1)
    logits: torch.Tensor = out.logits
    return logits


def _masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over each example's positions where `mask` (broadcastable, 0/1) is set, then over
    the examples: a per-example mean like the cross-entropy, so a batch split over processes adds up to the same."""
    weight = mask.to(student.dtype).expand_as(student)
    dims = tuple(range(1, student.dim()))
    per_example = ((student - teacher) ** 2 * weight).sum(dim=dims) / weight.sum(dim=dims).clamp(min=1)
    return per_example.mean()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor | None,
                 weights: DistillWeights, student_hidden: Any = None, teacher_hidden: Any = None,
                 student_scores: list[torch.Tensor] | None = None,
                 teacher_scores: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The weighted sum of the three terms (see the module docstring)."""
    if student_logits.shape != teacher_logits.shape:
        raise DistillError(f"teacher logits {list(teacher_logits.shape)} do not match the student's "
                           f"{list(student_logits.shape)}")
    t = weights.temperature
    loss = student_logits.new_zeros(())
    if weights.logits:
        kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                      reduction="batchmean", log_target=True)
        loss = loss + weights.logits * t * t * kl
    mask = attention_mask if attention_mask is not None else \
        torch.ones(student_logits.shape[0], 1, dtype=torch.long, device=student_logits.device)
    if weights.hidden and student_hidden is not None and teacher_hidden is not None:
        terms = [_masked_mse(s, tt, mask[:, :, None]) for s, tt in zip(student_hidden, teacher_hidden, strict=True)]
        loss = loss + weights.hidden * torch.stack(terms).mean()
    if weights.attention and student_scores and teacher_scores:
        pair = mask[:, None, :, None] * mask[:, None, None, :]
        terms = [_masked_mse(s, tt, pair) for s, tt in zip(student_scores, teacher_scores, strict=True)]
        loss = loss + weights.attention * torch.stack(terms).mean()
    return loss
