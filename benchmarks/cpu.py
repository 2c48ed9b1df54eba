"""Side-by-side CPU benchmark: jaxnets vs PyTorch vs Flax, in one process, one run.

    python -m benchmarks.cpu                      # everything, writes results/bench_cpu.json
    python -m benchmarks.cpu --only gemm,mlp      # a subset
    python -m benchmarks.cpu --convnet-epoch-images 4480  # a shorter ConvNet "epoch"

Measures, after warm-up, the median of ``--short-repeats`` (GEMM, MLP) or ``--repeats``
(ConvNet) timings, the contenders of each item timed in interleaved rounds (one call of
each in turn, so the machine's slow spells hit them alike), of:

1. ``gemm``: the best fp32 GEMM rate (2048^3 matmul) in jax and in torch: our "limit";
2. ``mlp``: one train step of 3072-512-512-10 (ReLU, batch 200, Adam): jaxnets autodiff,
   jaxnets manual backprop, the PyTorch variants of :data:`TORCH_VARIANTS` (eager,
   channels-last for the ConvNet, ``torch.compile`` where it runs), Flax linen + Optax;
3. ``convnet``: one train step of the course mini-VGG with BN (batch 128, Adam): the same,
   plus jaxnets on XLA's native convolution (the GPU/TPU path) to show why CPU uses GEMMs;
4. ``epoch``: a full training epoch of each model on CIFAR-10-sized data (45,000 images,
   data handling included): jaxnets' trainer vs idiomatic PyTorch loops over in-memory
   tensors (eager, and the fastest variant of the step measurement); jaxnets also in two
   fresh processes sharing a compilation cache (the first compiles, the second loads the
   programs, as ``train.py``'s ``--compile-cache`` does);
5. ``compile``: time to the first finished step of each jaxnets model.

Rates count the work actually done (:func:`jaxnets.cost.train_flops`: forward, weight
gradients, input gradients of all layers but the first). jaxnets' ConvNet multiplies less
than that on CPU (Winograd, :func:`multiply_flops`): its "GFLOP/s done" counts Winograd's
multiplies and its "effective" rate the direct convolution's FLOPs. Every speed ratio is
against the fastest PyTorch variant of the same run.

jaxnets steps are timed as the trainer runs them: ``--chunk`` steps per compiled call
(gather, normalise, gradient, Optax update on device-resident uint8 data), divided by
the number of steps. PyTorch needs ``pip install torch==2.13.0`` (the ``bench`` extra);
``torch.compile`` needs a C++ compiler (whether it ran, or why not, is in the JSON).

Regenerate the docs table from a results file with ``--update-docs results/bench_cpu.json``.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import child_output, cpu_info, interleaved_median_seconds, median_seconds, write_json
from jaxnets.config import TrainConfig
from jaxnets.steps import make_train_chunk, prepare_data
from jaxnets import conv
from jaxnets import data as D
from jaxnets import models as M
from jaxnets import cost, optim, runs
from jaxnets import network as nn
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

#: The PyTorch variants timed, label -> (channels_last, torch.compile, fused Adam). Every
#: ratio is taken against the fastest of those measured in the same run ("best PyTorch").
#: ``Adam(fused=True)`` is PyTorch's single-kernel CPU Adam; the default (``fused=None``,
#: ``foreach=None``) runs a Python loop over the parameters on CPU, kept as a reference row.
TORCH_VARIANTS = {
    "torch": (False, False, True),
    "torch_default_adam": (False, False, False),
    "torch_channels_last": (True, False, True),
    "torch_compile": (False, True, True),
}
#: Variants that mean nothing for a model: an MLP has no image layout to change.
TORCH_SKIP = {"mlp": {"torch_channels_last"}, "convnet": set()}


@dataclasses.dataclass(frozen=True)
class ModelItem:
    """A larger network's train-step row (``--only resnet18`` / ``efficientnet``): the
    ``family`` of ``--only``, its stem (ResNet), image side, batch, and the PyTorch variants
    timed beside jaxnets (the same model, :mod:`benchmarks.torch_twins`). These steps take
    0.3-10 s each on 2 cores, so each contender gets ``--model-repeats`` timed steps."""

    family: str
    size: int
    batch: int
    stem: str = ""
    torch_variants: tuple = ("torch", "torch_channels_last", "torch_compile")

    def model(self):
        if self.family == "resnet18":
            return M.ResNet(depths=M.RESNET_DEPTHS["resnet18"], classes=10, stem=self.stem,
                            input_shape=(self.size, self.size, 3))
        return M.EfficientNetLite0(input_shape=(self.size, self.size, 3), classes=10)

    def title(self):
        if self.family == "resnet18":
            return f"resnet18 ({self.stem} stem, {self.size} px, batch {self.batch})"
        return f"efficientnet-lite0 ({self.size} px, batch {self.batch})"


#: kind -> its item. ResNet-18 (issue 23): both stems on CIFAR-10's 32x32 and on 64x64 inputs,
#: batch 128. EfficientNet-Lite0 (issue 25) at 128 px, batch 64: the smallest of the input
#: sizes the transfer experiment measures (224/160/128/96) that keeps every stage's
#: spatial size even down to 4x4, at a batch that keeps a step near a few seconds on 2
#: cores (224 px would take ~3x longer per image); eager and channels-last only, as the
#: issue asks (torch.compile of its 16 blocks compiles for minutes on 2 cores).
MODEL_ITEMS = {  # cheapest first: the results file is rewritten after each item
    "resnet18_imagenet_32": ModelItem("resnet18", 32, 128, "imagenet"),
    "resnet18_imagenet_64": ModelItem("resnet18", 64, 128, "imagenet"),
    "resnet18_cifar_32": ModelItem("resnet18", 32, 128, "cifar"),
    "efficientnet_lite0_128": ModelItem("efficientnet", 128, 64, torch_variants=("torch", "torch_channels_last")),
    "resnet18_cifar_64": ModelItem("resnet18", 64, 128, "cifar"),
}
#: The ``--only`` names of the model items.
MODEL_FAMILIES = ("resnet18", "efficientnet")


def torch_models(torch, kind):
    nn = torch.nn
    if kind in MODEL_ITEMS:
        from benchmarks import torch_twins

        spec = MODEL_ITEMS[kind]
        if spec.family == "resnet18":
            return torch_twins.TorchResNet(M.RESNET_DEPTHS["resnet18"], 10, spec.stem)
        return torch_twins.TorchEfficientNetLite0(10, spec.size)
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


def torch_training(torch, kind, variant):
    """``(model, optimizer, to_input)`` of a PyTorch variant (see :data:`TORCH_VARIANTS`):
    ``model`` compiled with ``torch.compile`` (forward and backward; the optimizer step
    stays eager) or not, ``to_input(x)`` putting an NCHW batch in the variant's layout."""
    channels_last, compiled, fused = TORCH_VARIANTS[variant]
    torch.manual_seed(0)
    model = torch_models(torch, kind)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)
    if compiled:
        model = torch.compile(model)
    to_input = (lambda x: x.contiguous(memory_format=torch.channels_last)) if channels_last else (lambda x: x)
    return model, opt, to_input


