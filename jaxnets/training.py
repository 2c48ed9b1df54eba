"""The training loop: :func:`train` (one run) and :func:`train_group` (several runs at once).

The loop owns the order of a run: validate, read ``--pretrained``'s file (before anything
is written), place the data, init (from the file's weights when given) or restore, then per
epoch the chunks of steps (:mod:`jaxnets.steps`), evaluation, metrics and checkpoint
(:mod:`jaxnets.runs`), and at the end the test evaluation and the summary. Every random
draw derives from ``(seed, epoch, step)``, so a run resumed from an epoch checkpoint is
identical to an uninterrupted one. ``train.py``/``jaxnets-train`` (:mod:`jaxnets.cli`) is
a thin shell over :func:`train`; :mod:`jaxnets.sweep` calls :func:`train_group`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets import data as D
from jaxnets import cost, parallel, plots, runs
from jaxnets import models as M
from jaxnets.config import TrainConfig, flag, format_setting, resume_config
from jaxnets.optim import HPARAMS, active_groups, build_optimizer, eval_weights, hparams_of, with_hparams
from jaxnets.runs import TrainingError, default_run_dir, environment_info, load_checkpoint, save_checkpoint
from jaxnets.placement import INTEGER_PROGRAM_OPTIONS, DeviceMesh, MemberBlocks, OneDevice
from jaxnets.steps import (build_model, member_split, memory_settings, model_input, num_classes, run_dataset,
                           stack_members, take_member, training_pool)


#: Where ``train.py`` keeps compiled programs unless told otherwise (``--compile-cache``).
DEFAULT_COMPILE_CACHE = "~/.cache/jaxnets/xla"


def use_compile_cache(directory=DEFAULT_COMPILE_CACHE, *, min_compile_seconds=0.5):
    """Keep compiled XLA programs in ``directory`` (jax's persistent compilation cache).

    A later process that compiles the same program (same model, shapes, flags, jax
    version and machine) loads it instead: on the 2-core CPU that removes the seconds of
    compilation before a ConvNet's first step. Programs that compiled in less than
    ``min_compile_seconds`` are not stored. Call it before the first compilation; it sets
    process-wide jax options.
    """
    path = runs.make_dir(Path(directory).expanduser(), "--compile-cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return path


#: jax.monitoring's events of one compilation: tracing to a jaxpr, lowering to MLIR, and
#: XLA's compile (or its load from the persistent cache).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_charged = []  # the (clock, program) compilations are charged to now; one entry while a clock times a call


class CompileClock:
    """Seconds spent compiling, per program, as jax.monitoring reports them: a compilation
    inside ``with clock.program("chunk"):`` is charged to ``"chunk"`` (on whatever thread
    it runs). Timing the first calls this way is exact and free; the epoch's img/s is
    computed on its training time less these seconds."""

    _listening = False

    def __init__(self):
        self.seconds = {}
        if not CompileClock._listening:
            jax.monitoring.register_event_duration_secs_listener(_charge)
            CompileClock._listening = True

    @contextlib.contextmanager
    def program(self, name):
        _charged.append((self, name))
        try:
            yield
        finally:
            _charged.remove((self, name))

    def since(self, before):
        """``{program: seconds}`` compiled since the copy ``before`` of :attr:`seconds` (rounded; none: {})."""
        return {k: round(v - before.get(k, 0.0), 3) for k, v in self.seconds.items()
                if v - before.get(k, 0.0) >= 0.0005}


def _charge(event, duration, **kwargs):
    if event in COMPILE_EVENTS and _charged:
        clock, name = _charged[-1]
        clock.seconds[name] = clock.seconds.get(name, 0.0) + duration


# ---------------------------------------------------------------------------- train


def group_key(config: TrainConfig):
    """What configs must share to train together as one vmapped program: every setting
    except the numeric :data:`HPARAMS` and the seed (and ``out``/``progress``), plus
    whether the model has dropout at all (it adds ops to the program; the model says). Weight decay 0 and non-zero
    share a group: the decay term is exact at 0 (see :func:`build_optimizer`)."""
    d = dataclasses.asdict(config)
    for k in HPARAMS + ("seed", "out", "progress"):
        d.pop(k)
    d["hidden_units"] = tuple(d["hidden_units"])
    d["conv_plan"] = tuple(d["conv_plan"])
    d["dropout_on"] = build_model(config, D.SHAPES[config.dataset].image_shape, num_classes(config)).has_dropout
    return tuple(sorted(d.items()))


def train(config: TrainConfig | None = None, *, dataset: D.Dataset | None = None,
          resume: str | os.PathLike | None = None, changes: dict | None = None, command=None, log=print,
          on_epoch_end=None):
    """Train, evaluate and write a run directory; returns the summary dict.

    ``dataset`` skips loading (handy in research code and tests). ``resume=DIR`` continues
    the run in DIR with the settings saved in its ``config.json``: ``changes`` (and
    ``config``, when given) may only repeat them or change what
    :data:`jaxnets.config.RESUME_CHANGES` allows (more epochs, where the data is); the
    changes are recorded in config.json. A finished run is left untouched unless
    ``epochs`` extends it; a run stopped before its first checkpoint starts again from the
    first epoch. ``on_epoch_end(record, params, state)`` is called after each epoch's files
    are written (raising KeyboardInterrupt there stops the run as Ctrl-C would). A single
    run is a :func:`train_group` of one member.
    """
    t_start = time.time()
    writer = parallel.is_writer()  # in a multi-process run, process 0 alone writes the run directory
    if resume is None:
        if config is None:
            raise ValueError("train: give a config, or resume=DIR")
        config = config.validate()
        run_dir = Path(config.out) if config.out else default_run_dir(config)
        # --pretrained's file is read before anything is written: a missing or unreadable
        # file leaves no run directory behind.
        pretrained = M.read_pretrained(config.pretrained) if config.pretrained else None
    else:
        pretrained = None
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise TrainingError(f"--resume {run_dir}: no such run directory")
        if (run_dir / runs.SWEEP_PLAN).exists() and not (run_dir / "config.json").exists():
            raise TrainingError(runs.sweep_resume_line(run_dir))  # before anything is touched there
    with runs.removed_if_left_empty(run_dir) if writer else contextlib.nullcontext():
        if writer:
            runs.prepare_run_dir(run_dir, new=resume is None)
        with runs.RunLock(run_dir) if writer else contextlib.nullcontext():
            if resume is not None:
                config, finished = _resumed_config(run_dir, config, changes, command, log, writer)
                if finished is not None:
                    return finished
            if dataset is None:
                dataset = D.load_dataset(config.dataset, config.data_dir, source=config.data_source)
            dataset = run_dataset(dataset, config)
            model = build_model(config, dataset.image_shape, dataset.num_classes)
            cost.check_memory(model, **memory_settings(config))  # refused before init, not an OOM traceback
            return train_group([config], [run_dir], dataset=dataset, resume=resume is not None, log=log,
                               on_epoch_end=on_epoch_end, t_start=t_start, command=command,
                               pretrained=pretrained)[0]


def _resumed_config(run_dir: Path, config, changes, command, log, writer=True):
    """``(config, None)`` of a run to continue, its resume recorded in config.json, or
    ``(None, summary)`` of a finished run left as it is."""
    info = runs.read_config(run_dir)
    given = {**(dataclasses.asdict(config) if config is not None else {}), **(changes or {})}
    out = given.pop("out", None)
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise TrainingError(f"--resume {run_dir} continues the run in that directory; --out {out} differs")
    try:
        config, changed = resume_config(info["config"], given, where=f"--resume {run_dir}")
    except ValueError as e:
        raise TrainingError(str(e)) from None
    summary = runs.read_summary(run_dir) or {}
    status = str(summary.get("status", ""))
    if status == "completed" and "epochs" not in changed:
        try:  # finished: its results stand, but say so when its weights do not
            runs.read_checkpoint(run_dir)
        except TrainingError as e:
            raise TrainingError(f"--resume {run_dir}: the run finished and its results are intact, but its weights "
                                f"are not: {e}") from None
        log(f"{run_dir} finished already ({_plural(summary.get('epochs', 0), 'epoch')}); left untouched "
            f"(--epochs N with more epochs extends it)")
        return None, summary
    if runs.is_diverged(status):
        raise TrainingError(f"--resume {run_dir}: the run {status}; a resume would repeat the same steps. "
                            f"Start a new run (e.g. with a lower --lr)")
    runs.check_run_files(run_dir)  # a damaged checkpoint or metrics file: refused before config.json is touched
    for name, (old, new) in changed.items():
        log(f"resume: {flag(name)} {old} -> {new}")
    if writer:
        info["config"] = dataclasses.asdict(config)
        info.setdefault("resumes", []).append({**runs.provenance(command), "changes": changed})
        runs.write_json(run_dir / "config.json", info)
    return config, None


def _plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def train_group(configs, run_dirs, *, dataset: D.Dataset, resume=False, log=print, on_epoch_end=None,
                names=None, t_start=None, extra_config=None, vmap=None, command=None, pretrained=None):
    """Train ``configs`` together, one run directory each; returns the summaries, in order.

    The configs must agree in :func:`group_key` (shapes and static settings); they may
    differ in the :data:`~jaxnets.optim.HPARAMS` and the seed. Each member gets exactly the
    files, and follows exactly the computation, of ``train(config)`` (which is this
    function with one member): its own validation split, normalisation, init, data order,
    dropout masks. A member whose loss turns non-finite stops there (status
    ``diverged: ...``, last good epoch checkpoint kept) while the others go on. ``resume``
    continues every member from the last epoch checkpoint in its run directory (from the
    start where it has none); the members still training must be at the same epoch. In a
    resumed group a member whose summary.json says it diverged stays stopped: it only keeps
    its slot, so the group runs the same program, and rounds the same, as when it started.
    ``extra_config`` (a list of dicts) adds entries to each member's config.json.

    ``vmap``: train the members as one vmapped program (True), or each through exactly the
    compiled programs of its single run (False: bit-for-bit its single run), see
    :func:`member_blocks` for the default. Placement is :class:`OneDevice`, or
    :class:`DeviceMesh` for a data-parallel single run; scheduling is :class:`MemberBlocks`.

    ``--pretrained`` (the group shares it, a setting of :func:`group_key`): each new member
    starts from the file's weights, a replaced head from its own init key
    (:func:`jaxnets.models.load_pretrained`); ``pretrained`` is the file read already
    (:func:`jaxnets.models.read_pretrained`), else it is read here. It is loaded before any
    run file is written, and config.json records it. A resumed member loads its checkpoint
    instead (the file is read again only for members that have none yet).
    """
    t_start = time.time() if t_start is None else t_start
    configs, run_dirs = list(configs), [Path(d) for d in run_dirs]
    base, size = _check_group(configs, run_dirs)
    names = names or [d.name for d in run_dirs]
    devices = _group_devices(base, size)
    mesh = parallel.make_mesh(devices) if len(devices) > 1 else None
    writer = parallel.is_writer()
    if not writer:  # process 0 reports for all
        log = lambda *args, **kwargs: None
    say = (lambda m, text: log(text)) if size == 1 else (lambda m, text: log(f"[{names[m]}] {text}"))
    # A divergence or an interrupt goes to stderr when the log is the console's print; a
    # caller's own log gets it as any other line.
    problem = (lambda text: print(text, file=sys.stderr)) if log is print else log
    warn = (lambda m, text: problem(text)) if size == 1 else (lambda m, text: problem(f"[{names[m]}] {text}"))

    dataset = run_dataset(dataset, base)  # the members share it: --classes is a shape-fixing setting
    pool_x, pool_y = training_pool(dataset, base)
    _check_shapes(dataset, pool_x)
    _check_translate(base, pool_x)
    if dataset.data_warning:  # a --data-dir copy that differs from the published files: said, and recorded
        log(f"warning: {dataset.data_warning}")
    splits = {c.seed: member_split(pool_x, pool_y, c) for c in configs}
    train_idx, val_idx, means, stds = (np.stack(a) for a in zip(*(splits[c.seed] for c in configs)))
    model = build_model(base, dataset.image_shape, dataset.num_classes,
                        bn_axis_name=parallel.AXIS if mesh is not None and base.sync_bn else None,
                        batch_axis_name=parallel.AXIS if mesh is not None else None)
    n_train, n_val, batch = train_idx.shape[1], val_idx.shape[1], base.batch_size
    steps_per_epoch = n_train // batch
    total_steps = min(steps_per_epoch * base.epochs, base.max_steps or math.inf)
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = build_optimizer(base, total_steps, steps_per_epoch=steps_per_epoch,
                                decay=any(c.weight_decay != 0 for c in configs), model=model,
                                groups=active_groups(configs))
    members = MemberBlocks(size, vmap=vmap if mesh is None else True,
                           put=jax.device_put if mesh is None else (lambda x: parallel.replicate(x, mesh)))
    hps = jax.tree_util.tree_map(np.asarray, stack_members([hparams_of(c) for c in configs]))
    clock = CompileClock()
    loaded = _pretrained_members(base, model, configs, run_dirs, resume, pretrained, log)
    with clock.program("init"):
        carries, key_data = _init_members(model, optimizer, members, configs, hps, mesh, loaded)
    run = _GroupState(size)
    # A checkpoint has it already; pretrained weights bring their own state.
    fresh = [loaded is None and (not resume or not (d / runs.CHECKPOINT).exists()) for d in run_dirs]
    t_data = time.time()
    with clock.program("init"):
        carries = _data_init(model, optimizer, members, carries, hps, mesh, pool_x, train_idx, means, stds, fresh,
                             image_size=base.image_size)
    run.data_init_seconds = round(time.time() - t_data, 3) if getattr(model, "data_init", None) and any(fresh) else None
    if resume:
        carries, key_data = _restore(run, members, carries, key_data, run_dirs, log)
        if writer and dataset.data_warning:
            _record_resume_data(run_dirs, dataset)
    elif writer:
        if loaded is not None:
            extra_config = [{**extra, "pretrained": loaded[2]} for extra in (extra_config or [{}] * size)]
        _write_run_configs(configs, run_dirs, dataset, model, n_train, n_val, extra_config, command)
    integer_options = INTEGER_PROGRAM_OPTIONS if jax.default_backend() == "cpu" else None  # measured on CPU only
    args = (model, optimizer, base, (pool_x, pool_y.astype(np.int32)),
            (dataset.test_images, dataset.test_labels.astype(np.int32)), members, key_data, train_idx, val_idx,
            means, stds, hps, integer_options)
    place = OneDevice(*args) if mesh is None else DeviceMesh(*args, mesh, steps_per_epoch)
    log(f"{jax.default_backend()} backend, {_plural(len(devices), 'device')} ({devices[0].device_kind}); "
        f"{_describe(model)}\n{n_train} train / {n_val} val / {len(dataset.test_labels)} test images; "
        f"{steps_per_epoch} steps per epoch, {_plural(epochs, 'epoch')} ({total_steps} steps); "
        f"{place.describe(size, run_dirs[0])}")
    carries = [(*c, members.part(run.frozen, k)) for k, c in enumerate(carries)]
    run.begin()
    loop = _EpochLoop(place, members, carries, run, base, steps_per_epoch, total_steps, say, warn,
                      host_keys=jax.random.wrap_key_data(key_data), clock=clock)
    try:
        for epoch in range(run.start_epoch, epochs):
            runs.raise_if_interrupted()  # a Ctrl-C swallowed during start-up or the last epoch
            before = dict(clock.seconds)
            seconds, done, train = loop.run_epoch(epoch, epochs)
            if not run.alive.any():
                break
            # What compiled so far this epoch is the chunk and epoch order, inside ``seconds``.
            train_seconds = max(seconds - sum(clock.since(before).values()), 1e-6)
            val = loop.evaluate("val", run.alive) if n_val else (np.full(size, np.nan),) * 2
            if n_val:
                run.stop_non_finite(val[0], f"validation loss (epoch {epoch + 1})", say)
            steps_done = epoch * steps_per_epoch + done
            records = run.record_epoch(epoch, train, val, seconds, train_seconds, clock.since(before),
                                       images=done * batch, steps=steps_done, chunk=loop.chunk_length, say=say,
                                       weights=eval_weights(base, steps_done, total_steps))
            if writer:
                _write_epoch(records, loop, members, run_dirs, means, stds, on_epoch_end)
            else:
                run.last_good = [epoch + 1 if m in records else e for m, e in enumerate(run.last_good)]
            if size > 1:
                scores = np.where(run.alive & np.isfinite(val[1]), val[1], -np.inf)  # --val-size 0: all NaN
                best = int(np.argmax(scores))
                best_text = (f"best val acc {_percent(val[1][best])} ({names[best]})" if np.isfinite(scores[best])
                             else "no validation accuracy")
                log(f"epoch {epoch + 1}: {run.alive.sum()}/{size} members training; {best_text}; "
                    f"{_seconds(seconds, train_seconds)}, "
                    f"{done * batch * run.alive.sum() / train_seconds:.0f} img/s in all")
    except KeyboardInterrupt:
        run.interrupted = True
        run.status[run.alive] = "interrupted"
        run.cut_to_checkpoints()
        where = f"continue with --resume {run_dirs[0]}" if size == 1 else "the group's runs are incomplete"
        kept = (f"checkpoint of epoch {max(run.last_good)} kept" if max(run.last_good) else
                "no epoch finished, so --resume starts it from the first epoch")
        problem(f"\ninterrupted: {kept} in {run_dirs[0] if size == 1 else 'each run dir'}; {where}")
    except TrainingError as error:  # a run file could not be written (a full disk): stop as on Ctrl-C
        run.failure = error
        run.status[run.alive] = f"failed: {error}"
        run.cut_to_checkpoints()
    try:
        return _finish(run, loop, configs, run_dirs, dataset.num_classes, resume, writer, mesh, t_start, log)
    finally:
        members.close()


def _check_group(configs, run_dirs):
    """``(first config, size)`` of a valid group; ValueError naming what differs."""
    base, size = configs[0], len(configs)
    if len(run_dirs) != size:
        raise ValueError(f"train_group: {size} configs but {len(run_dirs)} run directories")
    for c in configs:
        c.validate()
        if group_key(c) != group_key(base):
            diff = [k for (k, a), (_, b) in zip(group_key(c), group_key(base)) if a != b]
            raise ValueError(f"train_group: configs differ in shape-fixing settings {diff}; group them apart")
    return base, size


def _check_translate(config: TrainConfig, pool_x):
    """``--translate`` must leave some of the image: a shift by its whole size is no image (and
    reflect padding cannot mirror more than the image)."""
    h, w = pool_x.shape[1:3]
    if config.augment and config.translate >= min(h, w):
        raise ValueError(f"--translate {config.translate} must be smaller than the {h}x{w} images")


def _data_init(model, optimizer, members, carries, hps, mesh, pool_x, train_idx, means, stds, fresh, image_size=0):
    """The carries with the model's data-dependent init (:func:`jaxnets.models.data_init`,
    e.g. Airbench's whitening) applied to each ``fresh`` member, from the first
    ``model.data_init_images`` of that member's own training rows, normalised as it trains
    (never its validation rows or the test set); the optimizer state is initialised again on
    the new parameters. Unchanged for a model without one. A shape the model was not built
    for is one DataError line."""
    if getattr(model, "data_init", None) is None or not any(fresh):
        return carries
    n = getattr(model, "data_init_images", None)

    @jax.jit
    def init_opt(params, hps):
        return jax.vmap(lambda p, hp: with_hparams(optimizer.init(p), hp))(params, hps)

    if mesh is not None:
        init_opt = jax.jit(init_opt.__wrapped__, out_shardings=parallel.replicated(mesh))
    out = []
    for k, block in enumerate(members.blocks):
        params, state, _ = jax.device_get(carries[k])
        new = []
        for j, m in enumerate(range(block.start, block.stop)):
            p, s = take_member(params, j), take_member(state, j)
            if fresh[m]:
                images = np.asarray(model_input(pool_x[train_idx[m][:n]], means[m], stds[m], image_size))
                try:
                    p, s = M.data_init(model, p, s, images)
                except ValueError as e:
                    raise D.DataError(f"data-dependent init: {e}") from None
            new.append((p, s))
        params, state = (stack_members(list(t)) for t in zip(*new))
        params, state = members.put((params, state))
        out.append((params, state, init_opt(params, members.part(hps, k))))
    return out


def _check_shapes(dataset: D.Dataset, pool_x):
    """The test split must be non-empty and of the training images' shape: checked before
    training, not after it."""
    if len(dataset.test_labels) == 0:
        raise D.DataError(f"{dataset.source}: the test split is empty")
    if tuple(dataset.test_images.shape[1:]) != tuple(pool_x.shape[1:]):
        raise D.DataError(f"{dataset.source}: test images of shape {tuple(dataset.test_images.shape[1:])} differ "
                          f"from the training images' {tuple(pool_x.shape[1:])}")


def _describe(model):
    """One readable line for a model (its settings without the internal axis names)."""
    fields = [f.name for f in dataclasses.fields(model)]  # not vars(): a model caches its layer tree there
    text = ", ".join(f"{k}={format_setting(getattr(model, k))}" for k in fields if not k.endswith("axis_name"))
    return f"{type(model).__name__}({text})"


def _seconds(seconds, train_seconds):
    """'5.2s' or '5.2s (3.1s of it compiling)'."""
    compiling = seconds - train_seconds
    return f"{seconds:.1f}s" + (f" ({compiling:.1f}s of it compiling)" if compiling >= 0.05 else "")


def _percent(x):
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.2f}%"


def _pretrained_members(base, model, configs, run_dirs, resume, pretrained, log):
    """``(params, state, record)`` of the group's members from ``--pretrained`` (params and
    state stacked over the members, each head replaced from its own init key), or None
    without it, or when every member resumes from a checkpoint of its own."""
    if base.pretrained is None:
        return None
    if resume and all((d / runs.CHECKPOINT).exists() for d in run_dirs):
        return None
    if pretrained is None:
        pretrained = M.read_pretrained(base.pretrained)
    loaded = [M.load_pretrained(base.model, model, pretrained, key=_init_key(c.seed), log=log if m == 0 else None,
                                new_head=base.new_head)
              for m, c in enumerate(configs)]
    record = {**pretrained.record(), "classes": loaded[0].classes}
    if loaded[0].classes == 1000 and base.normalize != "imagenet":
        log(f"note: {pretrained.path} has a 1000-class head (ImageNet-1k?); ImageNet weights expect "
            f"--normalize imagenet (this run uses --normalize {base.normalize})")
    if resume:
        for run_dir in run_dirs:  # members without a checkpoint start from the file: the same file
            recorded = (runs.read_config(run_dir).get("pretrained") or {}).get("sha256")
            if recorded and recorded != pretrained.sha256:
                raise TrainingError(f"--resume {run_dir}: --pretrained {base.pretrained} is not the file the run "
                                    f"started from (SHA-256 {pretrained.sha256[:12]}..., config.json has "
                                    f"{recorded[:12]}...)")
    return stack_members([l.params for l in loaded]), stack_members([l.state for l in loaded]), record


def _init_key(seed):
    """The key a member's weights are drawn from (the first half of its seed's split)."""
    return jax.random.split(jax.random.key(seed))[0]


def _init_members(model, optimizer, members, configs, hps, mesh, loaded=None):
    """Each block's initial ``(params, state, opt_state)`` and every member's run key data;
    ``loaded`` (:func:`_pretrained_members`): the members' params and state instead of
    ``model.init``'s."""
    @jax.jit
    def init(seeds, hps, loaded):
        def one(seed, hp, weights):
            init_key, run_key = jax.random.split(jax.random.key(seed))
            params, state = model.init(init_key) if weights is None else weights
            return params, state, with_hparams(optimizer.init(params), hp), run_key
        return jax.vmap(one)(seeds, hps, loaded)

    if mesh is not None:
        init = jax.jit(init.__wrapped__, out_shardings=parallel.replicated(mesh))
    seeds = np.asarray([c.seed for c in configs], np.uint32)
    weights = None if loaded is None else loaded[:2]
    inits = [init(members.part(seeds, k), members.part(hps, k), None if weights is None else members.part(weights, k))
             for k in range(len(members.blocks))]
    key_data = np.concatenate([np.asarray(jax.random.key_data(i[3])) for i in inits])
    return [i[:3] for i in inits], key_data


