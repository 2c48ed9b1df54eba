"""What EfficientNet-Lite0 costs on this CPU at each input size (issue 25's experiment).

    PYTHONPATH=. python -m benchmarks.effnet_cost [--sizes 96,128,160,224] [--batch 64]
                                                  [--steps 2] [--repeats 2] [--out results/effnet_cost.json]

For each size: images/s of the evaluation forward (``model.apply(train=False)``, jitted: what
a linear probe's frozen backbone and every test evaluation cost) and of a train step as the
trainer runs it (``benchmarks.cpu.jaxnets_step_runner``: one compiled chunk of ``--steps``
steps, hand-written backward, Adam), on synthetic images already at the size (no resize),
batch ``--batch``, after an untimed compiling call. The sizes are timed one after another,
so on a shared, loaded machine the figures are noisy: each row records the load average
before and after, and the ratios between sizes hold better than the absolute figures. Rows
are merged by size into ``--out`` after each size.
"""

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import median_seconds, write_json
from benchmarks.cpu import jaxnets_step_runner
from jaxnets import cost
from jaxnets import models as M


def forward_runner(model, batch):
    params, state = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (batch, *model.input_shape), jnp.float32)
    apply = jax.jit(lambda p, s, x: model.apply(p, s, x, train=False)[0])
    return lambda: apply(params, state, x)


def measure(size, batch, steps, repeats):
    """One size's row. A train step the trainer's memory check would refuse on this machine
    is not attempted (the first run at 224 px, batch 64, was killed for memory): its row says
    so instead of a figure."""
    model = M.EfficientNetLite0(input_shape=(size, size, 3), classes=10)
    forward = median_seconds(forward_runner(model, batch), repeats, warmup=1)
    try:
        cost.check_memory(model, batch_size=batch, eval_batch_size=0, optimizer_slots=2)
    except ValueError as e:
        return {"size": size, "batch": batch, "forward_img_s": batch / forward, "forward_s_per_batch": forward,
                "train_img_s": None, "train_refused": str(e)}
    run, first = jaxnets_step_runner(model, batch, "manual", steps, image_shape=(size, size, 3))
    train = median_seconds(run, repeats, warmup=0) / steps
    return {"size": size, "batch": batch, "forward_img_s": batch / forward, "train_img_s": batch / train,
            "forward_s_per_batch": forward, "train_s_per_step": train, "first_train_call_s": first}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="96,128,160,224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="train steps per timed call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="results/effnet_cost.json")
    args = parser.parse_args(argv)
    print(f"{'size':>5} {'forward img/s':>14} {'train img/s':>12} {'s/step':>8}", flush=True)
    for size in map(int, args.sizes.split(",")):
        load_before, t0 = os.getloadavg(), time.perf_counter()
        r = measure(size, args.batch, args.steps, args.repeats)
        r.update(load_average_before=load_before, load_average_after=os.getloadavg(),
                 wall_seconds=time.perf_counter() - t0, measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        train = (f"{r['train_img_s']:>12.1f} {r['train_s_per_step']:>8.2f}" if r["train_img_s"]
                 else f"  not run: {r['train_refused']}")
        print(f"{size:>5} {r['forward_img_s']:>14.1f} {train}", flush=True)
        # Written after every size, merged by size into what --out holds: a run killed at one
        # size keeps the others, and one size can be measured again alone.
        old = json.loads(Path(args.out).read_text())["rows"] if Path(args.out).exists() else []
        rows = sorted([*(o for o in old if o["size"] != size), r], key=lambda o: o["size"])
        write_json(args.out, {"rows": rows, "jax": jax.__version__,
                              "note": "shared 2-core CPU loaded by other jobs: noisy, ratios between sizes hold better"})


if __name__ == "__main__":
    main()
