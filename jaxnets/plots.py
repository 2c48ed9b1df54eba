"""The figures a run and a sweep write: ``curves.png``, ``sweep_<setting>.png``, ``seed_bands.png``.

matplotlib is imported only when a figure is drawn, and drawn on a
``matplotlib.figure.Figure`` with its own Agg canvas: pyplot and its backend are never
touched, so a notebook's backend stays as it was and no figure lingers in pyplot's list.
Each PNG is rendered in memory and written atomically (:func:`jaxnets.runs.write_atomic`),
so a full disk leaves the previous figure and one error line.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from jaxnets.config import format_setting
from jaxnets.runs import read_metrics, write_atomic


def _figure(**kwargs):
    """A figure on its own Agg canvas (not pyplot's: see the module docstring)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path):
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    write_atomic(path, image.getvalue())


#: Runs of at most this many epochs also get their training loss per chunk of steps
#: (``chunk_losses``), so a one-epoch run's curve is a curve and not one dot.
SHORT_RUN_EPOCHS = 10


def plot_curves(metrics, path: Path, title="", test_accuracy=None):
    """Loss and accuracy per epoch, train vs validation, side by side (like the course
    reports); epochs on integer ticks; a short run's training loss per chunk of steps too;
    the final test accuracy marked at the last epoch when given."""
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in metrics]
    fig = _figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    chunks = [(m["epoch"] - 1 + done / m["chunk_losses"][-1][0], loss) for m in metrics
              for done, loss in m.get("chunk_losses") or ()] if len(metrics) <= SHORT_RUN_EPOCHS else []
    if chunks:
        ax_loss.plot(*zip(*chunks), "-", color="tab:blue", alpha=0.45, linewidth=1, label="train, per chunk")
    for split, style in (("train", "-o"), ("val", "-s")):
        ax_loss.plot(epochs, [m[f"{split}_loss"] for m in metrics], style, label=split + (", epoch mean" if split ==
                     "train" and chunks else ""), markersize=4)
        ax_acc.plot(epochs, [100 * m[f"{split}_accuracy"] for m in metrics], style, label=split, markersize=4)
    if test_accuracy is not None and np.isfinite(test_accuracy):
        ax_acc.plot([epochs[-1]], [100 * test_accuracy], "*", color="tab:red", markersize=12,
                    label=f"test (final): {100 * test_accuracy:.2f}%")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    last = max(epochs)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0 if chunks or last == 1 else 0.5, last + max(0.1, 0.03 * last))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_sweep(out: Path, rows, axes):
    """``sweep_<setting>.png`` per swept setting (not the seed) and ``seed_bands.png``."""
    ok = [r for r in rows if r["flag"] != "diverged" and r["best_val_accuracy"] is not None]
    for name, values in axes.items():
        if name == "seed" or not ok:
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = list(values) if numeric else list(range(len(values)))
        fig = _figure(figsize=(6, 4))
        ax = fig.subplots()
        means, stds = [], []
        for v, x in zip(values, xs):
            accs = [100 * r["best_val_accuracy"] for r in ok if r["_values"][name] == v]
            ax.scatter([x] * len(accs), accs, s=10, alpha=0.4, color="gray")
            means.append(np.mean(accs) if accs else np.nan)
            stds.append(np.std(accs) if accs else np.nan)
        means, stds = np.array(means), np.array(stds)
        ax.plot(xs, means, "-o", label="mean over the other settings")
        ax.fill_between(xs, means - stds, means + stds, alpha=0.25, label="+- std")
        if numeric and min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xs, [format_setting(v) for v in values])
        ax.set(xlabel=name, ylabel="best validation accuracy (%)", title=f"validation accuracy vs {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        _save(fig, out / f"sweep_{name}.png")
    if "seed" in axes and len(axes["seed"]) > 1:
        _plot_seed_bands(out, ok, [k for k in axes if k != "seed"])


def _plot_seed_bands(out, rows, others, top=10):
    """Validation accuracy per epoch, mean +- std across seeds, for the ``top`` best settings."""
    by_setting = {}
    for r in rows:
        by_setting.setdefault(tuple(format_setting(r["_values"][k]) for k in others), []).append(r)
    curves = []
    for setting, members in by_setting.items():
        runs = [[m["val_accuracy"] for m in read_metrics(r["run_dir"])] for r in members]
        length = min(map(len, runs))
        acc = 100 * np.array([run[:length] for run in runs], dtype=float)  # None (no validation split): NaN
        if length and np.isfinite(acc).all():
            curves.append((acc[:, -1].mean(), setting, acc))
    if not curves:  # no validation accuracy to band (--val-size 0): no figure rather than an empty one
        return
    curves.sort(key=lambda c: -c[0])
    fig = _figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for _, setting, acc in curves[:top]:
        epochs = np.arange(1, acc.shape[1] + 1)
        label = ", ".join(f"{k}={v}" for k, v in zip(others, setting)) or "all"
        line, = ax.plot(epochs, acc.mean(0), label=f"{label} (n={len(acc)})")
        ax.fill_between(epochs, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), alpha=0.2,
                        color=line.get_color())
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="mean +- std across seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "seed_bands.png")
