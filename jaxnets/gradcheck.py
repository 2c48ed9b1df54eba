"""Check a hand-written backward pass against ``jax.vjp`` and finite differences, in float64.

A layer you wrote, in the conventions of :mod:`jaxnets.layers`::

    from jaxnets import gradcheck
    report = gradcheck.check(my_layer, my_layer_backward, x, params)
    print(report)              # the worst error of each input and parameter leaf
    assert report.ok, report

* With parameters: ``forward(params, x) -> (y, cache)`` and
  ``backward(params, cache, dy) -> (dparams, dx)`` (as ``linear``/``linear_backward``).
* Without (``params=None``): ``forward(x) -> (y, cache)`` and ``backward(cache, dy) -> dx``
  (as ``relu``/``relu_backward``).
* Static settings given to :func:`check` as keywords go to both (``stride=2``); wrap
  anything else in a lambda, e.g. batch norm:
  ``check(lambda p, x: L.batch_norm(p, state, x, train=True)[:2],
  lambda p, c, dy: L.batch_norm_backward(p, c, dy, train=True), x, params)``.

:func:`check_model` checks a whole model's hand-written gradient of the loss
(:func:`jaxnets.models.manual_value_and_grad`), :func:`check_grad` any function given as
``f(*primals) -> y`` and ``f_grad(*primals, dy) -> cotangents``.

What is compared
----------------
The backward is called with a random ``dy`` (standard normal, seeded; or the one given) and
compared, leaf by leaf, with

1. ``jax.vjp`` of the forward at the same ``dy`` (every entry);
2. central finite differences of ``sum(forward(...) * dy)``, ``(f(v + h) - f(v - h)) / 2h``,
   at ``coords`` random entries of every leaf (all of them for smaller leaves).

Each by the relative error of the leaf (:func:`rel_error`)::

    error(a, b) = max_i |a_i - b_i| / max(floor, max_i |a_i| + max_i |b_i|)

normalised by the leaf's scale rather than entry by entry, so entries that are zero up to
rounding (sums that cancel) do not dominate; ``floor`` (1e-8) keeps a gradient that is zero
in exact arithmetic (a bias in front of batch norm) from comparing noise with noise. For
finite differences the floor is ``noise / fd_tol`` with ``noise = 10 eps sum|y * dy| / h``
(their rounding error, ``eps`` of float64): a difference below that noise never fails. A
correct backward gives ~1e-15 against ``jax.vjp`` and ~1e-10 against finite differences
(their truncation error, ``h = 1e-5``); a wrong one gives ~1. Near a kink (ReLU at 0, a tie
in a max) finite differences are wrong instead: use inputs away from kinks.

Everything runs in float64: the inputs are converted (a float32 model is checked as its
float64 twin) inside ``jax.enable_x64``, so the caller need not enable it; a forward that
still returns another dtype (it casts) is refused with ``ValueError``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxnets import models as M
from jaxnets import network as nn

#: Default tolerances: against ``jax.vjp`` and against finite differences.
TOL = 1e-6
FD_TOL = 1e-5


def rel_error(a, b, floor=1e-8):
    """``max|a - b| / max(floor, max|a| + max|b|)``, the worst over the leaves of two pytrees
    of the same structure (see the module docstring)."""
    errors = jax.tree_util.tree_map(lambda x, y: _leaf_error(np.asarray(x), np.asarray(y), floor), a, b)
    return max(jax.tree_util.tree_leaves(errors), default=0.0)


def _leaf_error(a, b, floor=1e-8):
    if a.size == 0:
        return 0.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.max(np.abs(a - b)) / max(floor, np.max(np.abs(a)) + np.max(np.abs(b))))


@dataclasses.dataclass(frozen=True)
class Row:
    """One leaf of the inputs/parameters: its name and shape, ``max|grad|`` of the
    hand-written gradient, its errors against ``jax.vjp`` and finite differences, and how
    many entries the finite differences checked."""

    name: str
    shape: tuple
    scale: float
    vjp_error: float
    fd_error: float
    fd_entries: int


@dataclasses.dataclass(frozen=True, repr=False)
class Report:
    """The result of a check: one :class:`Row` per leaf; ``ok`` when every error is within
    its tolerance. ``str(report)`` is a small table."""

    rows: tuple
    tol: float = TOL
    fd_tol: float = FD_TOL

    def row_ok(self, row):
        return row.vjp_error <= self.tol and row.fd_error <= self.fd_tol

    @property
    def ok(self):
        return all(self.row_ok(row) for row in self.rows)

    @property
    def worst(self):
        """``(worst error vs jax.vjp, worst error vs finite differences)``."""
        return (max((r.vjp_error for r in self.rows), default=0.0),
                max((r.fd_error for r in self.rows), default=0.0))

    def __str__(self):
        head = (f"gradcheck: {'ok' if self.ok else 'FAILED'} (tolerance {self.tol:.0e} vs jax.vjp, "
                f"{self.fd_tol:.0e} vs finite differences)")
        table = [("leaf", "shape", "max|grad|", "vs jax.vjp", "vs finite diff", "")]
        for r in self.rows:
            table.append((r.name, str(r.shape), f"{r.scale:.2e}", f"{r.vjp_error:.1e}",
                          f"{r.fd_error:.1e} ({r.fd_entries} entries)", "" if self.row_ok(r) else "FAIL"))
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
        note = "  error = max|a - b| / max(1e-8, max|a| + max|b|) over the leaf (see jaxnets.gradcheck)"
        return "\n".join([head, *lines, note])

    __repr__ = __str__  # what pytest shows for ``assert report.ok, report``


def _to_float64(tree, what):
    def convert(leaf):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"gradcheck: {what} must be floating point, got a {leaf.dtype} array of shape "
                             f"{tuple(leaf.shape)}; close over integer inputs (labels) in a lambda instead")
        return leaf.astype(jnp.float64)

    return jax.tree_util.tree_map(convert, tree)


def check_grad(f, f_grad, primals, *, names=None, dy=None, seed=0, coords=12, h=1e-5, tol=TOL, fd_tol=FD_TOL):
    """Check ``f_grad(*primals, dy)`` (the cotangents of ``primals``, a tuple with one pytree
    per primal) against ``jax.vjp(f, *primals)`` and finite differences; returns a :class:`Report`.

    ``f(*primals) -> y`` is one array. ``names`` name the primals in the report (default
    ``p0``, ``p1``, ...). ``dy``: the cotangent (default standard normal from ``seed``);
    ``coords``: entries of each leaf checked by finite differences, with step ``h``.
    """
    names = tuple(names) if names is not None else tuple(f"p{i}" for i in range(len(primals)))
    if len(names) != len(primals):
        raise ValueError(f"gradcheck: {len(names)} names for {len(primals)} primals")
    with jax.enable_x64(True):
        primals = tuple(_to_float64(p, f"the input {n!r}") for p, n in zip(primals, names))
        out = jax.eval_shape(f, *primals)
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise ValueError(f"gradcheck: the forward must give one array, got {type(out).__name__}")
        if out.dtype != jnp.float64:
            raise ValueError(f"gradcheck: the forward returned {out.dtype} for float64 inputs; the check "
                             "needs float64 throughout (does it cast, or create float32 constants?)")
        if dy is None:
            dy = np.random.default_rng(seed).standard_normal(out.shape)
        dy = jnp.asarray(dy, jnp.float64)
        if dy.shape != out.shape:
            raise ValueError(f"gradcheck: dy has shape {tuple(dy.shape)}, the forward's output {tuple(out.shape)}")

        index, fd_where = _fd_entries(primals, coords, seed)

        @jax.jit  # one compilation for everything: it dominates the time of a small check
        def run(primals, dy, index):
            y, vjp_fn = jax.vjp(f, *primals)
            fd = _finite_differences(f, primals, dy, index, h)
            return vjp_fn(dy), tuple(f_grad(*primals, dy)), jnp.sum(jnp.abs(y * dy)), fd

        expected, got, magnitude, fd = run(primals, dy, index)
        _check_structure(expected, got, names)
        fd = np.asarray(fd)

    fd_floor = max(1e-8, 10 * np.finfo(np.float64).eps * float(magnitude) / h / fd_tol)
    rows = []
    leaves = [(name + jax.tree_util.keystr(path), want)
              for name, tree in zip(names, expected) for path, want in jax.tree_util.tree_flatten_with_path(tree)[0]]
    for (name, want), have, (offset, picks) in zip(leaves, jax.tree_util.tree_leaves(got), fd_where):
        want, have = np.asarray(want), np.asarray(have)
        analytic = have.ravel()[picks]
        rows.append(Row(name, tuple(want.shape), float(np.max(np.abs(have), initial=0.0)),
                        _leaf_error(want, have), _leaf_error(fd[offset:offset + len(picks)], analytic, fd_floor),
                        len(picks)))
    return Report(tuple(rows), tol, fd_tol)


def _check_structure(expected, got, names):
    for name, e, g in zip(names, expected, got):
        se, sg = jax.tree_util.tree_structure(e), jax.tree_util.tree_structure(g)
        if se != sg:
            raise ValueError(f"gradcheck: the gradient of {name!r} has the structure {sg}, but {name!r} has {se}")
        for a, b in zip(jax.tree_util.tree_leaves(e), jax.tree_util.tree_leaves(g)):
            if a.shape != b.shape:
                raise ValueError(f"gradcheck: a gradient of {name!r} has shape {tuple(b.shape)}, "
                                 f"the input's leaf {tuple(a.shape)}")


def _fd_entries(primals, coords, seed):
    """``coords`` random entries of each leaf of ``primals``: their indices into the
    flattened primals, and per leaf (offset of its entries among them, entries in the leaf)."""
    rng = np.random.default_rng(seed)
    where, index, start, offset = [], [], 0, 0
    for leaf in jax.tree_util.tree_leaves(primals):
        picks = np.sort(rng.choice(leaf.size, size=min(coords, leaf.size), replace=False))
        where.append((offset, picks))
        index.append(start + picks)
        start, offset = start + leaf.size, offset + len(picks)
    return np.concatenate(index) if index else np.zeros(0, int), where


def _finite_differences(f, primals, dy, index, h):
    """Central differences of ``sum(f(*primals) * dy)`` in the flattened primals' entries ``index``."""
    if index.size == 0:
        return jnp.zeros(0)
    flat, unravel = ravel_pytree(primals)
    objective = lambda v: jnp.sum(f(*unravel(v)) * dy)
    one = lambda i: (objective(flat.at[i].add(h)) - objective(flat.at[i].add(-h))) / (2 * h)
    # Perturbed copies of all the inputs at once, up to ~4M numbers.
    batch = max(1, 4_000_000 // max(flat.size, 1))
    return jax.vmap(one)(index) if batch >= index.size else jax.lax.map(one, index, batch_size=batch)


def check(forward, backward, x, params=None, *, dy=None, seed=0, coords=12, h=1e-5, tol=TOL, fd_tol=FD_TOL,
          **settings):
    """Check a layer's ``backward`` against ``jax.vjp`` and finite differences of ``forward``
    at ``x`` (and ``params``); returns a :class:`Report`.

    Conventions as in the module docstring: with ``params``, ``forward(params, x, **settings)
    -> (y, cache)`` and ``backward(params, cache, dy, **settings) -> (dparams, dx)``; with
    ``params=None``, ``forward(x, **settings) -> (y, cache)`` and
    ``backward(cache, dy, **settings) -> dx``. ``x`` and ``params`` may be any pytrees of
    float arrays (float32 ones are checked in float64). Other arguments: see :func:`check_grad`.
    """
    def output(result, what):
        if not (isinstance(result, tuple) and len(result) == 2):
            raise ValueError(f"gradcheck.check: {what} must return a pair as jaxnets layers do, "
                             f"got {type(result).__name__}" + (f" of length {len(result)}" if
                                                               isinstance(result, tuple) else ""))
        return result

    kw = dict(dy=dy, seed=seed, coords=coords, h=h, tol=tol, fd_tol=fd_tol)
    if params is None:
        f = lambda x: output(forward(x, **settings), "forward(x)")[0]

        def f_grad(x, dy):
            return (backward(output(forward(x, **settings), "forward(x)")[1], dy, **settings),)

        return check_grad(f, f_grad, (x,), names=("x",), **kw)
    f = lambda p, x: output(forward(p, x, **settings), "forward(params, x)")[0]

    def f_grad(p, x, dy):
        cache = output(forward(p, x, **settings), "forward(params, x)")[1]
        return output(backward(p, cache, dy, **settings), "backward(params, cache, dy)")

    return check_grad(f, f_grad, (params, x), names=("params", "x"), **kw)


def check_model(model, params, state, x, labels, *, seed=0, coords=6, h=1e-5, tol=TOL, fd_tol=FD_TOL,
                **loss_kwargs):
    """Check a model's hand-written gradient of the loss (:func:`jaxnets.models.manual_value_and_grad`)
    against ``jax.vjp`` (i.e. ``jax.grad``) and finite differences of
    :func:`jaxnets.models.loss`, with respect to every parameter leaf; returns a :class:`Report`.

    ``loss_kwargs`` (``train``, ``key``, ``label_smoothing``, ``l2``, ...) go to both. The
    model's float32 params, state and ``x`` are checked as float64; batch norm in training
    mode needs a batch with more than one value per channel.
    """
    with jax.enable_x64(True):
        state = _to_float64(state, "the state")
        x = _to_float64(x, "x")
        f = lambda p: M.loss(model, p, state, x, labels, **loss_kwargs)[0]

        def f_grad(p, dloss):
            grads = M.manual_value_and_grad(model, p, state, x, labels, **loss_kwargs)[1]
            return (jax.tree_util.tree_map(lambda g: g * dloss, grads),)

        return check_grad(f, f_grad, (params,), names=("params",), dy=1.0, seed=seed, coords=coords, h=h,
                          tol=tol, fd_tol=fd_tol)


def check_layer(layer, x, *, params=None, state=None, train=True, key=None, seed=0, coords=12, h=1e-5, tol=TOL,
                fd_tol=FD_TOL):
    """Check a :mod:`jaxnets.network` layer or composition: its ``backward`` (parameter and
    input gradients) against ``jax.vjp`` and finite differences of its ``forward`` at ``x``;
    returns a :class:`Report`.

    ``params``/``state`` default to ``layer.init`` from ``PRNGKey(seed)`` for inputs of
    ``x``'s per-example shape; ``train`` and ``key`` (for dropout) make the call's
    :class:`~jaxnets.network.Context`. Other arguments: see :func:`check_grad`.
    """
    if params is None:
        keys = iter(jax.random.split(jax.random.PRNGKey(seed), max(layer.weight_keys(), 1)))
        params, init_state, _ = layer.init(keys, tuple(x.shape[1:]), jnp.float32)
        state = init_state if state is None else state
    state = {} if state is None else state
    ctx = nn.Context(train, key)
    kw = dict(seed=seed, coords=coords, h=h, tol=tol, fd_tol=fd_tol)
    with jax.enable_x64(True):
        state = _to_float64(state, "the state")
        if not jax.tree_util.tree_leaves(params):
            return check(lambda x: layer.forward(params, state, x, ctx)[:2],
                         lambda cache, dy: layer.backward(params, cache, dy, ctx)[1], x, **kw)
        return check(lambda p, x: layer.forward(p, state, x, ctx)[:2],
                     lambda p, cache, dy: layer.backward(p, cache, dy, ctx), x, params, **kw)
