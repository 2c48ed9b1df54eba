"""A run directory and its files: what a run writes, and reading it back.

A run directory holds ``config.json`` (the settings, the model, the environment and the
provenance), ``metrics.jsonl`` (one line per epoch), ``checkpoint.msgpack`` (the last
epoch's parameters, batch-norm state, optimizer state and key, and the record of its run:
config.json's model and data settings and seed and the run's id, checked on every load),
``summary.json`` (status
and final figures) and ``curves.png``. Every file is written atomically (a temporary file,
fsync, rename), so an interrupted write never leaves a half file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jaxnets import data as D
from jaxnets.config import FIELDS, TrainConfig, flag, format_setting, from_dict

#: The files a run writes.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "checkpoint.msgpack")


class TrainingError(Exception):
    """A run cannot start or continue (bad run directory or run file, mismatched config, a
    failed write); the message is one line naming the file or setting."""


CHECKPOINT = "checkpoint.msgpack"
LOCK = ".lock"
#: A sweep directory's record of what it trains (written and read by :mod:`jaxnets.sweep`).
SWEEP_PLAN = "sweep_plan.json"


def write_atomic(path: Path, data: bytes):
    """Write ``data`` to ``path`` through ``path.tmp`` (fsync, rename): readers see the old file
    or the new one, never half of one. A failed write (disk full, no permission) removes
    the temporary file and raises a one-line TrainingError; the old file stays."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise TrainingError(f"{path}: cannot write ({e.strerror or e}); the previous version is kept") from None


@contextlib.contextmanager
def deferred_interrupts():
    """``with deferred_interrupts():`` the block runs to its end through Ctrl-C and SIGTERM
    (files that must change together, e.g. an epoch's metrics and checkpoint); a signal that
    came meanwhile raises KeyboardInterrupt right after it. Only the main thread receives
    signals, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise KeyboardInterrupt


class ReportedInterrupt(KeyboardInterrupt):
    """A Ctrl-C that a run or sweep has already reported (what was kept, how to resume)."""


_interrupts = []  # Ctrl-Cs seen by catch_interrupts' handler and not yet acted on


def catch_interrupts():
    """Install a SIGINT handler that raises KeyboardInterrupt, as Python's does, and also
    records it: a KeyboardInterrupt raised inside a garbage-collector callback (JAX has
    one) is swallowed, and the run would train to its end; :func:`raise_if_interrupted`
    acts on it at the next check (before training, at each epoch)."""
    def handler(signum, frame):
        _interrupts.append(signum)
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, handler)


def raise_if_interrupted():
    """KeyboardInterrupt if a Ctrl-C was caught and swallowed since the last check."""
    if _interrupts:
        _interrupts.clear()
        raise KeyboardInterrupt


def _strict(value):
    """``value`` with NaN and infinities as None: run files are strict JSON (``null``)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def json_text(value, indent=2) -> str:
    """Strict JSON (NaN and infinities written as null; tuples as lists)."""
    return json.dumps(_strict(value), indent=indent, allow_nan=False, default=str)


def write_json(path: Path, value):
    write_atomic(path, (json_text(value) + "\n").encode())


