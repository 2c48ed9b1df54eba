"""curves.png (issue 27): integer epoch ticks, a short run's training loss per chunk, the
final test accuracy marked, drawn without pyplot (a notebook's backend is left alone)."""

import sys

import matplotlib
import numpy as np
import pytest

from jaxnets import plots


def fake_metrics(epochs, chunks=4):
    return [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_accuracy": 0.5 + e / 100,
             "val_accuracy": 0.4 + e / 100, "chunk_losses": [[50 * (i + 1), 1.0 / e + (chunks - i) / 10]
                                                             for i in range(chunks)]} for e in range(1, epochs + 1)]


@pytest.fixture
def drawn(monkeypatch):
    """Each figure plot_curves saves, drawn with pyplot unimportable and matplotlib.use refused."""
    figures = []
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("matplotlib.use switches the user's backend"))
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    return figures


def labels(ax):
    return {line.get_label(): line for line in ax.get_lines()}


@pytest.mark.parametrize("epochs", [1, 3, 40])
def test_curves_have_integer_epoch_ticks_and_the_test_mark(epochs, drawn, tmp_path):
    plots.plot_curves(fake_metrics(epochs), tmp_path / "curves.png", title="t", test_accuracy=0.9704)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss, acc = drawn[0].axes
    for ax in (loss, acc):
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert lo <= 1 and hi >= epochs
    star = labels(acc)["test (final): 97.04%"]
    assert list(star.get_xdata()) == [epochs] and list(star.get_ydata()) == pytest.approx([97.04])
    per_chunk = labels(loss).get("train, per chunk")
    if epochs <= plots.SHORT_RUN_EPOCHS:  # chunk i of epoch e at e - 1 + (i + 1) / 4
        assert np.allclose(per_chunk.get_xdata(), [e + (i + 1) / 4 - 1 for e in range(1, epochs + 1)
                                                   for i in range(4)])
    else:
        assert per_chunk is None


def test_curves_without_chunks_or_test_accuracy(drawn, tmp_path):
    # Metrics written before chunk_losses existed, and a run that did not complete.
    metrics = [{k: v for k, v in m.items() if k != "chunk_losses"} for m in fake_metrics(2)]
    plots.plot_curves(metrics, tmp_path / "curves.png")
    loss, acc = drawn[0].axes
    assert set(labels(loss)) == {"train", "val"} and set(labels(acc)) == {"train", "val"}
