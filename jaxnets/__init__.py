"""jaxnets: MLPs, ConvNets and backpropagation in pure JAX.

    import jaxnets as jn
    y, cache = jn.layers.linear(params, x)          # every layer: forward, and its backward
    run = jn.load_run("runs/mlp-mnist-...")         # a trained run, back in one line
    probs = run.predict(images)

Modules: ``layers``, ``conv`` (layers and their hand-written backward passes), ``network``
(layers as composable values, ``serial``, ``residual``), ``models`` (the families: MLP, ConvNet,
ResNet, ...), ``checkpoints`` (PyTorch/safetensors state dicts), ``cost`` (FLOPs and memory per example), ``gradcheck`` (check a backward against finite differences and jax.vjp),
``data`` (MNIST/CIFAR-10), ``config``, ``optim``, ``steps``, ``training``, ``runs``,
``sweep``, ``parallel``; ``docs/design.md`` says what each owns.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("jaxnets")
except _metadata.PackageNotFoundError:  # run from a checkout that was not pip-installed
    __version__ = "0+unknown"

from jaxnets import (checkpoints, config, conv, cost, data, gradcheck, layers, models, network, optim, parallel, runs, steps,  # noqa: E402
                     sweep, training)
from jaxnets.models import export_torchvision  # noqa: E402
from jaxnets.runs import load_run  # noqa: E402

__all__ = ["__version__", "checkpoints", "config", "export_torchvision", "conv", "cost", "data", "gradcheck", "layers", "load_run", "models", "network", "optim", "parallel", "runs",
           "steps", "sweep", "training"]
