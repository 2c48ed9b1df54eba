"""The command line: ``python train.py ...`` and ``jaxnets-train ...`` (same flags).

A thin shell over :func:`jaxnets.training.train` and :func:`jaxnets.sweep.sweep`: the
flags, their defaults, help texts and groups are generated from
:class:`jaxnets.config.TrainConfig`'s fields. Exit codes: 0 success, 2 usage or data error
(one line on stderr, a malformed ``$XLA_FLAGS`` included), 3 the run diverged, 130
interrupted (Ctrl-C or SIGTERM; the last epoch checkpoint is kept, ``--resume DIR``
continues); 1 when XLA itself aborts on an ``$XLA_FLAGS`` option it does not know
(:func:`xla_flags_problem` checks the syntax only, not XLA's list of names).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import signal
import sys
import textwrap

from jaxnets import config as config_lib

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 2, 3, 130

EXAMPLES = """examples:
  jaxnets-train --model mlp --dataset mnist --epochs 1
  jaxnets-train --model mlp --dataset mnist --hidden-units 300 --activation sigmoid --optimizer sgd --lr 0.1
  jaxnets-train --preset course_mlp --grad manual
  jaxnets-train --resume runs/mlp-mnist-20261130-101500 --epochs 20
  jaxnets-train --model mlp --dataset mnist --sweep lr=1e-2,1e-3 --sweep seed=0..2 --out runs/lr-sweep

exit codes: 0 done, 2 usage or data error, 3 diverged, 130 interrupted (resume with --resume DIR);
  1 is XLA's own abort on an XLA_FLAGS option it does not know (its syntax is checked: exit 2)"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; wraps help texts at spaces only, so a flag name such
    as ``--batch-size`` is never split across two lines at its hyphen."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), and which
    suggests the nearest flag for a misspelt one."""

    def parse_args(self, args=None, namespace=None):
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(_unknown_message(self, unknown))
        return args

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _unknown_message(parser, unknown):
    """'unrecognized arguments: --epcohs 3 (did you mean --epochs?)'."""
    text = f"unrecognized arguments: {' '.join(unknown)}"
    names = [o[2:] for action in parser._actions for o in action.option_strings if o.startswith("--")]
    for arg in unknown:
        if arg.startswith("--"):  # compared without the '--' every flag shares
            near = difflib.get_close_matches(arg[2:].split("=", 1)[0], names, n=1, cutoff=0.6)
            if near:
                return f"{text} (did you mean --{near[0]}?)"
    return f"{text} (--help lists the options)"


def build_parser():
    """The argument parser: run-level flags plus one flag per TrainConfig field, in groups."""
    parser = _Parser(
        prog=os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "jaxnets-train",
        usage="%(prog)s [--model M] [--dataset D] [options]   (--help lists every option, in groups)",
        description="Train an MLP or ConvNet on MNIST or CIFAR-10 with jaxnets. Every default is shown once.",
        formatter_class=_Formatter, epilog=EXAMPLES, allow_abbrev=False)
    run = parser.add_argument_group("run and output")
    groups = {name: run if name == "run and output" else parser.add_argument_group(name) for name in config_lib.GROUPS}
    run.add_argument("--preset", choices=sorted(config_lib.PRESETS), metavar="NAME",
                     help=f"start from a named setup: {', '.join(sorted(config_lib.PRESETS))} (--preset NAME --dry-run "
                          f"prints its settings); flags given explicitly override it")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR with its saved settings (flags may only extend --epochs or "
                          "change --data-dir/--data-source/--devices/--progress); with --sweep, the sweep in DIR")
    run.add_argument("--dry-run", action="store_true",
                     help="print the configuration (with --sweep: the plan) and exit without loading data")
    for field in dataclasses.fields(config_lib.TrainConfig):
        _add_setting(groups[field.metadata["group"]], field)
    sweeps = parser.add_argument_group("sweeps")
    sweeps.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                        help="sweep a setting (repeat for a grid of every combination); KEY is a flag name without "
                             "'--'; integer ranges A..B; e.g. --sweep lr=1e-2,1e-3 --sweep seed=0..2 "
                             "--sweep hidden-units=100,300x100")
    sweeps.add_argument("--memory-budget", metavar="BYTES",
                        help="estimated memory per wave of members (a group too big for it trains in waves), e.g. 4G "
                             "(default: 25%% of free memory)")
    sweeps.add_argument("--max-members", type=int, metavar="N", help="at most N configurations per wave")
    perf = groups["performance"]
    from jaxnets.training import DEFAULT_COMPILE_CACHE
    perf.add_argument("--compile-cache", metavar="DIR",
                      default=os.environ.get("JAXNETS_COMPILE_CACHE", DEFAULT_COMPILE_CACHE),
                      help="keep compiled programs in DIR so a later run with the same shapes skips XLA "
                           "compilation; 'off' disables (env JAXNETS_COMPILE_CACHE; default %(default)s)")
    multi = groups["multi-device"]
    multi.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="multi-process run: address of process 0 (env JAXNETS_COORDINATOR_ADDRESS)")
    multi.add_argument("--num-processes", type=int, metavar="N",
                       help="multi-process run: number of processes (env JAXNETS_NUM_PROCESSES)")
    multi.add_argument("--process-id", type=int, metavar="I",
                       help="multi-process run: this process's index, 0..N-1 (env JAXNETS_PROCESS_ID)")
    multi.add_argument("--distributed", action="store_true",
                       help="multi-process run with the settings JAX detects itself (SLURM, Open MPI, TPU pods)")
    return parser


def _describe(values):
    return ", ".join(f"{config_lib.flag(k)} {config_lib.format_setting(v, k)}" for k, v in values.items())


def _add_setting(group, field):
    flag, help_text, default = config_lib.flag(field.name), field.metadata["help"], field.default
    shown = "" if default is None else f" (default: {config_lib.format_setting(default) if default != () else 'none'})"
    if "(default:" in help_text:
        shown = ""  # the help says what the default means (--conv-plan, --sync-bn, --data-dir)
    if isinstance(default, bool):
        shown = shown and f" (default: {flag if default else '--no-' + flag[2:]})"
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text + shown)
        return
    valid = config_lib.choices(field.name)
    group.add_argument(flag, type=_parser_of(field.name), default=None, choices=valid,
                       metavar=None if valid else _METAVARS.get(field.name, "N" if type(default) is int else "X"),
                       help=help_text.replace("%", "%%") + shown)


_METAVARS = {"data_dir": "DIR", "out": "DIR", "hidden_units": "SIZES", "conv_plan": "PLAN", "pretrained": "FILE"}


def _parser_of(name):
    def parse(text):
        try:
            if name == "hidden_units" and "," in text:  # the old syntax, still read
                try:
                    value = config_lib.parse_setting(name, text.replace(",", "x"))
                except ValueError:  # invalid in either form: the error quotes what was typed
                    config_lib.parse_setting(name, text)
                    raise
                print(f"note: {config_lib.flag(name)} {text}: write {text.replace(',', 'x')} (the comma form is "
                      "deprecated; 'x' is the one syntax, as in --sweep)", file=sys.stderr)
                return value
            return config_lib.parse_setting(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = name  # argparse names the type in its messages
    return parse


def given_settings(args):
    """The settings named on the command line (a preset's values, then explicit flags)."""
    values = dict(config_lib.PRESETS[args.preset]) if args.preset else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(config_lib.TrainConfig)
                   if getattr(args, f.name) is not None})
    return values