def read_json(path: Path, *, kind=dict):
    """The JSON in ``path``, which must be a ``kind`` (dict or list); a one-line TrainingError
    naming the file when it is missing, unreadable or not valid JSON of that kind."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainingError(f"{path} not found") from None
    except OSError as e:
        raise TrainingError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise TrainingError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(value, kind):
        raise TrainingError(f"{path}: expected a JSON {'object' if kind is dict else 'array'}, "
                            f"got {type(value).__name__}")
    return value


def read_config(run_dir: Path) -> dict:
    """``config.json`` of a run: a dict with a ``"config"`` object of valid settings, and,
    where present, an ``image_shape`` of three positive integers, a positive integer
    ``classes``, a string ``run_id`` and a list of ``resumes`` (a file edited by hand is
    refused naming the entry, not read into a wrong model or a traceback)."""
    path = Path(run_dir) / "config.json"
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise TrainingError(f"{run_dir}: a file, not a run directory (one holding config.json)")
    if not path.exists():
        raise TrainingError(f"{run_dir}: no config.json there, not a run directory")
    info = read_json(path)
    if not isinstance(info.get("config"), dict):
        raise TrainingError(f"{path}: no \"config\" object of settings in it")
    try:
        from_dict(info["config"], where=str(path))
    except ValueError as e:
        raise TrainingError(str(e)) from None
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
    checks = {"image_shape": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(positive, v)),
                              "a list of 3 positive integers (height, width, channels)"),
              "classes": (positive, "a positive integer"),
              "run_id": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
              "resumes": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of objects")}
    for key, (ok, what) in checks.items():
        if key in info and not ok(info[key]):
            raise TrainingError(f"{path}: \"{key}\" is {json_text(info[key], None)[:60]}; expected {what}")
    return info


def sweep_resume_line(out: Path) -> str:
    """What ``--resume DIR`` without ``--sweep`` says of a sweep directory: that it is one,
    and the command that resumes it (its axes and the settings it was started with that
    differ from the defaults, from its plan; the data dir from a member's config.json)."""
    import shlex

    out = Path(out)
    start = f"--resume {out}: a sweep directory ({SWEEP_PLAN}), not a run; resume it with its sweep"
    try:
        plan = read_json(out / SWEEP_PLAN)
        base = from_dict({k: v for k, v in plan["base"].items() if k in FIELDS}, where=SWEEP_PLAN)
        axes = {k: list(v) for k, v in plan["axes"].items()}
    except (TrainingError, ValueError, TypeError, KeyError, AttributeError):
        return f"{start} flags (--resume {out} --sweep KEY=V1,V2 ... as it was started; its {SWEEP_PLAN} is unreadable)"
    words = ["jaxnets-train", "--resume", str(out)]
    for k, values in axes.items():
        words += ["--sweep", f"{k.replace('_', '-')}={','.join(map(str, values))}"]
    members = [out / str(name) / "config.json" for name in plan.get("names") or []]
    saved = next((read_json(c).get("config", {}) for c in members if c.is_file()), {})
    for f in dataclasses.fields(TrainConfig):
        value = getattr(base, f.name) if f.name in plan["base"] else saved.get(f.name, f.default)
        if f.name in ("out", "progress") or value == f.default or value is None:
            continue
        if isinstance(f.default, bool):
            words.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        else:
            words += [flag(f.name), format_setting(tuple(value) if isinstance(value, list) else value)]
    return f"{start}'s flags: {shlex.join(words)}"


def check_run_files(run_dir: Path):
    """Read every file a resume reads (config.json, summary.json, metrics.jsonl, the
    checkpoint with its checksum) and raise the first problem as a one-line TrainingError
    naming the file: a resume checks them all before it writes anything."""
    read_config(run_dir)
    read_summary(run_dir)
    metrics = read_metrics(run_dir)
    if (Path(run_dir) / CHECKPOINT).exists():
        epoch = int(read_checkpoint(run_dir).get("epoch", 0))
        if len(metrics) < epoch:  # (more is a kill between the two writes: cut on resume)
            n = len(metrics)
            has = f"epochs 1..{n}" if n > 1 else "epoch 1" if n else "no epoch"
            raise TrainingError(f"{Path(run_dir) / 'metrics.jsonl'}: has metrics for {has}, but {CHECKPOINT} is of "
                                f"epoch {epoch}; a resume would leave epoch{'s' if epoch > n + 1 else ''} "
                                f"{n + 1}{'..' + str(epoch) if epoch > n + 1 else ''} without metrics (a truncated "
                                f"or edited file)")


def read_summary(run_dir: Path):
    """``summary.json`` of a run, or None when the run has none yet."""
    path = Path(run_dir) / "summary.json"
    return read_json(path) if path.exists() else None


def read_metrics(run_dir: Path) -> list:
    """The epoch records of ``metrics.jsonl`` (empty when there are none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError as e:
                raise TrainingError(f"{path}, line {n}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise TrainingError(f"{path}, line {n}: not an epoch record")
            if record["epoch"] != len(records) + 1:  # written one epoch after the other, from 1
                raise TrainingError(f"{path}, line {n}: epoch {record['epoch']} after "
                                    f"{'epoch ' + str(len(records)) if records else 'no epoch'}; expected epoch "
                                    f"{len(records) + 1} (a line lost or edited)")
            records.append(record)
    return records


def write_metrics(run_dir: Path, metrics):
    write_atomic(Path(run_dir) / "metrics.jsonl", "".join(json_text(m, indent=None) + "\n" for m in metrics).encode())


def _checkpoint_target(params, state, opt_state, key, epoch=0):
    return {"params": params, "state": state, "opt_state": opt_state, "key": key, "epoch": epoch}


#: The settings that make a checkpoint's weights what they are (config.json's model and data
#: settings but where the data is read from, which a resume may change, and the seed): a
#: checkpoint records them and is refused under a config.json that says otherwise.
IDENTITY_SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                          if f.metadata.get("group") in ("model", "data") and f.name not in ("data_dir", "data_source")
                          ) + ("seed",)


def run_identity(info: dict) -> dict:
    """What ties a checkpoint to its run: config.json's :data:`IDENTITY_SETTINGS` (as stored
    there), their SHA-256, and the run's id when config.json has one."""
    settings = {k: info["config"][k] for k in IDENTITY_SETTINGS if k in info["config"]}
    identity = {"settings": settings,
                "settings_sha256": hashlib.sha256(json_text(settings, None).encode()).hexdigest()}
    if info.get("run_id"):
        identity["run_id"] = str(info["run_id"])
    return identity


