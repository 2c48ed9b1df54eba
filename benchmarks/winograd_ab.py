"""Same-process A/B of one 3x3 conv layer, forward + backward: F(4x4) vs F(2x2) vs im2col+GEMM (medians of 5, alternated)."""
import time, jax, jax.numpy as jnp, numpy as np
from jaxnets import _cpu_conv as K, conv as C
def gemm(x, w):
    return C.conv2d({"w": w, "b": jnp.zeros(w.shape[-1])}, x, stride=1, padding=1, impl="gemm")[0]
import sys
SHAPES = [(128, 32, 64, 64), (128, 16, 128, 128), (128, 8, 256, 256), (128, 4, 512, 512), (128, 15, 256, 256),
          (128, 7, 256, 256), (128, 6, 256, 256), (128, 31, 64, 64), (128, 64, 64, 64)]
for (b, h, c, o) in SHAPES[int(sys.argv[1]) if len(sys.argv) > 1 else 0:]:
    r = np.random.default_rng(0)
    x = jnp.float32(r.standard_normal((b, h, h, c))); w = jnp.float32(r.standard_normal((3, 3, c, o)) / 30)
    dy = jnp.float32(r.standard_normal((b, h, h, o)))
    fs = {"F4": jax.jit(lambda x, w, dy: (K.winograd4_conv(x, w), K.winograd4_conv_backward(x, w, dy))),
          "gemm": jax.jit(lambda x, w, dy: jax.vjp(gemm, x, w)[1](dy) + (gemm(x, w),))}
    if h % 2 == 0:
        fs["F2"] = jax.jit(lambda x, w, dy: (K.winograd_conv(x, w), K.winograd_conv_backward(x, w, dy)))
    for f in fs.values(): jax.block_until_ready(f(x, w, dy))
    t = {k: [] for k in fs}
    for _ in range(5):
        for k, f in fs.items():
            s = time.perf_counter(); jax.block_until_ready(f(x, w, dy)); t[k].append(time.perf_counter() - s)
    print((b, h, c, o), {k: "%.1f ms" % (1e3 * np.median(v)) for k, v in t.items()}, flush=True)
