"""AQ-BERT (Zhao et al. 2021): a differentiable search of each subgroup's bit width, pruning included, then QAT.

Subgroups are structural, so that a pruned one is physically gone from the deployed graph:
- one per attention head: its rows of Q, K and V (which take the chosen width) and its columns of the attention
  output (which go with it when it is pruned);
- one per block of `ffn_block` FFN neurons (default 32): rows of `intermediate.dense` and the matching columns of
  `output.dense`. 32 is MiniLM's head size and a multiple of 16, so pruned GEMMs keep widths that the integer
  kernels tile without a ragged edge and 4/2-bit rows pack into whole bytes, while a block is still small enough
  (1/48 of a MiniLM FFN) for the search to trade fine-grained work for accuracy.
Each subgroup chooses among CHOICES (0 = pruned) through architecture logits relaxed with Gumbel-softmax: the
weights of the choices are mixed row by row, and a head's or block's keep probability gates its output (each
head's attention context, as 4.x's `head_mask` did, for heads; the intermediate activation for FFN blocks). The
logits are trained on held-out batches (task loss + lambda x how far the expected size / GEMM work is over the
target), the weights on training batches.
With distillation on (the default), the task loss is the distillation loss from the fp32 model: soft cross-entropy on
the logits plus MSE on the hidden states. The attention-score term does not apply: pruned layers have fewer heads.
The argmax choice, cut down greedily where it is still over the target, becomes a version-2 recipe; the pruned
model is rebuilt physically and fine-tuned with QAT.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qbert_deploy.models.distill import Distiller, DistillWeights
from qbert_deploy.models.hf_compat import head_gate_hook
from qbert_deploy.models.modules import QuantLinear
from qbert_deploy.models.prune import encoder_layers, restructure
from qbert_deploy.models.quantizer import fake_quant_weight
from qbert_deploy.models.size import MB
from qbert_deploy.models.wrap import calibrate, quantize_model
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.structure import DEFAULT_FFN_BLOCK, LayerPlan, Structure

log = logging.getLogger("qbert_deploy.quantize")

CHOICES = (0, 2, 3, 4, 8)  # 0: pruned
WIDTHS = CHOICES[1:]
RAMP_FRACTION = 0.7  # of the search steps over which the target falls to its final value; the last 30% settle there
SEQUENCE_FOR_MACS = 128  # the attention core's share of the work depends on the sequence; counted at 128
Batch = tuple[dict[str, np.ndarray], np.ndarray]


class AQBertError(ValueError):
    """A target the search cannot meet."""


# Logits and hidden states, as `--distill full` minus the attention term that pruned heads cannot match.
DEFAULT_DISTILL = DistillWeights(logits=1.0, hidden=1.0, attention=0.0)


@dataclass(frozen=True)
class Target:
    budget_mb: float | None = None
    keep_macs: float | None = None

    def __post_init__(self) -> None:
        if self.budget_mb is None and self.keep_macs is None:
            raise AQBertError("aqbert needs a target: --budget-mb and/or --keep-macs")
        if self.keep_macs is not None and not 0 < self.keep_macs <= 1:
            raise AQBertError(f"--keep-macs must be in (0, 1], got {self.keep_macs:g}")
        if self.budget_mb is not None and not self.budget_mb > 0:
            raise AQBertError(f"--budget-mb must be positive, got {self.budget_mb:g}")


@dataclass(frozen=True)
class CostModel:
    """Size (the paper's way: weights x bits, float leftovers x 32) and GEMM work of each subgroup choice."""

    layers: int
    heads: int
    head_size: int
    hidden: int
    blocks: int
    ffn_block: int
    column_bits: int
    fixed_bits: float  # embeddings and float leftovers: what no subgroup choice changes

    @classmethod
    def of(cls, model: nn.Module, ffn_block: int, column_bits: int, embedding_bits: int | None) -> CostModel:
        config: Any = model.config
        hidden, heads, inter = int(config.hidden_size), int(config.num_attention_heads), int(config.intermediate_size)
        if inter % ffn_block:
            raise AQBertError(f"the FFN block of {ffn_block} neurons does not divide intermediate_size {inter}")
        layers = int(config.num_hidden_layers)
        total = sum(p.numel() for p in model.parameters())
        embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
        subgroup_params = layers * (4 * hidden * hidden + 3 * hidden + 2 * hidden * inter + inter)
        float_params = total - embeddings - subgroup_params
        fixed = float_params * 32 + embeddings * (embedding_bits or 32)
        return cls(layers, heads, hidden // heads, hidden, inter // ffn_block, ffn_block, column_bits, fixed)

    def head_bits(self, bits: int) -> float:
        d, h = self.head_size, self.hidden
        return 0.0 if bits == 0 else 3 * d * h * bits + d * h * self.column_bits + 3 * d * 32

    def block_bits(self, bits: int) -> float:
        b, h = self.ffn_block, self.hidden
        return 0.0 if bits == 0 else b * h * bits + b * h * self.column_bits + b * 32

    @property
    def head_macs(self) -> float:
        return 4 * self.head_size * self.hidden + 2 * SEQUENCE_FOR_MACS * self.head_size

    @property
    def block_macs(self) -> float:
        return 2 * self.ffn_block * self.hidden

    @property
    def full_macs(self) -> float:
        return self.layers * (self.heads * self.head_macs + self.blocks * self.block_macs)

    def size_mb(self, head_choices: np.ndarray, block_choices: np.ndarray) -> float:
        bits = self.fixed_bits + sum(self.head_bits(int(b)) for b in head_choices.flat) \
            + sum(self.block_bits(int(b)) for b in block_choices.flat)
        return bits / 8 / MB

    def macs_kept(self, head_choices: np.ndarray, block_choices: np.ndarray) -> float:
        kept = (head_choices > 0).sum() * self.head_macs + (block_choices > 0).sum() * self.block_macs
        return float(kept / self.full_macs)

    @property
    def full_size_mb(self) -> float:
        """The size with every subgroup kept at 8 bits: where the size target's schedule starts."""
        full = np.full((self.layers, self.heads), 8), np.full((self.layers, self.blocks), 8)
        return self.size_mb(*full)

    @property
    def min_size_mb(self) -> float:
        return self.fixed_bits / 8 / MB

    def check(self, target: Target) -> None:
        if target.budget_mb is not None and target.budget_mb <= self.min_size_mb:
            raise AQBertError(f"--budget-mb {target.budget_mb:g} cannot be met: with every head and FFN neuron "
                              f"pruned the model is still {self.min_size_mb:.3f} MB (embeddings and float "
                              "leftovers)")


class SearchLinear(nn.Module):
    """A Linear whose row groups mix their fake-quantized versions at each width by the current relaxed choice."""

    def __init__(self, source: QuantLinear, group_rows: int) -> None:
        super().__init__()
        self.weight, self.bias, self.input_quant = source.weight, source.bias, source.input_quant
        self.group_rows = group_rows
        self.mix: torch.Tensor | None = None  # [groups, len(WIDTHS)], set before each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        assert self.mix is not None, "set the relaxed choice first"
        versions = torch.stack([fake_quant_weight(self.weight, b, None, False) for b in WIDTHS])
        coefficients = self.mix.repeat_interleave(self.group_rows, dim=0)  # [rows, widths]
        weight = torch.einsum("rk,kri->ri", coefficients, versions)
        return F.linear(x, weight, self.bias)


class SearchSpace(nn.Module):
    """Architecture logits [layers, subgroups, CHOICES] for heads and FFN blocks, and their relaxed samples."""

    def __init__(self, cost: CostModel) -> None:
        super().__init__()
        init = torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.5])  # a mild preference for keeping at 8 bits
        self.heads = nn.Parameter(init.repeat(cost.layers, cost.heads, 1).clone())
        self.blocks = nn.Parameter(init.repeat(cost.layers, cost.blocks, 1).clone())
        self.cost = cost
        head_costs = [cost.head_bits(b) for b in CHOICES]
        block_costs = [cost.block_bits(b) for b in CHOICES]
        self.head_cost: torch.Tensor
        self.block_cost: torch.Tensor
        self.keeps: torch.Tensor
        self.register_buffer("head_cost", torch.tensor(head_costs, dtype=torch.float64))
        self.register_buffer("block_cost", torch.tensor(block_costs, dtype=torch.float64))
        self.register_buffer("keeps", torch.tensor([0.0] + [1.0] * len(WIDTHS), dtype=torch.float64))

    def expected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected size (MB) and fraction of GEMM work kept under the current choice probabilities."""
        ph, pb = self.heads.double().softmax(-1), self.blocks.double().softmax(-1)
        size = (self.cost.fixed_bits + (ph * self.head_cost).sum() + (pb * self.block_cost).sum()) / 8 / MB
        macs = ((ph * self.keeps).sum() * self.cost.head_macs
                + (pb * self.keeps).sum() * self.cost.block_macs) / self.cost.full_macs
        return size, macs

    def confidence(self) -> float:
        """Mean probability of each subgroup's most likely choice: 1.0 is a discrete recipe."""
        return float(torch.cat([self.heads.detach().softmax(-1).max(-1).values.flatten(),
                                self.blocks.detach().softmax(-1).max(-1).values.flatten()]).mean())

    def discrete(self) -> tuple[np.ndarray, np.ndarray]:
        """The most likely choice of each subgroup, as bit widths (0 = pruned)."""
        table = np.array(CHOICES)
        return table[self.heads.argmax(-1).numpy()], table[self.blocks.argmax(-1).numpy()]


