"""Fault cases of issue 16 replayed end to end: bad flags, damaged run files, interrupts and
kills at chosen moments, full disks, concurrent runs, sweeps that fail half-way.

Each case runs ``train.py`` in fresh child processes in a temporary directory, on a tiny
synthetic MNIST (IDX files written here, so no dataset is needed), and is *handled* when

* the exit code is the documented one (0 done, 2 usage/data error, 3 diverged, 130 interrupted),
* nothing prints a traceback, and an error is one ``error:`` line on stderr (an argparse
  usage line may precede it) naming what is wrong,
* the files left behind are what they should be (a refused resume leaves the run byte for
  byte as it was; an interrupted or killed run resumes to metrics with every epoch exactly
  once; no ``.tmp`` or ``.lock`` remains).

    python -m benchmarks.faults                 # every case: one line each, then "N of M handled"
    python -m benchmarks.faults -k resume -v    # the cases whose name contains "resume", with output
    python -m benchmarks.faults --root DIR      # against another checkout (e.g. an older commit)

Disk-full cases mount a 2 MiB tmpfs (root only; skipped otherwise) and fill it at a chosen
write through a hook; the child mode ``--child HOOK -- ARGS`` runs ``train.py ARGS`` with
such a hook installed (see :func:`_install_hook`). The exit status is 0 when every case
that ran was handled.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "checkpoint.msgpack")


# ------------------------------------------------------------------------------ data


def write_idx(path, array):
    """An IDX file of unsigned bytes (gzipped): magic 0x0803/0x0801, big-endian sizes, data."""
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def digits(n, shape=(28, 28), *, label=None, seed=0):
    """``(images (n, *shape) uint8, labels (n,))``: noise where class k is a bright band at
    rows 2k..2k+2, so a tiny MLP learns it in one epoch; ``label`` gives every image that
    class instead (nothing to learn)."""
    rng = np.random.default_rng(seed)
    y = np.full(n, label) if label is not None else rng.integers(0, 10, n)
    x = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
    for i, k in enumerate(y):
        x[i, 2 * k:2 * k + 3] = 250
    return x, y.astype(np.int32)


def write_mnist(folder, *, n_train=600, n_test=200, test_shape=(28, 28), labels=(None, None), constant=False):
    """Four MNIST-format files of :func:`digits` in ``folder``; ``labels=(train, test)`` fixes
    each split's label (e.g. ``(0, 1)``: a run ends at chance on the test split);
    ``constant``: every training pixel 128 (std 0, nothing to normalise by)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x, y = digits(n_train, label=labels[0], seed=0)
    if constant:
        x[:] = 128
    write_idx(folder / "train-images-idx3-ubyte.gz", x)
    write_idx(folder / "train-labels-idx1-ubyte.gz", y)
    x, y = digits(n_test, test_shape, label=labels[1], seed=1)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y)
    return folder


# ------------------------------------------------------------------- child-side hooks