class _GroupState:
    """Where each member of a group stands: alive or frozen, its status, its metrics, the
    last epoch whose checkpoint it has, and the epoch the group starts from."""

    def __init__(self, size):
        self.size = size
        self.frozen = np.zeros(size, bool)
        self.status = np.array(["completed"] * size, dtype=object)
        self.metrics = [[] for _ in range(size)]
        self.member_epochs = [0] * size
        self.start_epoch = 0
        self.interrupted = False
        self.alive = None
        self.last_good = None
        self.failure = None
        self.data_init_seconds = None

    def begin(self):
        self.alive = ~self.frozen
        self.last_good = [e if f else self.start_epoch for e, f in zip(self.member_epochs, self.frozen)]

    def cut_to_checkpoints(self):
        """Each member's metrics end where its checkpoint does (a stop between an epoch's
        metrics and its checkpoint), as a resume will continue from there."""
        self.metrics = [[r for r in ms if r["epoch"] <= good] for ms, good in zip(self.metrics, self.last_good)]

    def stop_non_finite(self, losses, what, say):
        """Stop each live member whose ``losses[m]`` is NaN or infinite (status ``diverged:
        non-finite WHAT``): a loss the run reports is finite, or the run diverged."""
        for m in np.flatnonzero(self.alive):
            if not np.isfinite(losses[m]):
                self.status[m], self.alive[m] = f"diverged: non-finite {what}", False
                kept = (f"the checkpoint of epoch {self.last_good[m]} is kept" if self.last_good[m] else
                        "no epoch had finished, so no checkpoint is kept")
                say(m, f"stopped: {self.status[m]}; {kept}")

    def record_epoch(self, epoch, train, val, seconds, train_seconds, compiled, images, steps, chunk, say,
                     weights="live"):
        """Each live member's epoch record (appended to its metrics): ``{m: record}``.
        ``train``/``val``: per-member (step losses, correct counts) / (loss, accuracy);
        ``seconds`` the epoch's training wall time, ``train_seconds`` that less compilation
        (images/s is on it), ``compiled`` ``{program: seconds}`` compiled this epoch;
        ``images`` trained this epoch per member; ``steps`` in all by its end; ``chunk`` the
        steps per compiled call (``chunk_losses``: ``[steps into the epoch, mean loss]`` per
        call, for the curve of a short run); ``weights``: which weights were evaluated
        (:func:`jaxnets.optim.eval_weights`)."""
        (epoch_loss, epoch_correct), (val_loss, val_acc) = train, val
        records = {}
        for m in np.flatnonzero(self.alive):
            record = {
                "epoch": epoch + 1,
                "train_loss": float(epoch_loss[m].mean()),
                "train_accuracy": float(epoch_correct[m].sum() / images),
                "val_loss": float(val_loss[m]), "val_accuracy": float(val_acc[m]),
                "seconds": round(seconds, 3), "train_seconds": round(train_seconds, 3), "compile_seconds": compiled,
                "images_per_second": round(images / train_seconds, 1), "steps": steps, "weights": weights,
                "chunk_losses": [[min(i + chunk, len(epoch_loss[m])),
                                  float(f"{epoch_loss[m][i:i + chunk].mean():.5g}")]
                                 for i in range(0, len(epoch_loss[m]), chunk)],
            }
            self.metrics[m].append(record)
            if self.size == 1:
                say(m, f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, acc "
                       f"{_percent(record['train_accuracy'])} | val loss {record['val_loss']:.4f}, acc "
                       f"{_percent(record['val_accuracy'])} | {_seconds(seconds, train_seconds)}, "
                       f"{record['images_per_second']:.0f} img/s")
            records[m] = record
        return records