def config_from_args(args):
    """The TrainConfig of the command line: defaults, then the preset, then explicit flags."""
    return config_lib.TrainConfig(**given_settings(args))


def _env_defaults(parser, args):
    """Multi-process settings from the environment where no flag gave them (a bad value is a usage error)."""
    if args.coordinator_address is None:
        args.coordinator_address = os.environ.get("JAXNETS_COORDINATOR_ADDRESS") or None
    for name in ("num_processes", "process_id"):
        env = "JAXNETS_" + name.upper()
        if getattr(args, name) is None and os.environ.get(env):
            try:
                setattr(args, name, int(os.environ[env]))
            except ValueError:
                parser.error(f"${env} must be an integer, got {os.environ[env]!r}")


def xla_flags_problem(text: str | None) -> str | None:
    """What is wrong with ``$XLA_FLAGS``'s syntax, or None: XLA aborts the process (exit 1)
    on the first use of a backend when its value neither is a file of flags (a value not
    starting with ``--`` names one) nor splits into ``--name`` / ``--name=value`` words, and
    ignores a word that is not an option (``--flag 8`` sets nothing to 8). The names and
    values are XLA's to judge (an unknown one still ends in XLA's own message and exit 1),
    so they are not checked here."""
    import re
    import shlex

    text = (text or "").strip()
    if not text:
        return None
    if not text.startswith("--"):
        if os.path.isfile(text):
            return None
        return (f"$XLA_FLAGS {text!r}: XLA reads a value not starting with -- as a file of flags, and there is no "
                f"such file; give --name=value options (XLA_FLAGS='--xla_cpu_multi_thread_eigen=false') or unset it")
    try:
        words = shlex.split(text)
    except ValueError:
        return None  # an unbalanced quote: XLA's own parser decides
    for word in words:
        if not re.fullmatch(r"--[A-Za-z0-9_]+(=.*)?", word, re.S):
            return (f"$XLA_FLAGS: {word!r} is not a --name or --name=value option (XLA would abort on it or "
                    f"ignore it); write each option as --name=value, separated by spaces")
    return None


