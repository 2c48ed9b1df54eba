"""Where a composed network's CPU train step goes, layer by layer, and which conv kernels pay.

    python -m benchmarks.layer_breakdown --model resnet18 --stem cifar --size 32
    python -m benchmarks.layer_breakdown --model efficientnet_lite0 --size 128 --batch 64

Every distinct leaf layer of the network (the same layer type on the same input shape
counted once, times how often it occurs) is timed as its own jitted function: forward +
hand-written backward (``manual``) and forward + ``jax.vjp`` of the forward (``autodiff``),
median of ``--repeats`` calls in interleaved rounds. Convolutions are timed on every
implementation that computes them differently (``conv.conv_method``: Winograd where it
applies, im2col/GEMM, XLA's ``conv_general_dilated``), so the table says whether the CPU
kernels pay for each shape. The sum is close to, not equal to, a fused train step: XLA
fuses across layer boundaries in the step, which adds the loss and the optimizer update.
On a shared machine read the ratios, not the absolute figures.
"""

import argparse
import collections
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import cpu_info, interleaved_median_seconds, write_json
from jaxnets import models as M
from jaxnets import network as nn
from jaxnets import runs

RESULTS = Path(__file__).resolve().parents[1] / "results" / "layer_breakdown.json"


def kind_of(row):
    """A short name of the layer's role: ``conv 3x3/2``, ``bn``, ``max pool``, ..."""
    layer = row.layer
    if isinstance(layer, nn.Conv):
        return f"conv {layer.kernel}x{layer.kernel}/{layer.stride}"
    if isinstance(layer, nn.DepthwiseConv):
        return f"depthwise {layer.kernel}x{layer.kernel}/{layer.stride}"
    return {nn.BatchNorm: "bn", nn.MaxPool: "max pool", nn.GlobalAvgPool: "global pool", nn.Linear: "linear",
            nn.Activation: f"activation {getattr(layer, 'name', '')}"}.get(type(layer), type(layer).__name__)


def layer_timers(layer, in_shape, batch, key):
    """``{variant: fn}`` of one leaf layer on a batch: forward + manual backward, and autodiff."""
    x = jax.random.normal(key, (batch, *in_shape))
    params, state, out_shape = layer.init(iter(jax.random.split(key, 4)), in_shape, jnp.float32)
    dy = jax.random.normal(jax.random.fold_in(key, 1), (batch, *out_shape))
    ctx = nn.Context(train=True)

    def manual(layer):
        @jax.jit
        def fn(params, state, x, dy):
            y, cache, _ = layer.forward(params, state, x, ctx)
            return y, layer.backward(params, cache, dy, ctx)
        return lambda: fn(params, state, x, dy)

    def autodiff(layer):
        @jax.jit
        def fn(params, state, x, dy):
            y, vjp = jax.vjp(lambda p, x: layer.forward(p, state, x, ctx)[0], params, x)
            return y, vjp(dy)
        return lambda: fn(params, state, x, dy)

    timers = {}
    if isinstance(layer, nn.Conv):
        methods = {}
        for impl in ("winograd", "winograd4", "gemm", "xla"):
            variant = dataclasses.replace(layer, impl=impl)
            methods.setdefault(variant.method(in_shape), variant)
        chosen = layer.method(in_shape)
        for method, variant in methods.items():
            timers[f"manual {method}"] = manual(variant)
        timers[f"autodiff {chosen}"] = autodiff(methods[chosen])
    else:
        timers["manual"] = manual(layer)
        timers["autodiff"] = autodiff(layer)
    return timers


def build(args):
    if args.model.startswith("resnet"):
        return M.ResNet(depths=M.RESNET_DEPTHS[args.model], classes=10, stem=args.stem,
                        input_shape=(args.size, args.size, 3))
    return M.EfficientNetLite0(input_shape=(args.size, args.size, 3), classes=10)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=[*M.RESNET_DEPTHS, "efficientnet_lite0"])
    parser.add_argument("--stem", default="cifar", choices=M.RESNET_STEMS)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON here (default: print only)")
    args = parser.parse_args(argv)
    model = build(args)
    groups = collections.OrderedDict()
    for row in model.cost_rows():
        key = (kind_of(row), row.in_shape, row.out_shape, repr(row.layer))
        groups.setdefault(key, [row, 0])[1] += 1
    rows, t0 = [], time.perf_counter()
    load = os.getloadavg()[0]
    print(f"{'layer':18s} {'in -> out':28s} {'n':>2s}  ms per call (each variant) x n")
    for i, ((kind, in_shape, out_shape, _), (row, count)) in enumerate(groups.items()):
        timers = layer_timers(row.layer, in_shape, args.batch, jax.random.key(i))
        seconds = interleaved_median_seconds(timers, args.repeats, warmup=1)
        entry = {"kind": kind, "path": row.path, "in_shape": in_shape, "out_shape": out_shape, "count": count,
                 "chosen": row.layer.method(in_shape) if isinstance(row.layer, nn.Conv) else None,
                 "seconds": seconds}
        rows.append(entry)
        print(f"{kind:18s} {str(in_shape) + ' -> ' + str(out_shape):28s} {count:2d}  "
              + "  ".join(f"{k} {1e3 * v:.1f}" for k, v in seconds.items()), flush=True)
    totals = collections.defaultdict(lambda: collections.defaultdict(float))
    for entry in rows:
        for variant, s in entry["seconds"].items():
            path = variant.split()[0]
            method = variant.split()[1] if " " in variant else None
            if entry["chosen"] is None or method == entry["chosen"]:
                totals[path][entry["kind"]] += s * entry["count"]
    print()
    for path, parts in totals.items():
        whole = sum(parts.values())
        print(f"{path}: {1e3 * whole:.0f} ms summed; " + ", ".join(
            f"{k} {1e3 * v:.0f} ms ({v / whole:.0%})" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    if args.out:
        given = sys.argv[1:] if argv is None else argv
        write_json(args.out, {"command": " ".join(["python -m benchmarks.layer_breakdown", *given]),
                              "model": args.model, "stem": args.stem, "size": args.size, "batch": args.batch,
                              "layers": rows, "totals": {p: dict(v) for p, v in totals.items()},
                              "load_average_1min_start": load, "load_average_1min_end": os.getloadavg()[0],
                              "wall_s": time.perf_counter() - t0, "machine": runs.environment_info(),
                              "cpu": cpu_info()})


if __name__ == "__main__":
    main()
