"""Which ONNX file a runtime profile runs: the canonical export, or its lowering for a profile.

The lowering contract (qbert_deploy.runtimes.lowering): `PROFILES` names the profiles and
`lower(src, profile, dst) -> Path` writes the lowered model. An export directory may already hold
`model.<profile>.onnx`, which is then used as is.
"""

from __future__ import annotations

from pathlib import Path

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


def profile_model(export_dir: Path, profile: str, workdir: Path) -> Path:
    """The model file for `profile`: model.onnx, a lowered model already in the export, or one lowered now."""
    if profile == CANONICAL:
        return export_dir / "model.onnx"
    existing = export_dir / f"model.{profile}.onnx"
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
    result = lower(export_dir / "model.onnx", profile, workdir / f"model.{profile}.onnx")  # type: ignore[operator]
    return Path(result)
