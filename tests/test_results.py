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
        accs = [100 * json.loads((run / "summary.json").read_text())["test_accuracy"] for run in row["runs"]]
        if len(accs) == 1:
            assert f"{accs[0]:.2f}%" in table
        else:  # a seed sweep: the row is the mean over its committed members
            assert len(accs) >= 3 and f"{sum(accs) / len(accs):.2f} +- " in table
        for run in row["runs"]:
            for name in reproduce.MEMBER_FILES:
                assert (run / name).stat().st_size > 0


def test_every_experiment_command_parses():
    from jaxnets import cli

    from jaxnets import sweep

    reproduce = load_reproduce()
    for _, _, flags in [*reproduce.EXPERIMENTS.values(), *reproduce.SWEEPS.values()]:
        args = cli.build_parser().parse_args([*flags, "--data-dir", "DIR"])
        config = cli.config_from_args(args)
        config.validate()
        if args.sweep:
            axes = sweep.parse_sweep(args.sweep, config)
            assert "seed" in axes and len(axes["seed"]) >= 3  # ablations are reported over >= 3 seeds
            for member, _ in sweep.expand(config, axes):
                member.validate()
    for _, _, flags in reproduce.GRIDS.values():
        args = cli.build_parser().parse_args([*flags, "--data-dir", "DIR"])
        config = cli.config_from_args(args)
        members = sweep.expand(config, sweep.parse_sweep(args.sweep, config))
        assert len(members) == 243
        for member, _ in members:
            member.validate()


def test_effnet_commands_parse_and_the_section_is_the_committed_cells():
    """Issue 25's cells: every command (run or not) validates and sweeps >= 3 seeds, each
    not-run cell says its cost, a committed cell's members were trained by its command, and
    README.md's EfficientNet section is what render_effnet() makes of the committed files."""
    import dataclasses

    from jaxnets import cli, sweep

    reproduce = load_reproduce()
    for name, (_, method, n, flags) in reproduce.EFFNET.items():
        args = cli.build_parser().parse_args([*flags, "--data-dir", "DIR"])
        config = cli.config_from_args(args)
        config.validate()
        assert config.labels_per_class == n and (config.freeze == (method == "probe"))
        assert len(sweep.parse_sweep(args.sweep, config)["seed"]) >= 3
        committed = (RESULTS / name / "sweep.json").exists()
        assert committed != (name in reproduce.EFFNET_NOT_RUN), name
        if name in reproduce.EFFNET_NOT_RUN:
            assert "cost: " in reproduce.EFFNET_NOT_RUN[name]
        for member_config, _ in reproduce.member_records(RESULTS / name) if committed else ():
            saved = member_config["config"]
            now = dataclasses.asdict(config)
            assert all(saved[k] == now[k] for k in ("model", "image_size", "normalize", "labels_per_class", "lr",
                                                     "batch_size", "epochs", "freeze", "backbone_lr_scale"))
    readme = (RESULTS / "README.md").read_text()
    section = readme.split(reproduce.EFFNET_BEGIN, 1)[1].split(reproduce.EFFNET_END, 1)[0].strip()
    assert section == reproduce.render_effnet().strip()
    assert reproduce.effnet_cells()  # at least one cell ran

def test_ablation_rows_come_from_member_summaries():
    reproduce = load_reproduce()
    for row in reproduce.sweep_rows():
        folder = RESULTS / row["name"]
        members = [p for p in folder.iterdir() if (p / "summary.json").exists()]
        assert members, row["name"]
        seeds = {json.loads((p / "config.json").read_text())["config"]["seed"] for p in members}
        assert len(seeds) >= 3 and int(row["seeds"].split()[0]) == len(seeds)


def test_grid_rows_are_the_best_and_worst_committed_members():
    reproduce = load_reproduce()
    for grid in reproduce.grid_tables():
        folder = RESULTS / grid["name"]
        vals = sorted((json.loads((p / "summary.json").read_text())["best_val_accuracy"] or 0.0
                       for p in folder.iterdir() if (p / "summary.json").exists()), reverse=True)
        assert grid["members"] == len(vals) == 243
        shown = [r for r in grid["rows"] if r is not None]
        k = reproduce.GRID_SHOWN
        assert [r["best_val_accuracy"] for r in shown] == vals[:k] + vals[-k:]
        assert [r["rank"] for r in shown] == [*range(1, k + 1), *range(len(vals) - k + 1, len(vals) + 1)]


def test_transfer_commands_parse_and_share_their_images_per_seed():
    """The transfer sweeps: >= 3 seeds, classes 5-9, and per labels-per-class the three
    methods differ only in what they load and train (same images, batch and epochs)."""
    from jaxnets import cli, sweep

    reproduce = load_reproduce()
    data = {}
    for name, (_, method, n, flags) in reproduce.TRANSFER.items():
        args = cli.build_parser().parse_args([*flags, "--data-dir", "DIR"])
        config = cli.config_from_args(args).validate()
        axes = sweep.parse_sweep(args.sweep, config)
        assert list(axes) == ["seed"] and len(axes["seed"]) >= 3
        assert config.classes == (5, 6, 7, 8, 9) and config.labels_per_class == n and config.val_size == 0
        assert (config.pretrained is not None) == (method != "scratch") and config.freeze == (method == "probe")
        data.setdefault(n, set()).add((config.batch_size, config.epochs, config.seed, config.augment))
    assert all(len(v) == 1 for v in data.values()), data


def test_every_experiment_command_gives_its_committed_config():
    """The listed commands (presets included) still produce the settings the committed runs
    recorded: a preset that drifted would silently change what 'reproduce' reruns."""
    import dataclasses

    from jaxnets import cli

    reproduce = load_reproduce()
    where = {"out", "data_dir", "data_source", "progress", "conv_impl"}  # where/how, not what, is trained
    checked = 0
    for name, (_, _, flags) in reproduce.EXPERIMENTS.items():
        args = cli.build_parser().parse_args([*flags, "--data-dir", "DIR"])
        if args.sweep:
            continue
        saved = json.loads((RESULTS / name / "config.json").read_text())["config"]
        now = dataclasses.asdict(cli.config_from_args(args))
        differ = {k: (saved[k], now[k]) for k in saved if k not in where
                  and (tuple(saved[k]) if isinstance(saved[k], list) else saved[k]) != now[k]}
        assert not differ, (name, differ)
        checked += 1
    assert checked >= 8