def _fill(directory):
    """Fill the file system holding ``directory`` (a filler file, written until ENOSPC)."""
    with open(Path(directory) / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def _install_hook(spec):
    """Install a fault in this process's jaxnets, then ``train.py`` runs as usual. ``spec``:

    * ``signal:FILES:N:SIG`` -- right after the N-th completed write of any of FILES
      (comma-separated run file names; every write goes through ``runs.write_atomic``),
      send SIG to this process (``KILL``: between that write and the next);
    * ``fill:FILE:N`` -- just before the N-th write of FILE, fill the disk it is on;
    * ``fill-curves`` -- fill the disk just before ``curves.png`` is drawn;
    * ``wait:PATH`` -- before loading the data (the run's lock is held by then), wait until
      PATH exists (a second process can be started against a held run).
    """
    from jaxnets import data, plots, runs

    kind, *rest = spec.split(":")
    if kind == "wait":
        load, go = data.load_dataset, spec.partition(":")[2]

        def load_dataset(*args, **kwargs):
            while not os.path.exists(go):
                time.sleep(0.05)
            return load(*args, **kwargs)

        data.load_dataset = load_dataset
        return
    if kind == "fill-curves":
        plot = plots.plot_curves

        def plot_curves(metrics, path, *args, **kwargs):
            _fill(Path(path).parent)
            return plot(metrics, path, *args, **kwargs)

        plots.plot_curves = plot_curves
        return
    names, n = set(rest[0].split(",")), int(rest[1])
    write, count = runs.write_atomic, [0]

    def write_atomic(path, data):
        hit = Path(path).name in names
        count[0] += hit
        if kind == "fill" and hit and count[0] == n:
            _fill(Path(path).parent)
        write(path, data)
        if kind == "signal" and hit and count[0] == n:
            os.kill(os.getpid(), getattr(signal, "SIG" + rest[2]))

    runs.write_atomic = write_atomic


def _child(spec, args):
    sys.argv = ["train.py", *args]
    _install_hook(spec)
    from jaxnets.cli import run  # the entry train.py calls

    return run()


# ------------------------------------------------------------------------ the harness


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float


@dataclass
class Case:
    name: str
    fn: object
    rc: int
    says: str | None
    timeout: float
    needs: str | None = None


CASES: list[Case] = []


def case(name, rc=2, says=None, timeout=120, needs=None):
    """Register ``fn(ctx) -> (Result, [problems])`` as a fault case expecting exit ``rc`` and
    a message matching the regex ``says`` (the error line for exit 2, else all output)."""
    def register(fn):
        CASES.append(Case(name, fn, rc, says, timeout, needs))
        return fn
    return register


class Context:
    """What a case runs in: its own directory, the shared data and a finished run to copy."""

    def __init__(self, root: Path, work: Path, case: Case, fixtures):
        self.root, self.case, self.fixtures = root, case, fixtures
        self.dir = work / case.name
        self.dir.mkdir(parents=True)
        self.data = fixtures["data"]

    def base(self, *extra, data=None):
        """Training flags of a tiny, fast MLP run, then ``extra``."""
        return ["--data-dir", str(data or self.data), "--data-source", "files", "--hidden-units", "32",
                "--val-size", "100", "--batch-size", "50", "--dropout", "0", "--no-progress",
                "--compile-cache", "off", *map(str, extra)]

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXNETS_", "JAX_", "XLA_"))}
        # Unbuffered: a line is on the pipe when it is printed, so a signal sent after it lands after it.
        env.update(PYTHONPATH=str(self.root), PYTHONUNBUFFERED="1", JAXNETS_COMPILE_CACHE="off", **extra)
        return env

    def command(self, args, hook=None):
        if hook:
            return [sys.executable, str(Path(__file__).resolve()), "--child", hook, "--", *map(str, args)]
        return [sys.executable, str(self.root / "train.py"), *map(str, args)]

    def train(self, args, *, hook=None, env=None, cwd=None, timeout=None) -> Result:
        t0 = time.time()
        try:
            p = subprocess.run(self.command(args, hook), capture_output=True, text=True, cwd=cwd or self.dir,
                               env=self.env(**(env or {})), timeout=timeout or self.case.timeout)
        except subprocess.TimeoutExpired as e:
            text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            return Result(-999, text(e.stdout), text(e.stderr) + "\n[timed out]", time.time() - t0)
        return Result(p.returncode, p.stdout, p.stderr, time.time() - t0)

    def start(self, args, *, hook=None):
        """A child ``train.py`` left running (stdout piped, line by line)."""
        return subprocess.Popen(self.command(args, hook), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=self.dir, env=self.env(), bufsize=1)

    def interrupted(self, *args):
        """``train.py ARGS`` stopped by Ctrl-C right after its first epoch checkpoint: None, or
        ``(result, problems)`` for the case to return when it did not exit 130."""
        first = self.train(args, hook="signal:checkpoint.msgpack:1:INT")
        return None if first.rc == 130 else (first, [f"the interrupted run exited {first.rc}, not 130"])

    def copy(self, fixture, name="run") -> Path:
        target = self.dir / name
        shutil.copytree(self.fixtures[fixture], target)
        return target


def finish(proc, timeout=120) -> Result:
    t0 = time.time()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += "\n[timed out]"
    return Result(proc.returncode, out, err, time.time() - t0)


def wait_for_line(proc, pattern, timeout=60):
    """Read the child's stdout until a line matches ``pattern``; the lines read."""
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise RuntimeError(f"no line matching {pattern!r} (read {lines[-3:]})")


# --------------------------------------------------------------------- file checks


def snapshot(directory: Path):
    """``{relative path: sha256}`` of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def unchanged(directory, before):
    after = snapshot(directory)
    if after == before:
        return []
    changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
    return [f"files changed: {', '.join(changed)}"]


def strict_json(path: Path):
    """The JSON in ``path``, rejecting NaN/Infinity as strict readers do."""
    def reject(name):
        raise ValueError(f"{path.name}: bare {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=reject)


def epochs_of(run: Path):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [strict_json_line(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def strict_json_line(line):
    def reject(name):
        raise ValueError(f"metrics.jsonl: bare {name} is not JSON")
    return json.loads(line, parse_constant=reject)


def leftovers(run: Path):
    """Temporary or lock files left in ``run``."""
    return [f"left {p.name}" for p in Path(run).glob("*") if p.name.endswith(".tmp") or p.name == ".lock"]


def complete(run: Path, epochs: int):
    """Problems with ``run`` as a completed run of ``epochs`` epochs: each epoch's metrics
    exactly once, a summary that agrees, strict JSON everywhere, nothing left over."""
    problems = leftovers(run)
    try:
        got = epochs_of(run)
        summary = strict_json(run / "summary.json")
        strict_json(run / "config.json")
    except (OSError, ValueError) as e:
        return problems + [f"{run.name}: {e}"]
    if got != list(range(1, epochs + 1)):
        problems.append(f"metrics epochs {got}, expected 1..{epochs}")
    if summary.get("status") != "completed" or summary.get("epochs") != epochs:
        problems.append(f"summary says {summary.get('status')!r}, {summary.get('epochs')} epochs")
    return problems


def saved_epoch(run: Path):
    """The epoch of ``run``'s checkpoint, read by the checked-out jaxnets in a child process."""
    code = ("import sys; from jaxnets import runs; "
            "print(runs.checkpoint_epoch(sys.argv[1]))")
    p = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return p.stdout.strip() if p.returncode == 0 else f"unreadable ({p.stderr.strip().splitlines()[-1:]})"


# ------------------------------------------------------------------------- the cases

# Bad flags: one error line naming the flag, exit 2, before any data is read.
FLAG_CASES = {
    "lr-nan": (["--lr", "nan"], "--lr"),
    "lr-inf": (["--lr", "inf"], "--lr"),
    "lr-zero": (["--lr", "0"], "--lr"),
    "lr-negative": (["--lr", "-1"], "--lr"),
    "weight-decay-negative": (["--weight-decay", "-1"], "--weight-decay"),
    "momentum-negative": (["--momentum", "-5"], "--momentum"),
    "label-smoothing-2": (["--label-smoothing", "2"], "--label-smoothing"),
    "dropout-1": (["--dropout", "1"], "--dropout"),
    "warmup-negative": (["--warmup-epochs", "-3"], "--warmup-epochs"),
    "warmup-1e30": (["--warmup-epochs", "1e30"], "--warmup-epochs"),
    "max-steps-negative": (["--max-steps", "-5"], "--max-steps"),
    "train-subset-negative": (["--train-subset", "-100"], "--train-subset"),
    "seed-2**32": (["--seed", "4294967296"], "--seed"),
    "seed-negative": (["--seed", "-1"], "--seed"),
    "epochs-0": (["--epochs", "0"], "--epochs"),
    "batch-size-0": (["--batch-size", "0"], "--batch-size"),
    "val-size-negative": (["--val-size", "-1"], "--val-size"),
    "eval-batch-size-0": (["--eval-batch-size", "0"], "--eval-batch-size"),
    "chunk-steps-0": (["--chunk-steps", "0"], "--chunk-steps"),
    "hidden-units-text": (["--hidden-units", "abc"], "--hidden-units"),
    "hidden-units-0": (["--hidden-units", "0"], "--hidden-units"),
    "hidden-units-empty": (["--hidden-units", ""], "--hidden-units"),
    "sweep-empty-item": (["--sweep", "hidden-units=100,"], "--sweep hidden-units=100,"),
    "devices-negative": (["--devices", "-1"], "--devices"),
    "optimizer-unknown": (["--optimizer", "lbfgs"], "--optimizer"),
    "conv-plan-with-mlp": (["--model", "mlp", "--conv-plan", "8,M"], "--conv-plan"),
    "max-members-0": (["--sweep", "lr=0.1,0.01", "--max-members", "0"], "--max-members"),
    "memory-budget-text": (["--sweep", "lr=0.1,0.01", "--memory-budget", "lots"], "memory budget"),
    "num-processes-alone": (["--num-processes", "2"], "--coordinator-address"),
    "coordinator-without-port": (["--coordinator-address", "localhost", "--num-processes", "1",
                                  "--process-id", "0"], "--coordinator-address"),
    "process-id-out-of-range": (["--coordinator-address", "localhost:1", "--num-processes", "2",
                                 "--process-id", "5"], "--process-id"),
}


def _flag_case(name, args, says):
    @case(f"flag-{name}", says=re.escape(says), timeout=60)
    def run(ctx):
        # A data dir that does not exist: a flag checked after loading data would say so instead.
        res = ctx.train([*args, "--data-dir", str(ctx.dir / "no-data"), "--out", str(ctx.dir / "run")])
        return res, [] if not (ctx.dir / "run").exists() else ["created the run directory"]


for _name, (_args, _says) in FLAG_CASES.items():
    _flag_case(_name, _args, _says)


@case("env-num-processes-text", says=r"JAXNETS_NUM_PROCESSES")
def _(ctx):
    return ctx.train(ctx.base("--out", ctx.dir / "run"), env={"JAXNETS_NUM_PROCESSES": "abc"}), []


@case("env-num-processes-text-help", rc=0, says=r"usage:")
def _(ctx):
    return ctx.train(["--help"], env={"JAXNETS_NUM_PROCESSES": "abc"}), []


# --out: checked before the data is read (the data dir here does not exist).
@case("out-is-a-file", says=r"--out .*file")
def _(ctx):
    (ctx.dir / "f").write_text("x")
    return ctx.train(ctx.base("--out", ctx.dir / "f", data=ctx.dir / "no-data")), []


@case("out-under-a-file", says=r"--out ")
def _(ctx):
    (ctx.dir / "f").write_text("x")
    return ctx.train(ctx.base("--out", ctx.dir / "f" / "run", data=ctx.dir / "no-data")), []


@case("out-unwritable", says=r"--out .*(writable|read-only|cannot create)", needs="mount")
def _(ctx):
    mnt = ctx.dir / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], check=True)
    try:
        return ctx.train(ctx.base("--out", mnt / "run", data=ctx.dir / "no-data")), []
    finally:
        subprocess.run(["umount", str(mnt)])


