"""Measure the reliability table of docs/RESULTS.md (issue 7): bad inputs, property tests, fuzzing, determinism,
interrupted exports. Every figure comes from a run of this script; `--write` puts the table into docs/RESULTS.md.

    PYTHONPATH=. python -m benchmarks.reliability --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer fuzz iterations")
    parser.add_argument("--write", action="store_true", help="update the table in docs/RESULTS.md")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument("--resume", action="store_true", help="with --json: run only the stages it lacks")
    parser.add_argument("--from-json", help="render a table from measurements saved with --json (no new runs)")
    args = parser.parse_args()
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
