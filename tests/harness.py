"""Shared by the reliability tests and benchmarks/reliability.py: CLI runs, interrupted exports, file mutations."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

EXPORT = [sys.executable, "-m", "qbert_deploy.cli.export"]


@dataclass(frozen=True)
class CliOutcome:
    code: int | None  # None: it hung and was killed at the timeout
    stderr: str
    stdout: str

    @property
    def clean_error(self) -> bool:
        """Exit 1 or 2 with a one-line `error:` message and no traceback."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return self.code in (1, 2) and len(lines) == 1 and "error:" in lines[0] and "Traceback" not in self.stderr


def run_cli(args: list[str], timeout: float = 120.0) -> CliOutcome:
    try:
        done = subprocess.run([*EXPORT, *args], capture_output=True, text=True, timeout=timeout, env=os.environ)
    except subprocess.TimeoutExpired as err:
        return CliOutcome(None, str(err.stderr or ""), str(err.stdout or ""))
    return CliOutcome(done.returncode, done.stderr, done.stdout)


@dataclass(frozen=True)
class KillOutcome:
    event: str  # what was seen before the kill
    killed: bool  # False: the export finished first
    leftovers: list[str]  # temporary siblings the killed run left behind


def _temp_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def kill_export(model_pt: Path, out: Path, when: str, delay: float, timeout: float = 300.0) -> KillOutcome:
    """Start `qbert-export model.pt -o out`, SIGKILL it `delay` s after `when` happens:
    'start' (the process started), 'tmpdir' (its temporary export dir appeared) or 'model' (model.onnx began
    to be written inside it)."""
    proc = subprocess.Popen([*EXPORT, str(model_pt), "-o", str(out), "--no-parity"], env=os.environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    seen = when == "start"
    while not seen and proc.poll() is None and time.monotonic() < deadline:
        tmps = [t for t in _temp_dirs(out) if f".{proc.pid}." in t.name]
        seen = bool(tmps) and (when == "tmpdir" or any((t / "model.onnx").exists() for t in tmps))
        if not seen:
            time.sleep(0.005)
    if delay:
        time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return KillOutcome(when, killed, [t.name for t in _temp_dirs(out)])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


MUTATIONS = ("truncate", "flip", "overwrite", "insert", "delete", "zero_span")


def mutate(data: bytes, rng: random.Random, kinds: tuple[str, ...] = MUTATIONS,
           head: int | None = None) -> tuple[str, bytes]:
    """One random corruption of a file's bytes: truncation, flipped bits, overwritten or inserted/removed spans.

    `head` limits where the corruption lands to the first `head` bytes (e.g. model.pt's pickle, not its tensor data).
    """
    kind = rng.choice(kinds)
    n = len(data) if head is None else min(head, len(data))
    if kind == "truncate":
        return kind, data[:rng.randrange(0, len(data))]
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        i = rng.randrange(n)
        buf[i:i + 8] = rng.randbytes(8)
    elif kind == "insert":
        i = rng.randrange(n)
        buf[i:i] = rng.randbytes(rng.randint(1, 64))
    elif kind == "delete":
        i = rng.randrange(n)
        del buf[i:i + rng.randint(1, 64)]
    else:
        i = rng.randrange(n)
        j = min(n, i + rng.randint(1, 4096))
        buf[i:j] = bytes(j - i)
    return kind, bytes(buf)
