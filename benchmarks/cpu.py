"""Side-by-side CPU benchmark: jaxnets vs PyTorch vs Flax, in one process, one run.

    python -m benchmarks.cpu                      # everything, writes results/bench_cpu.json
    python -m benchmarks.cpu --only gemm,mlp      # a subset
    python -m benchmarks.cpu --convnet-epoch-images 4480  # a shorter ConvNet "epoch"

Measures, after warm-up, the median of ``--short-repeats`` (GEMM, MLP) or ``--repeats``
(ConvNet) timings, the contenders of each item timed in interleaved rounds (one call of
each in turn, so the machine's slow spells hit them alike), of:

1. ``gemm``: the best fp32 GEMM rate (2048^3 matmul) in jax and in torch: our "limit";
2. ``mlp``: one train step of 3072-512-512-10 (ReLU, batch 200, Adam): jaxnets autodiff,
   jaxnets manual backprop, PyTorch eager, Flax linen + Optax;
3. ``convnet``: one train step of the course mini-VGG with BN (batch 128, Adam): same four,
   plus jaxnets on XLA's native convolution (the GPU/TPU path) to show why CPU uses GEMMs;
4. ``epoch``: a full training epoch of each model on CIFAR-10-sized data (45,000 images,
   data handling included): jaxnets' trainer vs an idiomatic PyTorch loop over in-memory
   tensors; jaxnets also in two fresh processes sharing a compilation cache (the first
   compiles, the second loads the programs, as ``train.py``'s ``--compile-cache`` does);
5. ``compile``: time to the first finished step of each jaxnets model.

jaxnets steps are timed as the trainer runs them: ``--chunk`` steps per compiled call
(gather, normalise, gradient, Optax update on device-resident uint8 data), divided by
the number of steps. PyTorch needs ``pip install torch==2.13.0`` (the ``bench`` extra).
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import child_output, interleaved_median_seconds, median_seconds, write_json
from jaxnets.config import TrainConfig
from jaxnets.steps import make_train_chunk, prepare_data
from jaxnets import conv as C
from jaxnets import data as D
from jaxnets import models as M
from jaxnets import cost, optim, runs
from jaxnets import training as T

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench_cpu.json"


def synthetic_dataset(n_train, n_test, shape=(32, 32, 3), seed=0):
    rng = np.random.default_rng(seed)
    return D.Dataset("cifar10", rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
                     rng.integers(0, 10, n_train).astype(np.int32),
                     rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
                     rng.integers(0, 10, n_test).astype(np.int32), 10, "synthetic")


# ------------------------------------------------------------------------------ gemm


def bench_gemm(repeats, torch):
    n = 2048
    flops = 2 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n))
    b = jax.random.normal(jax.random.key(1), (n, n))
    mm = jax.jit(jnp.dot)
    fns = {"jax": lambda: mm(a, b)}
    if torch is not None:
        ta, tb = torch.randn(n, n), torch.randn(n, n)
        fns["torch"] = lambda: ta @ tb
    out = {f"{k}_gflops": flops / v / 1e9 for k, v in interleaved_median_seconds(fns, repeats).items()}
    out["limit_gflops"] = max(out.values())
    return out


# -------------------------------------------------------------------- jaxnets steps


def jaxnets_step_runner(model, batch, grad, steps, image_shape=(32, 32, 3)):
    """``(run, first)``: ``run()`` trains ``steps`` steps as the trainer runs them (one
    compiled chunk call); ``first`` is the wall time of the first call (compile + steps)."""
    config = TrainConfig(batch_size=batch, grad=grad, optimizer="adam", lr=1e-4, schedule="constant",
                           dropout=0.0, val_size=0)
    data = prepare_data(synthetic_dataset(batch * steps, 10, image_shape), config)
    optimizer = optim.build_optimizer(config, 10**6)
    chunk = make_train_chunk(model, optimizer, config)
    params, state = model.init(jax.random.key(0))
    carry = [(params, state, optimizer.init(params))]
    perm = jnp.arange(batch * steps)
    key = jax.random.key(1)

    def run():
        carry[0], (loss, _) = chunk(carry[0], data, perm, key, 0, steps)
        loss.block_until_ready()

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def jaxnets_step_time(model, batch, grad, steps, repeats, image_shape=(32, 32, 3)):
    """Seconds per train step as the trainer runs them, and seconds to the first finished step."""
    run, first = jaxnets_step_runner(model, batch, grad, steps, image_shape)
    per_step = median_seconds(run, repeats, warmup=0) / steps
    return per_step, first_step_seconds(first, steps, per_step)


def first_step_seconds(first_call, steps, per_step):
    """Time to the first finished step of a first call that compiled, then ran ``steps`` steps."""
    return first_call - (steps - 1) * per_step


# ---------------------------------------------------------------------- torch steps


def torch_models(torch, kind):
    nn = torch.nn
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3072, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10))
    layers, cin = [], 3
    for item in M.VGG_COURSE:
        if item == "M":
            layers.append(nn.MaxPool2d(3, 2, 1))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            cin = item
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin, 10))


def torch_step_runner(torch, kind, batch, channels_last=False):
    """``step()``: one PyTorch eager train step (same model and optimizer)."""
    torch.manual_seed(0)
    model = torch_models(torch, kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return step


# ----------------------------------------------------------------------- flax steps


def flax_step_runner(kind, batch):
    """``run()``: one Flax linen + Optax train step (jitted, compiled on its first call)."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = x.reshape(x.shape[0], -1)
            for width in (512, 512):
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(10)(x)

    class VGG(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            for item in M.VGG_COURSE:
                if item == "M":
                    x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
                else:
                    x = nn.Conv(item, (3, 3), use_bias=False)(x)
                    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    net = MLP() if kind == "mlp" else VGG()
    x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    variables = net.init(jax.random.key(2), x, train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    opt = optax.adam(1e-4)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, stats, opt_state):
        def loss_fn(p):
            logits, updates = net.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), updates.get("batch_stats", stats), opt_state, loss

    box = [(params, stats, opt_state)]

    def run():
        *box[0], loss = step(*box[0])
        box[0] = tuple(box[0])
        loss.block_until_ready()

    return run