def _restore(run, members, carries, key_data, run_dirs, log):
    """Load every member's checkpoint into ``run`` and the carries (from the start where a
    member has none yet); returns the carries and key data to continue with."""
    size, restored = run.size, []
    for m, run_dir in enumerate(run_dirs):
        k, j = members.block_of[m]
        like = take_member(carries[k], j)
        previous = str((runs.read_summary(run_dir) or {}).get("status", ""))
        if size > 1 and runs.is_diverged(previous):
            run.frozen[m], run.status[m] = True, previous
        if not (run_dir / runs.CHECKPOINT).exists():
            # Stopped before its first checkpoint (or diverged in the first epoch): it starts
            # from its initial values, which is what an uninterrupted run had at epoch 0.
            restored.append(dict(zip(("params", "state", "opt_state"), like),
                                 key=jax.random.wrap_key_data(key_data[m]), epoch=0))
        else:
            restored.append(load_checkpoint(run_dir, *like, jax.random.wrap_key_data(key_data[m])))
            if restored[m]["note"]:
                log(f"note: {restored[m]['note']}")
        run.member_epochs[m] = int(restored[m]["epoch"])
        run.metrics[m] = [r for r in runs.read_metrics(run_dir) if r["epoch"] <= run.member_epochs[m]]
    live = sorted({e for e, f in zip(run.member_epochs, run.frozen) if not f})
    if len(live) > 1:
        raise TrainingError(f"cannot resume {run_dirs[0].parent}: the group's members stopped at different "
                            f"epochs {live}")
    run.start_epoch = live[0] if live else 0
    carries = [members.put(tuple(stack_members([r[name] for r in restored[b]]) for name in ("params", "state",
                                                                                            "opt_state")))
               for b in members.blocks]
    key_data = np.stack([np.asarray(jax.random.key_data(r["key"])) for r in restored])
    if size == 1:
        log(f"resuming {run_dirs[0]} after epoch {run.start_epoch}" if run.start_epoch else
            f"resuming {run_dirs[0]}: no epoch had finished, starting from the first")
    else:
        log(f"resuming {size - run.frozen.sum()} members after epoch {run.start_epoch}"
            + (f" ({run.frozen.sum()} diverged before, kept stopped)" if run.frozen.any() else ""))
    return carries, key_data


