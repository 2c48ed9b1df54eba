"""Sweeps: a grid of configurations, trained group by group, one directory per member.

A sweep is a base :class:`~jaxnets.config.TrainConfig` and axes ``{setting: [values]}``;
every combination of the values (their Cartesian product) is one member. Members that
agree in every setting that fixes shapes or the program (:func:`~jaxnets.training.group_key`:
hidden sizes, depth, batch size, batch norm, activation, optimizer, epochs/max_steps, ...)
form a group. On GPU/TPU a group trains in one ``jax.vmap``-ed, jitted program (learning
rate, weight decay, momentum, dropout rate and label smoothing are per-member arrays); on
CPU each member runs through its single run's programs, two at a time
(:class:`~jaxnets.placement.MemberBlocks`). Each member's seed gives it its own split,
init, data order and dropout masks. Groups too big for the memory budget are split into
waves. Groups and waves run one after another.

Each member writes exactly the files of a single run (``train_group`` is also what
``train`` runs). The sweep directory gets ``sweep_plan.json`` (the settings, the members
and their waves, written before training), ``sweep.csv``/``sweep.json`` (every member,
best first), ``sweep_<setting>.png`` (validation accuracy vs each swept value, mean +- std
across the other settings) and, when seeds are swept, ``seed_bands.png`` (validation
curves, mean +- std across seeds).

An interrupted sweep continues with ``resume=True`` (``--resume DIR``): it reruns its saved
plan, skipping waves whose members all finished, continuing partly trained waves from
their epoch checkpoints (the whole wave, so its program and rounding are unchanged) and
training the rest; the table equals an uninterrupted sweep's.

    from jaxnets import sweep
    from jaxnets.config import TrainConfig
    rows = sweep.sweep(TrainConfig(dataset="cifar10", hidden_units=(200,)),
                   {"lr": [1e-2, 1e-3], "seed": [0, 1, 2]}, out="runs/lr-sweep")
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import jax

from jaxnets import data as D
from jaxnets import cost, placement, plots
from jaxnets import models as M
from jaxnets import training as T
from jaxnets.config import FIELDS, TrainConfig, format_setting, parse_setting
from jaxnets.runs import (SWEEP_PLAN, is_diverged, make_dir, RUN_FILES, ReportedInterrupt, RunLock, TrainingError, at_chance, checkpoint_epoch,
                          files_besides_lock, read_json, read_summary, removed_if_left_empty, write_json)
from jaxnets.steps import build_model, check_sizes, memory_settings, num_classes, run_dataset

#: Settings a sweep may not vary (they name where things go, not what is trained).
NOT_SWEEPABLE = ("out", "data_dir", "data_source", "progress", "dataset")
#: The most members a sweep may have (a typo like seed=0..1000000000 is refused, not expanded).
MAX_MEMBERS = 10_000
SWEEPABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_SWEEPABLE)
#: The sweep's own record of what it trains and how, read back by ``resume``.
PLAN_FILE = SWEEP_PLAN


# ------------------------------------------------------------------------- parsing


def parse_values(name: str, text: str):
    """``a,b,c`` -> [a, b, c]; for integer settings ``A..B`` is the inclusive range."""
    values = []
    for item in text.split(","):
        if not item.strip():
            raise ValueError(f"an empty value in {text!r} (a trailing or doubled comma?)")
        if ".." in item and type(FIELDS[name].default) is int:
            lo, _, hi = item.partition("..")
            lo, hi = parse_setting(name, lo), parse_setting(name, hi)
            if hi < lo:
                raise ValueError(f"empty range {item!r}")
            if hi - lo + 1 > MAX_MEMBERS:
                raise ValueError(f"range {item!r} has {hi - lo + 1} values; a sweep has at most {MAX_MEMBERS} members")
            values.extend(range(lo, hi + 1))
        else:
            values.append(parse_setting(name, item))
    return values


def parse_sweep(specs, base: TrainConfig | None = None):
    """``["lr=1e-2,1e-3", "seed=0..2", "hidden-units=100,300x100"]`` -> ``{"lr": [...], ...}``.

    Keys are TrainConfig field names (``-`` or ``_``); each value is checked against
    ``base`` (``TrainConfig()`` by default). Raises ValueError naming the bad spec.
    """
    base = base or TrainConfig()
    axes = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        name = key.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"--sweep {spec!r}: expected KEY=VALUE[,VALUE...], e.g. lr=1e-2,1e-3")
        if name not in SWEEPABLE:
            raise ValueError(f"--sweep {spec!r}: unknown or unsweepable setting {key.strip()!r}; "
                             f"sweepable: {', '.join(k.replace('_', '-') for k in SWEEPABLE)}")
        if name in axes:
            raise ValueError(f"--sweep {spec!r}: {key.strip()} is swept twice")
        if not text.strip():
            raise ValueError(f"--sweep {spec!r}: no values")
        try:
            values = parse_values(name, text)
            for v in values:
                dataclasses.replace(base, **{name: v}).validate()
        except ValueError as e:
            raise ValueError(f"--sweep {spec}: {e}") from None
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"--sweep {spec}: repeated value")
        axes[name] = values
    return axes


def expand(base: TrainConfig, axes):
    """Every combination: a list of ``(config, {setting: value})``, the last axis fastest."""
    names = list(axes)
    size = math.prod(len(axes[k]) for k in names)
    if size > MAX_MEMBERS:
        raise ValueError(f"the sweep has {size} members; at most {MAX_MEMBERS} (sweep fewer values)")
    members = []
    for combo in itertools.product(*(axes[k] for k in names)):
        swept = dict(zip(names, combo))
        config = dataclasses.replace(base, **swept)
        try:
            config.validate()
        except ValueError as e:
            raise ValueError(f"sweep member {format_values(swept)}: {e}") from None
        members.append((config, swept))
    return members


def format_values(swept):
    return "_".join(f"{k}={format_setting(v, k)}" for k, v in swept.items()) or "base"


# ------------------------------------------------------------------- grouping, memory


def member_bytes(config: TrainConfig, image_shape, classes, n_val=0):
    """A rough upper estimate of one member's memory while training (float32): the sum of
    :func:`jaxnets.cost.memory_parts`."""
    model = build_model(config, image_shape, classes)
    return sum(cost.memory_parts(model, **memory_settings(config, n_val)).values())


def member_cost(config: TrainConfig, image_shape, classes):
    """Multiply-adds of one example's forward pass (:func:`jaxnets.cost.forward_macs`): the
    relative cost of a member-step per example, for progress and work estimates."""
    return cost.forward_macs(build_model(config, image_shape, classes))


def member_steps(config: TrainConfig, n_pool):
    """``(steps per epoch, total steps)`` of a member trained on a pool of ``n_pool`` images
    (before ``train_subset`` and the validation split), as :func:`~jaxnets.training.train_group` counts."""
    n_train = (min(config.train_subset, n_pool) if config.train_subset else n_pool) - config.val_size
    if config.labels_per_class:
        n_train = config.labels_per_class * num_classes(config) - config.val_size
    per_epoch = max(n_train // config.batch_size, 1)
    total = per_epoch * config.epochs
    return per_epoch, min(total, config.max_steps) if config.max_steps else total


def memory_budget():
    """Default budget for one wave of a sweep: 25% of :func:`jaxnets.cost.available_memory`."""
    return int(0.25 * cost.available_memory())


def parse_bytes(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1e9"`` -> bytes."""
    text = str(text).strip().upper().removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise ValueError(f"memory budget {text!r}: expected bytes like 4G, 512M or 1e9") from None
    if value <= 0:
        raise ValueError(f"memory budget {text!r} must be positive")
    return int(value)