# ---------------------------------------------------------------------------- epochs


def jaxnets_epoch_seconds(kind, dataset, tmp):
    config = TrainConfig(
        model=kind, dataset="cifar10", epochs=1, batch_size=200 if kind == "mlp" else 128, optimizer="adam",
        lr=1e-4, schedule="constant", hidden_units=(512, 512), dropout=0.0, val_size=0, progress=False,
        out=str(Path(tmp) / f"jaxnets-{kind}-{time.time_ns()}"),
    )
    t0 = time.perf_counter()
    T.train(config, dataset=dataset, log=lambda *_: None)
    return time.perf_counter() - t0


def jaxnets_epoch_seconds_fresh_process(kind, n_images, cache_dir):
    """:func:`jaxnets_epoch_seconds` in a new Python process that keeps its compiled programs in
    ``cache_dir`` (as ``train.py`` does): the first call in an empty directory compiles
    everything, a second call loads the programs (what a user's next run with the same
    shapes gets). Imports and the synthetic data are outside the timing."""
    return float(child_output("benchmarks.cpu", "_epoch_in_child", kind, n_images, cache_dir))


def _epoch_in_child(kind, n_images, cache_dir):
    import tempfile

    T.use_compile_cache(cache_dir)
    dataset = synthetic_dataset(int(n_images), 1000)
    with tempfile.TemporaryDirectory() as tmp:
        print(jaxnets_epoch_seconds(kind, dataset, tmp))