def _relaxed(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep gate [...], width mix [..., widths]) from a Gumbel-softmax sample."""
    sample = F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    keep = 1 - sample[..., 0]
    return keep, sample[..., 1:] / keep.clamp_min(1e-6).unsqueeze(-1)


class Searcher:
    """Holds the relaxed model: search Linears, FFN gate hooks, the head mask."""

    def __init__(self, model: nn.Module, space: SearchSpace, ffn_block: int) -> None:
        self.model, self.space, self.ffn_block = model, space, ffn_block
        self.heads: list[list[SearchLinear]] = []
        self.ffn: list[SearchLinear] = []
        self.gates: list[torch.Tensor | None] = []
        self.head_gates: list[torch.Tensor | None] = []
        for index, (_, layer) in sorted(encoder_layers(model).items()):
            attention = layer.attention.self
            group = []
            for name in ("query", "key", "value"):
                linear = SearchLinear(getattr(attention, name), int(attention.attention_head_size))
                setattr(attention, name, linear)
                group.append(linear)
            self.heads.append(group)
            dense = SearchLinear(layer.intermediate.dense, ffn_block)
            layer.intermediate.dense = dense
            self.ffn.append(dense)
            self.gates.append(None)
            layer.intermediate.register_forward_hook(self._gate_hook(index))
            self.head_gates.append(None)
            attention.register_forward_hook(head_gate_hook(functools.partial(self._head_gate, index),
                                                           int(attention.attention_head_size)))

    def _head_gate(self, index: int) -> torch.Tensor | None:
        return self.head_gates[index]

    def _gate_hook(self, index: int) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            gate = self.gates[index]
            return output if gate is None else output * gate.repeat_interleave(self.ffn_block)
        return hook

    def sample(self, tau: float) -> None:
        """Draw a relaxed choice into the modules (head gates, FFN gates, mixed widths)."""
        head_keep, head_mix = _relaxed(self.space.heads, tau)
        block_keep, block_mix = _relaxed(self.space.blocks, tau)
        for index, group in enumerate(self.heads):
            for linear in group:
                linear.mix = head_mix[index]
            self.ffn[index].mix = block_mix[index]
            self.gates[index] = block_keep[index]
            self.head_gates[index] = head_keep[index]

    def ungate_heads(self) -> None:
        self.head_gates = [None] * len(self.head_gates)


@dataclass
class SearchSettings:
    steps: int = 200
    qat_steps: int = 200
    weight_lr: float = 5e-5
    arch_lr: float = 0.05
    qat_lr: float = 5e-5
    penalty: float = 5.0  # lambda: task loss + penalty x relative excess over the target
    tau: tuple[float, float] = (1.0, 0.1)  # Gumbel-softmax temperature, annealed geometrically
    ffn_block: int = DEFAULT_FFN_BLOCK
    column_bits: int = 8  # attention-output and FFN-output matrices (the subgroups' column side)
    calibration_batches: int = 8
    seed: int = 0
    distill: DistillWeights | None = DEFAULT_DISTILL  # None: the plain task loss in the search and the QAT
    teacher: nn.Module | None = None  # default: the fp32 model being searched
    layer_map: tuple[int, ...] | None = None  # a shorter student's teacher layer per layer (Distiller.layer_map)


@dataclass
class SearchResult:
    recipe: Recipe
    neurons: dict[int, torch.Tensor]
    head_choices: np.ndarray
    block_choices: np.ndarray
    size_mb: float
    macs_kept: float
    confidence: tuple[float, float]  # at the start and at the end of the search
    expected: tuple[float, float] = (0.0, 0.0)  # the relaxed choice's expected size (MB) and work kept at the end
    ramp_steps: int = 0  # the step at which the scheduled target reached its final value


def base_recipe(settings: SearchSettings) -> Recipe:
    return Recipe(default=WeightQuant(bits=settings.column_bits, groups=None),
                  embedding=WeightQuant(bits=8, groups=None), activation_bits=8, method="aqbert")


def _student_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                  distiller: Distiller | None) -> torch.Tensor:
    """The task loss, or `distiller`'s loss when distilling."""
    if distiller is None:
        loss: torch.Tensor = model(**inputs, labels=labels).loss
        return loss
    return distiller(model, inputs, labels)


