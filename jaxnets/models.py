"""The model families of jaxnets, each a composition of layers (:mod:`jaxnets.network`).

A model is a frozen (hashable) dataclass of settings, so it can be a static argument of
``jax.jit``; its ``definition()`` is the composition of layers, and :class:`~jaxnets.network.Network`
gives every model the same pure methods:

* ``init(key) -> (params, state)``: ``state`` holds the batch-norm running statistics.
* ``apply(params, state, x, *, train, key=None, dropout_rate=None) -> (logits, new_state)``.
* ``forward(...)``: like ``apply`` but also returns the layers' caches, and
  ``backward(params, cache, dlogits) -> grads`` composes the layers' hand-written backward
  functions in reverse (the combinators do it: no model writes its own backward).

:data:`FAMILIES` is the one registry of families: ``--model``'s choices, the trainer's
:func:`jaxnets.steps.build_model`, ``load_run`` and the docs read it. A new family is a
definition here and one :func:`family` entry.

Module-level :func:`loss`, :func:`autodiff_value_and_grad` and
:func:`manual_value_and_grad` share one signature, so a train step can use either
gradient path: both return ``((loss, new_state), grads)`` like
``jax.value_and_grad(loss, has_aux=True)``; they work on any :class:`~jaxnets.network.Network`.
"""

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import conv as conv_ops
from jaxnets import layers as layer_ops
from jaxnets import network as nn
from jaxnets._checks import check_choice, check_dim, check_ndim
from jaxnets.network import Network

INIT_SCHEMES = layer_ops.INIT_SCHEMES


def _first_layer_scheme(scheme):
    # Kaiming's sqrt(2/fan_in) assumes a ReLU in front; the first layer sees the
    # normalised input instead, so it gets the variance-preserving 1/sqrt(fan_in).
    return "lecun" if scheme == "kaiming" else scheme


# -------------------------------------------------------------------------------- MLP