def main(argv=None):
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _env_defaults(parser, args)
    problem = xla_flags_problem(os.environ.get("XLA_FLAGS"))  # before any backend reads it
    if problem:
        parser.error(problem)
    if args.resume is not None and not args.resume.strip():  # '' would start a new run instead
        parser.error("--resume is empty: give the run (or sweep) directory to continue")
    try:
        config = config_from_args(args).validate()
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    if args.max_members is not None and args.max_members <= 0:
        parser.error(f"--max-members must be positive, got {args.max_members}")
    from jaxnets import parallel, training

    try:  # before anything else touches a JAX backend
        parallel.initialize(args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed)
    except ValueError as e:
        parser.error(str(e))
    if args.compile_cache.strip().lower() not in ("", "off", "none", "0"):
        try:
            training.use_compile_cache(args.compile_cache)
        except training.TrainingError as e:
            parser.error(str(e))
    if args.sweep:
        return _sweep(parser, args, config)
    if args.dry_run:
        if args.preset:
            print(f"preset {args.preset}: {_describe(config_lib.PRESETS[args.preset])} (flags given explicitly override "
                  f"it); the configuration:")
        print(json.dumps(dataclasses.asdict(config), indent=2, default=str))
        return EXIT_OK
    if args.resume:
        return _exit_code(lambda: training.train(resume=args.resume, changes=given_settings(args),
                                                 command=_command(argv)))
    return _exit_code(lambda: training.train(config, command=_command(argv)))


def run():
    """The console entry (``train.py``, ``jaxnets-train``): :func:`main`, ending the process
    at once after an interrupt. A Ctrl-C or SIGTERM that lands inside XLA's compilation can
    leave native state that crashes the interpreter's teardown (SIGSEGV: exit -11 instead of
    130, seen with jax 0.10.2 on CPU); the run's files are written and its lock released by
    then, so the teardown is skipped. A Ctrl-C during start-up (imports, argument checks,
    before a run catches it) is the same exit 130 with one line, not a traceback."""
    from jaxnets import runs

    runs.catch_interrupts()
    try:
        code = main()
    except KeyboardInterrupt:
        print("\ninterrupted during start-up: nothing was trained", file=sys.stderr)
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _command(argv):
    return [os.path.basename(sys.argv[0]) or "jaxnets-train", *(sys.argv[1:] if argv is None else argv)]


def _exit_code(run, *, diverged_exit=EXIT_DIVERGED):
    """Run; a data/config/run error is one line on stderr (exit 2), a divergence
    ``diverged_exit``, an interrupt (Ctrl-C or SIGTERM) exit 130."""
    import jax

    from jaxnets import data as D
    from jaxnets import training

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run()
    except (D.DataError, training.TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The memory estimate is rough: a run it let through can still not fit.
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}); use a smaller --batch-size or "
              f"--eval-batch-size, or a smaller model", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        from jaxnets.runs import ReportedInterrupt

        if not isinstance(e, ReportedInterrupt):  # before training began: no run has said so
            print("\ninterrupted before training started: nothing was trained", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    from jaxnets.runs import is_diverged

    diverged = isinstance(result, dict) and is_diverged(result)
    return diverged_exit if diverged else EXIT_OK


def _terminate(signum, frame):
    # A scheduler's preemption stops a run as Ctrl-C does: the last epoch checkpoint is kept.
    raise KeyboardInterrupt


def _sweep(parser, args, config):
    from jaxnets import sweep

    if args.resume and config.out and os.path.abspath(config.out) != os.path.abspath(args.resume):
        parser.error(f"--resume {args.resume} continues the sweep in that directory; --out {config.out} differs")
    try:
        axes = sweep.parse_sweep(args.sweep, config)
        sweep.expand(config, axes)
        budget = sweep.parse_bytes(args.memory_budget) if args.memory_budget else None
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(sweep.dry_run(config, axes, budget=budget, max_members=args.max_members))
        return EXIT_OK
    return _exit_code(lambda: sweep.sweep(config, axes, out=args.resume, budget=budget, max_members=args.max_members,
                                      resume=args.resume is not None), diverged_exit=EXIT_OK)