def pruned_distill(weights: DistillWeights | None) -> DistillWeights | None:
    """`weights` without the attention-score term (pruned layers have fewer heads than the teacher)."""
    if weights is None or not weights.attention:
        return weights
    if not (weights.logits or weights.hidden):
        raise AQBertError("aqbert distils logits and hidden states; attention scores do not apply to pruned heads "
                          "(set --distill-logits or --distill-hidden above 0)")
    return replace(weights, attention=0.0)


def ramp_steps(steps: int) -> int:
    """The search step at which the scheduled target reaches its final value."""
    return max(1, round(RAMP_FRACTION * steps))


def scheduled_target(final: float, step: int, ramp: int) -> float:
    """The kept fraction asked for at `step` (Zhu & Gupta 2017, "To prune, or not to prune"):
    final + (1 - final) * (1 - step / ramp)^3 before step `ramp`, `final` from there on.

    It starts at 1.0 (nothing pruned), falls fastest at first, while much is redundant, and ever more slowly as it
    nears `final`, which it reaches exactly at `ramp` and keeps.
    """
    if step >= ramp:
        return final
    return final + (1 - final) * (1 - step / ramp) ** 3


def _excess(value: torch.Tensor, target: float) -> torch.Tensor:
    return (value / target - 1).clamp(min=0)


