"""Timing helpers shared by the benchmarks.

XLA:CPU timings vary between processes (about 1 process in 5 runs 1.7-4x slower for
its whole life), so a benchmark runs each measurement in several fresh processes and
reports the median. glibc's malloc must map big buffers on huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), which only works when set before the
process starts: :func:`ensure_hugepages` re-executes the script with it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

HUGEPAGES = "glibc.malloc.hugetlb=1"


def ensure_hugepages() -> None:
    """Re-executes this Python script with huge-page malloc, unless already set."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if HUGEPAGES in tunables:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGEPAGES])))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def median_ms(step: Callable[[], object], *, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``step()`` in milliseconds; ``step`` must wait for its result."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_child(args: list[str]) -> dict:
    """Runs ``python <this script> *args`` in a fresh process; returns the JSON object that
    the child printed as its last line of output."""
    result = subprocess.run([sys.executable, sys.argv[0], *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    """Key-wise median of the numbers in several children's results."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}
