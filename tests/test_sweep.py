"""Sweeps: vmapped members reproduce single runs, grouping, divergence, the table and the CLI."""

import csv
import json

import jax
import pytest
from flax import serialization

from jaxnets.config import TrainConfig
from jaxnets.runs import TrainingError
from jaxnets import cli, runs
from jaxnets import data as D
from jaxnets import sweep
from jaxnets import training as T

OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "checkpoint.msgpack")
quiet = dict(log=lambda *_: None, progress=False)


pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def mnist_small(mnist_dir):
    full = D.load_dataset("mnist", mnist_dir)
    return D.Dataset("mnist", full.train_images[:2000], full.train_labels[:2000], full.test_images[:300],
                     full.test_labels[:300], 10, full.source)


def base(tmp_path, **kwargs):
    values = dict(hidden_units=(32,), batch_size=64, epochs=2, val_size=500, progress=False, chunk_steps=10,
                  out=str(tmp_path / "sweep"))
    values.update(kwargs)
    return TrainConfig(**values)


def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curves(a, b, rtol=1e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert abs(ra[key] - rb[key]) <= rtol * max(abs(ra[key]), 1e-3), (key, ra[key], rb[key])


def same_files(a, b):
    """Bit-for-bit the same numbers: metrics (except timings) and the checkpoint's state
    bytes (all of it but the record naming its run, which differs from run to run)."""
    timing = ("seconds", "train_seconds", "compile_seconds", "images_per_second")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    state = lambda run: serialization.msgpack_serialize({k: v for k, v in runs.read_checkpoint(run).items()
                                                         if k != "run"})
    return strip(metrics(a)) == strip(metrics(b)) and state(a) == state(b)


@pytest.mark.parametrize("vmap", [None, True], ids=["default", "vmapped"])
def test_each_member_reproduces_its_single_run(mnist_small, tmp_path, vmap):
    # One group of 4 (lr x seed) with dropout on and a cosine schedule: every member has its
    # own lr, split, init, order and dropout masks, yet runs the single run's computation.
    # By default on CPU the members train one after another, each through its single run's
    # very programs, so its metrics and checkpoint are bit-for-bit the single run's;
    # vmapped (the default elsewhere), the batched softmax and reductions round differently
    # (loss curves within 1e-5).
    bit_for_bit = vmap is None and jax.default_backend() == "cpu"
    cfg = base(tmp_path, optimizer="adam", dropout=0.1, label_smoothing=0.05)
    rows = sweep.sweep(cfg, {"lr": [3e-3, 1e-3], "seed": [0, 1]}, dataset=mnist_small, vmap=vmap, **quiet)
    assert len(rows) == 4 and len({r["group"] for r in rows}) == 1
    for lr, seed in ((3e-3, 1), (1e-3, 0)):
        row = next(r for r in rows if r["_values"] == {"lr": lr, "seed": seed})
        single = base(tmp_path, optimizer="adam", dropout=0.1, label_smoothing=0.05, lr=lr, seed=seed,
                      out=str(tmp_path / f"single-{lr}-{seed}"))
        summary = T.train(single, dataset=mnist_small, log=lambda *_: None)
        assert_same_curves(metrics(tmp_path / f"single-{lr}-{seed}"), metrics(tmp_path / "sweep" / row["name"]))
        assert abs(summary["test_accuracy"] - row["test_accuracy"]) <= 1 / 300 + 1e-9
        if bit_for_bit:
            assert same_files(tmp_path / f"single-{lr}-{seed}", tmp_path / "sweep" / row["name"])
            assert (summary["test_accuracy"], summary["test_loss"]) == (row["test_accuracy"], row["test_loss"])
    # Every member is its own run: the seed changes split, init, order and masks, the lr the
    # steps, so no two of the four share a loss curve.
    curves = {tuple(r["_values"].values()): tuple(m["train_loss"] for m in metrics(tmp_path / "sweep" / r["name"]))
              for r in rows}
    assert len(set(curves.values())) == 4, curves


def test_zero_and_nonzero_weight_decay_share_a_group_and_reproduce_single_runs(mnist_small, tmp_path):
    # The group's program has the decay term; at weight decay 0 it adds 0 * w, exactly
    # nothing, so that member still equals a single run built without the term.
    cfg = base(tmp_path, optimizer="adam", dropout=0.0, epochs=1)
    rows = sweep.sweep(cfg, {"weight_decay": [0.0, 0.05]}, dataset=mnist_small, **quiet)
    assert len({r["group"] for r in rows}) == 1
    curves = {}
    for wd in (0.0, 0.05):
        row = next(r for r in rows if r["_values"] == {"weight_decay": wd})
        single = base(tmp_path, optimizer="adam", dropout=0.0, epochs=1, weight_decay=wd, out=str(tmp_path / f"single-{wd}"))
        T.train(single, dataset=mnist_small, log=lambda *_: None)
        assert_same_curves(metrics(tmp_path / f"single-{wd}"), metrics(tmp_path / "sweep" / row["name"]))
        curves[wd] = metrics(tmp_path / f"single-{wd}")[-1]["train_loss"]
    assert abs(curves[0.0] - curves[0.05]) > 1e-3  # the decay is really applied to one of them


@pytest.mark.parametrize("vmap", [False, True], ids=["one-after-another", "vmapped"])
def test_divergent_member_is_marked_and_the_others_are_unaffected(mnist_small, tmp_path, vmap):
    cfg = base(tmp_path, optimizer="sgd", schedule="constant", hidden_units=(32, 32), dropout=0.0, epochs=2)
    rows = sweep.sweep(cfg, {"lr": [1e4, 0.05]}, dataset=mnist_small, vmap=vmap, **quiet)
    out = tmp_path / "sweep"
    bad, good = rows[-1], rows[0]
    assert bad["flag"] == "diverged" and bad["status"].startswith("diverged: non-finite loss at step")
    assert bad["test_accuracy"] is None and good["flag"] == "" and good["test_accuracy"] > 0.6
    single = base(tmp_path, optimizer="sgd", schedule="constant", hidden_units=(32, 32), dropout=0.0, epochs=2,
                  lr=0.05, out=str(tmp_path / "single"))
    T.train(single, dataset=mnist_small, log=lambda *_: None)
    assert_same_curves(metrics(tmp_path / "single"), metrics(out / good["name"]))
    if not vmap:
        assert same_files(tmp_path / "single", out / good["name"])
    # Files: every member has a single run's files (the diverged one up to its last good epoch).
    for name in OUTPUTS:
        assert (out / good["name"] / name).stat().st_size > 0, name
    assert json.loads((out / bad["name"] / "summary.json").read_text())["status"] == bad["status"]
    table = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["name"] for r in table] == [good["name"], bad["name"]] and table[1]["flag"] == "diverged"
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["axes"] == {"lr": ["10000", "0.05"]} and saved["rows"][0]["rank"] == 1
    assert (out / "sweep_lr.png").stat().st_size > 0