def torch_step_runner(torch, kind, batch, variant):
    """``(step, first)``: ``step()`` is one PyTorch train step of ``variant`` (same model and
    optimizer as jaxnets'); ``first`` the wall time of its first call (torch.compile compiles there)."""
    model, opt, to_input = torch_training(torch, kind, variant)
    size = MODEL_ITEMS[kind].size if kind in MODEL_ITEMS else 32
    x = to_input(torch.randn(batch, 3, size, size))
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    return step, time.perf_counter() - t0


def torch_compile_status(torch):
    """``{"ran", "error", "compiler"}``: whether ``torch.compile`` (Inductor, which builds C++
    kernels) trains a tiny model here; ``error`` says why not. Checked once, up front, so a
    failure is recorded rather than ending the run."""
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0] if cxx else None
    try:
        model = torch.compile(torch.nn.Linear(4, 2))
        model(torch.randn(3, 4)).sum().backward()
    except Exception as e:  # noqa: BLE001 -- any failure means "does not run here"; its text is the record
        return {"ran": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500],
                "compiler": compiler}
    return {"ran": True, "error": None, "compiler": compiler}


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
    T.use_compile_cache(cache_dir)
    dataset = synthetic_dataset(int(n_images), 1000)
    with tempfile.TemporaryDirectory() as tmp:
        print(jaxnets_epoch_seconds(kind, dataset, tmp))