@case("out-holds-files", says=r"already holds files")
def _(ctx):
    run = ctx.dir / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    return ctx.train(ctx.base("--out", run)), unchanged(run, before)


@case("out-holds-a-users-lock", says=r"already holds files")
def _(ctx):
    run = ctx.dir / "run"
    run.mkdir()
    (run / ".lock").write_text("my notes, not a lock\n")
    before = snapshot(run)
    return ctx.train(ctx.base("--out", run)), unchanged(run, before)


@case("resume-with-a-users-lock", says=r"\.lock: not a jaxnets lock")
def _(ctx):
    run = ctx.copy("done")
    (run / ".lock").write_text("garbage")
    before = snapshot(run)
    return ctx.train(["--resume", run, "--epochs", "3"]), unchanged(run, before)


@case("resume-with-another-runs-checkpoint", says=r"checkpoint\.msgpack belongs to another run")
def _(ctx):
    run, other = ctx.copy("done"), ctx.copy("done", "other")
    info = json.loads((other / "config.json").read_text())
    info["run_id"] = "0" * 32  # another run's (same settings, same shapes)
    (other / "config.json").write_text(json.dumps(info))
    shutil.copy(run / "checkpoint.msgpack", other / "checkpoint.msgpack")
    before = snapshot(other)
    return ctx.train(["--resume", other, "--epochs", "3"]), unchanged(other, before)


# Data checked before training.
@case("data-dir-missing", says=r"no-data")
def _(ctx):
    return ctx.train(ctx.base("--out", ctx.dir / "run", data=ctx.dir / "no-data")), []


@case("data-test-shape-differs", says=r"shape")
def _(ctx):
    res = ctx.train(ctx.base("--out", ctx.dir / "run", data=ctx.fixtures["data27"]))
    return res, [f"trained first ({name})" for name in ("metrics.jsonl", "checkpoint.msgpack")
                 if (ctx.dir / "run" / name).exists()]


@case("data-test-split-empty", says=r"empty")
def _(ctx):
    res = ctx.train(ctx.base("--out", ctx.dir / "run", data=ctx.fixtures["data0"]))
    return res, [f"trained first ({name})" for name in ("metrics.jsonl", "checkpoint.msgpack")
                 if (ctx.dir / "run" / name).exists()]


@case("data-constant-channel", says=r"channel 0 is constant")
def _(ctx):
    res = ctx.train(ctx.base("--out", ctx.dir / "run", data=ctx.fixtures["data-constant"]))
    return res, [f"trained first ({name})" for name in ("metrics.jsonl", "checkpoint.msgpack")
                 if (ctx.dir / "run" / name).exists()]


@case("data-batch-larger-than-train-split", says=r"batch")
def _(ctx):
    return ctx.train(ctx.base("--batch-size", "1000", "--out", ctx.dir / "run")), []


@case("data-train-subset-larger-than-the-data", says=r"--train-subset 1000 is more than the 600")
def _(ctx):
    return ctx.train(ctx.base("--train-subset", "1000", "--out", ctx.dir / "run")), []


@case("sweep-later-member-invalid-on-the-data", says=r"sweep member 001-val_size=600")
def _(ctx):
    out = ctx.dir / "sweep"
    res = ctx.train(ctx.base("--sweep", "val-size=100,600", "--epochs", "1", "--out", out))
    return res, [f"trained first ({p.name})" for p in out.glob("*")] if out.exists() else []


@case("data-val-size-takes-everything", says=r"val")
def _(ctx):
    return ctx.train(ctx.base("--val-size", "600", "--out", ctx.dir / "run")), []


@case("val-size-0-strict-json", rc=0)
def _(ctx):
    run = ctx.dir / "run"
    res = ctx.train(ctx.base("--val-size", "0", "--epochs", "1", "--out", run))
    problems = complete(run, 1) if res.rc == 0 else []
    if res.rc == 0 and strict_json(run / "summary.json").get("best_val_accuracy", 0) is not None:
        problems.append("best_val_accuracy is not null")
    return res, problems


@case("memory-estimate-too-big", says=r"(?i)memory.*--batch-size|--batch-size.*memory|GiB")
def _(ctx):
    res = ctx.train(ctx.base("--hidden-units", "60000x60000", "--out", ctx.dir / "run"))
    return res, [] if not (ctx.dir / "run" / "metrics.jsonl").exists() else ["trained"]


@case("memory-estimate-too-big-sweep", says=r"(?i)memory|GiB")
def _(ctx):
    return ctx.train(ctx.base("--hidden-units", "60000x60000", "--sweep", "seed=0,1", "--out", ctx.dir / "s")), []


