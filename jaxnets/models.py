"""MLP and the course ConvNet as pure functions over plain dict params.

A model is a frozen (hashable) dataclass of settings, so it can be a static argument of
``jax.jit``. Its methods are pure functions of explicit arrays:

* ``init(key) -> (params, state)``: ``state`` holds the batch-norm running statistics.
* ``apply(params, state, x, *, train, key=None) -> (logits, new_state)``.
* ``forward(...)``: like ``apply`` but also returns the layers' caches, and
  ``backward(params, cache, dlogits) -> grads`` composes the layers' hand-written backward
  functions in reverse.

Module-level :func:`loss`, :func:`autodiff_value_and_grad` and
:func:`manual_value_and_grad` share one signature, so a train step can use either
gradient path: both return ``((loss, new_state), grads)`` like
``jax.value_and_grad(loss, has_aux=True)``.
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxnets import _init_fast
from jaxnets import conv as C
from jaxnets import layers as L
from jaxnets._checks import check_choice, check_dim, check_ndim

INIT_SCHEMES = L.INIT_SCHEMES


def _first_layer_scheme(scheme):
    # Kaiming's sqrt(2/fan_in) assumes a ReLU in front; the first layer sees the
    # normalised input instead, so it gets the variance-preserving 1/sqrt(fan_in).
    return "lecun" if scheme == "kaiming" else scheme


# -------------------------------------------------------------------------------- MLP


@dataclasses.dataclass(frozen=True)
class MLP:
    """Multi-layer perceptron: [linear -> (batch_norm) -> activation -> (dropout)] * n -> linear.

    A linear layer followed by batch norm has no bias (BN's beta takes its place).

    ``hidden=()`` gives multinomial logistic regression. Image batches (B, H, W, C) are
    flattened. ``init`` is one of ``"kaiming"`` (He normal; first layer 1/sqrt(fan_in)),
    ``"pytorch"`` (``torch.nn.Linear``'s uniform) or ``"course"`` (N(0, 1e-4^2)).
    """

    input_size: int
    hidden: tuple = (512, 512)
    classes: int = 10
    activation: str = "relu"
    batch_norm: bool = False
    dropout: float = 0.0
    init_scheme: str = "kaiming"
    bn_momentum: float = 0.1
    dtype: str = "float32"
    #: Inside ``shard_map``: the mesh axis over which batch norm syncs its statistics
    #: (forward and backward); None for per-device statistics.
    bn_axis_name: str | None = None
    #: Inside ``shard_map`` (data parallel): the mesh axis the batch is split over; dropout
    #: then draws each example's mask at its position in the whole batch (see
    #: :func:`jaxnets.layers.dropout`), so the masks equal a single device's.
    batch_axis_name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        check_choice("MLP", "activation", self.activation, tuple(L.ACTIVATIONS))
        check_choice("MLP", "init scheme", self.init_scheme, INIT_SCHEMES)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {self.dropout}")
        if self.input_size <= 0 or self.classes <= 1 or any(h <= 0 for h in self.hidden):
            raise ValueError(
                f"MLP: sizes must be positive (input_size={self.input_size}, "
                f"hidden={self.hidden}, classes={self.classes})"
            )

    @_init_fast.drawn_together  # every layer's weights in one compiled draw, the same numbers
    def init(self, key):
        sizes = (self.input_size, *self.hidden, self.classes)
        keys = jax.random.split(key, len(sizes) - 1)
        schemes = [_first_layer_scheme(self.init_scheme)] + [self.init_scheme] * len(self.hidden)
        blocks, states = [], []
        for i, width in enumerate(self.hidden):
            block, state = {}, {}
            block["linear"] = L.linear_init(keys[i], sizes[i], width, scheme=schemes[i],
                                            bias=not self.batch_norm, dtype=self.dtype)
            if self.batch_norm:
                block["bn"], state["bn"] = L.batch_norm_init(width, self.dtype)
            blocks.append(block)
            states.append(state)
        head = L.linear_init(keys[-1], sizes[-2], self.classes, scheme=schemes[-1], dtype=self.dtype)
        return {"blocks": blocks, "head": head}, {"blocks": states}

    def _flat_input(self, x):
        check_ndim("MLP", "input", x, (2, 4))
        if x.ndim == 4:
            x = x.reshape(x.shape[0], -1)
        check_dim("MLP", "input", x, 1, self.input_size, "features")
        return x

    def forward(self, params, state, x, *, train, key=None, dropout_rate=None):
        """Logits, new state and the caches that :meth:`backward` needs.

        ``dropout_rate`` overrides ``self.dropout`` (which still decides whether there is a
        dropout layer at all): a traced scalar, for sweeps that vmap over the rate.
        """
        act, _ = L.activation(self.activation)
        rate = self.dropout if dropout_rate is None else dropout_rate
        x = self._flat_input(x)
        caches, new_states = [], []
        for i, (block, block_state) in enumerate(zip(params["blocks"], state["blocks"])):
            cache, new_state = {}, {}
            x, cache["linear"] = L.linear(block["linear"], x)
            if self.batch_norm:
                x, cache["bn"], new_state["bn"] = L.batch_norm(
                    block["bn"], block_state["bn"], x, train=train, momentum=self.bn_momentum,
                    axis_name=self.bn_axis_name,
                )
            x, cache["act"] = act(x)
            if self.dropout:
                x, cache["dropout"] = L.dropout(
                    x, rate=rate, train=train, key=_layer_key(key, i), axis_name=self.batch_axis_name
                )
            caches.append(cache)
            new_states.append(new_state)
        logits, head_cache = L.linear(params["head"], x)
        return logits, {"blocks": new_states}, (caches, head_cache)

    def apply(self, params, state, x, *, train, key=None, dropout_rate=None):
        logits, new_state, _ = self.forward(params, state, x, train=train, key=key, dropout_rate=dropout_rate)
        return logits, new_state

    def backward(self, params, cache, dlogits, *, train=True):
        """Gradients w.r.t. params, composing each layer's backward in reverse order."""
        _, act_backward = L.activation(self.activation)
        caches, head_cache = cache
        head_grads, dx = L.linear_backward(params["head"], head_cache, dlogits)
        block_grads = []
        for block, block_cache in zip(reversed(params["blocks"]), reversed(caches)):
            grads = {}
            if self.dropout:
                dx = L.dropout_backward(block_cache["dropout"], dx)
            dx = act_backward(block_cache["act"], dx)
            if self.batch_norm:
                grads["bn"], dx = L.batch_norm_backward(block["bn"], block_cache["bn"], dx, train=train,
                                                        axis_name=self.bn_axis_name)
            grads["linear"], dx = L.linear_backward(block["linear"], block_cache["linear"], dx)
            block_grads.append(grads)
        return {"blocks": block_grads[::-1], "head": head_grads}

    def num_weights(self):
        sizes = (self.input_size, *self.hidden, self.classes)
        return sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def _layer_key(key, index):
    if key is None:
        return None
    return jax.random.fold_in(key, index)


# --------------------------------------------------------------------------- ConvNet

#: The course's mini-VGG: an int is a 3x3 conv block of that width, "M" a 3x3/2/1 max pool.
VGG_COURSE = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

POOL = {"window": 3, "stride": 2, "padding": 1}


def _pooled(size):
    return (size + 2 * POOL["padding"] - POOL["window"]) // POOL["stride"] + 1


@dataclasses.dataclass(frozen=True)
class ConvNet:
    """VGG-style ConvNet over NHWC images, ``plan`` as in :data:`VGG_COURSE`, then linear.

    ``preact=False``: each int in ``plan`` is conv3x3 -> batch_norm -> relu (the course's
    block). ``preact=True``: pre-activation residual blocks x + conv3x3(relu(bn(x))), with a
    1x1 conv in front where the width changes, and bn -> relu before the head.

    No conv has a bias: every conv output reaches a batch norm (directly, or through the
    residual stream and max pools, which commute with a per-channel shift), whose mean
    subtraction cancels it exactly.

    ``conv_impl`` is the ``impl`` of every conv and max pool, forward and backward (see
    :mod:`jaxnets.conv`: ``"auto"`` is Winograd/im2col on CPU and XLA's convolution on GPU/TPU).
    """

    input_shape: tuple = (32, 32, 3)
    plan: tuple = VGG_COURSE
    classes: int = 10
    preact: bool = False
    init_scheme: str = "kaiming"
    bn_momentum: float = 0.1
    dtype: str = "float32"
    bn_axis_name: str | None = None  # see MLP.bn_axis_name
    conv_impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "plan", tuple(self.plan))
        check_choice("ConvNet", "init scheme", self.init_scheme, INIT_SCHEMES)
        check_choice("ConvNet", "conv_impl", self.conv_impl, C.CONV_IMPLS)
        for item in self.plan:
            if item != "M" and not (isinstance(item, int) and item > 0):
                raise ValueError(f"ConvNet: plan items must be positive ints or 'M', got {item!r}")
        if len(self.input_shape) != 3:
            raise ValueError(f"ConvNet: input_shape must be (H, W, C), got {self.input_shape}")

    def output_spatial(self):
        h, w, _ = self.input_shape
        for item in self.plan:
            if item == "M":
                h, w = _pooled(h), _pooled(w)
        return h, w

    def _widths(self):
        """(in_channels, out_channels) of each conv block, in order."""
        widths, cin = [], self.input_shape[-1]
        for item in self.plan:
            if item != "M":
                widths.append((cin, item))
                cin = item
        return widths, cin

    @_init_fast.drawn_together  # every layer's weights in one compiled draw, the same numbers
    def init(self, key):
        widths, cout = self._widths()
        keys = iter(jax.random.split(key, 2 * len(widths) + 1))
        conv = lambda cin, cout, k, scheme: C.conv2d_init(next(keys), cin, cout, k, scheme=scheme, bias=False,
                                                          dtype=self.dtype)
        blocks, states = [], []
        for i, (cin, width) in enumerate(widths):
            block, state = {}, {}
            first = _first_layer_scheme(self.init_scheme) if i == 0 else self.init_scheme
            if self.preact:
                if cin != width:
                    block["proj"] = conv(cin, width, 1, first)
                block["bn"], state["bn"] = L.batch_norm_init(width, self.dtype)
                block["conv"] = conv(width, width, 3, self.init_scheme)
            else:
                block["conv"] = conv(cin, width, 3, first)
                block["bn"], state["bn"] = L.batch_norm_init(width, self.dtype)
            blocks.append(block)
            states.append(state)
        params, state = {"blocks": blocks}, {"blocks": states}
        if self.preact:
            params["head_bn"], state["head_bn"] = L.batch_norm_init(cout, self.dtype)
        h, w = self.output_spatial()
        params["head"] = L.linear_init(next(keys), h * w * cout, self.classes, scheme=self.init_scheme,
                                       dtype=self.dtype)
        return params, state

    def _check_input(self, x):
        check_ndim("ConvNet", "input", x, 4)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"ConvNet: input images have shape {tuple(x.shape[1:])}, "
                f"but the model was built for {self.input_shape} (H, W, C)"
            )

    def forward(self, params, state, x, *, train, key=None):
        del key  # no stochastic layers
        self._check_input(x)
        bn = dict(train=train, momentum=self.bn_momentum, axis_name=self.bn_axis_name)
        conv = dict(stride=1, padding="SAME", impl=self.conv_impl)
        caches, new_states, blocks = [], [], iter(zip(params["blocks"], state["blocks"]))
        for item in self.plan:
            cache = {}
            if item == "M":
                x, cache["pool"] = C.max_pool(x, **POOL, impl=self.conv_impl)
                caches.append(cache)
                continue
            block, block_state = next(blocks)
            new_state = {}
            if self.preact:
                if "proj" in block:
                    x, cache["proj"] = C.conv2d(block["proj"], x, **conv)
                h, cache["bn"], new_state["bn"] = L.batch_norm(block["bn"], block_state["bn"], x, **bn)
                h, cache["relu"] = L.relu(h)
                h, cache["conv"] = C.conv2d(block["conv"], h, **conv)
                x = x + h
            else:
                x, cache["conv"] = C.conv2d(block["conv"], x, **conv)
                x, cache["bn"], new_state["bn"] = L.batch_norm(block["bn"], block_state["bn"], x, **bn)
                x, cache["relu"] = L.relu(x)
            caches.append(cache)
            new_states.append(new_state)
        new_state = {"blocks": new_states}
        head_cache = {}
        if self.preact:
            x, head_cache["bn"], new_state["head_bn"] = L.batch_norm(
                params["head_bn"], state["head_bn"], x, **bn
            )
            x, head_cache["relu"] = L.relu(x)
        x, head_cache["flatten"] = C.flatten(x)
        logits, head_cache["linear"] = L.linear(params["head"], x)
        return logits, new_state, (caches, head_cache)

    def apply(self, params, state, x, *, train, key=None):
        logits, new_state, _ = self.forward(params, state, x, train=train, key=key)
        return logits, new_state

    def backward(self, params, cache, dlogits, *, train=True):
        """Gradients w.r.t. params, composing each layer's backward in reverse order."""
        caches, head_cache = cache
        conv = dict(stride=1, padding="SAME", impl=self.conv_impl)
        grads = {}
        grads["head"], dx = L.linear_backward(params["head"], head_cache["linear"], dlogits)
        dx = C.flatten_backward(head_cache["flatten"], dx)
        if self.preact:
            dx = L.relu_backward(head_cache["relu"], dx)
            grads["head_bn"], dx = L.batch_norm_backward(params["head_bn"], head_cache["bn"], dx, train=train,
                                                               axis_name=self.bn_axis_name)
        block_grads, blocks = [], iter(reversed(params["blocks"]))
        for item, cache in zip(reversed(self.plan), reversed(caches)):
            if item == "M":
                dx = C.max_pool_backward(cache["pool"], dx, **POOL, impl=self.conv_impl)
                continue
            block, g = next(blocks), {}
            if self.preact:
                # x_out = x_in + conv(relu(bn(x_in))): the skip passes dx through unchanged.
                g["conv"], dh = C.conv2d_backward(block["conv"], cache["conv"], dx, **conv)
                dh = L.relu_backward(cache["relu"], dh)
                g["bn"], dh = L.batch_norm_backward(block["bn"], cache["bn"], dh, train=train,
                                                     axis_name=self.bn_axis_name)
                dx = dx + dh
                if "proj" in block:
                    g["proj"], dx = C.conv2d_backward(block["proj"], cache["proj"], dx, **conv)
            else:
                dx = L.relu_backward(cache["relu"], dx)
                g["bn"], dx = L.batch_norm_backward(block["bn"], cache["bn"], dx, train=train,
                                                     axis_name=self.bn_axis_name)
                g["conv"], dx = C.conv2d_backward(block["conv"], cache["conv"], dx, **conv)
            block_grads.append(g)
        grads["blocks"] = block_grads[::-1]
        return grads


