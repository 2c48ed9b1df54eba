"""The command line's promises of issue 16, end to end on a tiny synthetic MNIST (IDX files
written here): every bad flag is one error line naming it (exit 2), a resume continues the
saved run and refuses other settings, a diverged run exits 3, SIGTERM is Ctrl-C (130), a
SIGKILL between an epoch's metrics and its checkpoint loses nothing, and two processes never
write one run. In-process ``cli.main`` where an exit code and stderr suffice; child processes
only for kills and concurrency (through the hooks of ``benchmarks/faults.py``)."""

import hashlib
import re
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ (fault hooks, tiny IDX data) is not an installed package
from benchmarks.faults import write_mnist  # noqa: E402
from jaxnets import cli  # noqa: E402
from conftest import scaled_timeout  # noqa: E402  (tests/ is on sys.path under pytest)

FAULTS = ROOT / "benchmarks" / "faults.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("data") / "mnist", n_train=600, n_test=200)


def flags(data_dir, *extra):
    """A tiny MLP run: 10 steps per epoch of batch 50 (600 images, 100 held out)."""
    return ["--data-dir", str(data_dir), "--data-source", "files", "--hidden-units", "16", "--val-size", "100",
            "--batch-size", "50", "--dropout", "0", "--no-progress", "--compile-cache", "off", *map(str, extra)]


def error_line(capsys):
    """The one ``error:`` line on stderr."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("usage:")]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    return lines[0]


def exit_code(argv):
    """``cli.main(argv)``'s exit status, whether returned or raised by argparse."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def snapshot(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def strict(path):
    """A run file's JSON, refusing the NaN/Infinity that strict JSON readers refuse."""
    def reject(name):
        raise ValueError(f"{path}: bare {name}")
    return json.loads(Path(path).read_text(), parse_constant=reject)


def epochs(run):
    return [json.loads(line)["epoch"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A completed 2-epoch run (never modified: tests that change it work on a copy)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(flags(data_dir, "--epochs", 2, "--out", run)) == 0
    return run


# ---------------------------------------------------------------- defect 4: flag ranges


@pytest.mark.parametrize("args, named", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--momentum", "-5"], "--momentum"),
    (["--label-smoothing", "2"], "--label-smoothing"), (["--warmup-epochs", "-3"], "--warmup-epochs"),
    (["--warmup-epochs", "1e30"], "--warmup-epochs"), (["--max-steps", "-5"], "--max-steps"),
    (["--train-subset", "-100"], "--train-subset"), (["--seed", "4294967296"], "--seed"),
    (["--seed", "-1"], "--seed"), (["--epochs", "0"], "--epochs"), (["--dropout", "1"], "--dropout"),
    # the recipe settings: MNIST's digits get no TTA, augmentation settings need --augment
    (["--tta"], "--tta averages over mirrored views"), (["--translate", "2"], "--translate sets what --augment"),
    (["--flip", "alternating"], "--flip"), (["--lookahead-period", "-1"], "--lookahead-period"),
    (["--warmup-fraction", "1.5"], "--warmup-fraction"), (["--loss-reduction", "max"], "--loss-reduction"),
])
def test_out_of_range_flag_is_one_line_naming_it(args, named, capsys, tmp_path):
    # Before any data is read: the data dir does not exist, and no run directory appears.
    assert exit_code([*args, "--data-dir", tmp_path / "none", "--out", tmp_path / "run"]) == 2
    assert named in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_multi_process_settings_are_checked_before_jax_distributed(capsys, monkeypatch):
    assert exit_code(["--coordinator-address", "localhost", "--num-processes", "1", "--process-id", "0"]) == 2
    assert "--coordinator-address 'localhost': expected HOST:PORT" in error_line(capsys)
    assert exit_code(["--coordinator-address", "localhost:1234", "--num-processes", "2", "--process-id", "5"]) == 2
    assert "--process-id must be in 0..1" in error_line(capsys)
    monkeypatch.setenv("JAXNETS_NUM_PROCESSES", "abc")
    assert exit_code(["--help"]) == 0
    capsys.readouterr()
    assert exit_code(["--dry-run"]) == 2
    assert "JAXNETS_NUM_PROCESSES" in error_line(capsys)


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_that_cannot_be_a_directory_is_refused_before_the_data(where, capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    assert exit_code(["--data-dir", tmp_path / "none", "--out", out]) == 2
    assert f"--out {out}" in error_line(capsys)


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(monkeypatch, capsys):
    # Issue 26: a Ctrl-C before the run catches it (imports, argument checks) was a traceback.
    def interrupted(argv=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "main", interrupted)
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            cli.run()
    finally:
        signal.signal(signal.SIGINT, previous)  # cli.run installs the entry's handler for the process
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip() == "interrupted during start-up: nothing was trained"


def test_sigterm_is_handled_as_ctrl_c():
    # What a scheduler's preemption sends: the run stops as on Ctrl-C, with exit 130. (Our
    # own handler around it fails the test, instead of ending pytest, if the CLI sets none.)
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert cli._exit_code(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(5))) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sweep_of_a_billion_seeds_is_refused_at_once(capsys):
    # Under a 1 GiB allowance of new memory: expanding the range first (as it once did) fails
    # here with a MemoryError instead of exhausting the machine.
    vm_data = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData:"))
    previous = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (vm_data + 2**30, previous[1]))
    t0 = time.time()
    try:
        code = exit_code(["--sweep", "seed=0..1000000000", "--dry-run"])
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, previous)
    assert code == 2 and "at most 10000" in error_line(capsys) and time.time() - t0 < 5


