"""Timing and output helpers shared by the benchmark scripts."""

import json
import statistics
import time
from pathlib import Path

import jax


def median_seconds(fn, repeats, warmup=1):
    """Median wall time of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones.

    Whatever ``fn`` returns is waited for (``jax.block_until_ready``), so a jitted call is
    timed to its end, not to its dispatch.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_json(path, data):
    """Write ``data`` as indented JSON to ``path`` (creating its folder) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
