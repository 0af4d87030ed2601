"""Peak resident memory of each stage of `qbert-demo`: the demo runs in this process while a thread samples RSS.

`python -m benchmarks.demo_memory --out DIR [demo flags]` prints, for every log line of the run, the peak RSS
(sampled every 0.1 s from /proc/self/statm) until the next one, then the process's VmHWM. tracemalloc would not
see torch's allocations; RSS does.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


def _hwm_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Marks(logging.Handler):
    """Remembers when each log line was written: the stage boundaries."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[float, str]] = [(time.monotonic(), "start (imports)")]

    def emit(self, record: logging.LogRecord) -> None:
        self.marks.append((time.monotonic(), record.getMessage()[:110]))


def main(argv: Sequence[str] | None = None) -> int:
    from qbert_deploy import demo

    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), _rss_mib()))
            done.wait(0.1)

    marks = _Marks()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # as the demo
    logging.getLogger().addHandler(marks)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        code = demo.main(argv)
    finally:
        done.set()
        thread.join()
    times = [t for t, _ in marks.marks] + [float("inf")]
    print("\npeak RSS MiB until the next log line, per log line:")
    for (start, message), end in zip(marks.marks, times[1:], strict=True):
        inside = [rss for t, rss in samples if start <= t < end]
        if inside:
            print(f"{max(inside):8.0f}  {message}")
    print(f"process peak (VmHWM) {_hwm_mib():.0f} MiB")
    return code


if __name__ == "__main__":
    sys.exit(main())