# Resume: the saved settings; other settings refused naming the flag and both values; the run untouched.
REFUSED_ON_RESUME = {
    "lr": (["--lr", "0.1"], r"--lr 0\.1 .*0\.001"),
    "seed": (["--seed", "3"], r"--seed 3 .*\b0\b"),
    "activation": (["--activation", "tanh"], r"--activation '?tanh'? differs .*'?relu'?"),
    "weight-decay-added": (["--weight-decay", "0.01"], r"--weight-decay 0\.01 differs .*saved 0\b"),
    "optimizer": (["--optimizer", "sgd"], r"--optimizer '?sgd'? differs .*'?adam'?"),
    "batch-size": (["--batch-size", "25"], r"--batch-size 25 .*50"),
    "val-size": (["--val-size", "50"], r"--val-size 50 .*100"),
    "hidden-units": (["--hidden-units", "64"], r"--hidden-units 64 .*32"),
    "fewer-epochs": (["--epochs", "1"], r"--epochs 1"),
}


def _refused_case(name, args, says):
    @case(f"resume-refuses-{name}", says=says)
    def run(ctx):
        run = ctx.copy("done")
        before = snapshot(run)
        return ctx.train(["--resume", run, *args]), unchanged(run, before)


for _name, (_args, _says) in REFUSED_ON_RESUME.items():
    _refused_case(_name, _args, _says)


@case("resume-finished-run-left-untouched", rc=0, says=r"finished")
def _(ctx):
    run = ctx.copy("done")
    before = snapshot(run)
    return ctx.train(["--resume", run]), unchanged(run, before)


@case("resume-finished-run-damaged-checkpoint", says=r"results are intact, but its weights are not.*damaged")
def _(ctx):
    run = ctx.copy("done")
    data = bytearray((run / "checkpoint.msgpack").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / "checkpoint.msgpack").write_bytes(bytes(data))
    before = snapshot(run)
    return ctx.train(["--resume", run]), unchanged(run, before)


@case("data-refused-leaves-no-directory", says=r"no-data")
def _(ctx):
    res = ctx.train(ctx.base("--out", ctx.dir / "run", data=ctx.dir / "no-data"))
    default = ctx.train(ctx.base(data=ctx.dir / "no-data"))  # runs/<name>
    left = [str(p) for p in [ctx.dir / "run", *(ctx.dir / "runs").glob("*")] if p.exists()]
    return res, [f"left {p}" for p in left] + ([] if default.rc == 2 else [f"runs/<name>: exit {default.rc}"])


@case("resume-with-other-out", says=r"--out")
def _(ctx):
    run = ctx.copy("done")
    before = snapshot(run)
    res = ctx.train(["--resume", run, "--out", ctx.dir / "other"])
    return res, unchanged(run, before) + (["wrote --out"] if (ctx.dir / "other").exists() else [])


@case("resume-missing-directory", says=r"nowhere")
def _(ctx):
    return ctx.train(["--resume", ctx.dir / "nowhere"]), []


@case("resume-not-a-run-directory", says=r"config\.json")
def _(ctx):
    (ctx.dir / "empty").mkdir()
    return ctx.train(["--resume", ctx.dir / "empty"]), []


@case("resume-extends-epochs", rc=0, says=r"--epochs 2 -> 3")
def _(ctx):
    run = ctx.copy("done")
    res = ctx.train(["--resume", run, "--epochs", "3"], cwd=ctx.dir)
    problems = complete(run, 3) if res.rc == 0 else []
    if res.rc == 0:
        resumes = strict_json(run / "config.json").get("resumes", [])
        if not resumes or resumes[-1].get("changes", {}).get("epochs") != [2, 3]:
            problems.append(f"config.json resumes: {resumes}")
    return res, problems


@case("resume-alone-keeps-epochs-and-data-dir", rc=0)
def _(ctx):
    # Interrupted (Ctrl-C right after epoch 1's checkpoint) from one directory; resumed from
    # another with --resume alone: 3 epochs, the saved data dir.
    run = ctx.dir / "run"
    failed = ctx.interrupted(*ctx.base("--epochs", "3", "--out", run))
    if failed:
        return failed
    elsewhere = ctx.dir / "elsewhere"
    elsewhere.mkdir()
    res = ctx.train(["--resume", run], cwd=elsewhere)
    return res, complete(run, 3) if res.rc == 0 else []


@case("resume-new-data-dir-recorded", rc=0, says=r"--data-dir")
def _(ctx):
    run = ctx.dir / "run"
    failed = ctx.interrupted(*ctx.base("--epochs", "2", "--out", run))
    if failed:
        return failed
    moved = ctx.dir / "moved-data"
    shutil.copytree(ctx.data, moved)
    res = ctx.train(["--resume", run, "--data-dir", moved])
    problems = complete(run, 2) if res.rc == 0 else []
    if res.rc == 0 and strict_json(run / "config.json")["config"]["data_dir"] != str(moved):
        problems.append("config.json keeps the old data dir")
    return res, problems


@case("sigkill-between-metrics-and-checkpoint", rc=0)
def _(ctx):
    # Killed right after the first of epoch 2's two files is written, whichever comes first.
    run = ctx.dir / "run"
    first = ctx.train(ctx.base("--epochs", "3", "--out", run), hook="signal:metrics.jsonl,checkpoint.msgpack:3:KILL")
    if first.rc != -signal.SIGKILL:
        return first, [f"the child was not killed (exit {first.rc})"]
    res = ctx.train(["--resume", run])
    return res, complete(run, 3) if res.rc == 0 else []


@case("sigkill-at-a-random-moment", rc=0)
def _(ctx):
    run = ctx.dir / "run"
    proc = ctx.start(ctx.base("--epochs", "40", "--out", run))
    wait_for_line(proc, r"^epoch 3:")
    time.sleep(np.random.default_rng().uniform(0, 0.05))
    proc.kill()
    finish(proc)
    res = ctx.train(["--resume", run])
    return res, complete(run, 40) if res.rc == 0 else []


def _signal_case(signame):
    @case(f"{signame.lower()}-mid-run-then-resume", rc=0)
    def run(ctx):
        run = ctx.dir / "run"
        proc = ctx.start(ctx.base("--epochs", "40", "--out", run))
        wait_for_line(proc, r"^epoch 3:")
        proc.send_signal(getattr(signal, signame))
        first = finish(proc)
        problems = [] if first.rc == 130 else [f"{signame} exit {first.rc}, expected 130 ({first.err[-200:]})"]
        problems += ["traceback on interrupt"] if "Traceback" in first.err else []
        summary = strict_json(run / "summary.json") if (run / "summary.json").exists() else {}
        kept = saved_epoch(run)
        if summary.get("status") != "interrupted" or str(summary.get("epochs")) != kept or \
                len(epochs_of(run)) != summary.get("epochs"):
            problems.append(f"after {signame}: summary {summary.get('status')!r} {summary.get('epochs')} epochs, "
                            f"checkpoint epoch {kept}, metrics {len(epochs_of(run))}")
        problems += leftovers(run)
        res = ctx.train(["--resume", run])
        return res, problems + (complete(run, 40) if res.rc == 0 else [])