def torch_epoch_seconds(torch, kind, dataset, variant="torch"):
    """An idiomatic PyTorch epoch of ``variant`` (:data:`TORCH_VARIANTS`): normalise the uint8
    set once, shuffle, slice batches, then predict the test set. A compiled variant
    compiles inside the timing (as jaxnets' epoch does)."""
    t0 = time.perf_counter()
    n_images = len(dataset.train_labels)
    x = torch.from_numpy(dataset.train_images).permute(0, 3, 1, 2).float().div_(255)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    y = torch.from_numpy(dataset.train_labels).long()
    model, opt, to_input = torch_training(torch, kind, variant)
    loss_fn = torch.nn.CrossEntropyLoss()
    batch = 200 if kind == "mlp" else 128
    model.train()
    perm = torch.randperm(n_images)
    for i in range(n_images // batch):
        idx = perm[i * batch:(i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(to_input(x[idx])), y[idx])
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        tx = torch.from_numpy(dataset.test_images).permute(0, 3, 1, 2).float().div_(255)
        model(to_input((tx - mean) / std)).argmax(1)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- FLOPs


#: Multiplications of Winograd F(2x2, 3x3) per direct-convolution multiplication: a 2x2
#: output tile from a 4x4 input tile takes 16 products per (input, output) channel pair,
#: the direct sum 4 outputs x 9 = 36.
def winograd_share(method, in_shape):
    """The share of a direct convolution's multiplies a Winograd layer does: F(2x2, 3x3)
    16 per 2x2 tile against 36 (16/36); F(4x4, 3x3) 36 per 4x4 tile against 144, over the
    tiles of the zero-padded image (``4 * ceil(H/4) * ceil(W/4) / (H * W)``; 1/4 when H and
    W are multiples of 4); 1 for any other method."""
    h, w = in_shape[:2]
    if method == "winograd":
        return 16 / 36
    if method == "winograd4":
        return 4 * -(-h // 4) * -(-w // 4) / (h * w)
    return 1.0


def multiply_flops(model):
    """FLOPs one example's training step multiplies on ``model.conv_impl`` (Winograd or not)
    and which layers use Winograd: ``(flops, ["name (F(4x4))", ...])``.

    Per layer, as in :func:`jaxnets.cost.train_flops`: ``2 * macs`` forward, ``2 * macs``
    weight gradient, ``2 * macs`` input gradient except the first layer. A conv that
    ``jaxnets.conv`` computes by Winograd (its own rule, ``conv.conv_method``) does all three
    products in the Winograd domain, each :func:`winograd_share` of the direct multiplies.
    The tile transforms are additions and are not counted. Without Winograd layers this is
    ``cost.train_flops(model)``."""
    total, winograd = 0, []
    rows = [row for row in model.cost_rows() if row.macs]
    for i, row in enumerate(rows):
        flops = (6 if i else 4) * row.macs
        method = row.layer.method(row.in_shape) if isinstance(row.layer, nn.Conv) else None
        if method in ("winograd", "winograd4"):
            flops *= winograd_share(method, row.in_shape)
            winograd.append(f"{row.path} ({'F(4x4)' if method == 'winograd4' else 'F(2x2)'})")
        total += flops
    return round(total), winograd


# ------------------------------------------------------------------------------ main


def machine_info(torch):
    info = runs.environment_info()
    info["torch"] = torch.__version__ if torch is not None else None
    info["torch_threads"] = torch.get_num_threads() if torch is not None else None
    info["platform"] = platform.platform()
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["conv_impl"] = conv.resolve_impl("auto")
    return info


def step_rows(kind, row, limit):
    """Adds each contender's images/s, GFLOP/s, share of the GEMM limit and speed against the
    best PyTorch variant to ``row`` (which holds the ``LABEL_s`` step times).

    ``LABEL_gflops`` is the work done per second: ``multiply_flops_per_step`` for the
    contenders in ``winograd_contenders`` (jaxnets on its CPU convolutions), else
    ``flops_per_step``; those contenders also get ``LABEL_effective_gflops``, the
    direct-convolution FLOPs per second (``flops_per_step / time``), labelled "effective"
    because Winograd did not do that many. ``LABEL_fraction_of_limit`` divides the work
    done by the GEMM limit. ``LABEL_speedup_vs_best_torch`` is the best PyTorch variant's
    time over this one's (> 1: faster than PyTorch's best)."""
    labels = [k[:-2] for k in row if k.endswith("_s") and not k.endswith("_first_call_s")]
    torch_labels = [k for k in labels if k in TORCH_VARIANTS]
    if torch_labels:
        row["best_torch"] = min(torch_labels, key=lambda k: row[f"{k}_s"])
    for label in labels:
        seconds = row[f"{label}_s"]
        done = row["multiply_flops_per_step"] if label in row.get("winograd_contenders", ()) else row["flops_per_step"]
        row[f"{label}_images_per_s"] = row["batch"] / seconds
        row[f"{label}_gflops"] = done / seconds / 1e9
        if done != row["flops_per_step"]:
            row[f"{label}_effective_gflops"] = row["flops_per_step"] / seconds / 1e9
        if limit:
            row[f"{label}_fraction_of_limit"] = row[f"{label}_gflops"] / limit
        if torch_labels:
            row[f"{label}_speedup_vs_best_torch"] = row[f"{row['best_torch']}_s"] / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="gemm,mlp,convnet,epoch,compile",
                        help="comma-separated subset of gemm,mlp,convnet,epoch,compile and the larger networks' "
                             "train steps resnet18 (both stems, 32 and 64 px, batch 128) and efficientnet "
                             "(Lite0, 128 px, batch 64), which the default leaves out")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median taken)")
    parser.add_argument("--short-repeats", type=int, default=30,
                        help="timed repetitions of the short measurements, the GEMM and the MLP steps (10-150 ms "
                             "each: a median of 5 is at the mercy of the machine's noise)")
    parser.add_argument("--model-repeats", type=int, default=3,
                        help="timed steps per contender of the resnet18/efficientnet items (0.3-10 s each on 2 cores)")
    parser.add_argument("--chunk", type=int, default=10, help="jaxnets steps per compiled call")
    parser.add_argument("--epoch-images", type=int, default=45000, help="training images in the MLP full-epoch test")
    parser.add_argument("--convnet-epoch-images", type=int, default=45000,
                        help="training images in the ConvNet full-epoch test (an epoch takes ~20 min per "
                             "library on a 2-core CPU)")
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="skip the torch.compile variant (it compiles C++ kernels for minutes on 2 cores)")
    parser.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    parser.add_argument("--markdown", metavar="JSON", help="print the docs/performance.md table of a results file "
                                                           "and exit")
    parser.add_argument("--update-docs", metavar="JSON",
                        help="replace the table of this results file in docs/performance.md (the block named after "
                             "the file: bench_cpu, bench_cpu_models) with its table and exit")
    args = parser.parse_args(argv)
    for flag, value in (("--repeats", args.repeats), ("--short-repeats", args.short_repeats), ("--chunk", args.chunk),
                        ("--model-repeats", args.model_repeats),
                        ("--epoch-images", args.epoch_images), ("--convnet-epoch-images", args.convnet_epoch_images)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.markdown or args.update_docs:
        path = Path(args.markdown or args.update_docs)
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"cannot read the results file {path}: {e}")
        if args.update_docs:
            update_docs(results, block=path.stem)
        else:
            print(markdown(results))
        return
    parts = set(args.only.split(","))
    known = ("gemm", "mlp", "convnet", "epoch", "compile", *MODEL_FAMILIES)
    unknown = parts - set(known)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {','.join(known)}")
    # torch.compile's kernels (Inductor) go to a new empty folder, so its first step is a cold
    # compile rather than one served by an earlier run's cache (/tmp/torchinductor_$USER).
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
        results = measure(args, parts, argv)
    print("\n" + markdown(results))
    write_json(args.out, results)