def search(fp32: nn.Module, train_batches: Iterable[Batch], held_out: Iterable[Batch],
           calibration: Sequence[dict[str, torch.Tensor]], target: Target,
           settings: SearchSettings) -> tuple[SearchResult, nn.Module]:
    """Run the relaxed search on a copy of `fp32`; returns the discrete result and the search-trained float model."""
    torch.manual_seed(settings.seed)
    distill = pruned_distill(settings.distill)
    distiller = Distiller(settings.teacher or fp32, distill, settings.layer_map) if distill is not None else None
    recipe = base_recipe(settings)
    cost = CostModel.of(fp32, settings.ffn_block, settings.column_bits, 8)
    cost.check(target)
    model = quantize_model(copy.deepcopy(fp32), recipe)
    calibrate(model, calibration)
    space = SearchSpace(cost)
    searcher = Searcher(model, space, settings.ffn_block)
    weights = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.weight_lr,
                                weight_decay=0.01)
    arch = torch.optim.Adam(space.parameters(), lr=settings.arch_lr, betas=(0.5, 0.999))
    train_iter, held_iter = _forever(train_batches), _forever(held_out)
    start_confidence = space.confidence()
    ramp = ramp_steps(settings.steps)
    size_fraction = None if target.budget_mb is None else min(1.0, target.budget_mb / cost.full_size_mb)
    model.train()
    with tqdm(total=settings.steps, desc="AQ-BERT search", unit="step", dynamic_ncols=True) as bar:
        for step in range(settings.steps):
            tau = settings.tau[0] * (settings.tau[1] / settings.tau[0]) ** (step / max(1, settings.steps - 1))
            # weights on a training batch, the choice held fixed
            inputs, labels = next(train_iter)
            with torch.no_grad():
                searcher.sample(tau)
            loss = _student_loss(model, _torch(inputs), torch.from_numpy(labels), distiller)
            weights.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            weights.step()
            # architecture on a held-out batch: task loss + lambda x excess over the target
            inputs, labels = next(held_iter)
            searcher.sample(tau)
            task_loss = _student_loss(model, _torch(inputs), torch.from_numpy(labels), distiller)
            size, macs = space.expected()
            penalty = torch.zeros((), dtype=torch.float64)
            if size_fraction is not None:
                budget_now = cost.full_size_mb * scheduled_target(size_fraction, step, ramp)
                penalty = penalty + _excess(size, 0.97 * budget_now)
            if target.keep_macs is not None:
                penalty = penalty + _excess(macs, 0.97 * scheduled_target(target.keep_macs, step, ramp))
            arch_loss = task_loss + settings.penalty * penalty.float()
            arch.zero_grad(set_to_none=True)
            weights.zero_grad(set_to_none=True)
            arch_loss.backward()
            arch.step()
            bar.set_postfix(loss=f"{float(task_loss.detach()):.3f}", size_mb=f"{float(size.detach()):.2f}",
                            work_kept=f"{float(macs.detach()):.2f}", tau=f"{tau:.2f}")
            bar.update()
    weights.zero_grad(set_to_none=True)
    with torch.no_grad():
        end_size, end_macs = (float(v) for v in space.expected())
    searcher.ungate_heads()
    heads, blocks = _fit(space, cost, target)
    model.eval()
    structure, neurons = _structure(heads, blocks, cost)
    result = SearchResult(Recipe(default=recipe.default, embedding=recipe.embedding, activation_bits=8,
                                 method="aqbert", structure=structure), neurons, heads, blocks,
                          cost.size_mb(heads, blocks), cost.macs_kept(heads, blocks),
                          (start_confidence, space.confidence()), (end_size, end_macs), ramp)
    return result, model