_signal_case("SIGTERM")
_signal_case("SIGINT")


@case("interrupt-in-epoch-1-then-resume", rc=0)
def _(ctx):
    run = ctx.dir / "run"
    proc = ctx.start(ctx.base("--epochs", "2", "--out", run))
    wait_for_line(proc, r"run dir")  # the last line before the first epoch, which compiles for seconds
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    first = finish(proc)
    problems = [] if first.rc == 130 else [f"exit {first.rc} on SIGTERM in epoch 1"]
    if "--resume" not in first.out + first.err:
        problems.append("the message does not say how to continue")
    res = ctx.train(["--resume", run])
    return res, problems + (complete(run, 2) if res.rc == 0 else [])


@case("diverged-exits-3", rc=3, says=r"diverged")
def _(ctx):
    run = ctx.dir / "run"
    res = ctx.train(ctx.base("--optimizer", "sgd", "--lr", "1e4", "--epochs", "2", "--out", run))
    status = strict_json(run / "summary.json").get("status", "") if (run / "summary.json").exists() else ""
    return res, [] if status.startswith("diverged") else [f"summary status {status!r}"]


@case("resume-diverged-run-refused", says=r"diverged")
def _(ctx):
    run = ctx.dir / "run"
    first = ctx.train(ctx.base("--optimizer", "sgd", "--lr", "1e4", "--epochs", "2", "--out", run))
    if first.rc != 3:
        return first, [f"first run exit {first.rc}"]
    before = snapshot(run)
    return ctx.train(["--resume", run]), unchanged(run, before)


@case("at-chance-warns", rc=0, says=r"chance")
def _(ctx):
    run = ctx.dir / "run"
    res = ctx.train(ctx.base("--epochs", "1", "--out", run, data=ctx.fixtures["data-chance"]))
    warning = strict_json(run / "summary.json").get("warning", "") if (run / "summary.json").exists() else ""
    return res, [] if "chance" in warning else ["no warning in summary.json"]


# Damaged run files: refused naming the file; nothing written.
def _damage_case(name, target, damage, says, extend=True):
    @case(f"damaged-{name}", says=says)
    def run(ctx):
        run = ctx.copy("done")
        path = run / target
        damage(path)
        before = snapshot(run)
        return ctx.train(["--resume", run, *(["--epochs", "3"] if extend else [])]), unchanged(run, before)


def _flip(path):
    data = bytearray(path.read_bytes())
    for i in np.random.default_rng(0).choice(len(data) // 2, 50, replace=False) + len(data) // 4:
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


_damage_case("checkpoint-flipped-bytes", "checkpoint.msgpack", _flip, r"checkpoint\.msgpack.*(damaged|SHA)")
_damage_case("checkpoint-truncated", "checkpoint.msgpack",
             lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]), r"checkpoint\.msgpack")
_damage_case("checkpoint-empty", "checkpoint.msgpack", lambda p: p.write_bytes(b""), r"checkpoint\.msgpack")
_damage_case("checkpoint-garbage", "checkpoint.msgpack", lambda p: p.write_bytes(os.urandom(4096)),
             r"checkpoint\.msgpack")
_damage_case("config-empty-object", "config.json", lambda p: p.write_text("{}"), r"config\.json", extend=False)
_damage_case("config-list", "config.json", lambda p: p.write_text("[1, 2]"), r"config\.json", extend=False)
_damage_case("config-invalid-json", "config.json", lambda p: p.write_text('{"config": {'), r"config\.json",
             extend=False)
_damage_case("config-unknown-setting", "config.json",
             lambda p: p.write_text(json.dumps({"config": {"learning_rate": 0.1}})), r"config\.json.*learning_rate",
             extend=False)
_damage_case("config-bad-value", "config.json",
             lambda p: p.write_text(p.read_text().replace('"lr": 0.001', '"lr": -1.0')), r"config\.json.*--lr",
             extend=False)
_damage_case("summary-invalid-json", "summary.json", lambda p: p.write_text("{oops"), r"summary\.json", extend=False)
_damage_case("summary-list", "summary.json", lambda p: p.write_text("[]"), r"summary\.json", extend=False)
_damage_case("metrics-invalid-line", "metrics.jsonl", lambda p: p.write_text(p.read_text() + "{half\n"),
             r"metrics\.jsonl")


# Locks: two writers of one run never run at once; a dead owner's lock is taken over.
@case("lock-held-by-a-live-process", says=r"another process")
def _(ctx):
    run = ctx.copy("done")
    (run / ".lock").write_text(f"{os.getpid()} {os.uname().nodename}\n")
    before = snapshot(run)
    return ctx.train(["--resume", run, "--epochs", "3"]), unchanged(run, before)


@case("lock-of-a-dead-process-taken-over", rc=0)
def _(ctx):
    run = ctx.copy("done")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / ".lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    res = ctx.train(["--resume", run, "--epochs", "3"])
    return res, complete(run, 3) if res.rc == 0 else []


def _one_trained(results, run, epochs, refusal=r"another process|already holds files"):
    """Problems unless exactly one of two concurrent children trained ``run`` and the other
    was refused with a clear one-line error (or found the run finished)."""
    trained = [r for r in results if r.rc == 0 and re.search(r"^epoch \d+:", r.out, re.M)]
    others = [r for r in results if r not in trained]
    problems = [] if len(trained) == 1 else [f"{len(trained)} of the 2 processes trained"]
    for r in others:
        if not (r.rc == 2 and re.search(refusal, r.err)) and not (r.rc == 0 and "finished" in r.out):
            problems.append(f"the other exited {r.rc}: {r.err.strip()[-200:]}")
        if "Traceback" in r.err:
            problems.append("traceback")
    return (trained or results)[0], problems + complete(run, epochs)


@case("two-processes-one-out", rc=0)
def _(ctx):
    run = ctx.dir / "run"
    procs = [ctx.start(ctx.base("--epochs", "30", "--out", run)) for _ in range(2)]
    return _one_trained([finish(p) for p in procs], run, 30)


@case("two-resumes-of-one-run", rc=0)
def _(ctx):
    run = ctx.dir / "run"
    failed = ctx.interrupted(*ctx.base("--epochs", "30", "--out", run))
    if failed:
        return failed
    procs = [ctx.start(["--resume", run]) for _ in range(2)]
    return _one_trained([finish(p) for p in procs], run, 30)


