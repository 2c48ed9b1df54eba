"""Forward+backward speed of the course mini-VGG conv/pool stack: jaxnets vs PyTorch.

Run:  python -m benchmarks.conv_speed [--batch 128] [--repeats 15] [--only gemm-grad,torch]

Network (input 32x32x3): conv3x3(64)-ReLU - maxpool(3,2,1) - conv(128)-ReLU - maxpool -
conv(256)-ReLU - conv(256)-ReLU - maxpool - conv(512)-ReLU - conv(512)-ReLU - maxpool -
conv(512)-ReLU - conv(512)-ReLU - maxpool - flatten - linear(10) - softmax cross-entropy.
Batch norm is left out (it is cheap elementwise work next to the convolutions and not
part of :mod:`jaxnets.conv`); every variant below runs exactly the same layers.

Variants (each one jitted step = forward + backward to all parameter gradients):
  gemm-grad    conv impl "gemm" (im2col + GEMM), gradients by jax.grad
  gemm-manual  conv impl "gemm", the hand-written *_backward functions
  xla-grad     conv impl "xla" (lax.conv_general_dilated), gradients by jax.grad
  xla-manual   conv impl "xla", hand-written backward
  torch        torch.nn with the same layers (loss.backward()), if torch is importable

Prints the median time per step, images/s and the ratio to PyTorch. The machine is
shared, so compare ratios within one run and repeat.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import conv as C

CHANNELS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
NUM_CLASSES = 10


def init_params(key):
    params, cin = [], 3
    for spec in CHANNELS:
        if spec == "M":
            continue
        key, sub = jax.random.split(key)
        params.append(C.conv2d_init(sub, cin, spec, 3, scheme="pytorch"))
        cin = spec
    key, sub = jax.random.split(key)
    bound = 1.0 / np.sqrt(cin)
    wk, bk = jax.random.split(sub)
    fc = {
        "w": jax.random.uniform(wk, (cin, NUM_CLASSES), jnp.float32, -bound, bound),
        "b": jax.random.uniform(bk, (NUM_CLASSES,), jnp.float32, -bound, bound),
    }
    return {"convs": params, "fc": fc}


def _xent(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def forward(params, x, labels):
    """Loss of the stack, written with the jaxnets forwards (caches dropped)."""
    convs = iter(params["convs"])
    for spec in CHANNELS:
        if spec == "M":
            x, _ = C.max_pool(x, window=3, stride=2, padding=1)
        else:
            x, _ = C.conv2d(next(convs), x, stride=1, padding="SAME")
            x = jnp.maximum(x, 0)
        # ReLU as jnp.maximum: its jax.grad at exactly 0 differs from the manual mask
        # only on a measure-zero set; irrelevant for timing.
    x, _ = C.flatten(x)
    logits = x @ params["fc"]["w"] + params["fc"]["b"]
    return _xent(logits, labels)


def manual_grads(params, x, labels):
    """Same loss, gradients from the hand-written backward functions."""
    caches, convs = [], iter(params["convs"])
    for spec in CHANNELS:
        if spec == "M":
            x, cache = C.max_pool(x, window=3, stride=2, padding=1)
            caches.append(("M", cache, None))
        else:
            p = next(convs)
            x, cache = C.conv2d(p, x, stride=1, padding="SAME")
            x = jnp.maximum(x, 0)
            caches.append(("C", cache, (p, x)))
    xf, fcache = C.flatten(x)
    logits = xf @ params["fc"]["w"] + params["fc"]["b"]
    loss = _xent(logits, labels)
    dlogits = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, NUM_CLASSES)) / x.shape[0]
    dfc = {"w": xf.T @ dlogits, "b": dlogits.sum(0)}
    dx = C.flatten_backward(fcache, dlogits @ params["fc"]["w"].T)
    dconvs = []
    for kind, cache, extra in reversed(caches):
        if kind == "M":
            dx = C.max_pool_backward(cache, dx, window=3, stride=2, padding=1)
        else:
            p, out = extra
            dx = jnp.where(out > 0, dx, 0)
            dp, dx = C.conv2d_backward(p, cache, dx, stride=1, padding="SAME")
            dconvs.append(dp)
    return loss, {"convs": dconvs[::-1], "fc": dfc}


def time_fn(fn, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_jax(impl, manual, params, x, labels, repeats):
    previous = C.set_conv_impl(impl)
    try:
        step = jax.jit(manual_grads) if manual else jax.jit(jax.value_and_grad(forward))
        step = step.lower(params, x, labels).compile()  # traced with `impl` set
    finally:
        C.set_conv_impl(previous)
    return time_fn(lambda: jax.block_until_ready(step(params, x, labels)), repeats)


def bench_torch(params, x, labels, repeats, channels_last=False):
    import torch

    layers, convs = [], iter(params["convs"])
    for spec in CHANNELS:
        if spec == "M":
            layers.append(torch.nn.MaxPool2d(3, 2, 1))
        else:
            p = next(convs)
            kh, kw, cin, cout = p["w"].shape
            conv = torch.nn.Conv2d(cin, cout, (kh, kw), padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(np.asarray(p["w"]).transpose(3, 2, 0, 1)))
                conv.bias.copy_(torch.from_numpy(np.asarray(p["b"])))
            layers += [conv, torch.nn.ReLU()]
    fc = torch.nn.Linear(*params["fc"]["w"].shape)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(np.asarray(params["fc"]["w"]).T.copy()))
        fc.bias.copy_(torch.from_numpy(np.asarray(params["fc"]["b"])))
    model = torch.nn.Sequential(*layers, torch.nn.Flatten(), fc)
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    ty = torch.from_numpy(np.asarray(labels).astype(np.int64))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        tx = tx.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(tx), ty)
        loss.backward()
        return loss

    return time_fn(step, repeats), step().item()


VARIANTS = ("gemm-grad", "gemm-manual", "xla-grad", "xla-manual", "torch", "torch-cl")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--only",
        default="gemm-grad,gemm-manual,xla-grad,torch",
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    args = ap.parse_args(argv)
    which = [w.strip() for w in args.only.split(",") if w.strip()]
    for w in which:
        if w not in VARIANTS:
            ap.error(f"unknown variant {w!r}; choose from {', '.join(VARIANTS)}")

    kp, kx, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    params = init_params(kp)
    x = jax.random.normal(kx, (args.batch, 32, 32, 3), jnp.float32)
    labels = jax.random.randint(ky, (args.batch,), 0, NUM_CLASSES)

    print(f"jax {jax.__version__} backend={jax.default_backend()} batch={args.batch} "
          f"repeats={args.repeats} (median)")
    results = {}
    for w in which:
        if w.startswith("torch"):
            try:
                import torch
            except ImportError:
                print(f"{w:12s} skipped: torch not importable")
                continue
            t, _ = bench_torch(params, x, labels, args.repeats, channels_last=(w == "torch-cl"))
            label = f"{w} {torch.__version__} threads={torch.get_num_threads()}"
        else:
            impl, mode = w.split("-")
            t = bench_jax(impl, mode == "manual", params, x, labels, args.repeats)
            label = w
        results[w] = t
        print(f"{label:34s} {t * 1e3:9.1f} ms/step {args.batch / t:9.1f} images/s", flush=True)

    ref = results.get("torch")
    if ref is not None:
        print("ratios (images/s relative to torch):")
        for w, t in results.items():
            print(f"  {w:12s} {ref / t:6.2f}x")


if __name__ == "__main__":
    main()