# -------------------------------------------------------------------- loss, gradients


def _rate(dropout_rate):
    # Only MLPs have dropout; other models' apply/forward take no dropout_rate.
    return {} if dropout_rate is None else {"dropout_rate": dropout_rate}


def loss(model, params, state, x, labels, *, key=None, train=True, label_smoothing=0.0, l2=0.0, dropout_rate=None):
    """Mean softmax cross-entropy (+ 0.5 * l2 * sum of squared weights); returns (loss, new_state).

    ``dropout_rate`` (MLP only) overrides the model's rate, e.g. with a traced sweep value.
    """
    logits, new_state = model.apply(params, state, x, train=train, key=key, **_rate(dropout_rate))
    value, _ = L.softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if l2:
        penalty, _ = L.l2_penalty(params, strength=l2)
        value = value + penalty
    return value, new_state


def autodiff_value_and_grad(model, params, state, x, labels, **kwargs):
    """``((loss, new_state), grads)`` by ``jax.value_and_grad`` of :func:`loss`."""
    return jax.value_and_grad(
        lambda p: loss(model, p, state, x, labels, **kwargs), has_aux=True
    )(params)


def manual_value_and_grad(model, params, state, x, labels, *, key=None, train=True, label_smoothing=0.0, l2=0.0,
                          dropout_rate=None):
    """``((loss, new_state), grads)`` by the hand-written backward passes.

    Same inputs, outputs and pytree structure as :func:`autodiff_value_and_grad`.
    """
    logits, new_state, cache = model.forward(params, state, x, train=train, key=key, **_rate(dropout_rate))
    value, ce_cache = L.softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)
    grads = model.backward(params, cache, L.softmax_cross_entropy_backward(ce_cache), train=train)
    if l2:
        penalty, l2_cache = L.l2_penalty(params, strength=l2)
        value = value + penalty
        grads = jax.tree_util.tree_map(jnp.add, grads, L.l2_penalty_backward(l2_cache, strength=l2))
    return (value, new_state), grads


GRADIENT_PATHS = {"autodiff": autodiff_value_and_grad, "manual": manual_value_and_grad}


def value_and_grad(model, params, state, x, labels, *, grad="autodiff", **kwargs):
    """Dispatch to the gradient path named ``grad`` (``"autodiff"`` or ``"manual"``)."""
    check_choice("value_and_grad", "gradient path", grad, tuple(GRADIENT_PATHS))
    return GRADIENT_PATHS[grad](model, params, state, x, labels, **kwargs)