# --------------------------------------------------------------------- defect 1: resume


@pytest.mark.parametrize("args, says", [
    (["--lr", "0.1"], "--lr 0.1 differs from the run's saved 0.001"),
    (["--seed", "3"], "--seed 3 differs from the run's saved 0"),
    (["--activation", "tanh"], "--activation tanh differs from the run's saved relu"),
    (["--weight-decay", "0.01"], "--weight-decay 0.01 differs from the run's saved 0"),
    (["--optimizer", "sgd"], "--optimizer sgd differs from the run's saved adam"),
])
def test_resume_refuses_other_settings_naming_both_values(finished, args, says, capsys):
    before = snapshot(finished)
    assert exit_code(["--resume", finished, *args]) == 2
    assert says in error_line(capsys)
    assert snapshot(finished) == before


def test_resume_of_a_finished_run_leaves_it_untouched(finished, capsys):
    before = snapshot(finished)
    assert exit_code(["--resume", finished]) == 0
    assert "finished already (2 epochs); left untouched" in capsys.readouterr().out
    assert snapshot(finished) == before


def test_resume_with_another_out_is_refused(finished, tmp_path, capsys):
    assert exit_code(["--resume", finished, "--out", tmp_path / "other"]) == 2
    assert "--out" in error_line(capsys) and not (tmp_path / "other").exists()


def test_resume_alone_keeps_epochs_and_data_dir_and_extends_on_request(finished, data_dir, tmp_path, monkeypatch,
                                                                       capsys):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    monkeypatch.chdir(tmp_path)  # not where the data is: the saved --data-dir must be used
    assert exit_code(["--resume", run, "--epochs", 3]) == 0
    assert "resume: --epochs 2 -> 3" in capsys.readouterr().out
    assert epochs(run) == [1, 2, 3] and strict(run / "summary.json")["epochs"] == 3
    saved = strict(run / "config.json")
    assert saved["config"]["epochs"] == 3 and saved["config"]["data_dir"] == str(data_dir)
    assert saved["resumes"][-1]["changes"] == {"epochs": [2, 3]}
    assert saved["resumes"][-1]["command"][-2:] == ["--epochs", "3"]
    # The resume read a copy that differs from the published files: said in its entry too.
    assert saved["resumes"][-1]["data_warning"] == saved["data_warning"]
    assert saved["resumes"][-1]["data_files"] == saved["data_files"]


