"""Dense layers, activations, normalisation, dropout and losses, each with a hand-written backward.

Conventions (shared with :mod:`jaxnets.conv`):

* Every layer is a pair of pure functions, ``foo`` and ``foo_backward``.
* ``foo(...) -> (y, cache)``: the output and what the backward needs. Callers that only
  want the output write ``y, _ = foo(...)``; under ``jax.jit`` an unused cache costs nothing.
* Layers with parameters take a params dict first: ``linear(params, x)`` and
  ``linear_backward(params, cache, dy) -> (dparams, dx)`` where ``dparams`` has exactly
  the structure of ``params``. Parameter-free layers: ``relu_backward(cache, dy) -> dx``.
  Static settings (slopes, rates, strides) are keyword arguments of both functions.
* Batch-first arrays; images are NHWC. No ``jax.grad``/``jax.vjp`` inside a backward: the
  math in each docstring is what the code computes.
* Bad shapes or names raise ``ValueError`` at trace time (see :mod:`jaxnets._checks`).
"""

import jax
import jax.numpy as jnp

from jaxnets._checks import check_choice, check_dim, check_ndim

# ----------------------------------------------------------------------------- linear


def linear_init(key, fan_in, fan_out, *, scheme="kaiming", dtype=jnp.float32):
    """Parameters ``{"w": (fan_in, fan_out), "b": (fan_out,)}`` of a linear layer.

    Schemes: ``"kaiming"`` w ~ N(0, 2/fan_in) (He et al., for ReLU-like units);
    ``"lecun"`` w ~ N(0, 1/fan_in) (used for the first layer, whose input is not a ReLU
    output); ``"pytorch"`` w, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``torch.nn.Linear``);
    ``"course"`` w ~ N(0, 1e-4^2), the old course default. Biases are zero except for
    ``"pytorch"``.
    """
    check_choice("linear_init", "init scheme", scheme, INIT_SCHEMES)
    wkey, bkey = jax.random.split(key)
    shape = (fan_in, fan_out)
    b = jnp.zeros((fan_out,), dtype)
    if scheme == "kaiming":
        w = jax.random.normal(wkey, shape, dtype) * jnp.sqrt(2.0 / fan_in).astype(dtype)
    elif scheme == "lecun":
        w = jax.random.normal(wkey, shape, dtype) * jnp.sqrt(1.0 / fan_in).astype(dtype)
    elif scheme == "course":
        w = jax.random.normal(wkey, shape, dtype) * jnp.asarray(1e-4, dtype)
    else:  # pytorch
        bound = 1.0 / jnp.sqrt(fan_in)
        w = jax.random.uniform(wkey, shape, dtype, -bound, bound)
        b = jax.random.uniform(bkey, (fan_out,), dtype, -bound, bound)
    return {"w": w, "b": b}


INIT_SCHEMES = ("kaiming", "lecun", "pytorch", "course")


def linear(params, x):
    """y = x W + b for x of shape (B, fan_in). Cache: x."""
    check_ndim("linear", "input", x, 2)
    check_dim("linear", "input", x, 1, params["w"].shape[0], "features")
    return x @ params["w"] + params["b"], x


def linear_backward(params, cache, dy):
    """dW = x^T dy,  db = sum_batch dy,  dx = dy W^T."""
    x = cache
    return {"w": x.T @ dy, "b": dy.sum(axis=0)}, dy @ params["w"].T
