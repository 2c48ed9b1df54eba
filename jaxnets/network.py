"""Networks as data: layers that carry their hand-written backward, and combinators that
compose them, forward and backward.

In the spirit of ``jax.example_libraries.stax`` (``serial``, ``FanOut``/``FanInSum``) and
of the UvA course's module list (``for module in reversed(self.modules): dout =
module.backward(dout)``), generalised to branches: every :class:`Layer` has

* ``init(keys, in_shape, dtype) -> (params, state, out_shape)``: shapes are per example
  (no batch axis); a layer that draws weights takes ``next(keys)``, in forward order;
* ``forward(params, state, x, ctx) -> (y, cache, new_state)``;
* ``backward(params, cache, dy, ctx) -> (dparams, dx)``, ``dparams`` with exactly the
  structure of ``params``.

``ctx`` is a :class:`Context`: the static ``train`` flag, the dropout ``key`` and an
optional traced ``dropout_rate``. The leaf layers here wrap the function pairs of
:mod:`jaxnets.layers` and :mod:`jaxnets.conv` (whose docstrings state each backward's
formula); the combinators :class:`Serial` and :class:`Residual` write their own backward:
the reverse walk, and the sum of the two paths' input gradients. Every layer is a frozen
dataclass, so a whole network is a hashable value, usable as a static ``jax.jit`` argument.

Params and state are plain nested dicts and lists with readable keys:

* :func:`serial` with named items (``("conv1", Conv(64))``) keeps a dict; items without a
  name must have no params and no state (activations, pools), or be dict containers
  themselves, whose keys are then merged in (how a ResNet block's ``conv1``/``bn1`` and
  its ``downsample`` sit side by side, as in torchvision).
* :func:`serial` with no named item keeps a list, one entry for each item that has params
  or state (pools and activations take no entry): ``layer2.0.conv1``.
* A dict leaves out a child without params (or, in ``state``, without state); a list keeps
  its entries in both trees, ``{}`` where there is nothing.

Dropout keys: a list gives its ``i``-th item ``fold_in(key, i)``; a dict passes the key
unchanged to its one stochastic item, or ``fold_in(key, i)`` to each when there are more.

A whole model is a :class:`Network` (a layer plus its input shape): ``init``, ``apply``,
``forward`` and ``backward`` as every jaxnets model; :mod:`jaxnets.models` defines the
families as compositions and :func:`jaxnets.models.manual_value_and_grad` works on any.
:func:`split_head` cuts a network's top-level composition into backbone and head, and
:class:`HeadOnly` is the network with its backbone frozen (``--freeze``'s linear probe).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxnets import _init_fast
from jaxnets import conv as conv_ops
from jaxnets import layers as layer_ops
from jaxnets._checks import check_choice


class Context(NamedTuple):
    """What a forward/backward call knows besides its arrays: ``train`` (a Python bool),
    the PRNG ``key`` of stochastic layers (or None) and ``dropout_rate``, which overrides
    every :class:`Dropout` layer's rate when given (a traced sweep value)."""

    train: bool
    key: Any = None
    dropout_rate: Any = None


class CostRow(NamedTuple):
    """One layer of a forward pass, per example: its dotted ``path`` in the params tree, the
    layer, its input and output shapes, and its multiply-adds."""

    path: str
    layer: Any
    in_shape: tuple
    out_shape: tuple
    macs: int


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else str(name)


class Layer:
    """Base of every composable layer. Subclasses are frozen dataclasses and set
    ``has_params``/``has_state``/``stochastic``; a layer with params overrides ``init``;
    every layer overrides ``forward`` and ``backward``."""

    has_params = False
    has_state = False
    stochastic = False

    def init(self, keys, in_shape, dtype):
        return {}, {}, self.output_shape(in_shape)

    def output_shape(self, in_shape):
        """The per-example output shape (default: traced through ``forward`` by ``jax.eval_shape``)."""
        x = jax.ShapeDtypeStruct((2, *in_shape), jnp.float32)
        y = jax.eval_shape(lambda x: self.forward({}, {}, x, Context(train=False))[0], x)
        return tuple(y.shape[1:])

    def forward(self, params, state, x, ctx):
        raise NotImplementedError

    def backward(self, params, cache, dy, ctx):
        raise NotImplementedError

    def weight_keys(self):
        """How many PRNG keys ``init`` takes."""
        return 0

    def macs(self, in_shape, out_shape):
        """Multiply-adds per example (0 for layers that do no products)."""
        return 0

    def kept_floats(self, in_shape, out_shape):
        """Values per example this layer's output adds to memory (default: the whole output)."""
        return math.prod(out_shape)

    def cost_rows(self, in_shape, path=""):
        """:class:`CostRow` of every leaf layer, in forward order; returns ``(rows, out_shape)``."""
        out_shape = self.output_shape(in_shape)
        return [CostRow(path, self, tuple(in_shape), out_shape, self.macs(in_shape, out_shape))], out_shape


