"""XLA:CPU settings tried for the CPU paths, measured side by side in one run.

    python -m benchmarks.xla_flags            # writes results/xla_cpu_flags.json

XLA reads ``XLA_FLAGS`` once, when the backend starts, so each setting runs in its own
subprocess (one after another, never two at once) that times, after warm-up, the median of
``--repeats`` calls of:

* ``gemm``: a 2048^3 fp32 matmul;
* ``mlp_gemm``: the MLP's first-layer product, (200, 3072) x (3072, 512);
* ``conv_fwd`` / ``conv_fwd_bwd``: ``lax.conv_general_dilated`` 3x3 SAME on (64, 16, 16, 128)
  -> 256 channels, forward and forward + both input and kernel gradients (``jax.grad``);
* ``gemm_conv_fwd_bwd``: the same layer through ``jaxnets.conv`` (im2col + GEMM) with its
  hand-written backward.

Rates are GFLOP/s (the backward counted as two forwards). The settings are XLA's CPU
library options of the installed jaxlib (XNNPACK, YNNPACK, oneDNN, the XNNPACK graph
fusion) and Eigen's single-threaded mode as a reference.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.common import write_json

RESULTS = Path(__file__).resolve().parents[1] / "results" / "xla_cpu_flags.json"

SETTINGS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnn_fusion_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "ynn_dot_conv": "--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot,individual_convolution",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_fusion_dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "eigen_single_thread": "--xla_cpu_multi_thread_eigen=false",
}


def measure(repeats):
    """Runs inside the subprocess: the rates under this process's XLA_FLAGS."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import median_seconds
    from jaxnets import conv

    def median(fn):
        return median_seconds(fn, repeats)

    keys = jax.random.split(jax.random.key(0), 6)
    out = {}
    a, b = jax.random.normal(keys[0], (2048, 2048)), jax.random.normal(keys[1], (2048, 2048))
    mm = jax.jit(jnp.dot)
    out["gemm"] = 2 * 2048**3 / median(lambda: mm(a, b)) / 1e9
    x, w = jax.random.normal(keys[2], (200, 3072)), jax.random.normal(keys[3], (3072, 512))
    out["mlp_gemm"] = 2 * 200 * 3072 * 512 / median(lambda: mm(x, w)) / 1e9

    xc, wc = jax.random.normal(keys[4], (64, 16, 16, 128)), jax.random.normal(keys[5], (3, 3, 128, 256))
    flops = 2 * 64 * 16 * 16 * 9 * 128 * 256

    def native(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    fwd = jax.jit(native)
    fwd_bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(native(x, w) ** 2), argnums=(0, 1)))
    out["conv_fwd"] = flops / median(lambda: fwd(xc, wc)) / 1e9
    out["conv_fwd_bwd"] = 3 * flops / median(lambda: fwd_bwd(xc, wc)) / 1e9

    @jax.jit
    def gemm_fwd_bwd(x, w):
        y, cache = conv.conv2d({"w": w}, x, padding="SAME", impl="gemm")
        return conv.conv2d_backward({"w": w}, cache, 2 * y, padding="SAME", impl="gemm")

    out["gemm_conv_fwd_bwd"] = 3 * flops / median(lambda: gemm_fwd_bwd(xc, wc)) / 1e9
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median taken)")
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(SETTINGS))
    parser.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return
    names = args.only.split(",") if args.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    results = {"command": "python -m benchmarks.xla_flags " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": {}}
    root = Path(__file__).resolve().parents[1]
    print(f"{'setting':22s} {'gemm':>7s} {'mlp_gemm':>9s} {'conv_fwd':>9s} {'conv_f+b':>9s} {'gemm_conv_f+b':>14s}  GFLOP/s")
    for name in names:
        env = dict(os.environ, XLA_FLAGS=SETTINGS[name])
        proc = subprocess.run([sys.executable, "-m", "benchmarks.xla_flags", "--child", "--repeats", str(args.repeats)],
                              cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results["settings"][name] = {"flags": SETTINGS[name], "error": last}
            print(f"{name:22s} failed: {last}")
            continue
        rates = json.loads(proc.stdout.strip().splitlines()[-1])
        results["settings"][name] = {"flags": SETTINGS[name], **rates}
        print(f"{name:22s} {rates['gemm']:7.1f} {rates['mlp_gemm']:9.1f} {rates['conv_fwd']:9.1f} "
              f"{rates['conv_fwd_bwd']:9.1f} {rates['gemm_conv_fwd_bwd']:14.1f}", flush=True)
    from jaxnets import runs

    results["machine"] = runs.environment_info()
    write_json(args.out, results)


if __name__ == "__main__":
    main()