# Full disks (a 2 MiB tmpfs, filled at a chosen write): one error line, no .tmp, the last
# good checkpoint kept, and the run resumes once there is room again.
def _disk_case(name, hook, says, *, epoch_kept):
    @case(f"disk-full-{name}", says=says, needs="mount")
    def run(ctx):
        mnt = ctx.dir / "disk"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
        try:
            run = mnt / "run"
            res = ctx.train(ctx.base("--epochs", "2", "--out", run), hook=hook)
            problems = leftovers(run) if run.exists() else []
            if epoch_kept is not None and saved_epoch(run) != str(epoch_kept):
                problems.append(f"checkpoint epoch {saved_epoch(run)}, expected {epoch_kept}")
            if (run / "summary.json").exists():
                summary = strict_json(run / "summary.json")
                if summary.get("status") == "completed" and summary.get("epochs") != 2 or \
                        summary.get("epochs") != len(epochs_of(run)):
                    problems.append(f"summary.json ({summary.get('epochs')} epochs) does not match the metrics")
            (run / "filler").unlink(missing_ok=True)
            if epoch_kept == 1:  # room again: the run continues from its checkpoint
                again = ctx.train(["--resume", run])
                problems += [f"resume after freeing space: exit {again.rc} {again.err.strip()[-200:]}"] \
                    if again.rc else complete(run, 2)
            return res, problems
        finally:
            subprocess.run(["umount", "-l", str(mnt)])


_disk_case("checkpoint", "fill:checkpoint.msgpack:2", r"checkpoint\.msgpack.*(space|cannot write)", epoch_kept=1)
_disk_case("metrics", "fill:metrics.jsonl:2", r"metrics\.jsonl.*(space|cannot write)", epoch_kept=1)
_disk_case("curves", "fill-curves", r"curves\.png.*(space|cannot write)", epoch_kept=2)
_disk_case("config", "fill:config.json:1", r"config\.json.*(space|cannot write)", epoch_kept=None)


@case("disk-full-in-a-resumed-run", says=r"checkpoint\.msgpack.*(space|cannot write)", needs="mount")
def _(ctx):
    # The summary.json of the interrupted start must not outlive a resume that got further.
    mnt = ctx.dir / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        run = mnt / "run"
        failed = ctx.interrupted(*ctx.base("--epochs", "3", "--out", run))
        if failed:
            return failed
        res = ctx.train(["--resume", run], hook="fill:checkpoint.msgpack:2")  # epoch 2 saved, epoch 3 not
        (run / "filler").unlink(missing_ok=True)
        problems = leftovers(run) + ([] if saved_epoch(run) == "2" else [f"checkpoint epoch {saved_epoch(run)}"])
        if (run / "summary.json").exists():
            summary = strict_json(run / "summary.json")
            if summary.get("epochs") != 2 or summary.get("status") == "completed":
                problems.append(f"summary.json says {summary.get('status')!r} after {summary.get('epochs')} epochs; "
                                f"the checkpoint is of epoch 2")
        return res, problems
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# Sweeps.
@case("sweep-huge-range-dry-run", says=r"at most", timeout=30)
def _(ctx):
    res = ctx.train(["--sweep", "seed=0..1000000000", "--dry-run"])
    return res, [] if res.seconds < 20 else [f"took {res.seconds:.0f}s"]


@case("sweep-huge-grid", says=r"at most", timeout=30)
def _(ctx):
    return ctx.train(["--sweep", "seed=0..999", "--sweep", "lr=1,2,3,4,5,6,7,8,9,10,11", "--dry-run"]), []


@case("sweep-bad-value", says=r"--sweep.*lr")
def _(ctx):
    return ctx.train(["--sweep", "lr=0.1,nan", "--dry-run"]), []


@case("sweep-out-holds-files", says=r"already holds files")
def _(ctx):
    out = ctx.dir / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    return ctx.train(ctx.base("--sweep", "seed=0,1", "--out", out)), unchanged(out, before)


@case("sweep-devices-refused-before-writing", says=r"--devices")
def _(ctx):
    out = ctx.dir / "s"
    res = ctx.train(ctx.base("--epochs", "1", "--sweep", "seed=0,1", "--devices", "2", "--out", out))
    return res, [f"wrote {p.name}" for p in out.rglob("*")] if out.exists() else []


def _sweep_refused_on_data(ctx, out):
    """A sweep whose batch is larger than the training split: refused once the data is loaded,
    leaving no directory (issue 26: it used to leave its plan, which blocked a rerun)."""
    first = ctx.train(ctx.base("--epochs", "1", "--sweep", "seed=0,1", "--batch-size", "1000", "--out", out))
    problems = [] if first.rc == 2 and "Traceback" not in first.err else [f"first exit {first.rc}: {first.err[-200:]}"]
    return problems + ([f"left {out}"] if out.exists() else [])


@case("sweep-refused-on-data-then-rerun", rc=0)
def _(ctx):
    out = ctx.dir / "s"
    problems = _sweep_refused_on_data(ctx, out)
    res = ctx.train(ctx.base("--epochs", "1", "--sweep", "seed=0,1", "--out", out))
    return res, problems


@case("sweep-refused-on-data-then-resume", says=r"--resume .*no such sweep directory.*--out")
def _(ctx):
    # Nothing was written, so there is nothing to resume: said in one line, naming --out.
    out = ctx.dir / "s"
    problems = _sweep_refused_on_data(ctx, out)
    res = ctx.train(ctx.base("--epochs", "1", "--sweep", "seed=0,1", "--resume", out))
    return res, problems + ([f"created {out}"] if out.exists() else [])


@case("sweep-resume-other-axes", says=r"swept")
def _(ctx):
    out = ctx.dir / "s"
    first = ctx.train(ctx.base("--epochs", "1", "--sweep", "seed=0,1", "--out", out))
    if first.rc != 0:
        return first, [f"first sweep exit {first.rc}"]
    before = snapshot(out)
    return ctx.train(ctx.base("--epochs", "1", "--sweep", "seed=0,2", "--resume", out)), unchanged(out, before)


@case("sweep-resume-not-a-sweep", says=r"sweep_plan\.json")
def _(ctx):
    run = ctx.copy("done")
    return ctx.train(ctx.base("--epochs", "2", "--sweep", "seed=0,1", "--resume", run)), []


@case("sweep-plan-invalid-json", says=r"sweep_plan\.json")
def _(ctx):
    out = ctx.dir / "s"
    out.mkdir()
    (out / "sweep_plan.json").write_text("{")
    return ctx.train(ctx.base("--epochs", "1", "--sweep", "seed=0,1", "--resume", out)), []