def save_checkpoint(run_dir: Path, params, state, opt_state, key, epoch, *, mean=None, std=None):
    """Write the epoch checkpoint: the state bytes (flax msgpack) and their SHA-256, verified
    on load. ``mean``/``std`` (the input normalisation) make the run loadable without its data;
    the run's identity (:func:`run_identity` of its config.json, when it has one) ties it to
    the run: a checkpoint copied in from another run is refused on load."""
    payload = _checkpoint_target(params, state, opt_state, jax.random.key_data(key), epoch)
    if mean is not None:
        payload["normalization"] = {"mean": np.asarray(mean), "std": np.asarray(std)}
    if (Path(run_dir) / "config.json").exists():
        payload["run"] = json_text(run_identity(read_json(Path(run_dir) / "config.json")), None)
    body = serialization.to_bytes(jax.device_get(payload))
    wrapped = serialization.msgpack_serialize({"format": "jaxnets-checkpoint-1",
                                               "sha256": hashlib.sha256(body).hexdigest(), "body": body})
    write_atomic(Path(run_dir) / CHECKPOINT, wrapped)


def read_checkpoint(run_dir: Path) -> dict:
    """The checkpoint's raw state dict (nested dicts of arrays), its checksum verified."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise TrainingError(f"{path} not found: no epoch checkpoint")
    try:
        outer = serialization.msgpack_restore(path.read_bytes())
        ok = isinstance(outer, dict) and outer.get("format") == "jaxnets-checkpoint-1"
        body = outer["body"] if ok else None
    except Exception as e:  # msgpack raises assorted types for damaged files
        raise TrainingError(f"{path}: damaged checkpoint, cannot read it ({type(e).__name__})") from None
    if not ok or not isinstance(body, bytes):
        raise TrainingError(f"{path}: not a jaxnets checkpoint (or one written before checksums)")
    if hashlib.sha256(body).hexdigest() != outer.get("sha256"):
        raise TrainingError(f"{path}: damaged checkpoint (SHA-256 mismatch)")
    try:
        raw = serialization.msgpack_restore(body)
    except Exception as e:
        raise TrainingError(f"{path}: damaged checkpoint, cannot read it ({type(e).__name__})") from None
    _check_identity(Path(run_dir), raw)
    return raw


def _check_identity(run_dir: Path, raw: dict):
    """Refuse a checkpoint whose recorded run (settings, run id) is not the one config.json
    describes: one line naming both files and what differs. A checkpoint without a record
    (written before issue 26) or a directory without config.json is not checked."""
    path, config_path = run_dir / CHECKPOINT, run_dir / "config.json"
    if "run" not in raw or not config_path.exists():
        return
    try:
        theirs = json.loads(raw["run"])
        recorded = theirs["settings"]
    except (TypeError, ValueError, KeyError):
        raise TrainingError(f"{path}: damaged checkpoint (its run record is not readable)") from None
    ours = run_identity(read_json(config_path))
    if theirs.get("run_id") and ours.get("run_id") and theirs["run_id"] != ours["run_id"]:
        raise TrainingError(f"{path} belongs to another run (run id {theirs['run_id']}) than {config_path} "
                            f"(run id {ours['run_id']}): copied in from elsewhere? Put back this run's checkpoint")
    for name, value in recorded.items():
        if name in ours["settings"] and json_text(ours["settings"][name], None) != json_text(value, None):
            shown = lambda v: format_setting(tuple(v) if isinstance(v, list) else v, name)
            raise TrainingError(f"{path} belongs to another run than {config_path}: {flag(name)} "
                                f"{shown(value)} in the checkpoint, {shown(ours['settings'][name])} in config.json; "
                                f"put back this run's checkpoint")


#: Said when a checkpoint carries no run record (written before issue 26): loaded unchecked.
UNTIED_NOTE = "{path}: written before checkpoints recorded their run; not checked against config.json"


def checkpoint_note(run_dir: Path, raw: dict):
    """:data:`UNTIED_NOTE` for a checkpoint without a run record, else None."""
    return UNTIED_NOTE.format(path=Path(run_dir) / CHECKPOINT) if "run" not in raw else None


def checkpoint_epoch(run_dir: Path):
    """The epoch of the run's checkpoint, or None when it has none."""
    return int(read_checkpoint(run_dir)["epoch"]) if (Path(run_dir) / CHECKPOINT).exists() else None


