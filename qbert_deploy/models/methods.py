"""The quantization methods that write model.pt, by id, and the recipes they use.

Ids: `qbert-w{bits}` (uniform bits), `qbert-mp{lo}{hi}` (Hessian-allocated mixed precision: mp24, mp23, mp34), `q8bert`,
`directq-w{bits}` (one group, no QAT), `ptq-{lq,aciq,ocs,mse,gptq}-w{bits}` (no training); `-g{groups}` overrides
the group count (default 128, the paper's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qbert_deploy.recipe import Recipe, WeightQuant

DEFAULT_GROUPS = 128
FAMILIES = ("qbert", "q8bert", "directq", "ptq-lq", "ptq-aciq", "ptq-ocs", "ptq-mse", "ptq-gptq")
# Mixed precision presets: the bit widths a layer may get, and the average the allocation must not exceed
# (the midpoint: half the weights at each width when the layers are of equal size). mp34 is the demo's: within its
# 100 QAT steps, 2-bit layers do not come back to within 0.5 points of fp32 (docs/results/demo.md).
MIXED = {"mp24": ((2, 4), 3.0), "mp23": ((2, 3), 2.5), "mp34": ((3, 4), 3.5)}
_ID = re.compile(r"^(?P<family>qbert|directq|ptq-lq|ptq-aciq|ptq-ocs|ptq-mse|ptq-gptq)-"
                 r"(?:w(?P<bits>[2-8])|(?P<mp>mp24|mp23|mp34))(?:-g(?P<groups>\d+))?$|^(?P<q8>q8bert)$")


@dataclass(frozen=True)
class Method:
    """A parsed method id: what recipe to build and which steps to run."""

    id: str
    family: str
    bits: int
    groups: int | None
    mixed: tuple[tuple[int, ...], float] | None = None

    @property
    def qat(self) -> bool:
        return self.family in ("qbert", "q8bert")

    @property
    def clip(self) -> str | None:
        """The clipping of models/ptq.py this post-training method applies; GPTQ (models/gptq.py) rounds instead."""
        if self.family.startswith("ptq-") and self.family != "ptq-gptq":
            return self.family.removeprefix("ptq-")
        return None

    def recipe(self) -> Recipe:
        """The uniform recipe; mixed precision adds per-module overrides after the Hessian allocation."""
        if self.family == "q8bert":
            spec = WeightQuant(bits=8, groups=1, symmetric=True)
            return Recipe(default=spec, embedding=spec, activation_bits=8, method="q8bert")
        return Recipe(default=WeightQuant(bits=self.bits, groups=self.groups), activation_bits=8,
                      embedding=WeightQuant(bits=8, groups=None), method=self.id)


def parse_method(method_id: str) -> Method:
    match = _ID.match(method_id)
    if match is None:
        raise ValueError(f"unknown method {method_id!r}: use qbert-w{{2,3,4,8}}, qbert-mp24, qbert-mp23, qbert-mp34, "
                         f"q8bert, directq-w{{bits}}, ptq-{{lq,aciq,ocs,mse,gptq}}-w{{bits}}, optionally with "
                         f"-g{{groups}}")
    if match["q8"]:
        return Method(method_id, "q8bert", 8, 1)
    family = match["family"]
    groups = int(match["groups"]) if match["groups"] else 1 if family == "directq" else DEFAULT_GROUPS
    if groups < 1:
        raise ValueError(f"{method_id}: the group count must be positive")
    if match["mp"]:
        if family != "qbert":
            raise ValueError(f"{method_id}: mixed precision is a Q-BERT method (qbert-mp24, qbert-mp23, qbert-mp34)")
        choices, average = MIXED[match["mp"]]
        return Method(method_id, family, min(choices), groups, (choices, average))
    return Method(method_id, family, int(match["bits"]), groups)