# ------------------------------------------------------------------------ leaf layers


@dataclasses.dataclass(frozen=True)
class Linear(Layer):
    """y = x W + b (:func:`jaxnets.layers.linear`); params ``{"w": (fan_in, features), "b"}``.
    ``bias=False`` for a layer followed by batch norm."""

    features: int
    init_scheme: str = "kaiming"
    bias: bool = True
    has_params = True

    def init(self, keys, in_shape, dtype):
        if len(in_shape) != 1:
            raise ValueError(f"Linear: expects flat inputs (features,), got per-example shape {tuple(in_shape)}; "
                             "put a Flatten() in front")
        params = layer_ops.linear_init(next(keys), in_shape[0], self.features, scheme=self.init_scheme,
                                       bias=self.bias, dtype=dtype)
        return params, {}, (self.features,)

    def weight_keys(self):
        return 1

    def output_shape(self, in_shape):
        return (self.features,)

    def forward(self, params, state, x, ctx):
        y, cache = layer_ops.linear(params, x)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return layer_ops.linear_backward(params, cache, dy)

    def macs(self, in_shape, out_shape):
        return in_shape[0] * self.features


@dataclasses.dataclass(frozen=True)
class Conv(Layer):
    """2-D convolution over NHWC (:func:`jaxnets.conv.conv2d`); params ``{"w": (kh, kw, cin,
    features), "b"}``. ``padding`` None is ``kernel // 2`` on every side (PyTorch's
    ``padding=k//2``; at stride 1 and an odd kernel the same as "SAME"); else as
    :func:`~jaxnets.conv.conv2d` takes it. ``impl`` picks the kernels (see :mod:`jaxnets.conv`)."""

    features: int
    kernel: int = 3
    stride: int = 1
    padding: Any = None
    init_scheme: str = "kaiming"
    bias: bool = True
    impl: str = "auto"
    has_params = True

    def __post_init__(self):
        check_choice("Conv", "impl", self.impl, conv_ops.CONV_IMPLS)

    @property
    def geometry(self):
        padding = self.kernel // 2 if self.padding is None else self.padding
        return dict(stride=self.stride, padding=padding, impl=self.impl)

    def init(self, keys, in_shape, dtype):
        params = conv_ops.conv2d_init(next(keys), in_shape[-1], self.features, self.kernel, scheme=self.init_scheme,
                                      bias=self.bias, dtype=dtype)
        return params, {}, self.output_shape(in_shape)

    def weight_keys(self):
        return 1

    def output_shape(self, in_shape):
        x = jax.ShapeDtypeStruct((1, *in_shape), jnp.float32)
        w = {"w": jax.ShapeDtypeStruct((self.kernel, self.kernel, in_shape[-1], self.features), jnp.float32)}
        return tuple(jax.eval_shape(lambda w, x: conv_ops.conv2d(w, x, **self.geometry)[0], w, x).shape[1:])

    def method(self, in_shape):
        """What computes this convolution on inputs of ``in_shape`` (``conv.conv_method``:
        ``"winograd"``, ``"gemm"`` or ``"xla"``), as recorded in its cache."""
        x = jax.ShapeDtypeStruct((1, *in_shape), jnp.float32)
        w = {"w": jax.ShapeDtypeStruct((self.kernel, self.kernel, in_shape[-1], self.features), jnp.float32)}
        return jax.eval_shape(lambda w, x: conv_ops.conv2d(w, x, **self.geometry)[1], w, x).method

    def forward(self, params, state, x, ctx):
        y, cache = conv_ops.conv2d(params, x, **self.geometry)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return conv_ops.conv2d_backward(params, cache, dy, **self.geometry)

    def macs(self, in_shape, out_shape):
        return math.prod(out_shape[:-1]) * self.kernel * self.kernel * in_shape[-1] * self.features


