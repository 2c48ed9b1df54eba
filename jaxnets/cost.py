"""What one example costs a model: multiply-adds, the FLOPs a training step does, activations,
and the memory a run needs.

The one cost model of jaxnets: sweep planning (work shares, memory per member), the
trainer's memory check and the benchmarks' FLOP rates read it. Every count comes from the
layers themselves (:meth:`jaxnets.network.Network.cost_rows`: each leaf layer's input and
output shapes and its ``macs``), so a new layer or family needs no edit here. FLOPs count
the layers that do products (linear, convolutions); batch norm, activations and pooling
are ignored.

A training step on one example does the forward products (``2 * macs`` FLOPs), the weight
gradients (``2 * macs``) and the input gradients of every layer but the first, whose input
is the data (``2 * (macs - first layer's macs)``): :func:`train_flops`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import jax


class Layer(NamedTuple):
    """One layer that does products, per example: its dotted path in the params tree
    (``blocks.3.conv``, ``layer2.0.downsample.0``), its multiply-adds, the number of values
    it outputs, and the leaf layer itself."""

    name: str
    macs: int
    outputs: int
    layer: object = None


def layers(model) -> list[Layer]:
    """The model's linear/conv layers (those with multiply-adds) in forward order."""
    return [Layer(row.path, row.macs, math.prod(row.out_shape), row.layer)
            for row in model.cost_rows() if row.macs]


def forward_macs(model) -> int:
    """Multiply-adds of one example's forward pass."""
    return sum(layer.macs for layer in layers(model))


def train_flops(model) -> int:
    """FLOPs one example costs a training step: forward, weight gradients, and input
    gradients of all but the first layer (``6 * macs - 2 * first layer's macs``)."""
    ls = layers(model)
    macs = sum(layer.macs for layer in ls)
    return 2 * macs + 2 * macs + 2 * (macs - ls[0].macs)


def activation_floats(model) -> int:
    """Values one example keeps for the backward pass, roughly: the input, every leaf
    layer's output (each is the next layer's cache, or the logits; a reshape keeps none),
    and the gradient flowing back, at most the largest of them."""
    rows = model.cost_rows()
    kept = [row.layer.kept_floats(row.in_shape, row.out_shape) for row in rows]
    return math.prod(model.input_shape) + sum(kept) + max(kept, default=0)


# ---------------------------------------------------------------------------- memory


def memory_parts(model, *, batch_size, eval_batch_size, optimizer_slots, n_val=0) -> dict:
    """The bytes of one member's memory while training, by what holds them (float32):

    ``state`` = 4 x parameters and state x (1 + ``optimizer_slots`` + gradients + update +
    the kept previous copy); ``activations`` = 4 x 2 x :func:`activation_floats` (forward
    and gradient) x (``batch_size`` + ``eval_batch_size``); ``validation`` = ``n_val``
    gathered validation images (uint8).
    """
    params, state = jax.eval_shape(model.init, jax.random.key(0))
    n_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves((params, state)))
    activations = 4 * 2 * activation_floats(model) * (batch_size + eval_batch_size)
    return {"state": 4 * n_params * (4 + optimizer_slots), "activations": activations,
            "validation": n_val * math.prod(model.input_shape)}


def check_memory(model, *, batch_size, eval_batch_size, optimizer_slots, n_val=0, available=None):
    """Refuse, before any training, a run whose :func:`memory_parts` exceed the ``available``
    bytes (default :func:`available_memory`): a ValueError saying how much it needs and what
    to make smaller (the batch sizes when activations dominate, else the model). Returns
    the bytes needed."""
    parts = memory_parts(model, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         optimizer_slots=optimizer_slots, n_val=n_val)
    need, available = sum(parts.values()), available_memory() if available is None else available
    if need <= available:
        return need
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    if parts["activations"] >= parts["state"]:
        advice = f"use a smaller --batch-size (now {batch_size}) or --eval-batch-size (now {eval_batch_size})"
    else:
        advice = "use a smaller model (--hidden-units, --conv-plan); a smaller --batch-size will not be enough"
    raise ValueError(f"the run needs about {gib(need)} (parameters and optimizer state {gib(parts['state'])}, "
                     f"activations {gib(parts['activations'])}), more than the {gib(available)} available: {advice}")


def available_memory():
    """Bytes a run can use: the free memory of the first device (GPU/TPU), else the
    available RAM (CPU: ``MemAvailable``, else the physical memory)."""
    try:
        stats = jax.devices()[0].memory_stats()
        if stats and "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    except Exception:  # CPU backends have no memory_stats
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