def load_checkpoint(run_dir: Path, params, state, opt_state, key):
    """The checkpoint restored into the structure of ``params, state, opt_state, key``
    (and ``note``: :func:`checkpoint_note`'s, for a checkpoint without a run record)."""
    path = Path(run_dir) / CHECKPOINT
    raw = read_checkpoint(run_dir)
    note = checkpoint_note(run_dir, raw)
    raw.pop("normalization", None)
    raw.pop("run", None)
    target = _checkpoint_target(params, state, opt_state, jax.random.key_data(key))
    try:
        restored = serialization.from_state_dict(target, raw)
    except Exception as e:  # flax names the first mismatching field
        raise TrainingError(f"{path}: the checkpoint does not match this run's model or optimizer "
                            f"({str(e).splitlines()[0][:200]})") from None
    for a, b in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(restored)):
        if np.shape(a) != np.shape(b):
            raise TrainingError(f"{path}: checkpoint shapes do not match this model ({np.shape(b)} vs {np.shape(a)})")
    restored["key"] = jax.random.wrap_key_data(jnp.asarray(restored["key"]))
    restored["note"] = note  # None, or checkpoint_note's: the checkpoint was not checked against config.json
    return restored


#: A final accuracy below this many times 1/classes counts as chance: the run learned nothing.
CHANCE_FACTOR = 1.2


def at_chance(accuracy, classes) -> bool:
    """Whether ``accuracy`` is at chance level for ``classes`` classes (see :data:`CHANCE_FACTOR`)."""
    return accuracy is not None and bool(np.isfinite(accuracy)) and accuracy < CHANCE_FACTOR / classes


def default_run_dir(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.model}-{config.dataset}-{stamp}"


def prepare_run_dir(run_dir: Path, *, new: bool):
    """Make sure ``run_dir`` can hold a run before any data is loaded: a directory (created
    when missing) that is writable and, for a new run, holds no files (``new``)."""
    run_dir, given = Path(run_dir), "--out" if new else "--resume"
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"{given} {run_dir}: is a file, not a directory")
    make_dir(run_dir, given)
    if not os.access(run_dir, os.W_OK | os.X_OK):  # (a read-only mount too, even for root)
        raise TrainingError(f"{given} {run_dir}: the directory is not writable" + (
            "" if new else " (a resume writes its lock, checkpoint, metrics and config.json there)"))
    if new and files_besides_lock(run_dir):
        is_run = (run_dir / "config.json").is_file()  # what --resume reads first
        raise TrainingError(f"--out {run_dir} already holds files" + (
            f" of a run; choose a new directory, or continue it with --resume {run_dir}" if is_run else
            " (not a run's); choose a new or empty directory"))


@contextlib.contextmanager
def removed_if_left_empty(directory: Path):
    """``with removed_if_left_empty(DIR):`` a directory the block creates is removed again
    when the block fails leaving it empty (a run refused on its data leaves nothing behind);
    rmdir never removes a directory holding anything, so no file is ever deleted."""
    directory = Path(directory)
    created = not directory.exists()
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


