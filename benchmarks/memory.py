"""Peak resident memory of one configuration, in a process of its own (peak RSS is per process and only grows).

Run by benchmarks.run as `python -m benchmarks.memory ort PATH` or `... torch MODEL_NAME`; prints JSON:
the peak RSS after the imports (baseline) and after loading and running batch 1 then batch 8, in MiB.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable

import numpy as np

SEQUENCE = 128


def _peak_mib() -> float:
    """This process's peak RSS: VmHWM, since ru_maxrss on Linux keeps the parent's peak across fork+exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _feed(batch: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(1000, 30000, size=(batch, SEQUENCE)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def _ort_runner(path: str, threads: int) -> Callable[[dict[str, np.ndarray]], object]:
    from qbert_deploy.runtimes.session import open_session

    session = open_session(path, threads=threads)
    outputs = [o.name for o in session.get_outputs()]
    output = "logits" if "logits" in outputs else outputs[-1]  # an embedding export: sentence_embedding
    return lambda feed: session.run([output], feed)


def _torch_runner(name: str, threads: int) -> Callable[[dict[str, np.ndarray]], object]:
    import torch

    from benchmarks.models import _float_model

    torch.set_num_threads(threads)
    model = _float_model(name)

    def run(feed: dict[str, np.ndarray]) -> object:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits

    return run


def main(argv: list[str]) -> int:
    kind, target = argv[0], argv[1]
    threads = int(argv[2]) if len(argv) > 2 else 2
    if kind == "ort":
        import onnxruntime  # noqa: F401  (counted in the baseline)
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    baseline = _peak_mib()
    run = _ort_runner(target, threads) if kind == "ort" else _torch_runner(target, threads)
    peaks = {}
    for batch in (1, 8):
        run(_feed(batch))
        peaks[str(batch)] = _peak_mib()
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peaks}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
