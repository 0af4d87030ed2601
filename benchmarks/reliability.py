"""Measure the reliability table of docs/RESULTS.md (issue 7): bad inputs, property tests, fuzzing, determinism,
interrupted exports. Every figure comes from a run of this script; `--write` puts the table into docs/RESULTS.md.

    PYTHONPATH=. python -m benchmarks.reliability --write

With `--serving` (issue 19) it measures qbert-serve instead, on the tiny export (or `--export DIR`): RSS and time
of maximum-size text requests, RSS over a soak of ordinary requests, stalled connections against the deadlines,
and SIGTERM under load; `--write` puts that table into docs/results/reliability.md. All traffic is on 127.0.0.1,
every loop bounded in count and time.

    nice -n 10 env PYTHONPATH=. OMP_NUM_THREADS=1 python -m benchmarks.reliability --serving --write
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from benchmarks.serve_load import HEADER_STALLS, STALLS, open_stalled, rss_mb, running_server, wait_closed
from qbert_deploy.atomic import clean_stale, write_text_atomic
from qbert_deploy.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from qbert_deploy.exporters.check import check_export
from qbert_deploy.exporters.onnx_export import export_checkpoint
from qbert_deploy.recipe import Recipe, WeightQuant
from qbert_deploy.safetensors_format import save_safetensors_checkpoint
from tests.harness import CliOutcome, kill_export, mutate, run_cli, snapshot
from tests.tiny import tiny_checkpoint

BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
Q0 = "bert.encoder.layer.0.attention.self.query"


class _WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _payload_file(path: Path, ckpt: Checkpoint, **changes: Any) -> None:
    with open(path, "wb") as handle:
        torch.save(ckpt.to_payload() | changes, handle)


def _state(ckpt: Checkpoint, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in ckpt.state_dict.items()} | {name: value}


def _bad_inputs(work: Path, ckpt: Checkpoint, model_pt: Path, export_dir: Path) -> list[dict[str, Any]]:
    """Each case: (category, what, setup returning the CLI args). The marker file proves no code ran."""
    marker = work / "marker"
    cfg = ckpt.config

    def pt(name: str, writer: Callable[[Path], object]) -> Callable[[], list[str]]:
        def setup() -> list[str]:
            path = work / name
            writer(path)
            return [str(path), "-o", str(work / "out"), "--no-parity"]
        return setup

    def st(mutator: Callable[[Path], object]) -> Callable[[], list[str]]:
        def setup() -> list[str]:
            folder = work / "st"
            shutil.rmtree(folder, ignore_errors=True)
            save_safetensors_checkpoint(ckpt, folder)
            mutator(folder)
            return [str(folder), "-o", str(work / "out"), "--no-parity"]
        return setup

    def huge_header(folder: Path) -> None:
        header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)

    def not_export_dir() -> list[str]:
        folder = work / "precious"
        folder.mkdir(exist_ok=True)
        (folder / "notes.txt").write_text("keep me")
        return [str(model_pt), "-o", str(folder), "--no-parity"]

    def damaged_export() -> list[str]:
        folder = work / "damaged"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(export_dir, folder)
        data = bytearray((folder / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0x10  # inside the weights
        (folder / "model.onnx").write_bytes(bytes(data))
        return ["--check", str(folder)]

    cases: list[tuple[str, str, Callable[[], list[str]]]] = [
        ("file", "model.pt does not exist", lambda: [str(work / "missing.pt"), "-o", str(work / "out")]),
        ("file", "empty model.pt", pt("empty.pt", lambda p: p.write_bytes(b""))),
        ("file", "model.pt truncated to half", pt("half.pt", lambda p: p.write_bytes(model_pt.read_bytes()[
            :model_pt.stat().st_size // 2]))),
        ("file", "random bytes", pt("noise.pt", lambda p: p.write_bytes(random.Random(0).randbytes(4096)))),
        ("file", "a torch file that is not a checkpoint", pt("other.pt", lambda p: torch.save({"a": 1}, p))),
        ("code", "torch zip whose pickle runs code", pt("evil_zip.pt", lambda p: torch.save(
            ckpt.to_payload() | {"metrics": {"x": _WritesMarker(marker)}}, p))),
        ("code", "raw pickle (protocol 2) that runs code", pt("evil_raw.pt", lambda p: p.write_bytes(
            pickle.dumps({"x": _WritesMarker(marker)}, protocol=2)))),
        ("recipe", "7 groups on 64-row layers", pt("groups.pt", lambda p: _payload_file(
            p, ckpt, recipe=Recipe(overrides={Q0: WeightQuant(bits=4, groups=7)}).to_json()))),
        ("recipe", "unknown module name", pt("unknown.pt", lambda p: _payload_file(
            p, ckpt, recipe=Recipe(overrides={"encoder.layer.0.attention.self.query": WeightQuant()}).to_json()))),
        ("recipe", "9-bit weights", pt("bits.pt", lambda p: _payload_file(
            p, ckpt, recipe={"default": {"bits": 9}}))),
        ("config", "hidden_size 10^7", pt("hidden.pt", lambda p: _payload_file(
            p, ckpt, config=cfg | {"hidden_size": 10**7}))),
        ("config", "4.1 billion parameters declared", pt("bomb.pt", lambda p: _payload_file(
            p, ckpt, config=cfg | {"vocab_size": 4_000_000, "hidden_size": 1024, "num_attention_heads": 16}))),
        ("weights", "shape differs from config", pt("shape.pt", lambda p: _payload_file(
            p, ckpt, state_dict=_state(ckpt, f"{Q0}.weight", torch.zeros(64, 63))))),
        ("weights", "NaN in a weight", pt("nan.pt", lambda p: _payload_file(
            p, ckpt, state_dict=_state(ckpt, f"{Q0}.weight", torch.full((64, 64), float("nan")))))),
        ("weights", "magnitude 3e38", pt("huge.pt", lambda p: _payload_file(
            p, ckpt, state_dict=_state(ckpt, f"{Q0}.weight", torch.full((64, 64), 3e38))))),
        ("tokenizer", "file name ../evil.txt", pt("tok.pt", lambda p: _payload_file(
            p, ckpt, tokenizer_files={"../evil.txt": "x"}))),
        ("safetensors", "corrupt model.safetensors", st(lambda f: (f / "model.safetensors").write_bytes(b"junk"))),
        ("safetensors", "header declares a 4 TiB tensor", st(huge_header)),
        ("safetensors", "qbert_checkpoint.json not JSON", st(lambda f: (f / "qbert_checkpoint.json").write_text("{"))),
        ("output", "-o names a non-empty non-export folder", not_export_dir),
        ("export dir", "--check on a model.onnx with a flipped weight bit", damaged_export),
    ]
    rows = []
    for category, what, setup in cases:
        shutil.rmtree(work / "out", ignore_errors=True)
        args = setup()
        before = snapshot(work / "precious")
        outcome = run_cli(args)
        written = (work / "out").exists() or (before and snapshot(work / "precious") != before)
        rows.append({"category": category, "input": what, "exit": outcome.code, "clean_error": outcome.clean_error,
                     "message": outcome.stderr.strip().splitlines()[-1] if outcome.stderr.strip() else "",
                     "written": bool(written), "code_ran": marker.exists(),
                     "command": "qbert-export " + " ".join(Path(a).name if "/" in a else a for a in args)})
        print(f"  bad input [{category}] {what}: exit {outcome.code}, clean={outcome.clean_error}", flush=True)
    return rows


def _property_counts() -> dict[str, int]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
               "tests/test_quant_properties.py"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=RESULTS.parents[1])
    counts: dict[str, int] = {}
    for test, passing in re.findall(r"::(test_\w+):\s*\n\s*\n\s*- during generate phase[^\n]*\n[^\n]*\n\s*- (\d+) "
                                    r"passing", done.stdout):
        counts[test] = int(passing)
    counts["_pytest_exit"] = done.returncode
    return counts


def _fuzz(work: Path, small_pt: Path, export_dir: Path, n_load: int, n_check: int, n_cli: int) -> dict[str, Any]:
    rng = random.Random(7)
    data = small_pt.read_bytes()
    load = {"iterations": n_load, "loaded": 0, "refused": 0, "crashed": 0, "slowest_s": 0.0}
    for _ in range(n_load):
        path = work / "fuzz.pt"
        path.write_bytes(mutate(data, rng)[1])
        start = time.monotonic()
        try:
            load_checkpoint(path)
            load["loaded"] += 1
        except CheckpointError:
            load["refused"] += 1
        except Exception:  # a crash is what this counts
            load["crashed"] += 1
        load["slowest_s"] = max(load["slowest_s"], round(time.monotonic() - start, 3))
    folder = work / "fuzz-export"
    shutil.copytree(export_dir, folder)
    onnx_bytes = (export_dir / "model.onnx").read_bytes()
    check = {"iterations": n_check, "passed": 0, "failed_check": 0, "crashed": 0, "slowest_s": 0.0}
    for _ in range(n_check):
        (folder / "model.onnx").write_bytes(mutate(onnx_bytes, rng)[1])
        start = time.monotonic()
        try:
            results = check_export(folder)
            check["passed" if all(r.ok for r in results) else "failed_check"] += 1
        except Exception:
            check["crashed"] += 1
        check["slowest_s"] = max(check["slowest_s"], round(time.monotonic() - start, 3))
    cli = {"iterations": 2 * n_cli, "ok": 0, "clean_error": 0, "traceback_or_hang": 0}
    for i in range(2 * n_cli):
        if i % 2 == 0:
            (work / "cli.pt").write_bytes(mutate(data, rng, head=4096)[1])
            outcome: CliOutcome = run_cli([str(work / "cli.pt"), "-o", str(work / "cli-out"), "--no-parity"], 300)
            shutil.rmtree(work / "cli-out", ignore_errors=True)
        else:
            (folder / "model.onnx").write_bytes(mutate(onnx_bytes, rng)[1])
            outcome = run_cli(["--check", str(folder)], 300)
        key = "ok" if outcome.code == 0 else "clean_error" if outcome.clean_error else "traceback_or_hang"
        cli[key] += 1
    return {"load_checkpoint": load, "check_export": check, "cli": cli}


def _determinism(work: Path, ckpt: Checkpoint, model_pt: Path) -> dict[str, Any]:
    st = work / "det-st"
    save_safetensors_checkpoint(ckpt, st)
    digests: dict[str, str] = {}
    for label, source in (("model.pt run 1", model_pt), ("model.pt run 2", model_pt), ("safetensors", st)):
        out = work / f"det-{len(digests)}"
        outcome = run_cli([str(source), "-o", str(out), "--no-parity"], 600)
        digests[label] = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest() if outcome.code == 0 \
            else f"exit {outcome.code}"
    return {"digests": digests, "identical": len(set(digests.values())) == 1}


def _interrupted(work: Path, model_pt: Path, export_dir: Path) -> list[dict[str, Any]]:
    plan = [("start", 1.0, False), ("tmpdir", 0.0, False), ("model", 0.0, False), ("model", 0.3, False),
            ("tmpdir", 0.0, True), ("model", 0.2, True)]
    rows = []
    for when, delay, existing in plan:
        out = work / "killed" / "export"
        shutil.rmtree(out.parent, ignore_errors=True)
        out.parent.mkdir()
        if existing:  # a previous export that differs from what this run writes, so a mix of both would show
            shutil.copytree(export_dir, out)
            (out / "size_report.md").write_text("previous export\n")
        before = snapshot(out)
        outcome = kill_export(model_pt, out, when, delay)
        # the previous export untouched, or no output, or the new export complete (passes every check)
        after = snapshot(out)
        new_whole = out.exists() and all(r.ok for r in check_export(out)) and after.get("size_report.md") != \
            b"previous export\n"
        intact = (before and after == before) or (not before and not out.exists()) or new_whole
        clean_stale(out)
        rows.append({"when": when, "delay_s": delay, "existing": existing, "killed": outcome.killed,
                     "result": "previous kept" if before and after == before else "new, complete" if new_whole
                     else "none" if not out.exists() else "BROKEN",
                     "leftovers": len(outcome.leftovers), "output_whole_or_absent": intact,
                     "left_after_clean": len(list(out.parent.glob(".export.*")))})
        print(f"  kill after {when}+{delay}s existing={existing}: {rows[-1]}", flush=True)
    return rows


def measure(quick: bool, partial: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """All stages; with `resume`, the stages already in `partial` are kept and not run again."""
    results: dict[str, Any] = {}
    if resume and partial is not None and partial.exists():
        results = json.loads(partial.read_text(encoding="utf-8"))

    def keep(key: str, value: Any) -> Any:  # a long run that fails late still leaves what it measured
        results[key] = value
        if partial is not None:
            write_text_atomic(partial, json.dumps(results, indent=2) + "\n")
        return value

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = tiny_checkpoint()
        model_pt = work / "model.pt"
        save_checkpoint(ckpt, model_pt)
        export_dir = work / "export"
        export_checkpoint(ckpt, export_dir)
        small_pt = work / "small.pt"
        save_checkpoint(tiny_checkpoint(hidden=16, layers=1, heads=2, intermediate=32), small_pt)
        import onnxruntime

        stages: list[tuple[str, Callable[[], Any]]] = [
            ("versions", lambda: {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}),
            ("bad_inputs", lambda: _bad_inputs(work, ckpt, model_pt, export_dir)),
            ("properties", _property_counts),
            ("fuzz", lambda: _fuzz(work, small_pt, export_dir, 100 if quick else 500, 20 if quick else 100,
                                   2 if quick else 12)),
            ("determinism", lambda: _determinism(work, ckpt, model_pt)),
            ("interrupted", lambda: _interrupted(work, model_pt, export_dir)),
        ]
        for name, stage in stages:
            if name not in results:
                print(name, flush=True)
                keep(name, stage())
    return results


def markdown(r: dict[str, Any]) -> str:
    cmd = "`PYTHONPATH=. python -m benchmarks.reliability --write`"
    lines = [BEGIN, "", f"Measured by {cmd} (torch {r['versions']['torch']}, onnxruntime "
             f"{r['versions']['onnxruntime']}; tiny random BERT, hidden 64). Each CLI run is a separate process.", "",
             "**Bad inputs** (outcome: exit code; one-line `error:` message and no traceback; nothing written; "
             "code in the file never ran):", "",
             "| category | bad input | command | exit | clean one-line error | output written | message |",
             "|---|---|---|---:|---|---|---|"]
    for b in r["bad_inputs"]:
        message = re.sub(r"/tmp/tmp\w+/", "", b["message"]).replace("|", "\\|")
        if len(message) > 140:
            message = message[:137] + "..."
        ran = " (CODE RAN)" if b["code_ran"] else ""
        lines.append(f"| {b['category']} | {b['input']}{ran} | `{b['command']}` | {b['exit']} | "
                     f"{'yes' if b['clean_error'] else 'NO'} | {'YES' if b['written'] else 'no'} | {message} |")
    props = {k: v for k, v in r["properties"].items() if not k.startswith("_")}
    lines += ["", "**Property tests** (hypothesis, derandomized; `pytest --hypothesis-show-statistics "
              "tests/test_quant_properties.py`, exit " f"{r['properties']['_pytest_exit']}):", "",
              "| property | passing examples |", "|---|---:|"]
    lines += [f"| {name} | {count} |" for name, count in props.items()]
    f = r["fuzz"]
    lines += ["", "**Fuzzing** (random truncation, bit flips, overwritten/inserted/deleted/zeroed spans):", "",
              "| target | iterations | outcomes | crashes (traceback) or hangs | slowest |", "|---|---:|---|---:|---:|",
              f"| `load_checkpoint(mutated model.pt)` in-process | {f['load_checkpoint']['iterations']} | "
              f"{f['load_checkpoint']['refused']} refused with CheckpointError, {f['load_checkpoint']['loaded']} "
              f"still valid | {f['load_checkpoint']['crashed']} | {f['load_checkpoint']['slowest_s']} s |",
              f"| `check_export(dir with mutated model.onnx)` in-process | {f['check_export']['iterations']} | "
              f"{f['check_export']['failed_check']} failed a check, {f['check_export']['passed']} passed | "
              f"{f['check_export']['crashed']} | {f['check_export']['slowest_s']} s |",
              f"| `qbert-export mutated.pt -o out` / `qbert-export --check dir` subprocesses | "
              f"{f['cli']['iterations']} | {f['cli']['clean_error']} clean one-line errors, {f['cli']['ok']} ok | "
              f"{f['cli']['traceback_or_hang']} | (limit 300 s each) |"]
    d = r["determinism"]
    lines += ["", "**Determinism** (`qbert-export model.pt -o A --no-parity` twice, and from the safetensors "
              f"folder): byte-identical model.onnx: **{'yes' if d['identical'] else 'NO'}**", "",
              "| source | sha256 of model.onnx |", "|---|---|"]
    lines += [f"| {k} | `{v[:16]}` |" for k, v in d["digests"].items()]
    lines += ["", "**Interrupted exports** (SIGKILL to `qbert-export model.pt -o export --no-parity` after an event "
              "plus a delay; `tests/harness.py:kill_export`):", "",
              "| killed after | delay | previous export present | killed before exiting | temp leftovers | "
              "output afterwards | whole or absent | leftovers after `clean_stale` (the next run's first step) |",
              "|---|---:|---|---|---:|---|---|---:|"]
    for k in r["interrupted"]:
        lines.append(f"| {k['when']} | {k['delay_s']} s | {'yes' if k['existing'] else 'no'} | "
                     f"{'yes' if k['killed'] else 'no (finished)'} | {k['leftovers']} | {k.get('result', '')} | "
                     f"{'yes' if k['output_whole_or_absent'] else 'NO'} | {k['left_after_clean']} |")
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Results\n"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        updated = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        updated = current.rstrip("\n") + "\n\n## Reliability (issue 7)\n\n" + text
    write_text_atomic(RESULTS, updated)


# ---- qbert-serve under hostile and unlucky clients (issue 19): docs/results/reliability.md ----

SERVING_RESULTS = RESULTS.parent / "results" / "reliability.md"
READING = "## Reading"
SERVING_COMMAND = "nice -n 10 env PYTHONPATH=. OMP_NUM_THREADS=1 python -m benchmarks.reliability --serving --write"
ORDINARY = ["a gorgeous, moving film", "dull and lifeless", "not bad at all", "the plot is a mess",
            "one of the best performances of the year", "i wanted my two hours back", "charming", "tedious"]


def _load_average() -> float:
    return round(os.getloadavg()[0], 2)


class _PeakRss:
    """Samples a process's RSS every 10 ms in a thread; `peak` is the highest seen since `reset`."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, rss_mb(self.pid))

    def reset(self) -> None:
        self.peak = rss_mb(self.pid)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _maximum_size(export: Path, work: Path, rounds: int) -> dict[str, Any]:
    """RSS and time of maximum-size text requests, `rounds` of each kind, on one server with the defaults."""
    limit = 8 << 20
    one = json.dumps({"text": "good film " * 838_000}).encode()  # one text, just under the 8 MiB body limit
    many = json.dumps({"text": ["!" * 262_000] * 32}).encode()  # 32 texts (the most), each 8192 tokens when cut
    assert len(one) <= limit and len(many) <= limit
    rows = []
    with running_server(export, work) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        for text in ORDINARY * 3:  # warm-up
            client.post("/v2/models/qbert/classify", json={"text": text})
        time.sleep(2)
        idle = rss_mb(server.process.pid)
        sampler = _PeakRss(server.process.pid)
        try:
            for what, body in (("one text of 8.4 MB ('good film ' x 838,000)", one),
                               ("32 texts of 262,000 '!' (8.4 MB)", many)):
                sampler.reset()
                times, statuses = [], []
                for _ in range(rounds):
                    started = time.perf_counter()
                    response = client.post("/v2/models/qbert/classify", content=body)
                    times.append(time.perf_counter() - started)
                    statuses.append(response.status_code)
                time.sleep(2)  # memory is handed back after each answer
                rows.append({"request": what, "body_bytes": len(body), "requests": rounds,
                             "statuses": sorted(set(statuses)), "idle_mb": round(idle, 1),
                             "peak_mb": round(sampler.peak, 1), "after_mb": round(rss_mb(server.process.pid), 1),
                             "retained_mb": round(rss_mb(server.process.pid) - idle, 1),
                             "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
                             "load": _load_average()})
                print(f"  maximum size: {rows[-1]}", flush=True)
        finally:
            sampler.close()
    return {"rows": rows}


