"""Adding a layer to jaxnets: GELU with its hand-written backward, checked by jaxnets.gradcheck.

    python examples/gelu_layer.py        # prints the reports; exit status 1 if a check fails

A layer is a pair of pure functions in the conventions of :mod:`jaxnets.layers`:
``gelu(x) -> (y, cache)`` and ``gelu_backward(cache, dy) -> dx`` (a parameter-free layer),
or, with parameters, ``dense_gelu(params, x) -> (y, cache)`` and
``dense_gelu_backward(params, cache, dy) -> (dparams, dx)``. :func:`jaxnets.gradcheck.check`
compares the backward with ``jax.vjp`` and with finite differences of the forward, in
float64, and returns a report: the worst relative error of every input and parameter leaf.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import gradcheck
from jaxnets import layers as L


# GELU itself is a library layer now (jaxnets.layers.gelu / gelu_backward; network.gelu()):
# y = x Phi(x), dx = dy (Phi(x) + x phi(x)). This example composes it with a linear layer.
gelu, gelu_backward = L.gelu, L.gelu_backward


def dense_gelu(params, x):
    """y = gelu(x W + b): a linear layer and the new activation, composed. Cache: both caches."""
    h, linear_cache = L.linear(params, x)
    y, gelu_cache = gelu(h)
    return y, (linear_cache, gelu_cache)


def dense_gelu_backward(params, cache, dy):
    """The chain rule: the activation's backward first, then the linear layer's."""
    linear_cache, gelu_cache = cache
    return L.linear_backward(params, linear_cache, gelu_backward(gelu_cache, dy))


def main():
    rng = np.random.default_rng(0)
    x = 2 * rng.standard_normal((8, 16))
    params = L.linear_init(jax.random.PRNGKey(0), 16, 5, scheme="pytorch")
    reports = {
        "gelu": gradcheck.check(gelu, gelu_backward, x),
        "dense_gelu": gradcheck.check(dense_gelu, dense_gelu_backward, x, params),
    }
    for name, report in reports.items():
        print(f"{name}: {report}\n")
    # The forward also agrees with JAX's own GELU (exact form), a check of the formula itself.
    same = np.allclose(gelu(x)[0], jax.nn.gelu(x, approximate=False), rtol=1e-5, atol=1e-6)
    print(f"gelu(x) equals jax.nn.gelu(x, approximate=False): {same}")
    return 0 if same and all(r.ok for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