@case("two-resumes-of-one-sweep", rc=0)
def _(ctx):
    out = ctx.dir / "s"
    args = ctx.base("--epochs", "15", "--sweep", "seed=0,1")
    failed = ctx.interrupted(*args, "--out", out)
    if failed:
        return failed
    results = [finish(p) for p in [ctx.start([*args, "--resume", out]) for _ in range(2)]]
    trained = [r for r in results if r.rc == 0]
    refused = [r for r in results if r.rc == 2 and re.search(r"another process", r.err) and "Traceback" not in r.err]
    problems = [] if len(trained) == 1 and len(refused) == 1 else \
        [f"exits {[r.rc for r in results]}: {[r.err.strip()[-150:] for r in results]}"]
    for member in sorted(p for p in out.iterdir() if p.is_dir()):
        problems += complete(member, 15)
    return (trained or results)[0], problems


# Issue 26, the rest: data checked on read, sweeps named as sweeps, XLA_FLAGS, empty paths,
# run files edited by hand, the library's inputs, Ctrl-C during start-up.
@case("data-dir-copy-differs-from-the-published-files-warns", rc=0,
      says=r"warning: 4 of 4 MNIST files in .* differ from the published MD5s")
def _(ctx):
    # The synthetic files are not MNIST's: trained as a modified copy, said and recorded.
    run = ctx.dir / "run"
    res = ctx.train(ctx.base("--epochs", "1", "--max-steps", "1", "--out", run))
    info = strict_json(run / "config.json") if (run / "config.json").exists() else {}
    problems = [] if "differ from the published MD5s" in info.get("data_warning", "") else ["no data_warning in config.json"]
    return res, problems + ([] if len(info.get("data_files", {})) == 4 else ["config.json's data_files"])


@case("data-cache-file-changed-after-download", says=r"changed since it was downloaded and verified.*delete it")
def _(ctx):
    # A file in jaxnets' download layout, stamped as verified, then replaced by another
    # well-formed IDX file (labels shifted by one): refused on read, naming it.
    root = ctx.dir / "cache"
    folder = write_mnist(root / "mnist")
    code = ("import sys, gzip, hashlib; from pathlib import Path; from jaxnets import download as DL\n"
            "for p in sorted(Path(sys.argv[1]).glob('*.gz')):\n"
            "    DL._stamp(p, {'md5': hashlib.md5(gzip.decompress(p.read_bytes())).hexdigest()})")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, env=ctx.env())
    labels = folder / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8:] = bytes((b + 1) % 10 for b in raw[8:])
    labels.write_bytes(gzip.compress(bytes(raw)))
    return ctx.train(ctx.base("--out", ctx.dir / "run", data=root)), \
        [f"created {ctx.dir / 'run'}"] if (ctx.dir / "run").exists() else []


@case("resume-a-sweep-without-sweep", says=r"a sweep directory \(sweep_plan\.json\), not a run; resume it with its "
                                           r"sweep's flags: jaxnets-train --resume .* --sweep seed=0,1")
def _(ctx):
    out = ctx.dir / "s"
    first = ctx.train(ctx.base("--epochs", "1", "--max-steps", "1", "--sweep", "seed=0,1", "--out", out))
    if first.rc != 0:
        return first, [f"first sweep exit {first.rc}"]
    before = snapshot(out)
    res = ctx.train(["--resume", out])
    problems = unchanged(out, before)
    if res.rc == 2:  # the command it gives resumes the sweep (every member finished: exit 0)
        command = shlex.split(res.err.split("flags: ", 1)[-1].strip())[1:]
        again = ctx.train(command)
        problems += [] if again.rc == 0 else [f"the command given exits {again.rc}: {again.err.strip()[-200:]}"]
    return res, problems


XLA_FLAG_CASES = {
    "not-options": ("--xla_cpu_multi_thread_eigen=false stray", 2, r"\$XLA_FLAGS: 'stray' is not a --name"),
    "space-before-value": ("--xla_force_host_platform_device_count 8", 2, r"\$XLA_FLAGS: '8' is not"),
    "no-such-file": ("garbage", 2, r"\$XLA_FLAGS 'garbage': XLA reads a value not starting with -- as a file"),
    # The names are XLA's to know: its own abort, exit 1 (documented), before anything is written.
    "unknown-name": ("--xla_no_such_flag=1", 1, r"Unknown flag in XLA_FLAGS: --xla_no_such_flag"),
}


def _xla_case(name, value, rc, says):
    @case(f"xla-flags-{name}", rc=rc, says=says, timeout=60)
    def run(ctx):
        res = ctx.train(ctx.base("--out", ctx.dir / "run"), env={"XLA_FLAGS": value})
        return res, [f"created {ctx.dir / 'run'}"] if (ctx.dir / "run").exists() else []


for _name, (_value, _rc, _says) in XLA_FLAG_CASES.items():
    _xla_case(_name, _value, _rc, _says)


@case("empty-path-flags", says=r"--data-dir is empty")
def _(ctx):
    # --data-dir '' was the default cache, --out '' runs/<name>, --resume '' a new run.
    problems = []
    for args, says in ((["--out", ""], "--out is empty"), (["--resume", ""], "--resume is empty")):
        other = ctx.train([*ctx.base(), *args])
        if other.rc != 2 or says not in other.err:
            problems.append(f"{args}: exit {other.rc} {other.err.strip()[-150:]}")
    res = ctx.train([*ctx.base("--out", ctx.dir / "run"), "--data-dir", ""])
    return res, problems + ([f"wrote in {ctx.dir}"] if set(os.listdir(ctx.dir)) - {"run"} or
                            (ctx.dir / "run").exists() else [])


@case("sigint-during-start-up", rc=130, says=r"interrupted (during start-up|before training started)")
def _(ctx):
    # Ctrl-C at a random moment of the imports, argument checks or data loading: one line,
    # exit 130, never a traceback nor a run trained to the end.
    proc = ctx.start(ctx.base("--epochs", "1", "--out", ctx.dir / "run"))
    time.sleep(np.random.default_rng().uniform(0.05, 1.5))
    proc.send_signal(signal.SIGINT)
    res = finish(proc)
    return res, [] if not re.search(r"^test accuracy", res.out, re.M) else ["trained to the end"]


_damage_case("config-resumes-not-a-list", "config.json",
             lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "resumes": {}})),
             r'config\.json: "resumes" is \{\}; expected a list')
_damage_case("config-image-shape-edited", "config.json",
             lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "image_shape": [28, 28]})),
             r'config\.json: "image_shape" is \[28, 28\]')
_damage_case("metrics-lost-the-last-epoch", "metrics.jsonl",
             lambda p: p.write_text(p.read_text().splitlines(keepends=True)[0]),
             r"metrics\.jsonl: has metrics for epoch 1, but checkpoint\.msgpack is of epoch 2")
