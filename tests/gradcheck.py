"""Gradient-check helpers shared by the layer and model tests (float64 throughout)."""

import jax
import jax.numpy as jnp
import numpy as np


def rel_error(a, b, floor=1e-8):
    """max|a - b| / max(floor, max|a| + max|b|), the worst over all leaves of two pytrees.

    Normalised by each leaf's scale rather than element by element, so entries that are
    zero up to rounding (sums that cancel) do not dominate. ``floor`` keeps leaves that are
    zero in exact arithmetic (the bias of a linear layer followed by batch norm) from
    comparing rounding noise with rounding noise.
    """
    errors = jax.tree_util.tree_map(
        lambda x, y: float(
            np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0)
            / max(floor, np.max(np.abs(x), initial=0.0) + np.max(np.abs(y), initial=0.0))
        ),
        a,
        b,
    )
    return max(jax.tree_util.tree_leaves(errors), default=0.0)


def assert_same_structure(a, b):
    sa, sb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert sa == sb, f"pytree structures differ:\n{sa}\n{sb}"
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape, (x.shape, y.shape)


def vjp_error(forward, manual, primals, seed=0):
    """Compare ``manual(*primals, dy)`` with ``jax.vjp(forward, *primals)`` for a random dy.

    ``forward(*primals) -> y`` (an array); ``manual(*primals, dy)`` returns the cotangents
    of ``primals`` as a tuple. Both run in one jitted call: compiling op by op would
    dominate the suite's time.
    """

    # Test data comes from numpy: compiling jax.random's threefry costs seconds per shape.
    out = jax.eval_shape(forward, *primals)
    dy = jnp.asarray(np.random.default_rng(seed).standard_normal(out.shape), out.dtype)

    @jax.jit
    def both(primals, dy):
        _, vjp_fn = jax.vjp(forward, *primals)
        return vjp_fn(dy), tuple(manual(*primals, dy))

    expected, got = both(tuple(primals), dy)
    assert_same_structure(expected, got)
    return rel_error(expected, got)


def finite_difference_error(forward, manual, primals, *, h=1e-5, coords=12, seed=0):
    """Compare ``manual`` with central differences of sum(forward(*primals) * dy).

    Checks ``coords`` random coordinates of every leaf of every primal.
    """
    y = jax.eval_shape(forward, *primals)
    dy = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(y.shape), y.dtype)
    objective = jax.jit(lambda *p: jnp.sum(forward(*p) * dy))
    got = jax.jit(manual)(*primals, dy)
    leaves, treedef = jax.tree_util.tree_flatten(tuple(primals))
    got_leaves = jax.tree_util.tree_leaves(tuple(got))
    numeric, analytic = [], []
    rng = np.random.default_rng(seed)
    for i, (leaf, grad_leaf) in enumerate(zip(leaves, got_leaves)):
        flat = np.asarray(leaf).ravel()
        for j in rng.choice(flat.size, size=min(coords, flat.size), replace=False):
            def shifted(delta):
                moved = flat.copy()
                moved[j] += delta
                new_leaves = list(leaves)
                new_leaves[i] = jnp.asarray(moved.reshape(leaf.shape))
                return float(objective(*jax.tree_util.tree_unflatten(treedef, new_leaves)))

            numeric.append((shifted(h) - shifted(-h)) / (2 * h))
            analytic.append(float(np.asarray(grad_leaf).ravel()[j]))
    numeric, analytic = np.array(numeric), np.array(analytic)
    return float(np.max(np.abs(numeric - analytic)) / max(1e-8, np.max(np.abs(numeric)) + np.max(np.abs(analytic))))