def _torch(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in inputs.items()}


def _forever(batches: Iterable[Batch]) -> Any:
    items = list(batches)
    if not items:
        raise AQBertError("the search needs at least one batch of training and of held-out data")
    while True:
        yield from items


def _fit(space: SearchSpace, cost: CostModel, target: Target) -> tuple[np.ndarray, np.ndarray]:
    """The discrete choice: each subgroup's most likely width, kept when its keep probability is over 1/2; then
    the cheapest loss of preference per step down while over the target, and back up (most likely kept first)
    while there is room, so that a choice that sits on the target's edge neither overshoots nor prunes everything.
    """
    logp = {"h": space.heads.detach().log_softmax(-1).numpy(), "b": space.blocks.detach().log_softmax(-1).numpy()}
    widths = np.array(WIDTHS)
    tables = {kind: np.where(np.exp(lp[..., 0]) < 0.5, widths[lp[..., 1:].argmax(-1)], 0)
              for kind, lp in logp.items()}
    heads, blocks = tables["h"], tables["b"]

    def fits() -> bool:
        return (target.budget_mb is None or cost.size_mb(heads, blocks) <= target.budget_mb) and \
            (target.keep_macs is None or cost.macs_kept(heads, blocks) <= target.keep_macs + 1e-9)

    while not fits():
        macs_over = target.keep_macs is not None and cost.macs_kept(heads, blocks) > target.keep_macs + 1e-9
        best: tuple[float, str, tuple[int, ...], int] | None = None
        for kind, table in tables.items():
            for where in zip(*np.nonzero(table > 0), strict=True):
                current = CHOICES.index(int(table[where]))
                lower = 0 if macs_over else current - 1
                loss = float(logp[kind][where][current] - logp[kind][where][lower])
                if best is None or loss < best[0]:
                    best = (loss, kind, tuple(int(i) for i in where), lower)
        if best is None:
            raise AQBertError("the target cannot be met even with every subgroup pruned")
        _, kind, where, lower = best
        tables[kind][where] = CHOICES[lower]
    pruned = [(float(logp[kind][where][0]), kind, tuple(int(i) for i in where))
              for kind, table in tables.items() for where in zip(*np.nonzero(table == 0), strict=True)]
    for _, kind, where in sorted(pruned):  # least likely pruned first
        tables[kind][where] = int(widths[logp[kind][where][1:].argmax()])
        if not fits():
            tables[kind][where] = 0
    if not (heads > 0).any() and not (blocks > 0).any():
        raise AQBertError("meeting the target would prune every head and every FFN neuron; give a larger target")
    return heads, blocks


