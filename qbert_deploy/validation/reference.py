"""Which fine-tuned fp32 model a validation run measures the quantization drop against.

model.pt records the folder `qbert-quantize` kept (OUT/fp32, relative to model.pt) and its content hash; `--fp32 DIR`
overrides it. An explicit folder that is missing, not a model, of other labels or of another hash is bad input (the
user asked for it); a recorded folder that has gone or changed since is a warning, and the run has no fp32 row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbert_deploy.checkpoint import Checkpoint, fp32_digest
from qbert_deploy.tasks import FEATURE
from qbert_deploy.tasks.embeddings import POOLING_KEY


class Fp32Error(ValueError):
    """An --fp32 folder that cannot be the reference of this checkpoint (exit 2)."""


@dataclass(frozen=True)
class Fp32Choice:
    folder: Path | None  # the folder to run; None: no fp32 row
    origin: str  # "--fp32", "model.pt" or "none"
    verified: bool  # its hash is the one model.pt recorded
    message: str  # one line for the console and the report: what was chosen, or why there is no fp32 row
    recorded_sha256: str | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.folder) if self.folder else None, "origin": self.origin, "verified": self.verified,
                "sha256": self.sha256, "recorded_sha256": self.recorded_sha256, "message": self.message}


def _labels(config: dict[str, Any]) -> list[str] | None:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return None


def _problem(folder: Path, checkpoint: Checkpoint) -> str | None:
    """Why `folder` cannot be the checkpoint's fp32 model, or None."""
    if not folder.is_dir():
        return f"{folder}: no such folder"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{folder}: not a Hugging Face model folder (no config.json)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{folder}/config.json: cannot read it ({type(err).__name__})"
    if not isinstance(config, dict):
        return f"{folder}/config.json: not a JSON object"
    if checkpoint.task == FEATURE:  # an embedding model has no head: its encoder must carry the same pooling
        if config.get(POOLING_KEY, "mean") != checkpoint.config.get(POOLING_KEY, "mean"):
            return f"{folder}: the fp32 model pools {config.get(POOLING_KEY, 'mean')}, model.pt " \
                   f"{checkpoint.config.get(POOLING_KEY, 'mean')}"
        return None
    labels = _labels(config)
    count = len(labels) if labels else config.get("num_labels", 2)  # transformers' default when unsaid
    if count != len(checkpoint.labels):
        return f"{folder}: the fp32 model predicts {count} labels, model.pt {len(checkpoint.labels)}"
    if labels and not all(name.startswith("LABEL_") for name in labels) and labels != checkpoint.labels:
        return f"{folder}: the fp32 model's labels {labels} differ from model.pt's {checkpoint.labels}"
    return None


def choose_fp32(checkpoint: Checkpoint, checkpoint_path: Path, explicit: Path | None) -> Fp32Choice:
    """The fp32 folder to run (explicit, else recorded), checked; raises Fp32Error only for an explicit one."""
    recorded = checkpoint.fp32_reference
    want = recorded.sha256 if recorded else None
    if explicit is not None:
        problem = _problem(explicit, checkpoint)
        if problem:
            raise Fp32Error(f"--fp32 {problem}")
        digest = fp32_digest(explicit)
        if want is not None and digest != want:
            raise Fp32Error(f"--fp32 {explicit} is not the fp32 model {checkpoint_path} was quantized from "
                                 f"(sha256 {digest[:12]}, model.pt records {want[:12]})")
        how = "matches model.pt's record" if want else "not verified: model.pt records no fp32 hash"
        return Fp32Choice(explicit, "--fp32", want is not None, f"fp32 reference: {explicit} ({how})", want, digest)
    if recorded is None:
        return Fp32Choice(None, "none", False, f"note: {checkpoint_path} records no fp32 model (written before "
                          "qbert-quantize recorded it): no pytorch-fp32 row; give --fp32 DIR (the run's OUT/fp32)")
    folder = recorded.resolve(checkpoint_path)
    problem = _problem(folder, checkpoint)
    if problem:
        return Fp32Choice(None, "model.pt", False, f"warning: the fp32 model recorded in {checkpoint_path} is "
                          f"unusable ({problem}): no pytorch-fp32 row; give --fp32 DIR", want)
    digest = fp32_digest(folder)
    if digest != recorded.sha256:
        return Fp32Choice(None, "model.pt", False, f"warning: {folder} has changed since {checkpoint_path} was "
                          f"quantized from it (sha256 {digest[:12]}, recorded {recorded.sha256[:12]}): no pytorch-fp32 "
                          "row; give --fp32 DIR", want, digest)
    return Fp32Choice(folder, "model.pt", True, f"fp32 reference: {folder} (recorded in model.pt, hash verified)",
                      want, digest)


__all__ = ["Fp32Choice", "Fp32Error", "choose_fp32"]
