"""Depthwise convolution on CPU: jaxnets' slices formulation (forward + hand-written
backward) against XLA's grouped convolution (``feature_group_count=C`` under ``jax.grad``)
and PyTorch's depthwise ``conv2d`` (``groups=C``, NCHW and channels-last), forward +
backward of ``sum(y * dy)``, on EfficientNet-Lite0 shapes at 128 px, batch 32.

``ours (1 chunk)`` is the same with the weight gradient summed over the whole batch at
once (``DEPTHWISE_DW_CHUNKS = 1``, what it did before it went chunk by chunk), and the
last columns time our forward, input gradient and weight gradient alone.

Run: ``python -m benchmarks.depthwise`` (same process, interleaved repeats, median ms;
the ratios are what to read on a shared machine).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnets import conv as conv_ops

SHAPES = [  # batch, H, W, C, k, stride (Lite0 blocks 1, 3, 8 and 12 at 128 px)
    (32, 64, 64, 96, 3, 2),
    (32, 32, 32, 144, 5, 1),
    (32, 8, 8, 480, 5, 1),
    (32, 8, 8, 672, 5, 2),
]


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main(repeats=7):
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'shape':28s} {'ours':>8s} {'ours (1 chunk)':>14s} {'xla grp':>8s} {'torch':>8s} {'torch CL':>8s}  "
          f"torch-best/ours  torch-best/ours (1 chunk)  {'fwd':>6s} {'dx':>6s} {'dw':>6s}")
    for b, h, w, c, k, s in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((b, h, w, c)).astype(np.float32)
        wt = rng.standard_normal((k, k, c)).astype(np.float32)
        y_shape = conv_ops.depthwise_conv2d({"w": wt}, x, stride=s)[0].shape
        dy = rng.standard_normal(y_shape).astype(np.float32)

        def ours_with(chunks):
            @jax.jit
            def ours(x, wt, dy):
                _, cache = conv_ops.depthwise_conv2d({"w": wt}, x, stride=s)
                return conv_ops.depthwise_conv2d_backward({"w": wt}, cache, dy, stride=s)

            default, conv_ops.DEPTHWISE_DW_CHUNKS = conv_ops.DEPTHWISE_DW_CHUNKS, chunks
            jax.block_until_ready(ours(x, wt, dy))  # traced (and the chunk count read) now
            conv_ops.DEPTHWISE_DW_CHUNKS = default
            return ours

        ours, ours_1 = ours_with(conv_ops.DEPTHWISE_DW_CHUNKS), ours_with(1)
        forward = jax.jit(lambda x, wt: conv_ops.depthwise_conv2d({"w": wt}, x, stride=s)[0])
        dx_only = jax.jit(lambda x, wt, dy: conv_ops.depthwise_conv2d_backward({"w": wt}, x, dy, stride=s)[1])
        dw_only = jax.jit(lambda x, wt, dy: conv_ops.depthwise_conv2d_backward({"w": wt}, x, dy, stride=s)[0])

        pads = conv_ops._resolve_padding("bench", "SAME", (h, w), (k, k), (s, s))

        @jax.jit
        def grouped(x, wt, dy):
            f = lambda x, wt: jnp.sum(lax.conv_general_dilated(
                x, wt[:, :, None, :], (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c) * dy)
            return jax.grad(f, argnums=(0, 1))(x, wt)

        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
        xcl = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(memory_format=torch.channels_last).requires_grad_()
        wt_t = torch.from_numpy(wt.transpose(2, 0, 1)[:, None].copy()).requires_grad_()
        dyt = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())
        dycl = dyt.to(memory_format=torch.channels_last)
        tpad = (pads[1][0], pads[1][1], pads[0][0], pads[0][1])

        def torch_step(xv, dyv):
            xv.grad = wt_t.grad = None
            y = torch.nn.functional.conv2d(torch.nn.functional.pad(xv, tpad), wt_t, stride=s, groups=c)
            y.backward(dyv)

        run = {
            "ours": lambda: jax.block_until_ready(ours(x, wt, dy)),
            "ours_1": lambda: jax.block_until_ready(ours_1(x, wt, dy)),
            "fwd": lambda: jax.block_until_ready(forward(x, wt)),
            "dx": lambda: jax.block_until_ready(dx_only(x, wt, dy)),
            "dw": lambda: jax.block_until_ready(dw_only(x, wt, dy)),
            "xla": lambda: jax.block_until_ready(grouped(x, wt, dy)),
            "torch": lambda: torch_step(xt, dyt),
            "torch_cl": lambda: torch_step(xcl, dycl),
        }
        for fn in run.values():
            fn()  # compile / warm up
        ms = {name: [] for name in run}
        for _ in range(repeats):  # interleaved, so drifting load hits all alike
            for name, fn in run.items():
                ms[name].append(_median_ms(fn, 1))
        med = {name: float(np.median(v)) for name, v in ms.items()}
        best = min(med["torch"], med["torch_cl"])
        print(f"{str((b, h, w, c, k, s)):28s} {med['ours']:8.1f} {med['ours_1']:14.1f} {med['xla']:8.1f} "
              f"{med['torch']:8.1f} {med['torch_cl']:8.1f}  {best / med['ours']:14.2f}x  "
              f"{best / med['ours_1']:24.2f}x  {med['fwd']:6.1f} {med['dx']:6.1f} {med['dw']:6.1f}", flush=True)


if __name__ == "__main__":
    main()