def plan(configs, *, image_shape, classes, n_val=0, budget=None, max_members=None):
    """Indices of ``configs`` grouped by :func:`~jaxnets.training.group_key`, each group split
    into waves that fit ``budget`` bytes (and ``max_members``), in first-seen order."""
    groups = {}
    for i, c in enumerate(configs):
        groups.setdefault(T.group_key(c), []).append(i)
    budget = memory_budget() if budget is None else budget
    waves = []
    for members in groups.values():
        per_member = member_bytes(configs[members[0]], image_shape, classes, n_val)
        cap = max(1, int(budget // per_member))
        if max_members:
            cap = min(cap, max_members)
        pieces = math.ceil(len(members) / cap)
        size = math.ceil(len(members) / pieces)  # even waves: one compile per distinct size
        waves.extend(members[i:i + size] for i in range(0, len(members), size))
    return waves


def describe(configs, waves, axes, *, image_shape, classes, n_pool, budget=None, vmap=None):
    """The plan as text: one line per wave (its group's fixed swept values, members,
    estimated memory per member, steps, share of the total work) and a header with totals
    that says how a wave's members train (``vmap`` as in :func:`sweep`)."""
    lines, works, rows, groups, examples = [], [], [], {}, 0
    for wave in waves:
        c = configs[wave[0]]
        group = groups.setdefault(T.group_key(c), len(groups))
        fixed = {k: getattr(c, k) for k in axes if all(getattr(configs[i], k) == getattr(c, k) for i in wave)}
        steps = member_steps(c, n_pool)[1]
        examples += len(wave) * steps * c.batch_size
        works.append(len(wave) * steps * c.batch_size * member_cost(c, image_shape, classes))
        mib = member_bytes(c, image_shape, classes, c.val_size) / 2**20
        rows.append((group, len(wave), mib, steps, " ".join(f"{k}={format_setting(v)}" for k, v in fixed.items())))
    total = sum(works) or 1
    budget_text = f"; memory budget {budget / 2**30:.2f} GiB per wave" if budget else ""
    how = ("vmapped wave(s) (one compile each)" if len(placement.member_blocks(2, vmap=vmap)) == 1 else
           f"wave(s) (members through their single run's programs, {placement.CONCURRENT_BLOCKS} at a time)")
    lines.append(f"{len(configs)} configurations over {', '.join(axes) or 'nothing'}: {len(groups)} group(s), "
                 f"{len(waves)} {how}{budget_text}; {examples:,} training examples over all members")
    lines.append(f"{'wave':>5} {'group':>5} {'members':>7} {'MiB/member':>10} {'steps':>6} {'work':>6}  fixed values")
    for k, ((group, n, mib, steps, fixed), work) in enumerate(zip(rows, works)):
        lines.append(f"{k + 1:>5} {group + 1:>5} {n:>7} {mib:>10.1f} {steps:>6} {100 * work / total:>5.1f}%  {fixed}")
    return "\n".join(lines)


def dry_run(base: TrainConfig, axes, *, budget=None, max_members=None, dataset: D.Dataset | None = None,
            vmap=None):
    """:func:`describe` of the sweep :func:`sweep` would run, without loading data or training."""
    configs = [c for c, _ in expand(base, axes)]
    if dataset is not None:
        dataset = run_dataset(dataset, base)
        image_shape, classes, n_pool = dataset.image_shape, dataset.num_classes, len(dataset.train_labels)
    else:  # the pool of --classes estimated as their share (exact for CIFAR-10's equal classes)
        image_shape, all_classes, n_pool = D.SHAPES[base.dataset]
        classes = num_classes(base)
        n_pool = n_pool * classes // all_classes
    budget = memory_budget() if budget is None else budget
    waves = plan(configs, image_shape=image_shape, classes=classes, n_val=base.val_size, budget=budget,
                  max_members=max_members)
    return describe(configs, waves, axes, image_shape=image_shape, classes=classes, n_pool=n_pool, budget=budget,
                    vmap=vmap)


# ---------------------------------------------------------------------------- sweep


def sweep(base: TrainConfig, axes, *, out=None, dataset: D.Dataset | None = None, budget=None,
          max_members=None, log=print, progress=None, resume=False, vmap=None):
    """Train every combination of ``axes`` over ``base``; returns the table rows, best first.

    ``out`` (default ``base.out``, else ``runs/sweep-<model>-<dataset>-<time>``) gets one
    directory per member plus the table and plots; a directory that holds files is never
    written into without ``resume``. ``budget`` (bytes) caps each wave's estimated
    memory (default :func:`memory_budget`); ``max_members`` caps its size. ``resume``
    continues the interrupted sweep in ``out``, which must have been started with the same
    ``base`` and ``axes`` (its saved plan is reused, whatever ``budget`` says now).
    ``vmap`` says how a wave's members train (see :func:`~jaxnets.training.train_group`):
    by default vmapped, except on CPU, where they run one after another, each bit-for-bit
    its single run.
    """
    t_start = time.time()
    members = expand(base, axes)
    if out is None:
        if resume:
            raise ValueError("resuming a sweep needs its directory (out)")
        out = base.out or Path("runs") / f"sweep-{base.model}-{base.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    configs = [c for c, _ in members]
    names = [f"{i:03d}-{format_values(s)}" for i, (_, s) in enumerate(members)]
    if base.devices > 1 or jax.process_count() > 1:  # before anything is written (train_group refuses it too)
        raise ValueError(f"--devices {base.devices}: a sweep trains each member on one device "
                         f"(use --devices 1 or 0, in one process)")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out}: is a file, not a directory")
    if resume and not out.exists():
        raise TrainingError(f"--resume {out}: no such sweep directory (a sweep refused before training leaves none); "
                            f"start it with --out {out} instead of --resume")
    if resume and out.is_dir() and not files_besides_lock(out):
        log(f"{out} holds no sweep yet (it stopped before writing its plan): starting it")
        resume = False
    if resume:
        waves = _saved_plan(out, base, axes, names)
    elif out.exists() and files_besides_lock(out):
        raise TrainingError(f"sweep directory {out} already holds files; continue it with --resume {out} "
                              f"or choose another --out")
    with removed_if_left_empty(out):
        make_dir(out, "--out")
        with RunLock(out):  # one process at a time runs (or resumes) a sweep
            if resume:
                waves = _saved_plan(out, base, axes, names)  # again: the plan as it is now we hold the lock
            return _sweep(base, axes, members, configs, names, out, waves if resume else None, dataset=dataset,
                          budget=budget, max_members=max_members, log=log, progress=progress, resume=resume,
                          vmap=vmap, t_start=t_start)


def _sweep(base, axes, members, configs, names, out, waves, *, dataset, budget, max_members, log, progress, resume,
           vmap, t_start):
    """:func:`sweep` once its directory is checked and locked."""
    if dataset is None:
        dataset = D.load_dataset(base.dataset, base.data_dir, source=base.data_source)
    dataset = run_dataset(dataset, base)
    image_shape, classes = dataset.image_shape, dataset.num_classes
    if not resume:
        budget = memory_budget() if budget is None else budget
        waves = plan(configs, image_shape=image_shape, classes=classes, n_val=base.val_size, budget=budget,
                      max_members=max_members)
    for wave in waves:  # each member alone must fit (a wave is at least one member, whatever the budget)
        c = configs[wave[0]]
        cost.check_memory(build_model(c, image_shape, classes), **memory_settings(c))
    for c, name in zip(configs, names):
        c.out, c.progress = str(out / name), False
    for c, name in zip(configs, names):  # every member checked on the data before the first trains
        try:
            check_sizes(len(dataset.train_labels), c, dataset.train_labels)
        except ValueError as e:
            raise ValueError(f"sweep member {name}: {e}") from None
    if not resume:  # every --pretrained file loads into its members' model before anything is written
        for model_name, pretrained in sorted({(c.model, c.pretrained) for c in configs if c.pretrained}):
            c = next(c for c in configs if (c.model, c.pretrained) == (model_name, pretrained))
            M.load_pretrained(model_name, build_model(c, image_shape, classes), pretrained)

    # Work (member-steps x batch x cost per example) per wave: what the progress bar and the
    # ETA count, so a wave of 3000-step, 300-wide members weighs what it costs.
    n_pool = len(dataset.train_labels)
    steps = [member_steps(c, n_pool) for c in configs]
    step_work = [c.batch_size * member_cost(c, image_shape, classes) for c in configs]
    works = [sum(steps[i][1] * step_work[i] for i in wave) for wave in waves]
    finished = [[_finished(Path(configs[i].out)) for i in wave] for wave in waves]
    done = [all(s is not None for s in f) for f in finished]

    enabled = base.progress if progress is None else progress
    bar = _sweep_bar(sum(works), sum(w for w, d in zip(works, done) if d), enabled)
    if enabled and log is print:  # printed lines would tear the bar
        log = lambda text="", **_: bar.write(str(text), file=sys.stdout)
    log(describe(configs, waves, axes, image_shape=image_shape, classes=classes, n_pool=n_pool,
                 budget=None if resume else budget))
    log(("resuming" if resume else "writing") + f" {out}"
        + (f": {sum(done)} of {len(waves)} waves finished already" if resume else ""))
    if not resume:
        _write_plan(out, base, axes, names, waves)

    summaries = [None] * len(configs)
    t_work, work_done, configs_done = None, 0.0, 0
    try:
        for g, wave in enumerate(waves):
            if done[g]:
                for i, summary in zip(wave, finished[g]):
                    summaries[i] = dict(summary, group=g, group_seconds=summary["wall_seconds"])
                configs_done += len(wave)
                continue
            t_work = t_work or time.time()
            dirs = [Path(configs[i].out) for i in wave]
            bar.set_postfix_str(f"wave {g + 1}/{len(waves)}, {configs_done}/{len(configs)} configs done")
            how, epoch = _resume_mode(dirs, log) if resume else ("new", 0)
            if how == "rerun":
                _clear(dirs)
            target = bar.n + works[g]

            def advance(record, *_, g=g, wave=wave):
                # One call per member and epoch; every member of a wave shares the step counts.
                c = configs[wave[0]]
                per_epoch, total = member_steps(c, n_pool)
                before = min((record["epoch"] - 1) * per_epoch, total)
                bar.update((record["steps"] - before) * step_work[wave[0]])

            if how == "continue":  # the epochs already trained count as done
                bar.update(works[g] * min(1.0, epoch * steps[wave[0]][0] / steps[wave[0]][1]))
            t0 = time.time()
            results = T.train_group([configs[i] for i in wave], dirs, dataset=dataset, log=log,
                                    names=[names[i] for i in wave], resume=how == "continue", on_epoch_end=advance,
                                    vmap=vmap,
                                    extra_config=[{"sweep": {"values": members[i][1], "group": g,
                                                             "group_size": len(wave)}} for i in wave])
            for i, summary in zip(wave, results):
                summaries[i] = dict(summary, group=g, group_seconds=summary["wall_seconds"])
            bar.update(target - bar.n)
            configs_done += len(wave)
            bar.set_postfix_str(f"wave {g + 1}/{len(waves)}, {configs_done}/{len(configs)} configs done")
            work_done += works[g]
            left = sum(w for w, d in zip(works[g + 1:], done[g + 1:]) if not d)
            eta = left * (time.time() - t_work) / work_done
            log(f"wave {g + 1}/{len(waves)} done in {time.time() - t0:.0f}s; "
                f"{configs_done}/{len(configs)} configurations done, about {_duration(eta)} left")
    except KeyboardInterrupt:
        bar.close()
        log(f"sweep interrupted; finished and partly trained waves are kept: continue it with the same "
            f"settings and --resume {out}")
        raise ReportedInterrupt from None
    except Exception:
        bar.close()
        if not resume and not any((Path(c.out) / "config.json").exists() for c in configs):
            # Failed before any member started (a setting refused on the data): the plan alone
            # would block both a corrected rerun and a resume, so it goes.
            (out / PLAN_FILE).unlink(missing_ok=True)
        raise
    bar.close()
    rows = table(members, summaries, names, classes)
    trained = ("vmapped per wave" if len(placement.member_blocks(2, vmap=vmap)) == 1 else
               "each member through its single run's programs")
    write_table(out, rows, axes, base, wall=time.time() - t_start, groups=[len(c) for c in waves], resumed=resume,
                members_trained=trained)
    plots.plot_sweep(out, rows, axes)
    log(f"sweep done in {time.time() - t_start:.0f}s; best: {rows[0]['name']} "
        f"(val {rows[0]['best_val_accuracy']}, test {rows[0].get('test_accuracy')}); table {out / 'sweep.csv'}")
    return rows


def _sweep_bar(total, initial, enabled):
    """One bar for the whole sweep, in units of work, so its rate and ETA weigh each wave by cost."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="sweep", disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _plan_settings(base: TrainConfig, axes, names):
    """What a resumed sweep must agree on, as JSON values: the base settings that change
    what is trained (not where it is written or read from), the axes and the member names."""
    settings = {k: v for k, v in dataclasses.asdict(base).items()
                if k not in ("out", "progress", "data_dir", "data_source", "devices")}
    payload = {"base": settings, "axes": {k: [format_setting(v) for v in vs] for k, vs in axes.items()},
               "names": names}
    return json.loads(json.dumps(payload, default=str))


def _write_plan(out: Path, base, axes, names, waves):
    payload = dict(_plan_settings(base, axes, names), waves=waves)
    write_json(out / PLAN_FILE, payload)


def _saved_plan(out: Path, base, axes, names):
    """The waves saved in ``out``'s plan, after checking it was started with these settings."""
    path = out / PLAN_FILE
    if not path.exists():
        raise TrainingError(f"--resume {out}: no {PLAN_FILE} there, not a sweep directory")
    saved = read_json(path)
    saved.setdefault("waves", saved.pop("chunks", None))  # plans written before the rename
    if not all(saved.get(k) is not None for k in ("axes", "base", "names", "waves")):
        raise TrainingError(f"{path}: not a sweep plan (missing axes, base, names or waves)")
    now = _plan_settings(base, axes, names)
    if saved["axes"] != now["axes"]:
        raise TrainingError(f"--resume {out}: that sweep swept {_axes_text(saved['axes'])}, "
                              f"not {_axes_text(now['axes'])}")
    for k in sorted(set(saved["base"]) | set(now["base"])):
        if k not in saved["base"] and now["base"][k] == FIELDS[k].default:
            continue  # a setting added since that sweep started, at its default
        if saved["base"].get(k) != now["base"].get(k):
            raise TrainingError(f"--resume {out}: that sweep was started with {k}={saved['base'].get(k)!r}, "
                                  f"not {now['base'].get(k)!r}")
    if saved["names"] != names:
        raise TrainingError(f"--resume {out}: its members differ from these settings'")
    return saved["waves"]


def _axes_text(axes):
    return " ".join(f"{k}={','.join(v)}" for k, v in axes.items()) or "nothing"


def _finished(run_dir: Path):
    """A member's summary if it finished (completed or diverged), else None."""
    summary = read_summary(run_dir)
    status = str((summary or {}).get("status", ""))
    return summary if status == "completed" or is_diverged(status) else None  # not interrupted/failed


def _resume_mode(dirs, log):
    """How to go on with an unfinished wave, and from which epoch: ``("continue", epoch)``
    from its checkpoints when every member still training has one, all of the same epoch;
    else ``("rerun", 0)`` from scratch (nothing trained yet, or a crash left the members at
    different epochs)."""
    epochs = set()
    for d in dirs:
        summary = read_summary(d)
        if summary is not None and is_diverged(summary):
            continue  # stays stopped in the continued wave
        epochs.add(checkpoint_epoch(d))
    if len(epochs) == 1 and None not in epochs:
        return "continue", epochs.pop()
    if epochs - {None}:
        log(f"members {dirs[0].name}... stopped at different epochs ({sorted(epochs, key=str)}); "
            f"rerunning their wave from the start")
    return "rerun", 0


def _clear(dirs):
    """Remove what an unfinished run wrote, so its wave reruns from scratch."""
    for d in dirs:
        if d.exists():
            for f in d.iterdir():
                if f.name in RUN_FILES or f.name.endswith(".tmp"):
                    f.unlink()


def table(members, summaries, names, classes):
    """The sweep table: one row per member, best validation accuracy first, diverged last."""
    rows = []
    for (config, swept), summary, name in zip(members, summaries, names):
        flag = ""
        if is_diverged(summary):
            flag = "diverged"
        elif summary["status"] != "completed":
            flag = summary["status"]
        elif at_chance(summary["best_val_accuracy"], classes):
            flag = "chance"
        rows.append({"name": name, **{k: format_setting(v) for k, v in swept.items()},
                     "best_val_accuracy": summary["best_val_accuracy"],
                     "test_accuracy": summary.get("test_accuracy"), "test_loss": summary.get("test_loss"),
                     "flag": flag, "status": summary["status"], "epochs": summary["epochs"],
                     "seconds": round(summary["group_seconds"] / summary.get("group_size", 1), 2),
                     "group": summary["group"], "group_seconds": summary["group_seconds"],
                     "run_dir": summary["run_dir"], "_values": swept})

    def order(row):
        acc = row["best_val_accuracy"]
        return (row["flag"] == "diverged", -(acc if acc is not None and math.isfinite(acc) else -1.0))

    rows.sort(key=order)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def write_table(out: Path, rows, axes, base, *, wall, groups, resumed=False, members_trained=None):
    """``sweep.csv`` and ``sweep.json``; run directories relative to the sweep directory."""
    rows = [dict(r, run_dir=os.path.relpath(r["run_dir"], out)) for r in rows]
    columns = ["rank", "name", *axes, "best_val_accuracy", "test_accuracy", "test_loss", "flag", "status",
               "epochs", "seconds", "group", "group_seconds", "run_dir"]
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    payload = {"base": dataclasses.asdict(base), "axes": {k: [format_setting(v) for v in vs] for k, vs in axes.items()},
               "wall_seconds": round(wall, 2), "resumed": resumed, "groups": groups, "members_trained": members_trained,
               "rows": [{k: v for k, v in r.items() if k != "_values"} for r in rows]}
    write_json(out / "sweep.json", payload)
