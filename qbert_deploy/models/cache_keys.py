"""What the output folder's caches (fp32/, sensitivity.json, qat-state.pt) are keyed on, and why one is not used.

A cache is reused only when everything that changes its result is the same: the content of the data and of the
models it was made from (hashes, not counts or paths) and the settings. Each key is a dict of readable names, so a
rejected cache can say what changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any


def examples_digest(examples: Iterable[Any]) -> str:
    """sha256 of the examples' contents (texts, words, answers, labels: every field of each dataclass, in order)."""
    h = hashlib.sha256()
    for example in examples:
        h.update(repr(example).encode() + b"\n")
    return h.hexdigest()


def differences(saved: Any, key: dict[str, Any]) -> str:
    """Why a cache keyed `saved` is not the one `key` asks for, in words."""
    if not isinstance(saved, dict):
        return "it records no key this version reads"
    changed = [name for name in key if saved.get(name) != key[name]]
    changed += [name for name in saved if name not in key]
    return f"{', '.join(changed)} changed" if changed else "same key"
