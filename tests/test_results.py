"""results/README.md's table is exactly what reproduce.py renders from the committed runs."""

import importlib.util
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", RESULTS / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_matches_committed_summaries():
    reproduce = load_reproduce()
    readme = (RESULTS / "README.md").read_text()
    table = readme.split(reproduce.BEGIN, 1)[1].split(reproduce.END, 1)[0].strip()
    assert table == reproduce.render().strip()
    for row in reproduce.rows():
        summary = json.loads((RESULTS / row["name"] / "summary.json").read_text())
        assert f"{100 * summary['test_accuracy']:.2f}%" in table
        for name in reproduce.LIGHT_FILES:
            assert (RESULTS / row["name"] / name).stat().st_size > 0


def test_every_experiment_command_parses():
    import train as cli

    reproduce = load_reproduce()
    for _, _, flags in reproduce.EXPERIMENTS.values():
        config = cli.config_from_args(cli.build_parser().parse_args([*flags, "--data-dir", "DIR"]))
        config.validate()