#: A lock's owner record: ``jaxnets-lock PID HOST`` (``PID HOST`` in locks written before issue 26).
_LOCK_RECORD = re.compile(r"(?:jaxnets-lock )?(\d+) (\S+)\n")
_LOCK_OWN = re.compile(re.escape(LOCK) + r"\.\d+\.tmp")  # the owner record before it is linked as the lock


def _lock_record(path: Path):
    """``(pid, host)`` when ``path`` holds a lock's owner record, else None (another file)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 300:
            return None
        match = _LOCK_RECORD.fullmatch(path.read_text(errors="replace"))
    except OSError:
        return None
    return (int(match.group(1)), match.group(2)) if match else None


def is_diverged(status) -> bool:
    """Whether a run's status (``summary["status"]``, or the summary itself) says it diverged:
    the one reading of the status for the CLI's exit code, the sweep and the loop."""
    if isinstance(status, dict):
        status = status.get("status", "")
    return str(status).startswith("diverged")


def make_dir(path, flag) -> Path:
    """Create directory ``path`` (and its parents), or raise TrainingError naming ``flag``
    and why: the one place runs, sweeps and the compile cache create their directories."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"{flag} {path}: cannot create the directory ({e.strerror})") from None
    return path


def files_besides_lock(directory: Path) -> list:
    """The entries of ``directory`` other than a lock of jaxnets' own (recognised by its
    owner record, not by its name: a user's file named ``.lock`` counts as a file)."""
    return [p for p in Path(directory).iterdir()
            if not ((p.name == LOCK or _LOCK_OWN.fullmatch(p.name)) and _lock_record(p) is not None)]