@dataclasses.dataclass(frozen=True)
class MLP(Network):
    """Multi-layer perceptron: [linear -> (batch_norm) -> activation -> (dropout)] * n -> linear.

    A linear layer followed by batch norm has no bias (BN's beta takes its place).

    ``hidden=()`` gives multinomial logistic regression. Image batches (B, H, W, C) are
    flattened. ``init`` is one of ``"kaiming"`` (He normal; first layer 1/sqrt(fan_in)),
    ``"pytorch"`` (``torch.nn.Linear``'s uniform) or ``"course"`` (N(0, 1e-4^2)).
    Params: ``{"blocks": [{"linear", "bn"?}, ...], "head"}``.
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
        check_choice("MLP", "activation", self.activation, tuple(layer_ops.ACTIVATIONS))
        check_choice("MLP", "init scheme", self.init_scheme, INIT_SCHEMES)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {self.dropout}")
        if self.input_size <= 0 or self.classes <= 1 or any(h <= 0 for h in self.hidden):
            raise ValueError(
                f"MLP: sizes must be positive (input_size={self.input_size}, "
                f"hidden={self.hidden}, classes={self.classes})"
            )

    @property
    def input_shape(self):
        return (self.input_size,)

    def definition(self):
        schemes = [_first_layer_scheme(self.init_scheme)] + [self.init_scheme] * len(self.hidden)
        blocks = []
        for width, scheme in zip(self.hidden, schemes):
            block = [("linear", nn.Linear(width, scheme, bias=not self.batch_norm))]
            if self.batch_norm:
                block.append(("bn", nn.BatchNorm(self.bn_momentum, axis_name=self.bn_axis_name)))
            block.append(nn.Activation(self.activation))
            if self.dropout:
                block.append(nn.Dropout(self.dropout, axis_name=self.batch_axis_name))
            blocks.append(nn.serial(*block))
        return nn.serial(nn.Flatten(), ("blocks", nn.serial(*blocks, keys="list")),
                         ("head", nn.Linear(self.classes, schemes[-1])))

    def check_input(self, x):
        check_ndim("MLP", "input", x, (2, 4))
        check_dim("MLP", "input", x.reshape(x.shape[0], -1), 1, self.input_size, "features")
        return x


# --------------------------------------------------------------------------- ConvNet

#: The course's mini-VGG: an int is a 3x3 conv block of that width, "M" a 3x3/2/1 max pool.
VGG_COURSE = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

POOL = {"window": 3, "stride": 2, "padding": 1}


@dataclasses.dataclass(frozen=True)
class ConvNet(Network):
    """VGG-style ConvNet over NHWC images, ``plan`` as in :data:`VGG_COURSE`, then linear.

    ``preact=False``: each int in ``plan`` is conv3x3 -> batch_norm -> relu (the course's
    block). ``preact=True``: pre-activation residual blocks x + conv3x3(relu(bn(x))), with a
    1x1 conv in front where the width changes, and bn -> relu before the head.

    No conv has a bias: every conv output reaches a batch norm (directly, or through the
    residual stream and max pools, which commute with a per-channel shift), whose mean
    subtraction cancels it exactly.

    ``conv_impl`` is the ``impl`` of every conv and max pool, forward and backward (see
    :mod:`jaxnets.conv`: ``"auto"`` is Winograd/im2col on CPU and XLA's convolution on GPU/TPU).
    Params: ``{"blocks": [{"conv", "bn"} or {"proj"?, "bn", "conv"}, ...], "head_bn"?, "head"}``
    (pools take no entry).
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
        check_choice("ConvNet", "conv_impl", self.conv_impl, conv_ops.CONV_IMPLS)
        for item in self.plan:
            if item != "M" and not (isinstance(item, int) and item > 0):
                raise ValueError(f"ConvNet: plan items must be positive ints or 'M', got {item!r}")
        if len(self.input_shape) != 3:
            raise ValueError(f"ConvNet: input_shape must be (H, W, C), got {self.input_shape}")

    @property
    def init_key_count(self):
        # Two keys per conv block and one for the head: the count the mini-VGG has always
        # split into (a key's value does not depend on the count, see Network).
        return 2 * sum(item != "M" for item in self.plan) + 1

    def output_spatial(self):
        return self.layer.items[0][1].output_shape(self.input_shape)[:2]

    def definition(self):
        conv = lambda width, k, scheme: nn.Conv(width, k, init_scheme=scheme, bias=False, impl=self.conv_impl)
        bn = lambda: nn.BatchNorm(self.bn_momentum, axis_name=self.bn_axis_name)
        body, cin, first = [], self.input_shape[-1], True
        for item in self.plan:
            if item == "M":
                body.append(nn.MaxPool(**POOL, impl=self.conv_impl))
                continue
            scheme = _first_layer_scheme(self.init_scheme) if first else self.init_scheme
            if self.preact:
                proj = [("proj", conv(item, 1, scheme))] if cin != item else []
                branch = nn.serial(("bn", bn()), nn.relu(), ("conv", conv(item, 3, self.init_scheme)))
                body.append(nn.serial(*proj, nn.residual(branch), keys="dict"))
            else:
                body.append(nn.serial(("conv", conv(item, 3, scheme)), ("bn", bn()), nn.relu()))
            cin, first = item, False
        head = [("head_bn", bn()), nn.relu()] if self.preact else []
        return nn.serial(("blocks", nn.serial(*body, keys="list")), *head, nn.Flatten(),
                         ("head", nn.Linear(self.classes, self.init_scheme)))

    def check_input(self, x):
        check_ndim("ConvNet", "input", x, 4)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"ConvNet: input images have shape {tuple(x.shape[1:])}, "
                f"but the model was built for {self.input_shape} (H, W, C)"
            )
        return x


# ---------------------------------------------------------------------------- registry


class Family(NamedTuple):
    """A model family: its ``--model`` name, a line for the help, and ``build(config,
    image_shape, classes, bn_axis_name, batch_axis_name) -> Network`` from a run's settings."""

    name: str
    help: str
    build: Callable


#: Every model family, by ``--model`` name, in the order the help lists them.
FAMILIES: dict[str, Family] = {}