_damage_case("metrics-lost-the-first-epoch", "metrics.jsonl",
             lambda p: p.write_text(p.read_text().splitlines(keepends=True)[1]),
             r"metrics\.jsonl, line 1: epoch 2 after no epoch")


@case("resume-read-only-run-directory", says=r"--resume .*: the directory is not writable", needs="mount")
def _(ctx):
    mnt = ctx.dir / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        shutil.copytree(ctx.fixtures["done"], mnt / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = snapshot(mnt / "run")
        return ctx.train(["--resume", mnt / "run", "--epochs", "3"]), unchanged(mnt / "run", before)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# The library's inputs (load_run, predict, evaluate): defined, or refused with one line.
LIBRARY_CASES = {
    "predict-0-255-floats": ("run.predict(x.astype('float32'))", r"values 0\.\.255 \(a 0\.\.255 float image"),
    "predict-int64": ("run.predict(x.astype('int64'))", r"given int64 .*neither uint8 nor floating point"),
    "predict-nan": ("run.predict(np.full(x.shape, np.nan))", r"holding 3136 NaN or infinite values"),
    "predict-one-image": ("run.predict(x[0])", r"one image without a batch axis"),
    "predict-empty-batch": ("run.predict(x[:0])", r"an empty batch"),
    "predict-batch-size-0": ("run.predict(x, batch_size=0)", r"batch_size must be a positive integer"),
    "evaluate-label-out-of-range": ("run.evaluate(images=x, labels=[0, 1, 2, 10])", r"labels: .*values 0\.\.10"),
    "evaluate-float-labels": ("run.evaluate(images=x, labels=[0.5, 1, 2, 3])", r"labels: given float64 .*not integers"),
    "evaluate-labels-without-images": ("run.evaluate(labels=[0, 1])", r"give images and labels together"),
    "load-run-of-a-file": ("jaxnets.load_run(RUN / 'config.json')", r"a file, not a run directory"),
    "load-run-of-none": ("jaxnets.load_run(None)", r"load_run: expected the path of a run directory"),
}
_LIBRARY = """import sys, json, numpy as np, jaxnets
from pathlib import Path
from jaxnets.runs import TrainingError
RUN = Path(sys.argv[1])
run = jaxnets.load_run(RUN)
x = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)).astype(np.uint8)
try:
    {call}
except (ValueError, TypeError, TrainingError) as e:
    print(f"error: {{e}}", file=sys.stderr)
    sys.exit(2)
print("accepted")
"""


def _library_case(name, call, says):
    @case(f"library-{name}", says=says, timeout=60)
    def run(ctx):
        t0 = time.time()
        p = subprocess.run([sys.executable, "-c", _LIBRARY.format(call=call), str(ctx.fixtures["done"])],
                           capture_output=True, text=True, env=ctx.env(), timeout=ctx.case.timeout)
        return Result(p.returncode, p.stdout, p.stderr, time.time() - t0), []


for _name, (_call, _says) in LIBRARY_CASES.items():
    _library_case(_name, _call, _says)


# ---------------------------------------------------------------------------- runner


def _fixtures(root: Path, work: Path, log):
    data = work / "data"
    fixtures = {"data": write_mnist(data / "mnist"), "data27": write_mnist(data / "mnist27", test_shape=(27, 27)),
                "data0": write_mnist(data / "mnist0", n_test=0),
                "data-constant": write_mnist(data / "constant", constant=True),
                "data-chance": write_mnist(data / "chance", labels=(0, 1))}
    ctx = Context(root, work, Case("_fixtures", None, 0, None, 300), {"data": fixtures["data"]})
    done = ctx.dir / "done"
    res = ctx.train(ctx.base("--epochs", "2", "--out", done))
    if res.rc != 0:
        log(f"the fixture run failed (exit {res.rc}):\n{res.err[-2000:]}")
        return None
    fixtures["done"] = done
    return fixtures


def _can_mount(work: Path):
    probe = work / ".mount-probe"
    probe.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
    except OSError:
        return False
    if ok:
        subprocess.run(["umount", str(probe)])
    return ok


def judge(c: Case, res: Result, problems):
    problems = list(problems)
    if res.rc != c.rc:
        problems.insert(0, f"exit {res.rc}, expected {c.rc}")
    if "Traceback" in res.err:
        problems.append("traceback: " + res.err.strip().splitlines()[-1][:200])
    if c.rc == 2:
        lines = [l for l in res.err.splitlines() if l.strip() and not l.startswith("usage:")]
        errors = [l for l in lines if "error:" in l]
        if len(errors) != 1 or len(lines) != 1:
            problems.append(f"stderr is not one error line ({len(lines)} lines)")
        text = errors[0] if errors else ""
    else:
        text = res.out + res.err
    if c.says and not re.search(c.says, text):
        last = (text or res.err or res.out).strip().splitlines()[-1:] or [""]
        problems.append(f"message does not match /{c.says}/: {last[0][:200]}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only the cases whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each unhandled case's output")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose train.py runs (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    cases = [c for c in CASES if args.k in c.name]
    work = Path(tempfile.mkdtemp(prefix="jaxnets-faults-"))
    print(f"{len(cases)} fault cases against {root / 'train.py'} in {work}", flush=True)
    t0 = time.time()
    handled = ran = 0
    try:
        mount = _can_mount(work)
        fixtures = _fixtures(root, work, print)
        if fixtures is None:
            return 1
        for c in cases:
            if c.needs == "mount" and not mount:
                print(f"SKIP     {c.name}: cannot mount a tmpfs here (needs root)", flush=True)
                continue
            ctx = Context(root, work, c, fixtures)
            try:
                res, problems = c.fn(ctx)
                problems = judge(c, res, problems)
            except Exception as e:  # the harness's own failure counts as unhandled, and says why
                res, problems = Result(-1, "", "", 0.0), [f"harness: {type(e).__name__}: {e}"]
            ran += 1
            handled += not problems
            print(f"{'ok' if not problems else 'FAILED':8} {c.name} ({res.seconds:.1f}s)"
                  + ("" if not problems else ": " + "; ".join(problems)), flush=True)
            if problems and args.verbose:
                print("  stdout: " + res.out.strip()[-1500:].replace("\n", "\n  "))
                print("  stderr: " + res.err.strip()[-1500:].replace("\n", "\n  "))
    finally:
        if not args.keep:
            subprocess.run(["umount", "-R", "-l", str(work)], capture_output=True)  # in case a case died mounted
            shutil.rmtree(work, ignore_errors=True)
    print(f"{handled} of {ran} handled ({time.time() - t0:.0f}s)")
    return 0 if handled == ran else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        spec, rest = sys.argv[2], sys.argv[3:]
        sys.exit(_child(spec, rest[1:] if rest[:1] == ["--"] else rest))
    sys.exit(main())