def test_damaged_checkpoint_is_refused_and_the_run_left_as_it_was(finished, tmp_path, capsys):
    # Defect 6: 50 flipped bytes used to load silently.
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    data = bytearray((run / "checkpoint.msgpack").read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 50):
        data[i] ^= 0xFF
    (run / "checkpoint.msgpack").write_bytes(bytes(data))
    before = snapshot(run)
    assert exit_code(["--resume", run, "--epochs", 3]) == 2
    assert "checkpoint.msgpack: damaged checkpoint" in error_line(capsys)
    assert snapshot(run) == before


@pytest.mark.parametrize("text", ["{}", "[1, 2]", '{"config": {'])
def test_damaged_config_json_is_refused_naming_it(finished, tmp_path, text, capsys):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    (run / "config.json").write_text(text)
    assert exit_code(["--resume", run]) == 2
    assert f"{run / 'config.json'}" in error_line(capsys)


# ------------------------------------------------------------------- defect 7: exit 3


def test_diverged_run_exits_3(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert exit_code(flags(data_dir, "--optimizer", "sgd", "--lr", "1e4", "--epochs", 2, "--out", run,
                           "--grad", "manual")) == 3
    assert strict(run / "summary.json")["status"].startswith("diverged: non-finite loss at step")
    # Issue 27: a whole sentence with what to try, on stderr.
    out, err = capsys.readouterr()
    assert "stopped" not in out
    assert re.search(r"^stopped: the loss became non-finite at step \d+ \(epoch 1\), so the run diverged; no epoch "
                     r"had finished, so there is no checkpoint\. To fix it, try a lower --lr, a warm-up "
                     r"\(--warmup-epochs 1\), or --grad autodiff to rule out the manual backward passes\.$",
                     err, re.M), err


def test_interrupt_message_is_on_stderr(data_dir, tmp_path, capsys):
    from jaxnets import config as config_lib, training

    def interrupt(record, params, state):
        raise KeyboardInterrupt

    settings = config_lib.TrainConfig(data_dir=str(data_dir), data_source="files", hidden_units=(16,), val_size=100,
                             batch_size=50, dropout=0.0, progress=False, epochs=2, out=str(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt):
        training.train(settings, on_epoch_end=interrupt)
    out, err = capsys.readouterr()
    assert "interrupted" not in out
    assert f"interrupted: checkpoint of epoch 1 kept in {tmp_path / 'run'}; continue with --resume" in err


def test_out_refusal_suggests_resume_only_for_a_run(finished, tmp_path, capsys):
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    assert exit_code(["--data-dir", tmp_path / "none", "--out", stray]) == 2
    line = error_line(capsys)
    assert "already holds files (not a run's)" in line and "--resume" not in line
    assert exit_code(["--data-dir", tmp_path / "none", "--out", finished]) == 2
    assert f"already holds files of a run; choose a new directory, or continue it with --resume {finished}" in \
        error_line(capsys)


def test_a_finished_run_with_a_damaged_checkpoint_says_so_on_resume(finished, tmp_path, capsys):
    # Issue 26: was "finished already; left untouched", exit 0.
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    data = bytearray((run / "checkpoint.msgpack").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / "checkpoint.msgpack").write_bytes(bytes(data))
    before = snapshot(run)
    assert exit_code(["--resume", run]) == 2
    line = error_line(capsys)
    assert "the run finished and its results are intact, but its weights are not" in line
    assert f"{run / 'checkpoint.msgpack'}: damaged checkpoint" in line and snapshot(run) == before


def test_a_start_refused_on_its_data_leaves_no_directory(tmp_path, capsys, monkeypatch):
    # Issue 26: a run refused on its data left an empty DIR/ (or runs/<name>/) behind.
    bad = tmp_path / "bad"
    write_mnist(bad)
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    monkeypatch.chdir(tmp_path)
    for out in (["--out", tmp_path / "run"], []):
        assert exit_code(flags(bad, *out)) == 2
        assert "train-labels-idx1-ubyte.gz" in error_line(capsys)
    assert not (tmp_path / "run").exists() and list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("args, says", [
    (["--hidden-units", ""], "argument --hidden-units: empty: give layer sizes like 200 or 300x100, or none"),
    (["--sweep", "hidden-units=100,"], "--sweep hidden-units=100,: an empty value in '100,' (a trailing or doubled "
                                       "comma?)"),
    (["--sweep", "lr=0.1,,0.01"], "--sweep lr=0.1,,0.01: an empty value"),
])
def test_an_empty_setting_is_refused_naming_the_flag(tmp_path, capsys, args, says):
    # Issue 26: both trained a logistic regression (no hidden layer) without a word.
    assert exit_code([*args, "--data-dir", tmp_path / "no-data", "--out", tmp_path / "run"]) == 2
    assert says in error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split, says", [("test", "diverged: non-finite test loss (final epoch)"),
                                         ("val", "diverged: non-finite validation loss (epoch 1)")])