def measure(args, parts, argv):
    """The results dict of the ``parts`` (see :func:`main`) of one run."""
    try:
        import torch
    except ImportError:
        torch = None
        print("torch not installed (pip install torch==2.13.0): PyTorch columns are skipped")

    results = {"command": "python -m benchmarks.cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine_info(torch), "cpu": cpu_info(), "load_average_1min": {"start": os.getloadavg()[0]}}
    variants = list(TORCH_VARIANTS) if torch is not None else []
    if torch is not None:
        if args.no_torch_compile:
            results["torch_compile"] = {"ran": False, "error": "skipped (--no-torch-compile)"}
        else:
            results["torch_compile"] = torch_compile_status(torch)
            results["torch_compile"]["inductor_cache"] = (
                "an empty temporary directory at the start of the run: the first compiled step compiles cold; "
                "a compiled epoch later in the run reuses what the step measurement compiled")
            print(f"torch.compile: {results['torch_compile']}")
        if not results["torch_compile"]["ran"]:
            variants.remove("torch_compile")
    if "gemm" in parts:
        results["gemm"] = bench_gemm(args.short_repeats, torch)
        print(f"GEMM 2048^3: {results['gemm']}")
    limit = results.get("gemm", {}).get("limit_gflops")

    specs = {"mlp": (M.MLP(input_size=3072, hidden=(512, 512)), 200),
             "convnet": (M.ConvNet(), 128)}
    for kind, (model, batch) in specs.items():
        if kind not in parts and "compile" not in parts:
            continue
        # The work a step does (jaxnets.cost), and what jaxnets' CPU convolutions multiply.
        row = {"batch": batch, "flops_per_step": cost.train_flops(model) * batch}
        if kind == "convnet":
            per_example, winograd_layers = multiply_flops(model)
            row.update(multiply_flops_per_step=per_example * batch, winograd_layers=winograd_layers,
                       winograd_contenders=["jaxnets_autodiff", "jaxnets_manual"] if winograd_layers else [])
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
            for variant in variants:
                if variant in TORCH_SKIP[kind]:
                    continue
                try:
                    step, row[f"{variant}_first_call_s"] = torch_step_runner(torch, kind, batch, variant)
                except Exception as e:  # noqa: BLE001 -- torch.compile failing on this model: record and go on
                    if not TORCH_VARIANTS[variant][1]:
                        raise
                    results["torch_compile"].setdefault("failed_on", {})[kind] = f"{type(e).__name__}: {e}"[:500]
                    continue
                contenders[variant] = repeat(step)
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
            row["jaxnets_xla_conv_s"], _ = jaxnets_step_time(dataclasses.replace(model, conv_impl="xla"), batch,
                                                             "autodiff", 1, 1)
            row["flax_s"] = median_seconds(flax_step_runner(kind, batch), 1, warmup=1)
        if kind in parts:
            step_rows(kind, row, limit)
        results[kind] = row
        print(f"{kind}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))

    for kind, item in MODEL_ITEMS.items():
        if item.family in parts:
            results[kind] = model_item_row(torch, kind, item, variants, args.model_repeats, limit, results)
            now = max(results["load_average_1min"]["start"], os.getloadavg()[0])
            write_json(args.out, {**results, "partial": "written after each item; the run went on",
                                  "machine_loaded": now > 0.5 * (results["cpu"]["cores"] or 1)})

    if "epoch" in parts:
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
                    # Eager NCHW, and the variant with the fastest step in this run if that is another.
                    timed = ["torch"] + [v for v in [results.get(kind, {}).get("best_torch")] if v and v != "torch"]
                    for variant in timed:
                        entry[f"{variant}_s"] = torch_epoch_seconds(torch, kind, dataset, variant)
                    entry["best_torch"] = min(timed, key=lambda v: entry[f"{v}_s"])
                    best = entry[f"{entry['best_torch']}_s"]
                    entry["jaxnets_over_best_torch"] = entry["jaxnets_s"] / best
                    entry["jaxnets_cached_compile_over_best_torch"] = entry["jaxnets_cached_compile_s"] / best
                epochs[kind] = entry
                print(f"epoch {kind}: {entry}")
        results["epoch"] = epochs
    results["load_average_1min"]["end"] = os.getloadavg()[0]
    results["machine_loaded"] = max(results["load_average_1min"].values()) > 0.5 * (results["cpu"]["cores"] or 1)
    return results


def model_item_row(torch, kind, item, variants, repeats, limit, results):
    """The step row of a :data:`MODEL_ITEMS` entry: jaxnets autodiff and manual (one step per
    timed call, as the trainer's chunk runs it) and the item's PyTorch variants, timed in
    interleaved rounds of one step each after one warm-up step, median of ``repeats``."""
    model = item.model()
    row = {"batch": item.batch, "image_size": item.size,
           "flops_per_step": cost.train_flops(model) * item.batch}
    per_example, winograd_layers = multiply_flops(model)
    row.update(multiply_flops_per_step=per_example * item.batch, winograd_layers=winograd_layers,
               winograd_contenders=["jaxnets_autodiff", "jaxnets_manual"] if winograd_layers else [])
    contenders = {}
    for grad in ("autodiff", "manual"):
        run, row[f"jaxnets_{grad}_first_call_s"] = jaxnets_step_runner(model, item.batch, grad, 1,
                                                                        (item.size, item.size, 3))
        contenders[f"jaxnets_{grad}"] = run
    for variant in variants:
        if variant not in item.torch_variants:
            continue
        try:
            contenders[variant], row[f"{variant}_first_call_s"] = torch_step_runner(torch, kind, item.batch, variant)
        except Exception as e:  # noqa: BLE001 -- torch.compile failing on this model: record and go on
            if not TORCH_VARIANTS[variant][1]:
                raise
            results["torch_compile"].setdefault("failed_on", {})[kind] = f"{type(e).__name__}: {e}"[:500]
    seconds = interleaved_median_seconds(contenders, repeats, warmup=1)
    for label, value in seconds.items():
        row[f"{label}_s"] = value
    step_rows(kind, row, limit)
    print(f"{kind}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


#: Contenders of the step rows, in table order.
STEP_LABELS = ("jaxnets_autodiff", "jaxnets_manual", "jaxnets_xla_conv", *TORCH_VARIANTS, "flax")
#: Rows of the step table, in order.
STEP_KINDS = ("mlp", "convnet", *MODEL_ITEMS)
#: How the table names them.
LABEL_TEXT = {"jaxnets_autodiff": "jaxnets autodiff", "jaxnets_manual": "jaxnets manual",
              "jaxnets_xla_conv": "jaxnets on XLA's convolution", "torch": "PyTorch eager",
              "torch_default_adam": "PyTorch eager, default (for-loop) Adam",
              "torch_channels_last": "PyTorch eager, channels-last", "torch_compile": "PyTorch torch.compile",
              "flax": "Flax"}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def markdown(results):
    """The docs/performance.md table of a results file: per step contender images/s, the
    GFLOP/s of the work done (Winograd's multiplies for jaxnets' ConvNet), the effective
    rate (direct-convolution FLOPs / time) where that differs, speed against the best
    PyTorch variant of the run, share of the GEMM limit; epochs; compile times; machine."""
    def f(value, spec):
        return "" if value is None else format(value, spec)

    lines = ["| benchmark | images/s | GFLOP/s done | effective GFLOP/s | vs best PyTorch | of GEMM limit |",
             "| --- | --- | --- | --- | --- | --- |"]
    for kind in STEP_KINDS:
        row = results.get(kind, {})
        for label in STEP_LABELS:
            if f"{label}_images_per_s" not in row:
                continue
            name = LABEL_TEXT[label] + (" (best PyTorch)" if row.get("best_torch") == label else "")
            title = MODEL_ITEMS[kind].title() if kind in MODEL_ITEMS else kind
            lines.append(f"| {title} step, {name} | {row[f'{label}_images_per_s']:.0f} | {row[f'{label}_gflops']:.0f} | "
                         f"{f(row.get(f'{label}_effective_gflops'), '.0f')} | "
                         f"{f(row.get(f'{label}_speedup_vs_best_torch'), '.2f')}x | "
                         f"{f(row.get(f'{label}_fraction_of_limit'), '.0%')} |")
    epochs = results.get("epoch", {})
    if epochs:
        lines += ["", "| epoch, wall s | images | jaxnets | jaxnets, new process | jaxnets, new process, programs "
                  "cached | PyTorch eager | best PyTorch | jaxnets / best PyTorch | cached / best PyTorch |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for kind, entry in epochs.items():
            best = entry.get("best_torch")
            lines.append(f"| {kind} | {entry['images']} | {entry['jaxnets_s']:.1f} | {entry['jaxnets_fresh_process_s']:.1f} | "
                         f"{entry['jaxnets_cached_compile_s']:.1f} | {f(entry.get('torch_s'), '.1f')} | "
                         + (f"{entry[f'{best}_s']:.1f} ({LABEL_TEXT[best]}) | " if best else " | ")
                         + f"{f(entry.get('jaxnets_over_best_torch'), '.2f')} | "
                         f"{f(entry.get('jaxnets_cached_compile_over_best_torch'), '.2f')} |")
    firsts = [(MODEL_ITEMS[kind].title() if kind in MODEL_ITEMS else kind, results[kind]) for kind in STEP_KINDS
              if "jaxnets_autodiff_first_call_s" in results.get(kind, {})]
    if firsts:
        lines += ["", "| first step (compile included), s | jaxnets autodiff | jaxnets manual | PyTorch torch.compile |",
                  "| --- | --- | --- | --- |"]
        for kind, row in firsts:
            lines.append(f"| {kind} | {row['jaxnets_autodiff_first_call_s']:.1f} | {row['jaxnets_manual_first_call_s']:.1f} | "
                         f"{f(row.get('torch_compile_first_call_s'), '.1f')} |")
    gemm, machine, cpu = results.get("gemm", {}), results.get("machine", {}), results.get("cpu", {})
    compiled = results.get("torch_compile", {})
    compile_text = ("torch.compile ran" if compiled.get("ran") else
                    f"torch.compile did not run ({compiled.get('error')})" if compiled else "torch.compile not tried")
    failed = compiled.get("failed_on", {})
    if failed:
        compile_text += "; failed on " + ", ".join(f"{k} ({v})" for k, v in failed.items())
    winograd = results.get("convnet", {}).get("winograd_layers")
    lines.append("")
    lines.append((f"GEMM limit (2048^3 fp32): jax {f(gemm.get('jax_gflops'), '.0f')} GFLOP/s, torch "
                  f"{f(gemm.get('torch_gflops'), '.0f')} GFLOP/s. " if gemm else "GEMM limit not measured. ")
                 + (f"Winograd layers: {', '.join(winograd)} "
                    + ("(F(2x2): 16/36 of their multiplies, F(4x4): about 1/4). " if any("(F(" in w for w in winograd)
                       else "(16/36 of their multiplies). ")  # files written before F(4x4) was chosen
                    if winograd else "")
                 + f"{compile_text}. Machine: {cpu.get('model')}, {cpu.get('cores')} cores, flags "
                 f"{' '.join(cpu.get('flags') or []) or 'unknown'}; jax {machine.get('jax')}, torch {machine.get('torch')}. "
                 f"Command: `{results.get('command')}`."
                 + load_text(results))
    return "\n".join(lines)


def load_text(results):
    """The footer's sentence on the machine's load (1-minute load average at the start of the
    run, and at its end when it finished) and on a run stopped before its last item. Only
    the start says whether other jobs shared the machine: at the end the average includes
    this run's own busy cores."""
    load = results.get("load_average_1min")
    if not load:
        return ""
    cores = results.get("cpu", {}).get("cores") or 1
    text = f" Load average (1 min) at the start of the run: {load['start']:.1f}"
    text += f", at its end {load['end']:.1f} (this run's own threads included)" if "end" in load else ""
    text += f" on {cores} cores"
    if load["start"] > 0.5 * cores:  # the end's figure counts this run itself
        text += ": the machine was shared and loaded (other jobs beside this one), so read the ratios, not the rates"
    text += "."
    if "partial" in results:
        text += " The run was stopped before its end: the items it had not finished are missing."
    return text


def table_markers(block):
    """The comment lines around the docs table of results file ``block``.json."""
    return f"<!-- {block} table: begin -->", f"<!-- {block} table: end -->"


def update_docs(results, page=DOCS, block="bench_cpu"):
    """Replace the table between the ``<block> table`` markers of ``page`` (``bench_cpu`` for
    results/bench_cpu.json, ``bench_cpu_models`` for the resnet18/efficientnet items'
    results/bench_cpu_models.json) with :func:`markdown` of ``results``
    (``tests/test_readme.py`` checks they agree)."""
    begin, end = table_markers(block)
    text = page.read_text()
    if begin not in text or end not in text:
        sys.exit(f"{page}: no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    page.write_text(f"{head}{begin}\n{markdown(results)}\n{end}{tail}")
    print(f"updated the {block} table in {page}")


if __name__ == "__main__":
    main()
