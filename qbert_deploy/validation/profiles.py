"""Which ONNX file a runtime profile runs: the canonical export, or its lowering for a profile.

The lowering contract (qbert_deploy.runtimes.lowering): `PROFILES` names the profiles and
`lower(src, profile, dst) -> Path` writes the lowered model. An export directory may already hold
`model.<profile>.onnx` (a deployment folder: its model.onnx), which is then used as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qbert_deploy.runtimes.export_dir import model_files

CANONICAL = "canonical"


class ProfileError(ValueError):
    """A profile that cannot be resolved to a model."""


def _lowering() -> tuple[tuple[str, ...], object] | None:
    try:
        from qbert_deploy.runtimes.lowering import PROFILES, lower
    except ImportError:
        return None
    return tuple(PROFILES), lower


def known_profiles() -> tuple[str, ...]:
    found = _lowering()
    return (CANONICAL, *(p for p in (found[0] if found else ()) if p != CANONICAL))


def lowered_files(export_dir: Path) -> list[str]:
    """The profiles whose lowered file the export directory holds, sorted."""
    return [profile for profile, path in model_files(export_dir).lowered.items() if path.is_file()]


def served_profile(provider: str) -> str | None:
    """What qbert-serve and qbert-triton-repo ship on `provider` by default (None: no lowering for it)."""
    try:
        from qbert_deploy.runtimes.lowering import LoweringError, default_profile
    except ImportError:
        return None
    try:
        return default_profile(provider)
    except LoweringError:
        return None


def _meant_for(profile: str, provider: str) -> bool:
    """A lowered file of a known profile runs on the providers it was made for; other names on any."""
    try:
        from qbert_deploy.runtimes.lowering import PROFILES, profile_info
    except ImportError:
        return True
    return profile not in PROFILES or provider in profile_info(profile).providers


def default_profiles(export_dir: Path, providers: Sequence[str]) -> dict[str, list[str]]:
    """Per provider, what is validated unless --profile says otherwise: the canonical model, every lowered file the
    export holds that is meant for the provider, and the profile served there by default (lowered now if absent)."""
    present = lowered_files(export_dir)
    out = {}
    for provider in providers:
        chosen = [CANONICAL, *(p for p in present if _meant_for(p, provider))]
        served = served_profile(provider)
        if served is not None and served not in chosen:
            chosen.append(served)
        out[provider] = chosen
    return out


def profile_model(export_dir: Path, profile: str, workdir: Path) -> Path:
    """The model file for `profile`: model.onnx, a lowered model already in the export, or one lowered now."""
    files = model_files(export_dir)
    if profile == CANONICAL:
        return files.canonical
    existing = files.lowered.get(profile, export_dir / f"model.{profile}.onnx")
    if existing.is_file():
        return existing
    found = _lowering()
    if found is None:
        raise ProfileError(f"profile {profile!r} needs {existing.name} in the export directory or "
                           f"qbert_deploy.runtimes.lowering, and neither is here (available: {CANONICAL})")
    profiles, lower = found
    if profile not in profiles:
        raise ProfileError(f"unknown profile {profile!r}; choose from {', '.join(known_profiles())}")
    workdir.mkdir(parents=True, exist_ok=True)
    result = lower(files.canonical, profile, workdir / f"model.{profile}.onnx")  # type: ignore[operator]
    return Path(result)