def _write_run_configs(configs, run_dirs, dataset, model, n_train, n_val, extra_config, command):
    """Each new member's config.json: its settings, the model, image shape and classes (so
    the run loads back without its data), environment and provenance."""
    for run_dir in run_dirs:
        runs.prepare_run_dir(run_dir, new=True)
    env, origin = environment_info(), runs.provenance(command)
    for m, (c, run_dir) in enumerate(zip(configs, run_dirs)):
        info = {"config": dataclasses.asdict(c), "run_id": uuid.uuid4().hex, "model": _describe(build_model(c, dataset.image_shape,
                                                                               dataset.num_classes)),
                "image_shape": list(dataset.image_shape), "classes": int(dataset.num_classes),
                "environment": env, "provenance": origin, "data_source": dataset.source,
                "data_files": dataset.data_files, **({"data_warning": dataset.data_warning} if dataset.data_warning else {}),
                "train_examples": int(n_train), "val_examples": int(n_val),
                "test_examples": int(len(dataset.test_labels))}
        info.update((extra_config or [{}] * len(configs))[m])
        runs.write_json(run_dir / "config.json", info)


def _record_resume_data(run_dirs, dataset):
    """A resume's data that differs from the published files: recorded in its entry of
    ``resumes`` in config.json (a run's first data is recorded at its start)."""
    for run_dir in run_dirs:
        info = runs.read_config(run_dir)
        if info.get("resumes"):
            info["resumes"][-1].update(data_source=dataset.source, data_files=dataset.data_files,
                                       data_warning=dataset.data_warning)
            runs.write_json(run_dir / "config.json", info)