def _structure(heads: np.ndarray, blocks: np.ndarray, cost: CostModel) -> tuple[Structure, dict[int, torch.Tensor]]:
    """Kept heads and FFN blocks, widest first (so each width is contiguous), and the neurons each layer keeps."""
    layers: dict[int, LayerPlan] = {}
    neurons: dict[int, torch.Tensor] = {}
    for layer in range(cost.layers):
        kept_heads = sorted((h for h in range(cost.heads) if heads[layer, h] > 0), key=lambda h: -heads[layer, h])
        kept_blocks = sorted((b for b in range(cost.blocks) if blocks[layer, b] > 0),
                             key=lambda b: -blocks[layer, b])
        neurons[layer] = torch.tensor([b * cost.ffn_block + i for b in kept_blocks for i in range(cost.ffn_block)],
                                      dtype=torch.long)
        layers[layer] = LayerPlan(heads=tuple(kept_heads), head_bits=tuple(int(heads[layer, h]) for h in kept_heads)
                                  or None, intermediate_size=len(kept_blocks) * cost.ffn_block,
                                  ffn_bits=tuple(int(blocks[layer, b]) for b in kept_blocks) or None)
    return Structure(layers=layers, ffn_block=cost.ffn_block), neurons


def pruned_model(fp32: nn.Module, searched: nn.Module, result: SearchResult) -> nn.Module:
    """The physically pruned float model with the search-trained weights (not yet quantized)."""
    model = copy.deepcopy(fp32)
    state = {k: v for k, v in searched.state_dict().items() if ".input_quant." not in k}
    model.load_state_dict(state, strict=True)
    assert result.recipe.structure is not None
    restructure(model, result.recipe.structure, result.neurons)
    return model


def finalize(fp32: nn.Module, searched: nn.Module, result: SearchResult,
             calibration: Sequence[dict[str, torch.Tensor]], train_batches: Callable[[int], Iterable[Batch]],
             settings: SearchSettings) -> nn.Module:
    """Prune physically, quantize with the searched recipe, calibrate and fine-tune with QAT."""
    from qbert_deploy.models.train import train

    model = pruned_model(fp32, searched, result)
    quantize_model(model, result.recipe)
    calibrate(model, calibration)
    if settings.qat_steps > 0:
        distill = pruned_distill(settings.distill)
        distiller = Distiller(settings.teacher or fp32, distill, settings.layer_map) if distill is not None else None
        train(model, train_batches, settings.qat_steps, lr=settings.qat_lr, desc="AQ-BERT QAT", loss_fn=distiller)
    return model.eval()


def plot_choices(result: SearchResult, path: Path) -> None:
    """Per layer: heads and FFN blocks by chosen width (pruned in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qbert_deploy.atomic import atomic_file

    colors = {0: "#cccccc", 2: "#d7301f", 3: "#fc8d59", 4: "#fdcc8a", 8: "#2c7fb8"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, table, title in ((axes[0], result.head_choices, "attention heads"),
                             (axes[1], result.block_choices, "FFN blocks")):
        layers = np.arange(table.shape[0])
        left = np.zeros(table.shape[0])
        for bits in CHOICES:
            count = (table == bits).sum(axis=1)
            ax.barh(layers, count, left=left, color=colors[bits], label="pruned" if bits == 0 else f"{bits}-bit")
            left += count
        ax.set_title(title)
        ax.set_xlabel("subgroups")
    axes[0].set_ylabel("encoder layer")
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"AQ-BERT choice: {result.size_mb:.2f} MB (paper's way), {result.macs_kept:.0%} of GEMM work kept")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def describe(result: SearchResult) -> str:
    heads = int((result.head_choices > 0).sum())
    blocks = int((result.block_choices > 0).sum())
    return (f"{heads}/{result.head_choices.size} heads and {blocks}/{result.block_choices.size} FFN blocks kept, "
            f"{result.size_mb:.2f} MB the paper's way, {result.macs_kept:.1%} of the GEMM work; "
            f"choice confidence {result.confidence[0]:.2f} -> {result.confidence[1]:.2f}")


__all__ = [
    "CHOICES",
    "AQBertError",
    "CostModel",
    "SearchResult",
    "SearchSettings",
    "Target",
    "describe",
    "finalize",
    "plot_choices",
    "scheduled_target",
    "search",
]
