"""Timing and figure helpers shared by the benchmarks.

XLA:CPU timings vary between processes (about 1 process in 5 runs 1.7-4x slower for
its whole life), so a benchmark runs each measurement in several fresh processes and
reports the median. glibc's malloc must map big buffers on huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), which only works when set before the
process starts: :func:`ensure_hugepages` re-executes the script with it.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HUGEPAGES = "glibc.malloc.hugetlb=1"


@contextlib.contextmanager
def einsum_attention_only():
    """Within it, programs traced use plain einsum attention, never the recompute kernel
    (``e4t_jax.models.attention.RECOMPUTE_MIN_SCORES`` is read at trace time)."""
    from e4t_jax.models import attention

    default, attention.RECOMPUTE_MIN_SCORES = attention.RECOMPUTE_MIN_SCORES, 1 << 62
    try:
        yield
    finally:
        attention.RECOMPUTE_MIN_SCORES = default


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


def method_figure(rows: list[list[Any]], columns: list[str], path: Path, cell: int = 128) -> None:
    """The paper's comparison layout: a row per concept, a labelled column per method.

    Args:
      rows: per concept, one uint8 ``[H, W, 3]`` image per column (any sizes: each is
        resized to ``cell`` x ``cell``, nearest neighbour, so small renders stay crisp).
      columns: the column titles (``input`` first, then the methods).
    """
    from PIL import Image, ImageDraw

    pad, header = 4, 18
    canvas = Image.new("RGB", (len(columns) * (cell + pad) + pad, header + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((pad + c * (cell + pad) + 2, 3), name, fill="black")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = Image.fromarray(np.asarray(image, np.uint8)).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (pad + c * (cell + pad), header + pad + r * (cell + pad)))
    canvas.save(path)
