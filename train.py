#!/usr/bin/env python
"""Train an MLP or ConvNet on MNIST or CIFAR-10: ``python train.py --help`` (same as ``jaxnets-train``)."""

import signal
import sys

if __name__ == "__main__":
    caught = []

    def interrupted(signum, frame):  # recorded too: JAX's import can swallow the KeyboardInterrupt
        caught.append(signum)
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, interrupted)
    unraisable = sys.unraisablehook  # "Exception ignored in ...": the swallowed Ctrl-C is acted on, not shown

    def quiet_interrupts(info):
        if not isinstance(info.exc_value, KeyboardInterrupt):
            unraisable(info)
    sys.unraisablehook = quiet_interrupts
    try:
        from jaxnets.cli import run  # jax is imported here
    except KeyboardInterrupt:
        caught.append(signal.SIGINT)
    if caught:
        print("\ninterrupted during start-up: nothing was trained", file=sys.stderr)
        sys.exit(130)
    sys.exit(run())
