#!/usr/bin/env python
"""Train an MLP or ConvNet on MNIST or CIFAR-10: a thin CLI over :func:`jaxnets.training.train`.

    python train.py --model mlp --dataset mnist
    python train.py --model mlp --dataset mnist --data-dir ../shared/data/mnist --epochs 10
    python train.py --preset course_mlp --data-dir DIR_WITH_cifar-10-batches-py

Every flag's default comes from ``TrainConfig``; ``--help`` lists them.
"""

import argparse
import dataclasses
import json
import os
import sys

HELP = {
    "model": "architecture: mlp, convnet (the course mini-VGG) or preact_convnet (its pre-activation residual variant)",
    "dataset": "mnist or cifar10",
    "data_dir": "directory with the standard files (MNIST IDX .gz; cifar-10-batches-py/ or cifar-10-python.tar.gz); "
                "else $JAXNETS_DATA_DIR, else tensorflow-datasets",
    "epochs": "training epochs",
    "batch_size": "examples per step",
    "optimizer": "Optax optimizer",
    "lr": "peak learning rate",
    "weight_decay": "weight decay on weights (not biases/BN): decoupled for adamw, L2 on the gradient otherwise",
    "momentum": "momentum of --optimizer momentum/nesterov",
    "schedule": "learning-rate schedule: constant, cosine (decay to 0), onecycle, step (x0.1 at 50%% and 75%%)",
    "warmup_epochs": "linear warm-up from 0 (constant/cosine/step schedules)",
    "hidden_units": "MLP hidden sizes, comma separated; empty string for logistic regression",
    "conv_plan": "ConvNet layers, comma separated: a width is conv3x3-BN-ReLU, M a 3x3/2 max pool "
                 "(e.g. 32,32,M,64,64,M); empty: the course's mini-VGG",
    "activation": "MLP activation",
    "batch_norm": "MLP: batch norm between each linear layer and its activation",
    "dropout": "MLP dropout rate after each hidden activation",
    "init": "weight init: kaiming, lecun, pytorch (torch.nn defaults) or course (N(0, 1e-4^2))",
    "label_smoothing": "label smoothing of the cross-entropy targets",
    "augment": "CIFAR-10: random crop with 4-pixel padding + horizontal flip, on the device",
    "normalize": "channel: per-channel mean/std of the training split; mean_image: subtract the mean image from raw 0..255 pixels (the course)",
    "val_size": "examples held out from train for validation (seeded)",
    "grad": "gradient path: autodiff (jax.grad) or manual (the hand-written backward passes: the same "
            "gradients up to rounding, and on CPU the faster path for the ConvNet; README, Performance)",
    "seed": "seed of init, split, shuffling, augmentation and dropout",
    "max_steps": "stop after this many steps (0: epochs decide)",
    "train_subset": "use only the first N training images (0: all)",
    "eval_batch_size": "batch size of evaluation",
    "chunk_steps": "steps per compiled call (the progress bar advances per chunk)",
    "devices": "data parallel over this many devices (0: all local devices, or all devices of a multi-process "
               "run); the batch size is global and must divide evenly; vmapped sweeps use one device",
    "sync_bn": "with --devices > 1: batch-norm statistics synchronised over all devices (default: per device)",
    "out": "run directory (default runs/<model>-<dataset>-<timestamp>)",
    "progress": "progress bar",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` (config flags state their own default in the help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    from jaxnets import data as D
    from jaxnets import layers as L
    from jaxnets import training as T

    choices = {"model": T.MODELS, "dataset": D.DATASETS, "optimizer": T.OPTIMIZERS, "schedule": T.SCHEDULES,
               "normalize": T.NORMALIZATIONS, "activation": tuple(L.ACTIVATIONS), "init": L.INIT_SCHEMES,
               "grad": ("autodiff", "manual")}
    parser = argparse.ArgumentParser(
        description="Train an MLP or ConvNet on MNIST or CIFAR-10 with jaxnets.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(T.PRESETS),
                        help="start from a named setup (flags given explicitly override it): "
                        + "; ".join(f"{k}: {v}" for k, v in T.PRESETS.items()).replace("%", "%%"))
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run in DIR from its last epoch checkpoint; with --sweep, the interrupted "
                             "sweep in DIR (same flags): finished chunks are kept, partly trained ones continue")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the configuration (with --sweep: the groups, chunks, members, memory per "
                             "member, steps and work share) and exit without loading data or training")
    parser.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                        help="sweep a setting (repeat for a grid: every combination trains, vmapped per shape "
                             "group); KEY is any flag name without '--'; integer ranges A..B; hidden units "
                             "300x100 for two layers, none for zero; e.g. --sweep lr=1e-2,1e-3 --sweep seed=0..2")
    parser.add_argument("--memory-budget", metavar="BYTES",
                        help="sweeps: estimated memory per chunk of members, e.g. 4G (default: 25%% of free memory)")
    parser.add_argument("--max-members", type=int, metavar="N", help="sweeps: at most N configurations per chunk")
    parser.add_argument("--compile-cache", metavar="DIR",
                        default=os.environ.get("JAXNETS_COMPILE_CACHE", T.DEFAULT_COMPILE_CACHE),
                        help="keep compiled programs in DIR so the next run with the same shapes skips XLA "
                             "compilation; 'off' disables (env JAXNETS_COMPILE_CACHE)")
    parser.add_argument("--coordinator-address", metavar="HOST:PORT", default=os.environ.get("JAXNETS_COORDINATOR_ADDRESS"),
                        help="multi-process run: address of process 0 for jax.distributed.initialize "
                             "(env JAXNETS_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, metavar="N", default=_env_int("JAXNETS_NUM_PROCESSES"),
                        help="multi-process run: number of processes (env JAXNETS_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, metavar="I", default=_env_int("JAXNETS_PROCESS_ID"),
                        help="multi-process run: this process's index, 0..N-1 (env JAXNETS_PROCESS_ID)")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-process run with the settings JAX detects itself (SLURM, Open MPI, TPU pod slices)")
    for field in dataclasses.fields(T.TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{HELP[field.name]} (default: {default})")
        elif field.name == "hidden_units":
            parser.add_argument(flag, type=_int_list, default=None, metavar="N,N,...",
                                help=f"{HELP[field.name]} (default: {','.join(map(str, default))})")
        elif field.name == "conv_plan":
            parser.add_argument(flag, type=_conv_plan, default=None, metavar="N,M,...",
                                help=HELP[field.name])
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if field.name in ("lr", "weight_decay", "momentum", "dropout", "label_smoothing", "warmup_epochs"):
                kind = float
            parser.add_argument(flag, type=kind, default=None, choices=choices.get(field.name),
                                help=f"{HELP[field.name]} (default: {default})")
    return parser


def _env_int(name):
    value = os.environ.get(name)
    return int(value) if value else None


def _int_list(text):
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _conv_plan(text):
    items = [v.strip() for v in text.split(",") if v.strip()]
    try:
        return tuple("M" if v.upper() == "M" else int(v) for v in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths and M (max pool), got {text!r}")


def config_from_args(args):
    from jaxnets import training as T

    values = dict(T.PRESETS[args.preset]) if args.preset else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(T.TrainConfig)
                   if getattr(args, f.name) is not None})
    return T.TrainConfig(**values)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from jaxnets import training as T

    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    from jaxnets import parallel as P

    try:  # before anything else touches a JAX backend
        P.initialize(args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed)
    except ValueError as e:
        parser.error(str(e))
    if args.compile_cache.strip().lower() not in ("", "off", "none", "0"):
        try:
            T.use_compile_cache(args.compile_cache)
        except T.TrainingError as e:
            parser.error(str(e))
    if args.sweep:
        return _sweep(parser, args, config)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(config), indent=2, default=str))
        return 0
    return _exit_code(lambda: T.train(config, resume=args.resume))


def _exit_code(run):
    """Run; a data/config/run error is one line on stderr and exit 2, Ctrl-C exit 130."""
    from jaxnets import data as D
    from jaxnets import training as T

    try:
        run()
    except (D.DataError, T.TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _sweep(parser, args, config):
    from jaxnets import sweep as S

    if args.resume and config.out and os.path.abspath(config.out) != os.path.abspath(args.resume):
        parser.error(f"--resume {args.resume} continues the sweep in that directory; --out {config.out} differs")
    if args.max_members is not None and args.max_members <= 0:
        parser.error(f"--max-members must be positive, got {args.max_members}")
    try:
        axes = S.parse_sweep(args.sweep, config)
        S.expand(config, axes)
        budget = S.parse_bytes(args.memory_budget) if args.memory_budget else None
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(S.dry_run(config, axes, budget=budget, max_members=args.max_members))
        return 0
    return _exit_code(lambda: S.sweep(config, axes, out=args.resume, budget=budget, max_members=args.max_members,
                                      resume=args.resume is not None))


if __name__ == "__main__":
    sys.exit(main())