def family(name, help):
    """Register ``build`` as the family ``name`` (a decorator)."""

    def register(build):
        FAMILIES[name] = Family(name, help, build)
        return build

    return register


@family("mlp", "the MLP (--hidden-units, --activation, --batch-norm, --dropout)")
def _build_mlp(config, image_shape, classes, bn_axis_name=None, batch_axis_name=None):
    return MLP(input_size=int(np.prod(image_shape)), hidden=tuple(config.hidden_units), classes=classes,
               activation=config.activation, batch_norm=config.batch_norm, dropout=config.dropout,
               init_scheme=config.init, bn_axis_name=bn_axis_name, batch_axis_name=batch_axis_name)


def _build_convnet(config, image_shape, classes, bn_axis_name=None, batch_axis_name=None, *, preact=False):
    return ConvNet(input_shape=tuple(image_shape), plan=tuple(config.conv_plan) or VGG_COURSE, classes=classes,
                   preact=preact, init_scheme=config.init, bn_axis_name=bn_axis_name, conv_impl=config.conv_impl)


family("convnet", "the course mini-VGG, or the --conv-plan you give")(_build_convnet)
family("preact_convnet", "the ConvNet with pre-activation residual blocks")(
    lambda *args, **kwargs: _build_convnet(*args, preact=True, **kwargs))


def build(config, image_shape, classes, bn_axis_name=None, batch_axis_name=None):
    """The network ``config.model`` names, for images of ``image_shape`` and ``classes`` classes."""
    check_choice("build", "model family", config.model, tuple(FAMILIES))
    return FAMILIES[config.model].build(config, tuple(image_shape), classes, bn_axis_name, batch_axis_name)


# -------------------------------------------------------------------- loss, gradients


def loss(model, params, state, x, labels, *, key=None, train=True, label_smoothing=0.0, l2=0.0, dropout_rate=None):
    """Mean softmax cross-entropy (+ 0.5 * l2 * sum of squared weights); returns (loss, new_state).

    ``dropout_rate`` overrides the rate of every dropout layer, e.g. with a traced sweep value.
    """
    logits, new_state = model.apply(params, state, x, train=train, key=key, dropout_rate=dropout_rate)
    value, _ = layer_ops.softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if l2:
        penalty, _ = layer_ops.l2_penalty(params, strength=l2)
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
    logits, new_state, cache = model.forward(params, state, x, train=train, key=key, dropout_rate=dropout_rate)
    value, ce_cache = layer_ops.softmax_cross_entropy(logits, labels, label_smoothing=label_smoothing)
    grads = model.backward(params, cache, layer_ops.softmax_cross_entropy_backward(ce_cache), train=train)
    if l2:
        penalty, l2_cache = layer_ops.l2_penalty(params, strength=l2)
        value = value + penalty
        grads = jax.tree_util.tree_map(jnp.add, grads, layer_ops.l2_penalty_backward(l2_cache, strength=l2))
    return (value, new_state), grads


GRADIENT_PATHS = {"autodiff": autodiff_value_and_grad, "manual": manual_value_and_grad}


def value_and_grad(model, params, state, x, labels, *, grad="autodiff", **kwargs):
    """Dispatch to the gradient path named ``grad`` (``"autodiff"`` or ``"manual"``)."""
    check_choice("value_and_grad", "gradient path", grad, tuple(GRADIENT_PATHS))
    return GRADIENT_PATHS[grad](model, params, state, x, labels, **kwargs)


# --------------------------------------------------------------------- airbench (issue 24)