def test_groups_by_shape_and_waves_to_the_memory_budget(tmp_path):
    cfg = base(tmp_path)
    members = sweep.expand(cfg, sweep.parse_sweep(["hidden-units=16,32x16", "batch-size=32,64", "lr=1e-3,1e-2",
                                           "seed=0..2"], cfg))
    configs = [c for c, _ in members]
    assert len(configs) == 24
    groups = sweep.plan(configs, image_shape=(28, 28, 1), classes=10, budget=10**12)
    assert len(groups) == 4 and all(len(g) == 6 for g in groups)
    for g in groups:
        assert len({(configs[i].hidden_units, configs[i].batch_size) for i in g}) == 1
    # Dropout on/off changes the program: separate groups; weight decay 0 joins the others.
    mixed = [c for c, _ in sweep.expand(cfg, {"dropout": [0.0, 0.3, 0.5], "weight_decay": [0.0, 1e-4]})]
    assert sorted(map(len, sweep.plan(mixed, image_shape=(28, 28, 1), classes=10))) == [2, 4]
    # A budget for ~2.5 members splits a group of 6 into 3 even waves; max_members caps it too.
    per_member = sweep.member_bytes(configs[0], (28, 28, 1), 10)
    waves = sweep.plan(configs[:6], image_shape=(28, 28, 1), classes=10, budget=2.5 * per_member)
    assert [len(c) for c in waves] == [2, 2, 2]
    assert [len(c) for c in sweep.plan(configs[:6], image_shape=(28, 28, 1), classes=10, max_members=4)] == [3, 3]
    assert sweep.parse_bytes("4G") == 4 * 2**30 and sweep.parse_bytes("1e6") == 10**6


def test_sweep_parsing():
    axes = sweep.parse_sweep(["lr=1e-2,1e-3", "seed=0..2", "hidden_units=100,300x100,none", "batch-norm=true,false",
                          "activation=relu,tanh"])
    assert axes == {"lr": [1e-2, 1e-3], "seed": [0, 1, 2], "hidden_units": [(100,), (300, 100), ()],
                    "batch_norm": [True, False], "activation": ["relu", "tanh"]}


