"""Where the CPU ConvNet step's time goes, layer by layer (hand-written forward + backward).

    python -m benchmarks.convnet_breakdown          # writes results/convnet_breakdown.json

For every conv block of the course mini-VGG at batch 128 (conv3x3 -> batch_norm -> relu,
then the 3x3/2 max pool where the plan has one) it times, each as its own jitted function,
median of ``--repeats`` calls after warm-up:

* ``gemm``: the three matrix products of the im2col convolution alone, on ready-made
  matrices: ``cols @ W`` (forward), ``cols^T @ dy`` (dW) and ``dy @ W^T`` (dcols);
* ``conv``: :func:`jaxnets.conv.conv2d` + :func:`~jaxnets.conv.conv2d_backward` (GEMM
  implementation): the same products plus building the patch matrix and ``col2im``;
* ``bn_relu``: batch norm + ReLU forward and their backward;
* ``pool``: max pool forward and backward.

``conv - gemm`` is what im2col/col2im cost on top of the products. The table shows each
part's share of the summed time and the GEMMs' rate; the sum is close to, but not exactly,
a fused train step (XLA fuses across layer boundaries there, and the step adds the head,
the loss and the Adam update).
"""

import argparse
from pathlib import Path

import jax

from benchmarks.common import median_seconds, write_json
from jaxnets import conv as conv_ops
from jaxnets import layers as L
from jaxnets import models as M

RESULTS = Path(__file__).resolve().parents[1] / "results" / "convnet_breakdown.json"


def blocks(plan, image_hw, channels):
    """(h, w, cin, cout, pooled) of each conv block of ``plan``."""
    out, (h, w), cin = [], image_hw, channels
    for i, item in enumerate(plan):
        if item == "M":
            continue
        pooled = i + 1 < len(plan) and plan[i + 1] == "M"
        out.append((h, w, cin, item, pooled))
        cin = item
        if pooled:
            h, w = (h + 1) // 2, (w + 1) // 2
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    b = args.batch
    key = jax.random.key(0)
    rows = []

    @jax.jit
    def gemms(cols, w, dy):
        return cols @ w, cols.T @ dy, dy @ w.T

    @jax.jit
    def conv(params, x, dy):
        y, cache = conv_ops.conv2d(params, x, impl="gemm")
        return y, conv_ops.conv2d_backward(params, cache, dy, impl="gemm")

    @jax.jit
    def bn_relu(params, state, x, dy):
        y, bn_cache, _ = L.batch_norm(params, state, x, train=True)
        z, relu_cache = L.relu(y)
        return z, L.batch_norm_backward(params, bn_cache, L.relu_backward(relu_cache, dy), train=True)

    @jax.jit
    def pool(x, dy):
        y, cache = conv_ops.max_pool(x, impl="gemm")
        return y, conv_ops.max_pool_backward(cache, dy, impl="gemm")

    print(f"{'layer':24s} {'gemm ms':>8s} {'conv ms':>8s} {'im2col ms':>9s} {'bn+relu ms':>10s} {'pool ms':>8s} "
          f"{'GEMM GFLOP/s':>12s}")
    for h, w, cin, cout, pooled in blocks(M.VGG_COURSE, (32, 32), 3):
        keys = jax.random.split(key, 8)
        key = keys[0]
        x = jax.random.normal(keys[1], (b, h, w, cin))
        params = {"w": jax.random.normal(keys[2], (3, 3, cin, cout)) * 0.05}
        dy = jax.random.normal(keys[3], (b, h, w, cout))
        cols = jax.random.normal(keys[4], (b * h * w, 9 * cin))
        flops = 3 * 2 * b * h * w * 9 * cin * cout
        w2, dy2 = params["w"].reshape(-1, cout), dy.reshape(-1, cout)
        row = {"layer": f"{h}x{w}x{cin}->{cout}", "gemm_flops": flops,
               "gemm_s": median_seconds(lambda: gemms(cols, w2, dy2), args.repeats),
               "conv_s": median_seconds(lambda: conv(params, x, dy), args.repeats)}
        bn_params, bn_state = L.batch_norm_init(cout)
        row["bn_relu_s"] = median_seconds(lambda: bn_relu(bn_params, bn_state, dy, dy), args.repeats)
        if pooled:
            pooled_dy = jax.random.normal(keys[5], (b, (h + 1) // 2, (w + 1) // 2, cout))
            row["pool_s"] = median_seconds(lambda: pool(dy, pooled_dy), args.repeats)
        else:
            row["pool_s"] = 0.0
        row["im2col_s"] = row["conv_s"] - row["gemm_s"]
        row["gemm_gflops"] = flops / row["gemm_s"] / 1e9
        rows.append(row)
        print(f"{row['layer']:24s} {1e3 * row['gemm_s']:8.1f} {1e3 * row['conv_s']:8.1f} {1e3 * row['im2col_s']:9.1f} "
              f"{1e3 * row['bn_relu_s']:10.1f} {1e3 * row['pool_s']:8.1f} {row['gemm_gflops']:12.1f}", flush=True)

    totals = {k: sum(r[k] for r in rows) for k in ("gemm_s", "im2col_s", "bn_relu_s", "pool_s")}
    whole = sum(totals.values())
    shares = {k[:-2]: v / whole for k, v in totals.items()}
    gflops = sum(r["gemm_flops"] for r in rows) / totals["gemm_s"] / 1e9
    print(f"sum {1e3 * whole:.0f} ms per step of {b}: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
          + f"; GEMMs at {gflops:.0f} GFLOP/s")
    from jaxnets import runs

    write_json(args.out, {"command": "python -m benchmarks.convnet_breakdown", "batch": b, "layers": rows,
                          "total_s": whole, "shares": shares, "gemm_gflops": gflops, "machine": runs.environment_info()})


if __name__ == "__main__":
    main()
