"""Vmapped sweep vs the same configurations one after another, side by side in one run.

    python -m benchmarks.sweep_speed --data-dir DIR      # DIR holds cifar-10-batches-py/

16 configurations of the course reports' MLP (3072-200-10, batch 256, Adam, 5 epochs of
CIFAR-10): 4 learning rates x 4 seeds. First each runs alone through ``train`` (the
dataset loaded once, as a research script would), then all 16 through ``sweep`` (one
vmapped group). Writes ``results/sweep_speed.json``: wall times, speedup, each config's
test accuracy both ways and the largest difference, machine info.
"""

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_json
from jaxnets.config import TrainConfig
from jaxnets import data as D
from jaxnets import sweep
from jaxnets import placement, runs, training as T

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("JAXNETS_CIFAR10_DIR"),
                        help="directory with cifar-10-batches-py/ (default $JAXNETS_CIFAR10_DIR)")
    parser.add_argument("--lrs", default="3e-3,1e-3,3e-4,1e-4")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results" / "sweep_speed.json"))
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("give --data-dir or set $JAXNETS_CIFAR10_DIR")

    dataset = D.load_dataset("cifar10", args.data_dir)
    base = TrainConfig(model="mlp", dataset="cifar10", hidden_units=(200,), batch_size=256, optimizer="adam",
                         epochs=args.epochs, dropout=0.0, progress=False)
    axes = {"lr": [float(v) for v in args.lrs.split(",")], "seed": [int(v) for v in args.seeds.split(",")]}
    members = sweep.expand(base, axes)
    work = Path(tempfile.mkdtemp(prefix="sweep_speed-"))
    load_before = os.getloadavg()
    quiet = lambda *_: None
    try:
        t0 = time.time()
        single = []
        for i, (config, values) in enumerate(members):
            t = time.time()
            summary = T.train(dataclasses.replace(config, out=str(work / f"single-{i}")), dataset=dataset, log=quiet)
            single.append({**values, "test_accuracy": summary["test_accuracy"], "seconds": round(time.time() - t, 2)})
            print(f"single {i + 1}/{len(members)} {values}: test {summary['test_accuracy']:.4f} "
                  f"in {time.time() - t:.1f}s", flush=True)
        single_wall = time.time() - t0

        t0 = time.time()
        rows = sweep.sweep(dataclasses.replace(base, out=str(work / "sweep")), axes, dataset=dataset, log=quiet,
                       progress=False)
        sweep_wall = time.time() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    by_values = {tuple(r["_values"].values()): r for r in rows}
    per_config = []
    for s in single:
        r = by_values[(s["lr"], s["seed"])]
        per_config.append({"lr": s["lr"], "seed": s["seed"], "single_test_accuracy": s["test_accuracy"],
                           "sweep_test_accuracy": r["test_accuracy"], "single_seconds": s["seconds"],
                           "difference_points": round(100 * abs(s["test_accuracy"] - r["test_accuracy"]), 3)})
    result = {
        "configs": len(members), "setup": "MLP 3072-200-10, batch 256, Adam, cosine, "
                                          f"{args.epochs} epochs of CIFAR-10 (45000 train / 5000 val / 10000 test)",
        "axes": axes, "single_wall_seconds": round(single_wall, 2), "sweep_wall_seconds": round(sweep_wall, 2),
        "speedup": round(single_wall / sweep_wall, 3),
        "max_test_accuracy_difference_points": max(c["difference_points"] for c in per_config),
        "sweep_members": ("one vmapped program" if len(placement.member_blocks(len(members))) == 1 else
                          f"each through its single run's programs, {placement.CONCURRENT_BLOCKS} at a time"),
        "load_average_1_5_15_min": {"before": [round(v, 2) for v in load_before],
                                    "after": [round(v, 2) for v in os.getloadavg()]},
        "per_config": per_config, "machine": runs.environment_info(),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_config", "machine")}, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
