"""What one example costs a model: multiply-adds, the FLOPs a training step does, activations.

The one cost model of jaxnets: sweep planning (work shares, memory per member) and the
benchmarks' FLOP rates read it. Counts are of the linear and convolution layers, the ones
that do the work; batch norm, activations and pooling are ignored in FLOPs.

A training step on one example does the forward products (``2 * macs`` FLOPs), the weight
gradients (``2 * macs``) and the input gradients of every layer but the first, whose input
is the data (``2 * (macs - first layer's macs)``): :func:`train_flops`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from jaxnets import models as M


class Layer(NamedTuple):
    """One linear or conv layer of a forward pass, per example: its multiply-adds and the
    number of values it outputs."""

    name: str
    macs: int
    outputs: int


def layers(model) -> list[Layer]:
    """The model's linear/conv layers in forward order (an MLP's, or a ConvNet's plan walked
    with its 3x3/2 pools; a pre-activation block's 1x1 projection before its 3x3 conv)."""
    if isinstance(model, M.MLP):
        sizes = [model.input_size, *model.hidden, model.classes]
        return [Layer(f"linear{i}", a * b, b) for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
    h, w, cin = model.input_shape
    out = []
    for item in model.plan:
        if item == "M":
            h, w = (_pooled(h), _pooled(w))
            continue
        if model.preact and cin != item:
            out.append(Layer(f"proj{len(out)}", h * w * cin * item, h * w * item))
            cin = item
        out.append(Layer(f"conv{len(out)}", h * w * 9 * cin * item, h * w * item))
        cin = item
    out.append(Layer("head", h * w * cin * model.classes, model.classes))
    return out


def _pooled(size):
    pool = M.POOL
    return (size + 2 * pool["padding"] - pool["window"]) // pool["stride"] + 1


def forward_macs(model) -> int:
    """Multiply-adds of one example's forward pass."""
    return sum(layer.macs for layer in layers(model))


def train_flops(model) -> int:
    """FLOPs one example costs a training step: forward, weight gradients, and input
    gradients of all but the first layer (``6 * macs - 2 * first layer's macs``)."""
    ls = layers(model)
    macs = sum(layer.macs for layer in ls)
    return 2 * macs + 2 * macs + 2 * (macs - ls[0].macs)


def activation_floats(model, image_shape) -> int:
    """Values one example keeps for the backward pass, roughly: the image, and per hidden
    layer its output four times over (linear/conv output, batch norm, activation, and the
    gradient flowing back), plus the logits."""
    pixels = math.prod(image_shape)
    if isinstance(model, M.MLP):
        return pixels + 4 * sum(model.hidden) + model.classes
    return pixels + sum(4 * layer.outputs for layer in layers(model)[:-1] if layer.name.startswith("conv"))
