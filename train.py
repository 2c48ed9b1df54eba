#!/usr/bin/env python
"""Train an MLP or ConvNet on MNIST or CIFAR-10: ``python train.py --help`` (same as ``jaxnets-train``)."""

import sys

from jaxnets.cli import run

if __name__ == "__main__":
    sys.exit(run())