def torch_epoch_seconds(torch, kind, dataset):
    """An idiomatic PyTorch epoch: normalise the uint8 set once, shuffle, slice batches."""
    t0 = time.perf_counter()
    n_images = len(dataset.train_labels)
    x = torch.from_numpy(dataset.train_images).permute(0, 3, 1, 2).float().div_(255)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    y = torch.from_numpy(dataset.train_labels).long()
    torch.manual_seed(0)
    model = torch_models(torch, kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    batch = 200 if kind == "mlp" else 128
    model.train()
    perm = torch.randperm(n_images)
    for i in range(n_images // batch):
        idx = perm[i * batch:(i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        tx = torch.from_numpy(dataset.test_images).permute(0, 3, 1, 2).float().div_(255)
        model((tx - mean) / std).argmax(1)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ main


def machine_info(torch):
    info = runs.environment_info()
    info["torch"] = torch.__version__ if torch is not None else None
    info["torch_threads"] = torch.get_num_threads() if torch is not None else None
    info["platform"] = platform.platform()
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["conv_impl"] = C.get_conv_impl()
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="gemm,mlp,convnet,epoch,compile",
                        help="comma-separated subset of gemm,mlp,convnet,epoch,compile")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median taken)")
    parser.add_argument("--short-repeats", type=int, default=30,
                        help="timed repetitions of the short measurements, the GEMM and the MLP steps (10-150 ms "
                             "each: a median of 5 is at the mercy of the machine's noise)")
    parser.add_argument("--chunk", type=int, default=10, help="jaxnets steps per compiled call")
    parser.add_argument("--epoch-images", type=int, default=45000, help="training images in the MLP full-epoch test")
    parser.add_argument("--convnet-epoch-images", type=int, default=45000,
                        help="training images in the ConvNet full-epoch test (an epoch takes ~20 min per "
                             "library on a 2-core CPU)")
    parser.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    parser.add_argument("--markdown", metavar="JSON", help="print the README table of a results file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    parts = set(args.only.split(","))
    try:
        import torch
    except ImportError:
        torch = None
        print("torch not installed (pip install torch==2.13.0): PyTorch columns are skipped")

    results = {"command": "python -m benchmarks.cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine_info(torch)}
    if "gemm" in parts:
        results["gemm"] = bench_gemm(args.short_repeats, torch)
        print(f"GEMM 2048^3: {results['gemm']}")
    limit = results.get("gemm", {}).get("limit_gflops")

    specs = {"mlp": (M.MLP(input_size=3072, hidden=(512, 512)), 200),
             "convnet": (M.ConvNet(), 128)}
    for kind, (model, batch) in specs.items():
        if kind not in parts and "compile" not in parts:
            continue
        flops = cost.train_flops(model) * batch  # the work a step does (jaxnets.cost)
        row = {"batch": batch, "flops_per_step": flops}
        steps = args.chunk if kind == "mlp" else max(2, args.chunk // 5)
        repeats = args.short_repeats if kind == "mlp" else args.repeats
        # Every contender as a callable of one timed call and the steps it runs; timed in
        # interleaved rounds (a slow spell of the machine hits them all alike).
        contenders = {}
        for grad in ("autodiff", "manual"):
            run, first = jaxnets_step_runner(model, batch, grad, steps)
            contenders[f"jaxnets_{grad}"] = (run, steps)
            row[f"jaxnets_{grad}_first_call_s"] = first
        if kind in parts:
            # The same number of steps per timed call for everyone (only a call's first step
            # finds the caches cold after another library's call).
            repeat = lambda step: (lambda: [step() for _ in range(steps)], steps)
            if torch is not None:
                contenders["torch"] = repeat(torch_step_runner(torch, kind, batch))
                if kind == "convnet":
                    contenders["torch_channels_last"] = repeat(torch_step_runner(torch, kind, batch, True))
            if kind == "mlp":
                contenders["flax"] = repeat(flax_step_runner(kind, batch))
            seconds = interleaved_median_seconds({k: f for k, (f, _) in contenders.items()}, repeats, warmup=2)
            for label, (_, n) in contenders.items():
                row[f"{label}_s"] = seconds[label] / n
        for grad in ("autodiff", "manual"):
            per_step = row.get(f"jaxnets_{grad}_s")
            if per_step is None:  # --only compile: one timed call
                per_step = median_seconds(contenders[f"jaxnets_{grad}"][0], 1, warmup=0) / steps
            row[f"jaxnets_{grad}_first_call_s"] = first_step_seconds(row[f"jaxnets_{grad}_first_call_s"], steps,
                                                                     per_step)
        if kind == "convnet" and kind in parts:
            # The same step on lax.conv_general_dilated, what the GPU/TPU path uses (and Flax's
            # ConvNet): GEMM formulations (Winograd, im2col) are the CPU default because of this
            # comparison. They run at a few images/s: one timed step after the compiling one.
            previous = C.set_conv_impl("xla")
            try:
                row["jaxnets_xla_conv_s"], _ = jaxnets_step_time(model, batch, "autodiff", 1, 1)
            finally:
                C.set_conv_impl(previous)
            row["flax_s"] = median_seconds(flax_step_runner(kind, batch), 1, warmup=1)
        if kind in parts:
            for name in [k for k in row if k.endswith("_s") and not k.endswith("first_call_s")]:
                label = name[:-2]
                row[f"{label}_images_per_s"] = batch / row[name]
                row[f"{label}_gflops"] = flops / row[name] / 1e9
                if limit:
                    row[f"{label}_fraction_of_limit"] = row[f"{label}_gflops"] / limit
                if "torch_s" in row:
                    row[f"{label}_speedup_vs_torch"] = row["torch_s"] / row[name]
        results[kind] = row
        print(f"{kind}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))

    if "epoch" in parts:
        import tempfile

        epochs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for kind, n_images in (("mlp", args.epoch_images), ("convnet", args.convnet_epoch_images)):
                # The same uint8 arrays for both, made outside the timings.
                dataset = synthetic_dataset(n_images, 1000)
                entry = {"images": n_images, "jaxnets_s": jaxnets_epoch_seconds(kind, dataset, tmp)}
                cache = Path(tmp) / f"cache-{kind}"
                entry["jaxnets_fresh_process_s"] = jaxnets_epoch_seconds_fresh_process(kind, n_images, cache)
                entry["jaxnets_cached_compile_s"] = jaxnets_epoch_seconds_fresh_process(kind, n_images, cache)
                if torch is not None:
                    entry["torch_s"] = torch_epoch_seconds(torch, kind, dataset)
                    entry["jaxnets_over_torch"] = entry["jaxnets_s"] / entry["torch_s"]
                    entry["jaxnets_cached_compile_over_torch"] = entry["jaxnets_cached_compile_s"] / entry["torch_s"]
                epochs[kind] = entry
                print(f"epoch {kind}: {entry}")
        results["epoch"] = epochs

    print_table(results)
    write_json(args.out, results)


def print_table(results):
    print(f"\n{'benchmark':32s} {'images/s':>10s} {'GFLOP/s':>9s} {'vs torch':>9s} {'of limit':>9s}")
    for kind in ("mlp", "convnet"):
        row = results.get(kind, {})
        for label in ("jaxnets_autodiff", "jaxnets_manual", "jaxnets_xla_conv", "torch", "torch_channels_last", "flax"):
            if f"{label}_images_per_s" in row:
                print(f"{kind + ' ' + label:32s} {row[f'{label}_images_per_s']:10.1f} {row[f'{label}_gflops']:9.1f} "
                      f"{row.get(f'{label}_speedup_vs_torch', float('nan')):9.2f} "
                      f"{row.get(f'{label}_fraction_of_limit', float('nan')):9.2f}")
    for kind, entry in results.get("epoch", {}).items():
        print(f"epoch {kind}: jaxnets {entry['jaxnets_s']:.1f}s (compiled programs cached: "
              f"{entry.get('jaxnets_cached_compile_s', float('nan')):.1f}s), torch {entry.get('torch_s', float('nan')):.1f}s")
    for kind in ("mlp", "convnet"):
        if kind in results:
            print(f"first call {kind}: autodiff {results[kind]['jaxnets_autodiff_first_call_s']:.1f}s, "
                  f"manual {results[kind]['jaxnets_manual_first_call_s']:.1f}s")


def markdown(results):
    """The README's Performance table, from a results file."""
    lines = ["| benchmark | images/s | GFLOP/s | vs PyTorch | of GEMM limit |", "| --- | --- | --- | --- | --- |"]
    for kind in ("mlp", "convnet"):
        row = results.get(kind, {})
        for label in ("jaxnets_autodiff", "jaxnets_manual", "jaxnets_xla_conv", "torch", "torch_channels_last", "flax"):
            if f"{label}_images_per_s" in row:
                lines.append(f"| {kind} step, {label.replace('_', ' ')} | {row[f'{label}_images_per_s']:.0f} | "
                             f"{row[f'{label}_gflops']:.0f} | {row.get(f'{label}_speedup_vs_torch', float('nan')):.2f}x | "
                             f"{row.get(f'{label}_fraction_of_limit', float('nan')):.0%} |")
    for kind, entry in results.get("epoch", {}).items():
        lines.append(f"| {kind} epoch of {entry['images']} images, wall s | jaxnets {entry['jaxnets_s']:.1f} | "
                     f"torch {entry.get('torch_s', float('nan')):.1f} | {entry.get('jaxnets_over_torch', float('nan')):.2f}x time | |")
        if "jaxnets_cached_compile_s" in entry:
            lines.append(f"| {kind} epoch, new process with its compiled programs cached, wall s | "
                         f"jaxnets {entry['jaxnets_cached_compile_s']:.1f} (first process "
                         f"{entry['jaxnets_fresh_process_s']:.1f}) | torch {entry.get('torch_s', float('nan')):.1f} | "
                         f"{entry.get('jaxnets_cached_compile_over_torch', float('nan')):.2f}x time | |")
    for kind in ("mlp", "convnet"):
        if kind in results:
            lines.append(f"| {kind} first step (compile), s | autodiff {results[kind]['jaxnets_autodiff_first_call_s']:.1f} | "
                         f"manual {results[kind]['jaxnets_manual_first_call_s']:.1f} | | |")
    gemm = results.get("gemm", {})
    machine = results.get("machine", {})
    lines.append("")
    lines.append(f"GEMM limit (2048^3 fp32): jax {gemm.get('jax_gflops', float('nan')):.0f} GFLOP/s, torch "
                 f"{gemm.get('torch_gflops', float('nan')):.0f} GFLOP/s. Machine: {machine.get('cpu')}, "
                 f"{machine.get('cores')} cores; jax {machine.get('jax')}, torch {machine.get('torch')}. "
                 f"Command: `{results.get('command')}`.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