class _EpochLoop:
    """Runs the chunks of an epoch over the member blocks, watching for divergence."""

    def __init__(self, place, members, carries, run, config, steps_per_epoch, total_steps, say, warn, *, host_keys,
                 clock):
        self.place, self.members, self.carries, self.run, self.config = place, members, carries, run, config
        self.clock = clock
        self.steps_per_epoch, self.total_steps, self.say, self.warn = steps_per_epoch, total_steps, say, warn
        self.host_keys = host_keys  # each member's run key, saved with its checkpoints
        # One chunk program per run: the steps per call are an argument, at most chunk_length.
        self.chunk_length = min(config.chunk_steps, steps_per_epoch, total_steps)

    def run_epoch(self, epoch, epochs):
        """Train one epoch; returns ``(seconds, steps done, (losses, correct counts))``, the
        last two per member and step (None when every member had stopped)."""
        run, members, place, batch = self.run, self.members, self.place, self.config.batch_size
        epoch_steps = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
        losses, corrects, done, t0 = [], [], 0, time.time()
        with self.clock.program("epoch_order"):
            epoch_batches = {k: place.epoch_data(epoch, k) for k in members.with_members(run.alive)}
        bar = _progress(epoch_steps, f"epoch {epoch + 1}/{epochs}", self.config.progress)
        while done < epoch_steps and run.alive.any():
            n = min(self.chunk_length, epoch_steps - done)
            start, steps = place.put((np.int32(done), np.int32(n))) if isinstance(place, DeviceMesh) else \
                (np.int32(done), np.int32(n))

            def run_block(k, n=n, start=start, steps=steps):
                (batches, epoch_keys), x = epoch_batches[k], place.inputs[k]
                self.carries[k], out = place.chunk(self.carries[k], *batches, epoch_keys, x["means"], x["stds"],
                                                   x["hps"], start, steps, length=self.chunk_length)
                return jax.tree_util.tree_map(lambda a: a[:, :n], jax.device_get(out))

            with self.clock.program("chunk"):
                outs = members.run(run_block, members.with_members(run.alive), "chunk")
            # A stopped member alone in its block: NaN losses (float32, as the others').
            chunk_loss = members.gather({k: o[0] for k, o in outs.items()},
                                        lambda b: np.full((b.stop - b.start, n), np.nan, np.float32))
            chunk_correct = members.gather({k: o[1] for k, o in outs.items()},
                                           lambda b: np.zeros((b.stop - b.start, n), np.int32))
            self._check_finite(chunk_loss, epoch, done)
            losses.append(chunk_loss)
            corrects.append(chunk_correct)
            done += n
            bar.update(n)
            if run.alive.any():
                bar.set_postfix(loss=f"{chunk_loss[run.alive].mean():.4f}",
                                img_s=f"{done * batch * run.alive.sum() / (time.time() - t0):.0f}")
        bar.close()
        train = (np.concatenate(losses, axis=1), np.concatenate(corrects, axis=1)) if losses else None
        return time.time() - t0, done, train

    def _check_finite(self, chunk_loss, epoch, done):
        run = self.run
        for m in np.flatnonzero(run.alive):
            finite = np.isfinite(chunk_loss[m])
            if not finite.all():
                bad = epoch * self.steps_per_epoch + done + int(np.argmin(finite)) + 1
                run.status[m] = f"diverged: non-finite loss at step {bad} (epoch {epoch + 1})"
                run.alive[m] = False
                kept = (f"the checkpoint and metrics of epoch {run.last_good[m]} are kept" if run.last_good[m] else
                        "no epoch had finished, so there is no checkpoint")
                hint = "try a lower --lr" + (", a warm-up (--warmup-epochs 1)" if not self.config.warmup_epochs and
                                             self.config.schedule != "onecycle" else "")
                if self.config.grad == "manual":  # a wrong hand-written backward can blow up too
                    hint += ", or --grad autodiff to rule out the manual backward passes"
                self.warn(m, f"stopped: the loss became non-finite at step {bad} (epoch {epoch + 1}), so the run "
                             f"diverged; {kept}. To fix it, {hint}.")

    def evaluate(self, split, members_on):
        """(losses, accuracies) of every member, NaN where ``members_on`` is False for its whole block."""
        members, place = self.members, self.place
        with self.clock.program(split):
            got = members.run(lambda k: jax.device_get(place.evaluate(split, self.carries[k][0], self.carries[k][1],
                                                                      k)),
                              members.with_members(members_on), split)
        nan = lambda b: np.full(b.stop - b.start, np.nan)
        return tuple(members.gather({k: g[i] for k, g in got.items()}, nan) for i in (0, 1))