def _soak(export: Path, work: Path, total: int, every: int = 250) -> dict[str, Any]:
    """RSS every `every` requests over `total` ordinary text requests from 16 concurrent clients."""
    samples: list[tuple[int, float]] = []
    errors = 0

    async def run(url: str, pid: int) -> float:
        nonlocal errors
        done = 0
        counter = iter(range(total))
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            async def worker() -> None:
                nonlocal done, errors
                for number in counter:
                    response = await client.post("/v2/models/qbert/classify",
                                                 json={"text": ORDINARY[number % len(ORDINARY)] + f" {number}"})
                    errors += response.status_code != 200
                    done += 1
                    if done % every == 0:
                        samples.append((done, round(rss_mb(pid), 1)))

            started = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(16))), timeout=1800)
            return time.perf_counter() - started

    with running_server(export, work) as server:
        samples.append((0, round(rss_mb(server.process.pid), 1)))
        wall = asyncio.run(run(server.url, server.process.pid))
    half = next(rss for n, rss in samples if n >= total // 2)
    warm = next(rss for n, rss in samples if n >= min(500, total // 10))
    return {"requests": total, "errors": errors, "wall_s": round(wall, 1), "rps": round(total / wall, 1),
            "samples": samples, "after_warm_up_mb": warm, "half_mb": half, "end_mb": samples[-1][1],
            "growth_second_half_mb": round(samples[-1][1] - half, 1), "load": _load_average()}


def _stalled(export: Path, work: Path, header_stalls: int, body_stalls: int) -> dict[str, Any]:
    """Stalled connections against the default deadlines, while one client sends ordinary requests."""
    latencies: list[float] = []
    errors: list[str] = []
    stop = threading.Event()

    def ordinary(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            number = 0
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = client.post("/v2/models/qbert/classify", json={"text": ORDINARY[number % 8]})
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}")
                except httpx.HTTPError as err:
                    errors.append(type(err).__name__)
                latencies.append(time.perf_counter() - started)
                number += 1
                time.sleep(0.02)

    with running_server(export, work) as server:
        port = int(server.hostport.rsplit(":", 1)[1])
        thread = threading.Thread(target=ordinary, args=(server.url,))
        thread.start()
        time.sleep(3)
        before = list(latencies)
        opened = time.monotonic()
        kinds = [HEADER_STALLS[i % len(HEADER_STALLS)] for i in range(header_stalls)]
        body_kinds = [k for k in STALLS if k not in HEADER_STALLS]
        kinds += [body_kinds[i % len(body_kinds)] for i in range(body_stalls)]
        socks = [sock for kind in kinds for sock in open_stalled(port, kind)]
        closed = wait_closed(socks, 60, since=opened)
        during = latencies[len(before):]
        stop.set()
        thread.join()
    header = [c for k, c in zip(kinds, closed, strict=True) if k in HEADER_STALLS]
    body = [c for k, c in zip(kinds, closed, strict=True) if k not in HEADER_STALLS]

    def closed_at(group: list[Any]) -> dict[str, Any]:
        times = [c.after_s for c in group if c.after_s is not None]
        return {"count": len(group), "closed": len(times), "first_s": round(min(times), 2) if times else None,
                "last_s": round(max(times), 2) if times else None,
                "answers": sorted({c.answer.split(b"\r\n", 1)[0].decode(errors="replace") or "(none)" for c in group})}

    def lat(values: list[float]) -> dict[str, float]:
        ms = np.asarray(values) * 1000
        return {"requests": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "max_ms": round(float(ms.max()), 1)} if values else {"requests": 0}

    return {"header": closed_at(header), "body": closed_at(body), "header_timeout_s": 10, "body_timeout_s": 30,
            "before": lat(before), "during": lat(during), "errors": errors[:10], "error_count": len(errors),
            "load": _load_average()}


def _sigterm(export: Path, work: Path, clients: int, grace: int) -> dict[str, Any]:
    """SIGTERM while `clients` clients keep [32, 128] infer requests coming, with --graceful-timeout-s `grace`."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(32, 128))
    body = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [32, 128],
                                   "data": ids.reshape(-1).tolist()}]}).encode()
    outcomes: list[tuple[float, float, str]] = []  # (sent, answered, outcome), time.monotonic()
    signalled = threading.Event()

    def client(url: str) -> None:
        # a connection per request ("Connection: close"): a request sent on an idle keep-alive connection as the
        # server closes it would be lost unread, and could not be told from one the server dropped
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(100_000):
                sent = time.monotonic()
                try:
                    response = http.post("/v2/models/qbert/infer", content=body,
                                         headers={"content-type": "application/json", "connection": "close"})
                except httpx.ConnectError:  # the server no longer accepts: nothing was sent
                    return
                except httpx.HTTPError as err:
                    outcomes.append((sent, time.monotonic(), f"no answer ({type(err).__name__})"))
                    return
                json_error = response.headers.get("content-type") == "application/json" and \
                    "error" in response.text[:200]
                outcomes.append((sent, time.monotonic(),
                                 f"{response.status_code}{' JSON' if json_error else ''}"))
                if signalled.is_set() and response.status_code != 200:
                    return

    with running_server(export, work, "--graceful-timeout-s", str(grace)) as server:
        threads = [threading.Thread(target=client, args=(server.url,)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(4)
        at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        signalled.set()
        code = server.process.wait(timeout=120)
        exited = time.monotonic() - at
        for thread in threads:
            thread.join(timeout=120)
        log = server.log_text()

    def counted(selected: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in selected:
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    return {"clients": clients, "graceful_timeout_s": grace, "exit_code": code, "exit_s": round(exited, 2),
            "answered_before": sum(1 for sent, answered, _ in outcomes if answered < at),
            "in_flight": counted([o for sent, answered, o in outcomes if sent < at < answered]),
            "sent_after": counted([o for sent, _, o in outcomes if sent >= at]),
            "stopped_line": next((line for line in log.splitlines() if line.startswith("qbert-serve: stopped")),
                                 None),
            "traceback_in_log": "Traceback" in log, "load": _load_average()}


def measure_serving(export: Path | None, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if export is None:
            export = work / "export"
            export_checkpoint(tiny_checkpoint(), export, opset=21)
            model = "the tiny random BERT of tests/tiny.py (hidden 64, 2 layers, max length 128), exported"
        else:
            model = str(export)
        import onnxruntime

        results: dict[str, Any] = {"model": model, "onnxruntime": onnxruntime.__version__,
                                   "load_at_start": _load_average()}
        stages: list[tuple[str, Callable[[], Any]]] = [
            ("maximum_size", lambda: _maximum_size(export, work, 5 if quick else 20)),
            ("soak", lambda: _soak(export, work, 1000 if quick else 5000)),
            ("stalled", lambda: _stalled(export, work, 100, 20)),
            ("sigterm", lambda: _sigterm(export, work, 64, 1)),
        ]
        for name, stage in stages:
            print(name, flush=True)
            results[name] = stage()
    return results


def serving_markdown(r: dict[str, Any]) -> str:
    m, s, st, t = r["maximum_size"]["rows"], r["soak"], r["stalled"], r["sigterm"]
    lines = ["# qbert-serve under hostile and unlucky clients (issue 19)", "", "```bash", SERVING_COMMAND, "```", "",
             f"Model: {r['model']}; onnxruntime {r['onnxruntime']}; the server's defaults unless said. The machine: "
             "2 shared cores, other agents at work; the load generator runs on the same cores. `load` is the "
             "1-minute load average (`uptime`) after each stage.", "",
             "| what | measured | target | met | load |", "|---|---|---|---|---:|"]
    for row in m:
        lines.append(f"| {row['requests']} requests of {row['request']}: RSS idle / peak / after | "
                     f"{row['idle_mb']:.0f} / {row['peak_mb']:.0f} / {row['after_mb']:.0f} MB: retained "
                     f"**{row['retained_mb']:+.0f} MB**; HTTP {', '.join(map(str, row['statuses']))} | retained "
                     f"≤ 100 MB | {'yes' if row['retained_mb'] <= 100 else 'NO'} | {row['load']} |")
        lines.append(f"| the same, time per request | median **{row['median_s']:.2f} s**, max {row['max_s']:.2f} s | "
                     f"≤ 2 s | {'yes' if row['max_s'] <= 2 else 'NO'} | {row['load']} |")
    samples = ", ".join(f"{n}: {rss:.0f}" for n, rss in s["samples"][::4])
    lines.append(f"| RSS over {s['requests']} ordinary text requests (16 clients) | after warm-up "
                 f"{s['after_warm_up_mb']:.0f} MB, at {s['requests'] // 2}: {s['half_mb']:.0f} MB, at the end "
                 f"{s['end_mb']:.0f} MB: **{s['growth_second_half_mb']:+.1f} MB** over the second half; "
                 f"{s['errors']} errors, {s['rps']} req/s | flat after warm-up | "
                 f"{'yes' if abs(s['growth_second_half_mb']) <= 10 and not s['errors'] else 'NO'} | {s['load']} |")
    h, b = st["header"], st["body"]
    lines.append(f"| {h['count']} connections stalled before their headers end (idle, partial request line, no "
                 f"blank line) | {h['closed']} closed, at {h['first_s']}-{h['last_s']} s, no answer | all closed "
                 f"within the header deadline ({st['header_timeout_s']} s) | "
                 f"{'yes' if h['closed'] == h['count'] and (h['last_s'] or 99) <= st['header_timeout_s'] + 1 else 'NO'}"
                 f" | {st['load']} |")
    lines.append(f"| {b['count']} connections stalled in the body (10 of 100 bytes, chunked after a chunk, a 2^64-1 "
                 f"byte chunk) | {b['closed']} closed, at {b['first_s']}-{b['last_s']} s, answered "
                 f"{'; '.join(b['answers'])} | closed at the body deadline ({st['body_timeout_s']} s) | "
                 f"{'yes' if b['closed'] == b['count'] and (b['last_s'] or 99) <= st['body_timeout_s'] + 1 else 'NO'}"
                 f" | {st['load']} |")
    lines.append(f"| ordinary requests meanwhile (one client) | before: p50 {st['before'].get('p50_ms')} ms, max "
                 f"{st['before'].get('max_ms')} ms ({st['before']['requests']}); during: p50 "
                 f"{st['during'].get('p50_ms')} ms, max {st['during'].get('max_ms')} ms ({st['during']['requests']}); "
                 f"{st['error_count']} errors | unaffected | {'yes' if not st['error_count'] else 'NO'} | "
                 f"{st['load']} |")
    flight = ", ".join(f"{v} x {k}" for k, v in sorted(t["in_flight"].items()))
    after = ", ".join(f"{v} x {k}" for k, v in sorted(t["sent_after"].items())) or "none"
    ok = all(k in ("200", "503 JSON") for k in [*t["in_flight"], *t["sent_after"]]) and t["exit_code"] == 0 and \
        t["exit_s"] <= t["graceful_timeout_s"] + 1
    lines.append(f"| SIGTERM under load ({t['clients']} clients of [32, 128] infer requests, "
                 f"`--graceful-timeout-s {t['graceful_timeout_s']}`) | in flight at the signal: {flight}; sent "
                 f"after it (on connections accepted before the listener closed): {after}; exit "
                 f"**{t['exit_code']}** after **{t['exit_s']} s**; `{t['stopped_line']}`; traceback in the log: "
                 f"{'YES' if t['traceback_in_log'] else 'no'} | each 200 or a JSON 503; exit 0 within "
                 f"{t['graceful_timeout_s'] + 1} s | {'yes' if ok else 'NO'} | {t['load']} |")
    lines += ["", f"RSS (MB) every 1,000 requests of the soak: {samples}.", ""]
    return "\n".join(lines) + "\n"


def write_serving(text: str) -> None:
    """The table into docs/results/reliability.md, keeping its hand-written reading; a link from RESULTS.md."""
    current = SERVING_RESULTS.read_text(encoding="utf-8") if SERVING_RESULTS.exists() else ""
    reading = current[current.index(READING):] if READING in current else f"{READING}\n\n(to be written)\n"
    write_text_atomic(SERVING_RESULTS, text + "\n" + reading)
    results = RESULTS.read_text(encoding="utf-8")
    link = "results/reliability.md"
    if link not in results:
        write_text_atomic(RESULTS, results.rstrip("\n") + "\n\nIssue 19 (qbert-serve under hostile and unlucky "
                          f"clients: long texts, stalled connections, shutdown under load): [{link}]({link}).\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer fuzz iterations")
    parser.add_argument("--write", action="store_true", help="update the table in docs/RESULTS.md")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument("--resume", action="store_true", help="with --json: run only the stages it lacks")
    parser.add_argument("--from-json", help="render a table from measurements saved with --json (no new runs)")
    parser.add_argument("--serving", action="store_true", help="measure qbert-serve (docs/results/reliability.md)")
    parser.add_argument("--export", type=Path, default=None, help="with --serving: this export (default: tiny)")
    args = parser.parse_args()
    if args.serving:
        served = json.loads(Path(args.from_json).read_text(encoding="utf-8")) if args.from_json else \
            measure_serving(args.export, args.quick)
        if args.json and not args.from_json:
            write_text_atomic(Path(args.json), json.dumps(served, indent=2) + "\n")
        table = serving_markdown(served)
        print(table)
        if args.write:
            write_serving(table)
        return 0
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
    else:
        results = measure(args.quick, Path(args.json) if args.json else None, args.resume)
    text = markdown(results)
    print(text)
    if args.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