def test_a_non_finite_validation_or_test_loss_is_diverged_exit_3(data_dir, tmp_path, capsys, monkeypatch, split, says):
    # Issue 26: the steps' losses finite, the final test loss NaN -- was "completed", exit 0.
    from jaxnets import training

    evaluate = training._EpochLoop.evaluate

    def nan_on(self, which, members_on):
        loss, acc = evaluate(self, which, members_on)
        return (np.full_like(loss, np.nan), acc) if which == split else (loss, acc)
    monkeypatch.setattr(training._EpochLoop, "evaluate", nan_on)
    run = tmp_path / "run"
    assert exit_code(flags(data_dir, "--epochs", 2, "--out", run)) == 3
    summary = strict(run / "summary.json")
    assert summary["status"] == says and summary.get("test_loss") is None
    assert epochs(run) == ([1, 2] if split == "test" else [])  # a NaN validation loss stops before that epoch's files


def test_a_constant_channel_is_refused_as_data_before_training(tmp_path, capsys):
    # Issue 26: std 0 made every loss NaN and was reported as "diverged at step 1" (the lr blamed).
    data = write_mnist(tmp_path / "mnist", n_train=600, n_test=200, constant=True)
    run = tmp_path / "run"
    assert exit_code(flags(data, "--out", run)) == 2
    line = error_line(capsys)
    assert "channel 0 is constant (every pixel 128 of 255, std 0)" in line and "--normalize channel" in line
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint.msgpack").exists()


# ------------------------------------------------- child processes: kills and locks