class RunLock:
    """``with RunLock(run_dir):`` one process at a time writes a run: ``run_dir/.lock`` holds
    the owner record ``jaxnets-lock PID HOST``; a lock whose process is gone (same host) is
    taken over. A ``.lock`` that holds anything else is not jaxnets' and is never touched:
    the run is refused, naming it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def __enter__(self):
        # The owner line is written to a private file first and hard-linked to .lock, which
        # fails if .lock exists: the lock appears with its owner in it, so another process
        # never sees an empty lock, and a lock without an owner record is no lock of ours.
        own = self.path.with_name(f"{LOCK}.{os.getpid()}.tmp")
        try:
            own.write_text(f"jaxnets-lock {os.getpid()} {platform.node()}\n")
            for _ in range(2):
                try:
                    os.link(own, self.path)
                except FileExistsError:
                    owner = _lock_record(self.path)
                    if owner is None and self.path.exists():
                        raise TrainingError(f"{self.path}: not a jaxnets lock (no owner record in it: a file of "
                                            f"yours?); left untouched: move it away or choose another --out") from None
                    if owner is not None and not self._stale(owner):
                        raise TrainingError(f"{self.path.parent}: another process is writing this run "
                                            f"(PID {owner[0]} on {owner[1]}); wait for it or stop it") from None
                    if owner is not None and _lock_record(self.path) == owner:  # still the dead owner's
                        self.path.unlink(missing_ok=True)
                    continue
                self.held = True
                return self
        except OSError as e:
            raise TrainingError(f"{self.path}: cannot create the lock file ({e.strerror or e})") from None
        finally:
            own.unlink(missing_ok=True)
        raise TrainingError(f"{self.path}: cannot take the lock (another process took it over meanwhile)")

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    @staticmethod
    def _stale(owner):
        pid, host = owner
        if host != platform.node():
            return False  # another machine's process: cannot tell, so keep it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def provenance(command=None) -> dict:
    """Where a run came from: jaxnets' version, the git commit of the checkout (with a dirty
    flag) when run from one, the command line and the start time."""
    from jaxnets import __version__

    info = {"jaxnets_version": __version__, "command": list(command) if command is not None else list(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            if commit:
                info["git"] = {"commit": commit, "dirty": bool(dirty)}
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def environment_info():
    import flax
    return {
        "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "optax": optax.__version__, "flax": flax.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "host": platform.node(),
    }


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@dataclasses.dataclass
class Run:
    """A trained run loaded back (:func:`load_run`): its model, parameters, batch-norm state,
    settings and input normalisation; no dataset needed."""

    run_dir: Path
    config: TrainConfig
    model: object
    image_shape: tuple
    params: dict
    state: dict
    mean: np.ndarray
    std: np.ndarray
    epoch: int
    summary: dict | None

    def predict(self, images, *, batch_size: int = 1000) -> np.ndarray:
        """Class probabilities ``(N, classes)`` of ``images`` ``(N, H, W, C)``, N >= 1: uint8
        pixels 0..255, or floating point in [0, 1] (the same pixels divided by 255), as the
        run was trained. Anything else (another dtype, floats outside [0, 1] such as a
        0..255 float image, NaN or infinities, an empty batch, one image without its batch
        axis, another image shape) is refused with a one-line ValueError, never guessed.
        The images go through the run's own input pipeline (:func:`jaxnets.steps.model_input`:
        its normalisation, then the resize of ``--image-size``).

        A run trained with ``--classes`` has one column per class it was trained on, in
        that order: column ``j`` is the dataset's class ``run.class_ids[j]``
        (``--classes 5,6,7,8,9``: column 0 is class 5)."""
        return self._probs(self._images(images), _batch_size(batch_size))

    def _probs(self, x, batch_size):
        """Probabilities of checked images ``x`` (uint8 or float32 on the 0..255 scale)."""
        from jaxnets.steps import model_input

        probs = []
        for i in range(0, len(x), batch_size):
            batch = model_input(x[i:i + batch_size], self.mean, self.std, self.config.image_size)
            logits, _ = self._apply(self.params, self.state, batch)
            probs.append(np.asarray(jax.nn.softmax(logits, axis=-1)))
        return np.concatenate(probs)

    def evaluate(self, dataset=None, *, images=None, labels=None, batch_size: int = 1000) -> dict:
        """Accuracy and mean cross-entropy on ``dataset``'s test split (a
        :class:`jaxnets.data.Dataset`, loaded from the run's data settings when None; a run
        trained with ``--classes`` is scored on those classes' test images, relabelled as in
        training), or on ``images``/``labels`` (labels ``0..classes-1``, see :meth:`predict`)."""
        from jaxnets.steps import make_evaluate, run_dataset

        batch_size = _batch_size(batch_size)
        if (images is None) != (labels is None) or (images is not None and dataset is not None):
            raise ValueError("evaluate: give images and labels together, or a dataset, or neither (the run's "
                             "test split)")
        if images is None:
            if dataset is None:
                dataset = D.load_dataset(self.config.dataset, self.config.data_dir, source=self.config.data_source)
            dataset = run_dataset(dataset, self.config)  # a run on --classes is scored on those, relabelled
            images, labels = dataset.test_images, dataset.test_labels
        x = self._images(images)
        y = self._labels(labels, len(x))
        u8 = x if x.dtype == np.uint8 else None
        if u8 is None:  # the evaluation program takes uint8 pixels; floats go through predict's path
            probs = self._probs(x, batch_size)
            picked = np.clip(probs[np.arange(len(y)), y], 1e-30, None)
            return {"accuracy": float(np.mean(probs.argmax(-1) == y)), "loss": float(-np.log(picked).mean()),
                    "examples": int(len(y))}
        loss, acc = make_evaluate(self.model, batch_size, self.config.image_size)(self.params, self.state, u8, y,
                                                                                 self.mean, self.std)
        return {"accuracy": float(acc), "loss": float(loss), "examples": int(len(y))}

    @property
    def num_classes(self):
        return self.model.classes

    @property
    def class_ids(self) -> tuple:
        """The dataset's class of each output column: ``--classes`` as given, else ``0..classes-1``."""
        return tuple(self.config.classes) or tuple(range(self.num_classes))

    def _apply(self, params, state, x):
        if not hasattr(self, "_jitted"):
            self._jitted = jax.jit(lambda p, s, x: self.model.apply(p, s, x, train=False))
        return self._jitted(params, state, x)

    def _labels(self, labels, n):
        """``labels`` as int32 after checking they are ``n`` integer class indices in
        ``[0, classes)``; a one-line ValueError saying what was given otherwise (a float, bool
        or out-of-range label would be truncated, wrapped or indexed out of bounds)."""
        y = np.asarray(labels)
        expected = f"expected {n} integer class indices 0..{self.model.classes - 1}, shape ({n},)"
        given = f"labels: given {y.dtype} of shape {y.shape}"
        if y.shape != (n,):
            raise ValueError(f"{given}; {expected}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{given}, not integers; {expected}")
        if n and (int(y.min()) < 0 or int(y.max()) >= self.model.classes):
            raise ValueError(f"{given}, values {int(y.min())}..{int(y.max())}; {expected}")
        return y.astype(np.int32)

    def _images(self, images):
        """``images`` checked against what :meth:`predict` accepts, on the programs' 0..255
        scale (uint8 as given; floats in [0, 1] times 255 as float32); a one-line ValueError
        saying what was given and what is expected otherwise. The value checks are one
        min/max pass over floating inputs, nothing for uint8."""
        x = np.asarray(images)
        shape = tuple(self.image_shape)
        expected = (f"expected images of shape (N, {', '.join(map(str, shape))}) with N >= 1, "
                    f"as uint8 pixels 0..255 or floating point in [0, 1]")
        given = f"images: given {x.dtype} of shape {x.shape}"
        if x.shape == shape:
            raise ValueError(f"{given}, one image without a batch axis (pass images[None]); {expected}")
        if x.ndim != 4 or x.shape[1:] != shape:
            raise ValueError(f"{given}; {expected}")
        if len(x) == 0:
            raise ValueError(f"{given}, an empty batch; {expected}")
        if x.dtype == np.uint8:
            return x
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{given}, neither uint8 nor floating point; {expected} "
                             f"(0..255 integers: convert with .astype(np.uint8))")
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise ValueError(f"{given}, holding {bad} NaN or infinite values; {expected}")
        if lo < 0.0 or hi > 1.0:
            hint = " (a 0..255 float image: divide it by 255)" if hi > 1.0 and hi <= 255.0 and lo >= 0.0 else ""
            raise ValueError(f"{given}, values {lo:g}..{hi:g}{hint}; {expected}")
        return x.astype(np.float32) * 255.0  # the programs scale by 1/255, as for uint8 pixels