@pytest.mark.parametrize("spec, message", [
    ("learning-rate=0.1", "unknown or unsweepable setting 'learning-rate'"),
    ("lr=abc", "'abc' is not a number"),
    ("lr=-1", "--lr must be in (0, inf)"),
    ("seed=0.5", "'0.5' is not an integer"),
    ("dropout=0.5,1.5", "dropout must be in [0, 1)"),
    ("activation=relu,swish", "activation must be one of"),
    ("hidden-units=10xa", "not a list of layer sizes"),
    ("seed=3..1", "empty range"),
    ("lr", "expected KEY=VALUE"),
    ("out=a,b", "unsweepable"),
])
def test_cli_sweep_errors_are_argparse_errors(spec, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--sweep", spec])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: --sweep" in err and message in err, err


def test_cli_sweep_runs_and_writes_the_table(mnist_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["--dataset", "mnist", "--data-dir", str(mnist_dir), "--train-subset", "1200", "--val-size",
                     "200", "--hidden-units", "16", "--epochs", "1", "--batch-size", "100", "--no-progress",
                     "--out", str(out), "--sweep", "lr=1e-2,1e-3", "--max-members", "1"])
    assert code == 0
    table = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(table) == 2 and {r["lr"] for r in table} == {"0.01", "0.001"}
    assert float(table[0]["best_val_accuracy"]) >= float(table[1]["best_val_accuracy"])
    assert {r["group"] for r in table} == {"0", "1"}  # --max-members 1: two waves
    for r in table:
        assert (out / r["name"] / "summary.json").exists()


def _interrupt_at(text_start, occurrence):
    """A sweep log that raises KeyboardInterrupt (as Ctrl-C would) at the ``occurrence``-th
    line starting with ``text_start``; the lines are kept in ``log.lines``."""
    seen = []

    def log(text="", **_):
        log.lines.append(str(text))
        if str(text).startswith(text_start):
            seen.append(text)
            if len(seen) == occurrence:
                raise KeyboardInterrupt

    log.lines = []
    return log


SAME = ("name", "seed", "lr", "best_val_accuracy", "test_accuracy", "test_loss", "flag", "status", "epochs", "group",
        "rank")


def test_interrupted_sweep_resumes_to_the_uninterrupted_table(mnist_small, tmp_path):
    # Three waves of two (lr 1e4 diverges in its first epoch, lr 0.05 trains). The run is
    # stopped after epoch 2 of wave 2: wave 1 finished, wave 2 has epoch-2 checkpoints
    # (and a diverged member without one), wave 3 never started.
    cfg = base(tmp_path, optimizer="sgd", schedule="constant", dropout=0.0, hidden_units=(16,), batch_size=100,
               epochs=3, chunk_steps=15)
    axes = {"seed": [0, 1, 2], "lr": [1e4, 0.05]}
    whole = sweep.sweep(cfg, axes, out=tmp_path / "whole", dataset=mnist_small, max_members=2, **quiet)
    assert [r["flag"] for r in whole] == ["", "", "", "diverged", "diverged", "diverged"]
    out = tmp_path / "resumed"
    log = _interrupt_at("epoch 2:", 2)
    with pytest.raises(KeyboardInterrupt):
        sweep.sweep(cfg, axes, out=out, dataset=mnist_small, max_members=2, log=log, progress=False)
    assert "--resume" in log.lines[-1] and not (out / "sweep.csv").exists()
    finished = (out / "000-seed=0_lr=10000" / "summary.json").read_text()
    assert json.loads((out / "003-seed=1_lr=0.05" / "summary.json").read_text())["status"] == "interrupted"
    assert not (out / "004-seed=2_lr=10000").exists()

    log = _interrupt_at("never", 1)
    rows = sweep.sweep(cfg, axes, out=out, dataset=mnist_small, log=log, progress=False, resume=True)
    assert any("1 of 3 waves finished already" in line for line in log.lines)
    assert any("resuming 1 members after epoch 2 (1 diverged before, kept stopped)" in line for line in log.lines)
    assert (out / "000-seed=0_lr=10000" / "summary.json").read_text() == finished  # not retrained
    assert [{k: r[k] for k in SAME} for r in rows] == [{k: r[k] for k in SAME} for r in whole]
    assert list(csv.DictReader(open(out / "sweep.csv"))) == [
        dict(r, run_dir=r["run_dir"].replace("whole", "resumed"), seconds=a["seconds"], group_seconds=a["group_seconds"])
        for r, a in zip(csv.DictReader(open(tmp_path / "whole" / "sweep.csv")), csv.DictReader(open(out / "sweep.csv")))]
    for r in whole:  # the per-epoch curves too, bit for bit
        timing = ("seconds", "train_seconds", "compile_seconds", "images_per_second")
        strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]
        assert strip(metrics(out / r["name"])) == strip(metrics(tmp_path / "whole" / r["name"]))


def test_sweep_directory_is_not_overwritten_or_resumed_with_other_settings(mnist_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    cfg = base(tmp_path)
    with pytest.raises(TrainingError, match="no such sweep directory .*start it with --out"):
        sweep.sweep(cfg, {"lr": [1e-3, 1e-2]}, out=out, resume=True, **quiet)
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    flags = ["--dataset", "mnist", "--data-dir", str(mnist_dir), "--hidden-units", "16", "--no-progress",
             "--sweep", "lr=1e-2,1e-3"]
    assert cli.main([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"sweep directory {out} already holds files" in err and "--resume" in err
    assert (out / "notes.txt").read_text() == "mine"
    started = cli.config_from_args(cli.build_parser().parse_args(flags))
    sweep._write_plan(out, started, {"lr": [1e-2, 1e-3]}, ["000-lr=0.01", "001-lr=0.001"], [[0, 1]])
    assert cli.main([*flags[:-1], "lr=1e-2,1e-4", "--resume", str(out)]) == 2
    assert "that sweep swept lr=0.01,0.001, not lr=0.01,0.0001" in capsys.readouterr().err
    assert cli.main([*flags, "--batch-size", "64", "--resume", str(out)]) == 2
    assert "that sweep was started with batch_size=128, not 64" in capsys.readouterr().err