@dataclasses.dataclass(frozen=True)
class Airbench(Network):
    """airbench94's network (Jordan 2024, arXiv 2404.00498), re-derived as a composition:

    whiten (frozen 2x2 patch-whitening conv, 2*4*C filters, trained bias) -> GELU, then per
    width in ``widths``: conv3x3 -> maxpool 2x2/2 -> BN -> GELU -> conv3x3 -> BN -> GELU
    (convs bias-free and Dirac-initialised on their first c_in filters; BN scale frozen at 1,
    ``bn_eps``, PyTorch ``bn_momentum``), then maxpool 3x3/3 -> flatten -> bias-free linear
    x ``head_scale``. On 32x32x3: 32 -> 31 -> 15 -> 7 -> 3 -> 1, 1.97 M parameters.

    The whitening filters are data-dependent: :func:`data_init` sets them from training
    images (state ``whiten.w``); ``init`` alone leaves them zero.
    Params: ``{"whiten": {"b"}, "blocks": [{"conv1", "bn1", "conv2", "bn2"}, ...], "head": {"w"}}``.
    """

    input_shape: tuple = (32, 32, 3)
    widths: tuple = (64, 256, 256)
    classes: int = 10
    bn_momentum: float = 0.4
    bn_eps: float = 1e-12
    whiten_eps: float = 5e-4
    head_scale: float = 1 / 9
    dtype: str = "float32"
    bn_axis_name: str | None = None
    conv_impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.input_shape) != 3:
            raise ValueError(f"Airbench: input_shape must be (H, W, C), got {self.input_shape}")
        spatial = self.layer.items[0][1].output_shape(self.input_shape)  # through the blocks
        if any(s < 3 for s in spatial[:2]):
            raise ValueError(f"Airbench: images of shape {self.input_shape} shrink to {spatial[:2]} before the "
                             f"final 3x3 pool (whiten -1, then /2 per block); use images of at least 28x28")

    def definition(self):
        bn = lambda: nn.ShiftBatchNorm(self.bn_momentum, self.bn_eps, axis_name=self.bn_axis_name)
        conv = lambda width: nn.Conv(width, 3, init_scheme="pytorch", bias=False, impl=self.conv_impl)
        whiten = nn.Whiten(channels=self.input_shape[-1], eps=self.whiten_eps, impl=self.conv_impl)
        blocks = [nn.serial(("conv1", conv(width)), nn.MaxPool(2, 2, 0, impl=self.conv_impl), ("bn1", bn()),
                            nn.gelu(), ("conv2", conv(width)), ("bn2", bn()), nn.gelu())
                  for width in self.widths]
        body = nn.serial(("whiten", whiten), nn.gelu(), ("blocks", nn.serial(*blocks, keys="list")))
        return nn.serial(body, nn.MaxPool(3, 3, 0), nn.Flatten(),
                         ("head", nn.ScaledLinear(self.classes, self.head_scale)), keys="dict")

    def init(self, key):
        """As every Network's, then each block conv's first c_in filters set to the identity
        (:func:`jaxnets.conv.dirac_`; after the draw, which hands out placeholders until it ends)."""
        params, state = super().init(key)
        blocks = [{**block, **{name: {**block[name], "w": conv_ops.dirac_(block[name]["w"])}
                               for name in ("conv1", "conv2")}} for block in params["blocks"]]
        return {**params, "blocks": blocks}, state

    def data_init(self, params, state, images):
        """``(params, state)`` with the whitening filters computed from ``images``, which must be
        training images (N, H, W, C) of this model's shape; never validation or test images."""
        if tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"Airbench: data-dependent init got images of shape {tuple(images.shape[1:])}, "
                             f"but the model was built for {self.input_shape} (H, W, C)")
        whiten = self.layer.items[0][1].items[0][1]
        return params, {**state, "whiten": whiten.data_init(state["whiten"], images)}


def data_init(model, params, state, train_images):
    """The model's data-dependent init (e.g. :class:`Airbench`'s whitening) from training
    images, or ``(params, state)`` unchanged for a model that has none."""
    hook = getattr(model, "data_init", None)
    return (params, state) if hook is None else hook(params, state, train_images)


@family("airbench", "airbench94's net: frozen 2x2 whitening, 3 GELU conv blocks 64/256/256, x1/9 head "
                    "(data-dependent init from training images)")
def _build_airbench(config, image_shape, classes, bn_axis_name=None, batch_axis_name=None):
    return Airbench(input_shape=tuple(image_shape), classes=classes, bn_axis_name=bn_axis_name,
                    conv_impl=config.conv_impl)