def child(args, hook=None, **kwargs):
    """``train.py ARGS`` in a child process, with a fault hook of benchmarks/faults.py."""
    command = [sys.executable, str(FAULTS), "--child", hook, "--"] if hook else [sys.executable, str(ROOT / "train.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*command, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def test_sigkill_between_metrics_and_checkpoint_loses_no_epoch(data_dir, tmp_path):
    # Defect 2: killed right after the first of epoch 2's two files is written (whichever the
    # trainer writes first). The resume must end with every epoch's metrics exactly once.
    run = tmp_path / "run"
    killed = child(flags(data_dir, "--epochs", 3, "--out", run), hook="signal:metrics.jsonl,checkpoint.msgpack:3:KILL")
    assert killed.wait(timeout=scaled_timeout(120)) == -signal.SIGKILL, killed.stderr.read()
    resumed = child(["--resume", run])
    out, err = resumed.communicate(timeout=scaled_timeout(120))
    assert resumed.returncode == 0, err
    assert "resuming" in out and "after epoch 1" in out
    assert epochs(run) == [1, 2, 3]
    summary = strict(run / "summary.json")
    assert summary["status"] == "completed" and summary["epochs"] == 3 and summary["steps"] == 30


def test_two_processes_never_write_one_run(data_dir, tmp_path):
    # The first holds the run (its lock taken) until the second has tried and been refused.
    run, go = tmp_path / "run", tmp_path / "go"
    first = child(flags(data_dir, "--epochs", 1, "--out", run), hook=f"wait:{go}")
    for _ in range(600):
        if (run / ".lock").exists() or first.poll() is not None:
            break
        time.sleep(0.05)
    second = child(flags(data_dir, "--epochs", 1, "--out", run))
    out, err = second.communicate(timeout=scaled_timeout(120))
    go.write_text("")
    assert first.wait(timeout=scaled_timeout(120)) == 0, first.stderr.read()
    assert second.returncode == 2 and "Traceback" not in err
    assert [l for l in err.splitlines() if l.strip()] == [
        f"error: {run}: another process is writing this run (PID {first.pid} on {os.uname().nodename}); "
        f"wait for it or stop it"]
    assert epochs(run) == [1] and not (run / ".lock").exists()


# ------------------------------------------- issue 27: the help page and usage errors


def help_entries(monkeypatch, capsys, columns):
    """``--help`` at a terminal width: ``{flag: its entry's text}`` and the raw lines."""
    monkeypatch.setenv("COLUMNS", str(columns))
    assert exit_code(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries, name = {}, None
    for line in lines:
        if line.startswith("  --"):
            name = line.split()[0].rstrip(",")
            entries[name] = [line]
        elif name and line.startswith("    "):
            entries[name].append(line)
        else:
            name = None
    return entries, lines


@pytest.mark.parametrize("columns", [70, 100, 160])
def test_help_shows_each_default_once_and_keeps_flags_whole(columns, monkeypatch, capsys):
    entries, lines = help_entries(monkeypatch, capsys, columns)
    assert len(entries) > 40
    for name, entry in entries.items():
        assert " ".join(entry).count("(default:") <= 1, entry
    assert "(default: --no-sync-bn, per device)" in " ".join(" ".join(entries["--sync-bn"]).split())
    # No word broken at a hyphen at a line end (argparse's textwrap does that by default).
    assert not [l for l in lines if re.search(r"\w-$", l)]
    preset = " ".join(entries["--preset"])
    assert len(entries["--preset"]) <= (3 if columns >= 100 else 5) and "course_mlp" in preset  # 4 presets
    assert "lr=" not in preset and "--lr" not in preset  # names only: the settings are --dry-run's


def test_preset_dry_run_prints_the_presets_settings(capsys):
    assert exit_code(["--preset", "course_mlp", "--lr", "0.1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first.startswith("preset course_mlp: --model mlp, --dataset cifar10, --hidden-units 100")
    assert "--lr 0.002" in first  # the preset's own value ...
    assert json.loads(rest)["lr"] == 0.1  # ... and the configuration with the flag over it


def stderr_line(capsys):
    """The one line a usage error prints on stderr (no usage line before it)."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["--epoch", "3"], "unrecognized arguments: --epoch 3 (did you mean --epochs?)"),  # no prefix matching
    (["--epcohs", "3"], "(did you mean --epochs?)"),
    (["--batch_size", "3"], "(did you mean --batch-size?)"),
    (["--bogus"], "unrecognized arguments: --bogus (--help lists the options)"),
    (["--lr", "x"], "argument --lr: 'x' is not a number"),
    (["--hidden-units", "512,abc"], "argument --hidden-units: '512,abc' is not a list of layer sizes"),
    (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
])
def test_usage_error_is_one_line_on_stderr(args, says, capsys):
    assert exit_code([*args, "--dry-run"]) == 2
    line = stderr_line(capsys)
    assert says in line and "512xabc" not in line


def test_old_comma_form_of_hidden_units_still_reads_with_a_note(capsys):
    assert exit_code(["--hidden-units", "512,256", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["hidden_units"] == [512, 256] and "write 512x256" in out.err


def test_a_data_dir_copy_that_differs_from_the_published_files_is_a_warning_recorded_in_config(
        data_dir, finished, tmp_path, capsys):
    """Issue 26: the synthetic files of this module are not MNIST's published ones: the run
    trains (a modified copy is a choice), says so in one warning line of its log, and records
    each file's MD5 and the warning in config.json."""
    assert cli.main(flags(data_dir, "--epochs", 1, "--max-steps", 1, "--out", tmp_path / "run")) == 0
    out = capsys.readouterr().out
    warnings = [l for l in out.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: 4 of 4 MNIST files in {data_dir} differ from "
                                                         f"the published MD5s"), out
    info = strict(finished / "config.json")
    assert info["data_warning"] == warnings[0][len("warning: "):]
    assert sorted(info["data_files"]) == sorted(str(data_dir / f"{b}.gz") for b in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    assert all(v.startswith("MD5 ") and ", published " in v for v in info["data_files"].values())


def test_resume_of_a_sweep_directory_without_sweep_says_how_to_resume_it(data_dir, tmp_path, capsys):
    """Issue 26: ``--resume DIR`` on a sweep directory is one line saying it is a sweep and
    the exact command that resumes it (which then does, here finding it finished)."""
    out = tmp_path / "sweep"
    sweep_flags = flags(data_dir, "--epochs", 1, "--max-steps", 1, "--lr", "0.01", "--sweep", "seed=0,1",
                        "--sweep", "hidden-units=8,none", "--out", out)
    assert cli.main(sweep_flags) == 0
    capsys.readouterr()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert exit_code(["--resume", out]) == 2
    line = error_line(capsys)
    assert f"--resume {out}: a sweep directory (sweep_plan.json), not a run" in line
    command = shlex.split(line.split("flags: ", 1)[1])
    assert command[0] == "jaxnets-train" and "--sweep" in command and "--lr" in command and "--data-dir" in command
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert cli.main(command[1:]) == 0  # the command given resumes it (every member finished)
    assert "2 of 2 waves finished already" in capsys.readouterr().out


@pytest.mark.parametrize("value, says", [
    ("garbage", "$XLA_FLAGS 'garbage': XLA reads a value not starting with -- as a file of flags"),
    ("--xla_force_host_platform_device_count 8", "$XLA_FLAGS: '8' is not a --name or --name=value option"),
    ("--xla_cpu_multi_thread_eigen=false stray", "$XLA_FLAGS: 'stray' is not"),
    ("--=3", "$XLA_FLAGS: '--=3' is not"),
])
def test_malformed_xla_flags_are_one_line_exit_2_before_xla_aborts(value, says, monkeypatch, capsys, tmp_path):
    """Issue 26: XLA aborts the process (exit 1) on a malformed XLA_FLAGS, or ignores a stray
    word; its syntax is checked first (the option names are XLA's: exit 1, documented)."""
    monkeypatch.setenv("XLA_FLAGS", value)
    assert exit_code(["--out", tmp_path / "run", "--data-dir", tmp_path / "none"]) == 2
    assert says in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_well_formed_xla_flags_pass_the_syntax_check(tmp_path):
    flags_file = tmp_path / "flags"
    flags_file.write_text("--xla_cpu_multi_thread_eigen=false\n")
    for value in (None, "", "  --xla_cpu_multi_thread_eigen=false --xla_dump_to='/tmp/a b'", "--xla_unknown_name",
                  str(flags_file)):
        assert cli.xla_flags_problem(value) is None, value


@pytest.mark.parametrize("args, says", [
    (["--data-dir", ""], "--data-dir is empty"),  # was the default data dir (a download there)
    (["--out", " "], "--out is empty"),  # was runs/<name>
    (["--resume", ""], "--resume is empty"),  # was a new run with every default
])
def test_an_empty_path_flag_is_refused_not_taken_as_the_default(args, says, capsys, tmp_path):
    assert exit_code(["--epochs", 1, *args]) == 2
    assert says in error_line(capsys)