@dataclasses.dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch norm over every axis but the last (:func:`jaxnets.layers.batch_norm`): params
    ``{"gamma", "beta"}``, state ``{"mean", "var"}`` (running statistics, PyTorch's update).
    ``axis_name``: the mesh axis to synchronise the statistics over (inside ``shard_map``)."""

    momentum: float = 0.1
    eps: float = 1e-5
    axis_name: str | None = None
    has_params = True
    has_state = True

    def init(self, keys, in_shape, dtype):
        params, state = layer_ops.batch_norm_init(in_shape[-1], dtype)
        return params, state, tuple(in_shape)

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def forward(self, params, state, x, ctx):
        return layer_ops.batch_norm(params, state, x, train=ctx.train, momentum=self.momentum, eps=self.eps,
                                    axis_name=self.axis_name)

    def backward(self, params, cache, dy, ctx):
        return layer_ops.batch_norm_backward(params, cache, dy, train=ctx.train, axis_name=self.axis_name)


@dataclasses.dataclass(frozen=True)
class Function(Layer):
    """A parameter-free layer from a pair of functions in :mod:`jaxnets.layers`' convention:
    ``forward(x) -> (y, cache)`` and ``backward(cache, dy) -> dx`` (an activation of your own,
    say). ``name`` is how it prints."""

    forward_fn: Any
    backward_fn: Any
    name: str = ""

    def forward(self, params, state, x, ctx):
        y, cache = self.forward_fn(x)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return {}, self.backward_fn(cache, dy)


@dataclasses.dataclass(frozen=True)
class Activation(Layer):
    """An elementwise activation of :data:`jaxnets.layers.ACTIVATIONS` by name (relu, elu, ...)."""

    name: str = "relu"

    def __post_init__(self):
        check_choice("Activation", "activation", self.name, tuple(layer_ops.ACTIVATIONS))

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def forward(self, params, state, x, ctx):
        y, cache = layer_ops.ACTIVATIONS[self.name][0](x)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return {}, layer_ops.ACTIVATIONS[self.name][1](cache, dy)


def relu():
    return Activation("relu")


@dataclasses.dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout (:func:`jaxnets.layers.dropout`) at ``rate`` (``ctx.dropout_rate``
    overrides it); the identity in evaluation. ``axis_name``: the mesh axis the batch is
    split over (data parallel), so masks equal a single device's."""

    rate: float
    axis_name: str | None = None
    stochastic = True

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def forward(self, params, state, x, ctx):
        rate = self.rate if ctx.dropout_rate is None else ctx.dropout_rate
        y, cache = layer_ops.dropout(x, rate=rate, train=ctx.train, key=ctx.key, axis_name=self.axis_name)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return {}, layer_ops.dropout_backward(cache, dy)


@dataclasses.dataclass(frozen=True)
class MaxPool(Layer):
    """Max pool (:func:`jaxnets.conv.max_pool`): the gradient goes to each window's first maximum."""

    window: int = 3
    stride: int = 2
    padding: Any = 1
    impl: str = "auto"

    @property
    def geometry(self):
        return dict(window=self.window, stride=self.stride, padding=self.padding, impl=self.impl)

    def forward(self, params, state, x, ctx):
        y, cache = conv_ops.max_pool(x, **self.geometry)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return {}, conv_ops.max_pool_backward(cache, dy, **self.geometry)


@dataclasses.dataclass(frozen=True)
class AvgPool(Layer):
    """Average pool (:func:`jaxnets.conv.avg_pool`, padding counted as zeros)."""

    window: int = 3
    stride: int = 2
    padding: Any = 1

    @property
    def geometry(self):
        return dict(window=self.window, stride=self.stride, padding=self.padding)

    def forward(self, params, state, x, ctx):
        y, cache = conv_ops.avg_pool(x, **self.geometry)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return {}, conv_ops.avg_pool_backward(cache, dy, **self.geometry)


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    """(B, ...) -> (B, prod(...)) row-major (:func:`jaxnets.conv.flatten`)."""

    def output_shape(self, in_shape):
        return (math.prod(in_shape),)

    def kept_floats(self, in_shape, out_shape):
        return 0  # a reshape: the same values

    def forward(self, params, state, x, ctx):
        y, cache = conv_ops.flatten(x)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return {}, conv_ops.flatten_backward(cache, dy)


# ------------------------------------------------------------------------- containers


def _fold(key, i):
    return None if key is None else jax.random.fold_in(key, i)


@dataclasses.dataclass(frozen=True)
class _Container(Layer):
    """Layers held by name (a dict of params) or by position (a list); see the module docstring.

    ``items`` is a tuple of ``(name or None, layer)``; ``listed`` says which layout.
    """

    items: tuple
    listed: bool

    def __post_init__(self):
        names = [n for n, _ in self.items if n is not None]
        if self.listed and names:
            raise ValueError(f"{type(self).__name__}: a list layout takes no names, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"{type(self).__name__}: item names must be unique, got {names}")
        if not self.listed:
            for name, layer in self.items:
                if name is None and (layer.has_params or layer.has_state) and not _is_dict(layer):
                    raise ValueError(
                        f"{type(self).__name__}: {layer!r} has parameters or state, so it needs a name here: "
                        f"write (\"name\", layer)")

    @property
    def has_params(self):
        return self.listed or any(layer.has_params for _, layer in self.items)

    @property
    def has_state(self):
        return self.listed or any(layer.has_state for _, layer in self.items)

    @property
    def stochastic(self):
        return any(layer.stochastic for _, layer in self.items)

    def weight_keys(self):
        return sum(layer.weight_keys() for _, layer in self.items)

    # Where each item's params and state live.
    def _slots(self):
        """Per item: its list position (listed), its name, ``"inline"`` (merged dict) or None (no entry)."""
        slots, position = [], 0
        for name, layer in self.items:
            kept = layer.has_params or layer.has_state
            if self.listed:
                slots.append(position if kept else None)
                position += kept
            else:
                slots.append(name if name is not None and kept else ("inline" if kept else None))
        return slots

    def _take(self, tree, slot, present):
        if slot is None or (not self.listed and not present and slot != "inline"):
            return {}
        if slot == "inline":
            return tree
        return tree[slot]

    def _empty(self):
        return [] if self.listed else {}

    def _put(self, tree, slot, value, present, what):
        if slot is None:
            return
        if self.listed:
            tree.append(value)
        elif slot == "inline":
            clash = set(tree) & set(value)
            if clash:
                raise ValueError(f"{type(self).__name__}: merged {what} keys {sorted(clash)} appear twice")
            tree.update(value)
        elif present:
            tree[slot] = value

    def _ctx(self, ctx, i):
        if ctx.key is None or not self.items[i][1].stochastic:
            return ctx
        if self.listed or sum(layer.stochastic for _, layer in self.items) > 1:
            return ctx._replace(key=_fold(ctx.key, i))
        return ctx

    def _init_items(self, keys, shapes, dtype):
        """Init of items whose per-example input shapes are ``shapes``; returns params, state, out shapes."""
        params, state, outs = self._empty(), self._empty(), []
        for slot, (_, layer), shape in zip(self._slots(), self.items, shapes):
            p, s, out = layer.init(keys, shape, dtype)
            self._put(params, slot, p, layer.has_params, "params")
            self._put(state, slot, s, layer.has_state, "state")
            outs.append(out)
        return params, state, outs

    def _item_rows(self, i, in_shape, path):
        name, layer = self.items[i]
        slot = self._slots()[i]
        sub = path if slot == "inline" else _join(path, name if name is not None else (slot if slot is not None
                                                                                        else f"<{i}>"))
        return layer.cost_rows(in_shape, sub)


def _is_dict(layer):
    return isinstance(layer, _Container) and not layer.listed


@dataclasses.dataclass(frozen=True)
class Serial(_Container):
    """Layers applied one after the other: ``y = f_n(... f_2(f_1(x)))``.

    Backward, the chain rule as a reverse walk: ``dx_{k-1} = backward_k(dx_k)`` from the
    last layer to the first, each layer's parameter gradient kept at its place in the tree.
    """

    def init(self, keys, in_shape, dtype):
        params, state = self._empty(), self._empty()
        shape = tuple(in_shape)
        for slot, (_, layer) in zip(self._slots(), self.items):
            p, s, shape = layer.init(keys, shape, dtype)
            self._put(params, slot, p, layer.has_params, "params")
            self._put(state, slot, s, layer.has_state, "state")
        return params, state, tuple(shape)

    def output_shape(self, in_shape):
        shape = tuple(in_shape)
        for _, layer in self.items:
            shape = layer.output_shape(shape)
        return shape

    def forward(self, params, state, x, ctx):
        caches, new_state = [], self._empty()
        for i, (slot, (_, layer)) in enumerate(zip(self._slots(), self.items)):
            p = self._take(params, slot, layer.has_params)
            s = self._take(state, slot, layer.has_state)
            x, cache, s_new = layer.forward(p, s, x, self._ctx(ctx, i))
            self._put(new_state, slot, s_new, layer.has_state, "state")
            caches.append(cache)
        return x, tuple(caches), new_state

    def backward(self, params, cache, dy, ctx):
        slots = self._slots()
        grads = [None] * len(self.items)
        for i in reversed(range(len(self.items))):
            layer = self.items[i][1]
            grads[i], dy = layer.backward(self._take(params, slots[i], layer.has_params), cache[i], dy,
                                          self._ctx(ctx, i))
        out = self._empty()
        for slot, (_, layer), g in zip(slots, self.items, grads):
            self._put(out, slot, g, layer.has_params, "gradient")
        return out, dy

    def cost_rows(self, in_shape, path=""):
        rows, shape = [], tuple(in_shape)
        for i in range(len(self.items)):
            more, shape = self._item_rows(i, shape, path)
            rows += more
        return rows, shape


def serial(*items, keys=None):
    """:class:`Serial` of ``items``: layers, or ``(name, layer)`` pairs.

    ``keys`` is the params layout: ``"dict"`` (by name) or ``"list"`` (by position); the
    default is a dict when any item has a name, else a list.
    """
    pairs = tuple(item if isinstance(item, tuple) else (None, item) for item in items)
    for name, layer in pairs:
        if not isinstance(layer, Layer):
            raise TypeError(f"serial: expected a jaxnets.network.Layer or a (name, layer) pair, got {layer!r}")
    if keys is None:
        keys = "dict" if any(name is not None for name, _ in pairs) else "list"
    check_choice("serial", "keys", keys, ("dict", "list"))
    return Serial(pairs, keys == "list")


@dataclasses.dataclass(frozen=True)
class Residual(_Container):
    """``y = shortcut(x) + branch(x)``; with no shortcut, ``y = x + branch(x)``.

    Backward: both paths see the same ``x``, so ``dx = dx_shortcut + dx_branch``, where each
    is that path's backward of the same ``dy`` (for the identity, ``dx_shortcut = dy``).
    Params: a dict; an unnamed branch (a named :func:`serial`) is merged in, a named
    shortcut (ResNet's ``downsample``) sits under its name.
    """

    def __post_init__(self):
        super().__post_init__()
        if len(self.items) not in (1, 2) or self.listed:
            raise ValueError("Residual: expected a branch and an optional shortcut")

    def init(self, keys, in_shape, dtype):
        params, state, outs = self._init_items(keys, [in_shape] * len(self.items), dtype)
        out = outs[0]
        if (outs[1] if len(outs) == 2 else tuple(in_shape)) != out:
            what = "the shortcut's output" if len(outs) == 2 else "the input"
            raise ValueError(f"Residual: the branch's output shape {out} differs from {what} "
                             f"{outs[1] if len(outs) == 2 else tuple(in_shape)}; add a projection shortcut")
        return params, state, out

    def output_shape(self, in_shape):
        return self.items[0][1].output_shape(in_shape)

    def forward(self, params, state, x, ctx):
        new_state, caches, ys = {}, [], []
        for i, (slot, (_, layer)) in enumerate(zip(self._slots(), self.items)):
            y, cache, s_new = layer.forward(self._take(params, slot, layer.has_params),
                                            self._take(state, slot, layer.has_state), x, self._ctx(ctx, i))
            self._put(new_state, slot, s_new, layer.has_state, "state")
            caches.append(cache)
            ys.append(y)
        shortcut = ys[1] if len(ys) == 2 else x
        return shortcut + ys[0], tuple(caches), new_state

    def backward(self, params, cache, dy, ctx):
        grads, dxs = {}, []
        for i, (slot, (_, layer)) in enumerate(zip(self._slots(), self.items)):
            g, dx = layer.backward(self._take(params, slot, layer.has_params), cache[i], dy, self._ctx(ctx, i))
            self._put(grads, slot, g, layer.has_params, "gradient")
            dxs.append(dx)
        d_shortcut = dxs[1] if len(dxs) == 2 else dy
        return grads, d_shortcut + dxs[0]

    def cost_rows(self, in_shape, path=""):
        rows, out = [], None
        for i in range(len(self.items)):
            more, shape = self._item_rows(i, in_shape, path)
            rows += more
            out = shape if out is None else out
        return rows, out


def residual(branch, shortcut=None):
    """:class:`Residual`: ``shortcut(x) + branch(x)`` (``shortcut`` None: the identity, or a
    ``(name, layer)`` pair such as ``("downsample", serial(Conv(..., kernel=1, stride=2), BatchNorm()))``)."""
    items = [branch if isinstance(branch, tuple) else (None, branch)]
    if shortcut is not None:
        items.append(shortcut if isinstance(shortcut, tuple) else (None, shortcut))
    return Residual(tuple(items), False)


# ---------------------------------------------------------------------------- networks


class Network:
    """A model: a :class:`Layer` from input images (or features) to logits.

    Subclasses (frozen dataclasses) provide ``definition()`` (the composition), ``input_shape``
    and ``dtype``; :class:`Composed` holds a user's composition directly. The methods are
    those of every jaxnets model:

    * ``init(key) -> (params, state)``;
    * ``apply(params, state, x, *, train, key=None, dropout_rate=None) -> (logits, new_state)``;
    * ``forward(...)`` like ``apply`` and also the caches; ``backward(params, cache, dlogits,
      *, train=True) -> grads``, the layers' hand-written backward composed in reverse.
    """

    dtype = "float32"
    #: How many keys ``init`` splits its key into (None: one per weight-drawing layer). The
    #: i-th key of a split does not depend on the count, so this only names it.
    init_key_count = None

    def definition(self) -> Layer:
        raise NotImplementedError

    @functools.cached_property
    def layer(self) -> Layer:
        return self.definition()

    @property
    def classes(self):
        return self.layer.output_shape(tuple(self.input_shape))[-1]

    @property
    def has_dropout(self):
        """Whether the network has a stochastic layer (its forward then wants a key when training)."""
        return self.layer.stochastic

    def _name(self):
        return type(self).__name__

    def check_input(self, x):
        """Refuse inputs the network was not built for (a ValueError naming both shapes)."""
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"{self._name()}: input has shape {tuple(x.shape)}, but the model was built for "
                             f"(batch, {', '.join(map(str, self.input_shape))})")
        return x

    @_init_fast.drawn_together  # every layer's weights in one compiled draw, the same numbers
    def init(self, key):
        count = self.layer.weight_keys() if self.init_key_count is None else self.init_key_count
        keys = iter(jax.random.split(key, count)) if count else iter(())
        params, state, _ = self.layer.init(keys, tuple(self.input_shape), self.dtype)
        return params, state

    def forward(self, params, state, x, *, train, key=None, dropout_rate=None):
        """Logits, new state and the caches that :meth:`backward` needs."""
        x = self.check_input(x)
        logits, cache, new_state = self.layer.forward(params, state, x, Context(train, key, dropout_rate))
        return logits, new_state, cache

    def apply(self, params, state, x, *, train, key=None, dropout_rate=None):
        logits, new_state, _ = self.forward(params, state, x, train=train, key=key, dropout_rate=dropout_rate)
        return logits, new_state

    def backward(self, params, cache, dlogits, *, train=True):
        """Gradients w.r.t. params: the composition's backward (the input gradient is dropped)."""
        grads, _ = self.layer.backward(params, cache, dlogits, Context(train))
        return grads

    def cost_rows(self):
        """:class:`CostRow` of every leaf layer in forward order (read by :mod:`jaxnets.cost`)."""
        return self.layer.cost_rows(tuple(self.input_shape))[0]


def split_head(layer):
    """``(backbone, head, name)``: a network's top-level composition cut before its head.

    The head is ``name``, the last named item with parameters of ``layer`` (a dict
    :class:`Serial`: ResNet's and EfficientNet's ``fc``, the MLP's and ConvNet's ``head``),
    together with the parameter-free items just before it (global pool, flatten, the
    classifier's dropout: they act on the features, so they go with the head). Both parts
    are dict Serials over the same items, so their params are the network's split by
    top-level key: the head's ``{name: ...}``, the backbone's the rest. ValueError when
    ``layer`` has no such head.
    """
    if not isinstance(layer, Serial) or layer.listed:
        raise ValueError(f"split_head: the network's top level is not a composition of named layers ({layer!r})")
    named = [i for i, (name, item) in enumerate(layer.items) if name is not None and item.has_params]
    if not named or any(item.has_params or item.has_state for _, item in layer.items[named[-1] + 1:]):
        raise ValueError("split_head: the network's last layer with parameters has no name, so it has no head")
    start = named[-1]
    while start > 0 and not (layer.items[start - 1][1].has_params or layer.items[start - 1][1].has_state):
        start -= 1
    return Serial(layer.items[:start], False), Serial(layer.items[start:], False), layer.items[named[-1]][0]


@dataclasses.dataclass(frozen=True)
class HeadOnly(Network):
    """``base`` with its backbone frozen (a linear probe): what ``--freeze`` trains.

    The backbone (:func:`split_head`) runs in evaluation mode (batch norm normalises with
    its running statistics, which stay as they are; no dropout) behind
    ``jax.lax.stop_gradient``; only the head trains. ``forward`` is the head's forward on
    the backbone's features; ``backward`` is the head's alone (no backward pass through the
    backbone on either gradient path: autodiff sees the stop_gradient) and returns zeros
    for the backbone's leaves, so the gradient tree is ``base``'s. Same params, state and
    ``init`` as ``base``; in evaluation mode the same logits.
    """

    base: Network

    @property
    def input_shape(self):
        return self.base.input_shape

    @property
    def dtype(self):
        return self.base.dtype

    def definition(self):
        return self.base.layer

    def check_input(self, x):
        return self.base.check_input(x)

    @functools.cached_property
    def parts(self):
        return split_head(self.base.layer)

    def forward(self, params, state, x, *, train, key=None, dropout_rate=None):
        backbone, head, name = self.parts
        x = self.check_input(x)
        rest = lambda tree: {k: v for k, v in tree.items() if k != name}
        features, _, _ = backbone.forward(jax.lax.stop_gradient(rest(params)), rest(state), x, Context(False))
        head_state = {name: state[name]} if name in state else {}
        logits, cache, new_head_state = head.forward({name: params[name]}, head_state, jax.lax.stop_gradient(features),
                                                     Context(train, key, dropout_rate))
        return logits, {**state, **new_head_state}, cache

    def backward(self, params, cache, dlogits, *, train=True):
        _, head, name = self.parts
        grads, _ = head.backward({name: params[name]}, cache, dlogits, Context(train))
        return {**jax.tree_util.tree_map(jnp.zeros_like, {k: v for k, v in params.items() if k != name}), **grads}


@dataclasses.dataclass(frozen=True)
class Composed(Network):
    """A network of your own: ``Composed(serial(...), input_shape=(28, 28, 1))``."""

    root: Layer
    input_shape: tuple
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        if not isinstance(self.root, Layer):
            raise TypeError(f"Composed: expected a jaxnets.network.Layer, got {self.root!r}")

    def definition(self):
        return self.root


# ---- layers for EfficientNet-Lite (depthwise convolution, global average pool, resize)


def relu6():
    return Activation("relu6")


@dataclasses.dataclass(frozen=True)
class DepthwiseConv(Layer):
    """Depthwise 2-D convolution over NHWC (:func:`jaxnets.conv.depthwise_conv2d`): one
    ``kernel x kernel`` filter per channel, params ``{"w": (k, k, C)}``, no bias.
    ``padding`` "SAME" is TensorFlow's (asymmetric at stride 2), as EfficientNet's weights
    were trained with."""

    kernel: int = 3
    stride: int = 1
    padding: Any = "SAME"
    init_scheme: str = "kaiming"
    has_params = True

    @property
    def geometry(self):
        return dict(stride=self.stride, padding=self.padding)

    def init(self, keys, in_shape, dtype):
        params = conv_ops.depthwise_conv2d_init(next(keys), in_shape[-1], self.kernel, scheme=self.init_scheme,
                                                dtype=dtype)
        return params, {}, self.output_shape(in_shape)

    def weight_keys(self):
        return 1

    def output_shape(self, in_shape):
        x = jax.ShapeDtypeStruct((1, *in_shape), jnp.float32)
        w = {"w": jax.ShapeDtypeStruct((self.kernel, self.kernel, in_shape[-1]), jnp.float32)}
        return tuple(jax.eval_shape(lambda w, x: conv_ops.depthwise_conv2d(w, x, **self.geometry)[0], w, x).shape[1:])

    def forward(self, params, state, x, ctx):
        y, cache = conv_ops.depthwise_conv2d(params, x, **self.geometry)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return conv_ops.depthwise_conv2d_backward(params, cache, dy, **self.geometry)

    def macs(self, in_shape, out_shape):
        return math.prod(out_shape) * self.kernel * self.kernel


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool(Layer):
    """(B, H, W, C) -> (B, C), the mean over positions (:func:`jaxnets.conv.global_avg_pool`)."""

    def output_shape(self, in_shape):
        return (in_shape[-1],)

    def forward(self, params, state, x, ctx):
        y, cache = conv_ops.global_avg_pool(x)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return {}, conv_ops.global_avg_pool_backward(cache, dy)


@dataclasses.dataclass(frozen=True)
class Resize(Layer):
    """Bilinear resize of the images to ``size x size`` (:func:`jaxnets.conv.resize_bilinear`):
    how 32x32 CIFAR-10 images reach a network trained at ImageNet sizes."""

    size: int

    def output_shape(self, in_shape):
        return (self.size, self.size, in_shape[-1])

    def forward(self, params, state, x, ctx):
        y, cache = conv_ops.resize_bilinear(x, size=self.size)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return {}, conv_ops.resize_bilinear_backward(cache, dy, size=self.size)

    def macs(self, in_shape, out_shape):
        # Separable: H'*H*W per channel, then H'*W'*W.
        h, w, c = in_shape
        return c * (self.size * h * w + self.size * self.size * w)

# ------------------------------------------------------------- layers for airbench (issue 24)


def gelu():
    """The exact (erf) GELU, :func:`jaxnets.layers.gelu`."""
    return Activation("gelu")


@dataclasses.dataclass(frozen=True)
class ShiftBatchNorm(BatchNorm):
    """Batch norm with its scale frozen at 1, only the shift ``beta`` trained
    (:func:`jaxnets.layers.batch_norm_shift`): params ``{"beta"}``, state ``{"mean", "var"}``.
    ``momentum`` is PyTorch's (airbench's running-average decay 0.6 is momentum 0.4). The
    settings and shapes are :class:`BatchNorm`'s; only the functions differ."""

    def init(self, keys, in_shape, dtype):
        params, state = layer_ops.batch_norm_shift_init(in_shape[-1], dtype)
        return params, state, tuple(in_shape)

    def forward(self, params, state, x, ctx):
        return layer_ops.batch_norm_shift(params, state, x, train=ctx.train, momentum=self.momentum, eps=self.eps,
                                          axis_name=self.axis_name)

    def backward(self, params, cache, dy, ctx):
        return layer_ops.batch_norm_shift_backward(params, cache, dy, train=ctx.train, axis_name=self.axis_name)


@dataclasses.dataclass(frozen=True)
class Whiten(Layer):
    """airbench's frozen ``patch x patch`` whitening conv (no padding, stride 1) with a trained
    bias: params ``{"b"}``, state ``{"w"}`` (frozen: it is state, so no optimizer touches it).
    ``init`` leaves ``w`` zero; :meth:`data_init` (or :func:`jaxnets.models.data_init`) sets it
    from training images by :func:`jaxnets.conv.whitening_filters`. ``channels`` is the image's."""

    channels: int = 3
    patch: int = 2
    eps: float = 5e-4
    impl: str = "auto"
    has_params = True
    has_state = True

    @property
    def features(self):
        return 2 * self.patch * self.patch * self.channels

    @property
    def geometry(self):
        return dict(stride=1, padding=0, impl=self.impl)

    def init(self, keys, in_shape, dtype):
        if len(in_shape) != 3 or in_shape[-1] != self.channels:
            raise ValueError(f"Whiten: expects images (H, W, {self.channels}), got per-example shape {tuple(in_shape)}")
        w = jnp.zeros((self.patch, self.patch, self.channels, self.features), dtype)
        return {"b": jnp.zeros((self.features,), dtype)}, {"w": w}, self.output_shape(in_shape)

    def data_init(self, state, images):
        """``state`` with ``w`` the whitening filters of ``images`` (N, H, W, C): training images only."""
        if images.ndim != 4 or images.shape[-1] != self.channels:
            raise ValueError(f"Whiten: data-dependent init expects training images (N, H, W, {self.channels}), "
                             f"got shape {tuple(images.shape)}")
        w = conv_ops.whitening_filters(images, patch=self.patch, eps=self.eps)
        return {"w": jnp.asarray(w, state["w"].dtype)}

    def output_shape(self, in_shape):
        h, w, _ = in_shape
        return (h - self.patch + 1, w - self.patch + 1, self.features)

    def forward(self, params, state, x, ctx):
        w = jax.lax.stop_gradient(state["w"])
        y, cache = conv_ops.conv2d({"w": w, "b": params["b"]}, x, **self.geometry)
        return y, (cache, w), state

    def backward(self, params, cache, dy, ctx):
        conv_cache, w = cache
        grads, dx = conv_ops.conv2d_backward({"w": w, "b": params["b"]}, conv_cache, dy, **self.geometry)
        return {"b": grads["b"]}, dx

    def macs(self, in_shape, out_shape):
        return math.prod(out_shape[:-1]) * self.patch * self.patch * in_shape[-1] * self.features


@dataclasses.dataclass(frozen=True)
class ScaledLinear(Layer):
    """y = scale * x W, no bias (:func:`jaxnets.layers.scaled_linear`); params ``{"w"}``."""

    features: int
    scale: float = 1.0
    init_scheme: str = "pytorch"
    has_params = True

    def init(self, keys, in_shape, dtype):
        if len(in_shape) != 1:
            raise ValueError(f"ScaledLinear: expects flat inputs (features,), got per-example shape {tuple(in_shape)}")
        params = layer_ops.linear_init(next(keys), in_shape[0], self.features, scheme=self.init_scheme, bias=False,
                                       dtype=dtype)
        return params, {}, (self.features,)

    def weight_keys(self):
        return 1

    def output_shape(self, in_shape):
        return (self.features,)

    def forward(self, params, state, x, ctx):
        y, cache = layer_ops.scaled_linear(params, x, scale=self.scale)
        return y, cache, {}

    def backward(self, params, cache, dy, ctx):
        return layer_ops.scaled_linear_backward(params, cache, dy, scale=self.scale)

    def macs(self, in_shape, out_shape):
        return in_shape[0] * self.features
