"""Timing and output helpers shared by the benchmark scripts."""

import json
import os
import statistics
import subprocess
import sys
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


def interleaved_median_seconds(fns, repeats, warmup=1):
    """``{name: median seconds}`` of ``fns`` (``{name: fn}``) timed in rounds, each round
    calling every ``fn`` once in turn.

    On a noisy machine a slow spell then hits every contender alike instead of whichever
    happened to be measured during it, so ratios between them hold better than with one
    :func:`median_seconds` block after another.
    """
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def child_output(module, function, *args, env=None):
    """The last line ``module.function(*args)`` prints, run in a new Python process.

    For what cannot share a process with the caller: a fresh compilation cache, settings
    read at process start (``GLIBC_TUNABLES``). ``args`` are passed as strings; ``env``
    replaces the environment if given. Runs from the repository root.
    """
    code = f"import sys; from {module} import {function}; {function}(*sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, check=True,
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


#: /proc/cpuinfo flags that decide which kernels a CPU can run fast: the vector widths (AVX2,
#: AVX-512), FMA, and the bf16/int8 matrix instructions (AVX-512 BF16/VNNI, AMX) that would
#: make low-precision training worth trying.
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo="/proc/cpuinfo"):
    """``{"model", "cores", "flags"}``: the CPU's model name, the cores this process may use,
    and which of :data:`CPU_FLAGS` the first processor's ``flags`` line lists (the cloud VM
    this project runs on changes host between sessions, and with it these)."""
    from jaxnets.runs import cpu_model

    try:
        line = next((ln for ln in Path(cpuinfo).read_text().splitlines() if ln.startswith("flags")), "")
        present = set(line.split(":", 1)[1].split()) if ":" in line else set()
        flags = [f for f in CPU_FLAGS if f in present]
    except OSError:
        flags = None  # not Linux: unknown rather than "none"
    return {"model": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "flags": flags}


def write_json(path, data):
    """Write ``data`` as indented JSON to ``path`` (creating its folder) and say so. Every
    benchmark writes through here, so each results file records the CPU it ran on
    (:func:`cpu_info`, key ``"cpu"``) unless it set that key itself."""
    data = {**data, "cpu": data.get("cpu") or cpu_info()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
