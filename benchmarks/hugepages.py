"""Does glibc malloc on transparent huge pages speed up the ConvNet train step?

    python -m benchmarks.hugepages                 # 4 pairs of processes, ConvNet manual
    python -m benchmarks.hugepages --pairs 6 --grad autodiff

XLA:CPU allocates a step's large buffers afresh on every call, and glibc serves them with
``mmap``: each 4 KiB page is faulted in again (~70,000 minor faults per ConvNet step).
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` makes malloc ask for transparent huge pages
(``madvise``), 2 MiB each. glibc reads the tunable when a process starts, so the two
settings cannot share a process: this script runs pairs of child processes, with and
without it, alternating (the VM's speed drifts), each timing the median of a few steps
after compiling, and reports the per-pair ratios and their median. Writes
``results/hugepages.json``.
"""

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

from benchmarks.common import child_output, write_json
from jaxnets import runs

RESULTS = Path(__file__).resolve().parents[1] / "results" / "hugepages.json"
TUNABLE = "glibc.malloc.hugetlb=1"


def _child(grad, repeats):
    from benchmarks.common import median_seconds
    from benchmarks.cpu import jaxnets_step_runner
    from jaxnets import conv
    from jaxnets import models as M

    steps = 2
    model = M.ConvNet()
    run, _ = jaxnets_step_runner(model, 128, grad, steps)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = median_seconds(run, int(repeats), warmup=1) / steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / ((int(repeats) + 1) * steps)
    print(json.dumps({"step_s": seconds, "faults_per_step": faults, "conv_impl": conv.resolve_impl(model.conv_impl)}))


def run_child(grad, repeats, hugepages):
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if hugepages:
        env["GLIBC_TUNABLES"] = TUNABLE
    return json.loads(child_output("benchmarks.hugepages", "_child", grad, repeats, env=env))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs of processes (default, huge pages)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of 2 steps per process (median)")
    parser.add_argument("--grad", choices=("manual", "autodiff"), default="manual")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    pairs = []
    for i in range(args.pairs):
        default = run_child(args.grad, args.repeats, False)
        huge = run_child(args.grad, args.repeats, True)
        pairs.append({"default": default, "hugepages": huge, "speedup": default["step_s"] / huge["step_s"]})
        print(f"pair {i + 1}: default {default['step_s'] * 1e3:.0f} ms ({default['faults_per_step']:.0f} faults/step), "
              f"huge pages {huge['step_s'] * 1e3:.0f} ms ({huge['faults_per_step']:.0f} faults/step): "
              f"{pairs[-1]['speedup']:.2f}x", flush=True)
    result = {
        "command": "python -m benchmarks.hugepages " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "ConvNet (course mini-VGG, BN), batch 128, Adam", "grad": args.grad, "tunable": TUNABLE,
        "machine": runs.environment_info(), "pairs": pairs, "median_speedup": statistics.median(p["speedup"] for p in pairs),
    }
    print(f"median speedup with {TUNABLE}: {result['median_speedup']:.2f}x over {args.pairs} pairs")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