def _write_epoch(records, loop, members, run_dirs, means, stds, on_epoch_end):
    """Each member's files after an epoch: metrics first, then the checkpoint (a kill between
    the two leaves metrics one epoch ahead, which a resume drops and retrains)."""
    host = {}
    for m, record in records.items():
        k, j = members.block_of[m]
        if k not in host:
            host[k] = jax.device_get(loop.carries[k][:3])
        p_m, s_m, o_m = take_member(host[k], j)
        with runs.deferred_interrupts():  # a Ctrl-C here lands after both files and last_good
            runs.write_metrics(run_dirs[m], loop.run.metrics[m])
            save_checkpoint(run_dirs[m], p_m, s_m, o_m, loop.host_keys[m], record["epoch"], mean=means[m],
                            std=stds[m])
            loop.run.last_good[m] = record["epoch"]
        if on_epoch_end is not None:
            on_epoch_end(record, jax.tree_util.tree_map(jnp.asarray, p_m), jax.tree_util.tree_map(jnp.asarray, s_m))


def _finish(run, loop, configs, run_dirs, classes, resume, writer, mesh, t_start, log):
    """Test the completed members and write every member's summary, metrics and curves."""
    size = run.size
    completed = np.array([s == "completed" for s in run.status])
    if completed.any():
        test_loss, test_acc = loop.evaluate("test", completed)
        for m in np.flatnonzero(completed & ~np.isfinite(test_loss)):  # trained to the end, but tests to NaN
            run.status[m] = "diverged: non-finite test loss (final epoch)"
            log(f"stopped: {run.status[m]}" if size == 1 else f"[{run_dirs[m].name}] {run.status[m]}")
    summaries, wall = [], round(time.time() - t_start, 2)
    for m, (c, run_dir) in enumerate(zip(configs, run_dirs)):
        metrics = run.metrics[m]
        vals = [r["val_accuracy"] for r in metrics]
        best = int(np.nanargmax(vals)) if vals and np.isfinite(vals).any() else None
        summary = {"status": str(run.status[m]), "epochs": len(metrics),
                   "steps": metrics[-1]["steps"] if metrics else 0,
                   "final_val_accuracy": vals[-1] if vals else None,
                   "best_val_accuracy": vals[best] if best is not None else None,
                   "best_epoch": metrics[best]["epoch"] if best is not None else None,
                   "wall_seconds": wall, "compile_seconds": loop.clock.since({}),
                   # training time less compilation, over every epoch (a resume's included)
                   "train_seconds": round(sum(r.get("train_seconds", r["seconds"]) for r in metrics), 3)}
        if run.data_init_seconds is not None:
            summary["data_init_seconds"] = run.data_init_seconds
        if size > 1:
            summary["group_size"] = size  # wall_seconds is the whole group's
        if completed[m]:
            summary.update(test_loss=float(test_loss[m]), test_accuracy=float(test_acc[m]), tta=c.tta,
                           test_weights=eval_weights(c, summary["steps"], loop.total_steps))
            if runs.at_chance(test_acc[m], classes):
                summary["warning"] = (f"test accuracy {_percent(test_acc[m])} is at chance for {classes} classes: "
                                      f"the run learned nothing (learning rate too high or too low?)")
                log(f"warning: {summary['warning']}" if size == 1 else f"[{run_dir.name}] warning: "
                    f"{summary['warning']}")
            if size == 1:
                log(f"test accuracy {_percent(test_acc[m])}, loss {test_loss[m]:.4f} (final epoch; "
                    f"{wall:.0f}s); wrote {run_dir}")
        previous = runs.read_summary(run_dir) if resume else None
        if previous:
            summary["wall_seconds"] = round(summary["wall_seconds"] + float(previous.get("wall_seconds") or 0), 2)
            old = previous.get("compile_seconds") or {}  # a resume compiles again: its seconds add up
            summary["compile_seconds"] = {k: round(summary["compile_seconds"].get(k, 0) + old.get(k, 0), 3)
                                          for k in {**old, **summary["compile_seconds"]}}
        summary["run_dir"] = str(run_dir)
        if mesh is not None:
            summary.update(devices=mesh.size, processes=jax.process_count())
        if writer and run.failure is not None:
            try:  # the failed write removed its .tmp, so these small files usually fit again
                runs.write_metrics(run_dir, metrics)
                runs.write_json(run_dir / "summary.json", summary)
            except TrainingError:  # still full: at least no summary claims more than the checkpoint
                (run_dir / "summary.json").unlink(missing_ok=True)
        elif writer:
            runs.write_metrics(run_dir, metrics)
            runs.write_json(run_dir / "summary.json", summary)
            if metrics:
                plots.plot_curves(metrics, run_dir / "curves.png", title=f"{c.model} on {c.dataset}",
                                  test_accuracy=summary.get("test_accuracy"))
        summaries.append(summary)
    if run.failure is not None:
        raise run.failure
    if run.interrupted:
        raise runs.ReportedInterrupt
    return summaries


def _group_devices(config: TrainConfig, size: int):
    """The devices a group trains on: one for a vmapped sweep group, else ``config.devices`` (0: all)."""
    if size > 1:
        if config.devices > 1 or jax.process_count() > 1:
            raise ValueError(f"a sweep group ({size} members) trains on one device; "
                             f"--devices {config.devices} works for single runs only (use --devices 1 or 0)")
        return jax.devices()[:1]
    devices = parallel.resolve_devices(config.devices)
    if len(devices) > 1:
        parallel.check_batch(config.batch_size, len(devices))
        if config.augment and config.flip == "alternating" and config.dataset != "mnist":
            raise ValueError(f"--flip alternating needs each image's index in the pool, which the data-parallel "
                             f"path does not carry; use --devices 1 (or --flip random) for now, not "
                             f"{len(devices)} devices")
    return devices


def _progress(total, desc, enabled):
    """A progress bar on stderr, only when it is a terminal (a log file gets the epoch lines)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not (enabled and sys.stderr.isatty()), leave=False,
                dynamic_ncols=True, file=sys.stderr)
