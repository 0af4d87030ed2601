"""What dense 3-bit packing costs and buys in the cpu-w8a8 file: size, session start, peak memory.

`python -m benchmarks.bitpack EXPORT_MODEL_ONNX FP32_ONNX [--out DIR]` lowers the export for cpu-w8a8 with and
without `pack_3bit_weights`, then prints each file's size and its ratio to the fp32 ONNX, the session-start time
(median of 3, interleaved, 2 threads), and in a fresh process per file the peak RSS of opening it and running batch
1, the RSS left afterwards and the RSS after glibc's malloc_trim (all over the imports' baseline).
The two files' logits on one batch must be identical.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qbert_deploy.runtimes.lowering import lower
from qbert_deploy.runtimes.session import open_session

ROUNDS = 3


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _memory_child(path: str) -> None:
    """In a fresh process: peak RSS of opening PATH + batch 1, the RSS left, and the RSS after malloc_trim."""
    import onnxruntime  # noqa: F401  (counted in the baseline)

    baseline = _status_mib("VmRSS")
    session = open_session(path, threads=2)
    session.run(["logits"], _feed())
    left = _status_mib("VmRSS")
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # glibc keeps freed heap pages until asked
    print(json.dumps({"peak": _status_mib("VmHWM") - baseline, "left": left - baseline,
                      "trimmed": _status_mib("VmRSS") - baseline}))


def _memory(path: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "benchmarks.bitpack", "--memory-child", str(path)],
                          capture_output=True, text=True, check=True)
    mib = json.loads(done.stdout.strip().splitlines()[-1])
    return (f"peak RSS {mib['peak']:.0f} MiB, {mib['left']:.0f} MiB left after opening + batch 1, "
            f"{mib['trimmed']:.0f} MiB after malloc_trim")


def _feed() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(1000, 20000, (1, 128)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-child"]:
        _memory_child(argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bitpack", description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="a canonical model.onnx")
    parser.add_argument("fp32", type=Path, help="the fp32 ONNX of the same model")
    parser.add_argument("--out", type=Path, help="where to write the two lowered files (default: a temporary dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = {"int4 containers": lower(args.export, "cpu-w8a8", out / "model.cpu-w8a8.unpacked.onnx",
                                           pack_3bit=False),
                 "3-bit packed": lower(args.export, "cpu-w8a8", out / "model.cpu-w8a8.onnx", pack_3bit=True)}
        feed = _feed()
        starts: dict[str, list[float]] = {label: [] for label in files}
        logits = {}
        for _ in range(ROUNDS):
            for label, path in files.items():
                begin = time.perf_counter()
                session = open_session(path, threads=2)
                starts[label].append(time.perf_counter() - begin)
                logits[label] = session.run(["logits"], feed)[0]
                del session
        fp32 = args.fp32.stat().st_size
        for label, path in files.items():
            size = path.stat().st_size
            print(f"{label}: {size} bytes ({size / 1e6:.2f} MB) = 1/{fp32 / size:.2f} of the fp32 ONNX "
                  f"({fp32} bytes); session start median {statistics.median(starts[label]):.3f} s "
                  f"({', '.join(f'{s:.3f}' for s in starts[label])}); {_memory(path)}")
        same = bool(np.array_equal(*logits.values()))
        print(f"logits identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