def _batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def load_run(run_dir) -> Run:
    """A trained run back from its directory: ``run = load_run(DIR)``; ``run.predict(images)``.

    Works for single runs and sweep members, whatever backend trained them; reads
    ``config.json`` and the verified ``checkpoint.msgpack`` (the last finished epoch).
    """
    from jaxnets.steps import build_model, num_classes

    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"load_run: expected the path of a run directory, got {type(run_dir).__name__}")
    run_dir = Path(run_dir)
    info = read_config(run_dir)
    try:
        config = from_dict(info["config"], where=str(run_dir / "config.json"))
    except ValueError as e:
        raise TrainingError(str(e)) from None
    shape, classes = D.SHAPES[config.dataset].image_shape, num_classes(config)  # config.json predating them
    shape, classes = tuple(info.get("image_shape", shape)), int(info.get("classes", classes))
    model = build_model(config, shape, classes)
    raw = read_checkpoint(run_dir)
    note = checkpoint_note(run_dir, raw)
    if note:
        warnings.warn(note, stacklevel=2)
    like_params, like_state = jax.eval_shape(model.init, jax.random.key(0))
    path = run_dir / CHECKPOINT
    try:
        params = serialization.from_state_dict(like_params, raw["params"])
        state = serialization.from_state_dict(like_state, raw.get("state", {}))
        norm = raw["normalization"]
    except Exception as e:
        raise TrainingError(f"{path}: does not match the model in config.json ({str(e).splitlines()[0][:160]})") \
            from None
    for a, b in zip(jax.tree_util.tree_leaves((like_params, like_state)), jax.tree_util.tree_leaves((params, state))):
        if tuple(a.shape) != np.shape(b):
            raise TrainingError(f"{path}: shapes do not match the model in config.json ({np.shape(b)} vs {a.shape})")
    as_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)
    return Run(run_dir=run_dir, config=config, model=model, image_shape=shape, params=as_jax(params),
               state=as_jax(state),
               mean=np.asarray(norm["mean"], np.float32), std=np.asarray(norm["std"], np.float32),
               epoch=int(raw["epoch"]), summary=read_summary(run_dir))
