"""Wall time of `train.py`'s MNIST default vs an equivalent plain PyTorch loop, run back to back.

    python -m benchmarks.mnist_vs_torch --data-dir DIR [--epochs 10]

All are timed as whole processes (imports, data loading, compilation and evaluation
included). jaxnets runs twice with one persistent compile cache (``--compile-cache``) in a
new empty temporary directory: **cold** (the first process finds the directory empty,
compiles every program and stores it, as a user's first run does) and **warm** (a second
process loads those programs). The two runs must end with the same test accuracy (CPU runs
are bit-reproducible); the file records whether they did. A cache left by an earlier run
never enters: the user's ``~/.cache/jaxnets/xla`` is not used.

The PyTorch loop mirrors the defaults of ``TrainConfig``: MLP 784-1024-1024-10, ReLU,
dropout 0.2, He-normal init, Adam 1e-3 (``fused=True``, PyTorch's fastest CPU Adam) with
cosine decay to 0 over all steps, batch 128, per-channel normalisation, 5,000 images held
out (the same seeded split), and the final batch of each epoch dropped; eager, as such a
loop is usually written (``benchmarks.cpu`` compares torch.compile step by step). Writes
``results/mnist_vs_torch.json``, with the CPU model and flags.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_json

ROOT = Path(__file__).resolve().parents[1]


def torch_loop(data_dir, epochs, seed=0):
    import math

    import numpy as np
    import torch

    from jaxnets import data as D
    from jaxnets.config import TrainConfig

    config = TrainConfig()
    dataset = D.load_dataset("mnist", data_dir)
    train_x, train_y, _, _ = D.split_validation(dataset.train_images, dataset.train_labels, config.val_size, seed)
    mean, std = D.normalization_stats(train_x)
    prep = lambda a: torch.from_numpy(((a.astype(np.float32) / 255 - mean) / std).reshape(len(a), -1))
    x, y = prep(train_x), torch.from_numpy(train_y).long()
    tx, ty = prep(dataset.test_images), torch.from_numpy(dataset.test_labels).long()

    torch.manual_seed(seed)
    sizes = (784, *config.hidden_units)
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        linear = torch.nn.Linear(fan_in, fan_out)
        torch.nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        torch.nn.init.zeros_(linear.bias)
        layers += [linear, torch.nn.ReLU(), torch.nn.Dropout(config.dropout)]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], 10))
    batch = config.batch_size
    steps = len(x) // batch
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / (steps * epochs))))
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(tx).argmax(1) == ty).float().mean().item()
    print(json.dumps({"test_accuracy": accuracy}))


def timed(cmd):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder with MNIST's four IDX .gz files")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--torch-loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "results" / "mnist_vs_torch.json"))
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir}: not a directory")
    if args.torch_loop:
        return torch_loop(args.data_dir, args.epochs)

    jaxnets = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "compile-cache"  # empty: the first run compiles, the second loads
        for label in ("cold", "warm"):
            run_dir = Path(tmp) / f"run-{label}"
            jax_cmd = [sys.executable, "train.py", "--model", "mlp", "--dataset", "mnist", "--data-dir", args.data_dir,
                       "--data-source", "files", "--epochs", str(args.epochs), "--out", str(run_dir), "--no-progress",
                       "--compile-cache", str(cache)]
            seconds, _ = timed(jax_cmd)
            jaxnets[label] = {"wall_seconds": round(seconds, 1),
                              "test_accuracy": json.loads((run_dir / "summary.json").read_text())["test_accuracy"]}
            if label == "cold":
                jaxnets[label]["cached_programs"] = sum(1 for p in cache.rglob("*") if p.is_file())
    torch_cmd = [sys.executable, "-m", "benchmarks.mnist_vs_torch", "--torch-loop", "--data-dir", args.data_dir,
                 "--epochs", str(args.epochs)]
    torch_s, out = timed(torch_cmd)
    torch_acc = json.loads(out.strip().splitlines()[-1])["test_accuracy"]
    from jaxnets.runs import environment_info

    # The command without this machine's paths (the data, the temporary run and cache folders).
    names = {args.data_dir: "DIR", str(run_dir): "RUN_DIR", str(cache): "CACHE_DIR"}
    jaxnets["command"] = " ".join(names.get(a, a) for a in jax_cmd[1:])
    jaxnets["warm_equals_cold"] = jaxnets["warm"]["test_accuracy"] == jaxnets["cold"]["test_accuracy"]
    command = " ".join(["python -m benchmarks.mnist_vs_torch", *(names.get(a, a) for a in sys.argv[1:])])
    result = {"command": command, "jaxnets": jaxnets,
              "torch": {"wall_seconds": round(torch_s, 1), "test_accuracy": torch_acc},
              "torch_over_jaxnets_cold": round(torch_s / jaxnets["cold"]["wall_seconds"], 2),
              "torch_over_jaxnets_warm": round(torch_s / jaxnets["warm"]["wall_seconds"], 2),
              "machine": environment_info()}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
