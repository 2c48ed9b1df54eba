"""README.md and docs/*.md say only what is true.

* Every fenced shell command (```bash/```sh blocks) in README.md and docs/*.md is covered:
  a ``train.py``/``jaxnets-train`` command parses and validates (run here with ``--dry-run``,
  which loads no data); ``pip install`` lines name extras that exist (the project's in
  pyproject.toml, JAX's in the installed jax's metadata); the test command is the one CI
  runs; ``results/reproduce.py`` and ``benchmarks`` commands name committed results files;
  the few launch recipes that cannot run here (TPU pods, SLURM) are listed in
  :data:`UNTESTED_LAUNCH` with the reason, and their ``train.py`` flags still parse.
* The README's research example and its load-a-run example run as written.
* The README's results table holds the figures computed from the committed run files.
* The README stays at most 12 KB; docs/performance.md's benchmark table is exactly what its
  generator prints from ``results/bench_cpu.json``; the download URLs in docs/data.md are
  the downloader's.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shlex
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import scaled_timeout  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "results"
MAX_README_BYTES = 12 * 1024

#: Launch recipes for hardware CI does not have. They are not run anywhere; the train.py
#: flags inside them are still checked with --dry-run (the distributed flags left out).
UNTESTED_LAUNCH = {
    "gcloud compute tpus tpu-vm scp --recurse jaxnets-repo NAME:~/ --zone ZONE --worker=all":
        "copies the checkout to a TPU pod slice's workers (no TPU here)",
    'gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "cd ~/jaxnets-repo && python train.py '
    '--distributed --dataset cifar10 --data-dir ~/data --batch-size 1024 --out runs/dp"':
        "starts the run on every TPU pod worker (no TPU here)",
    "srun python train.py --distributed --dataset cifar10 --batch-size 1024 --sync-bn --out runs/dp":
        "SLURM job step (no cluster here); JAX's SLURM detection is JAX's own",
    'export JAXNETS_COORDINATOR_ADDRESS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):12345':
        "SLURM: the first node as coordinator (no cluster here)",
    "srun bash -c 'JAXNETS_NUM_PROCESSES=$SLURM_NTASKS JAXNETS_PROCESS_ID=$SLURM_PROCID python train.py "
    "--dataset cifar10 --batch-size 1024 --sync-bn --out runs/dp'":
        "SLURM job step with the process variables set from SLURM's (no cluster here)",
}

#: benchmarks module -> the results file it writes.
BENCHMARK_FILES = {"cpu": "bench_cpu.json", "xla_flags": "xla_cpu_flags.json", "mnist_vs_torch": "mnist_vs_torch.json",
                   "sweep_speed": "sweep_speed.json", "convnet_breakdown": "convnet_breakdown.json",
                   "hugepages": "hugepages.json"}



def results_file(command):
    """The results file a documented ``python -m benchmarks.X`` command writes: its
    ``--out results/F`` when it has one, else the module's default."""
    m = re.search(r"--out results/(\S+)", command)
    return m.group(1) if m else BENCHMARK_FILES[re.match(r"python -m benchmarks\.(\w+)", command).group(1)]


_DISTRIBUTED_FLAGS = {"--distributed": 0, "--coordinator-address": 1, "--num-processes": 1, "--process-id": 1}
_TRAIN = re.compile(r"(?:python3? train\.py|jaxnets-train)((?:[ \t]+[^\s'\"&;|]+)*)")
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


# --------------------------------------------------------------------------- parsing


def fenced(text: str, languages) -> list[str]:
    """The bodies of the fenced code blocks whose language is one of ``languages``."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)[ \t]*\n(.*?)^```", text, re.M | re.S)
            if m.group(1) in languages]


def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` outside quotes that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(text: str) -> list[str]:
    """Each command of the fenced shell blocks in ``text``: continuation lines joined,
    comments dropped, whitespace normalised."""
    commands = []
    for block in fenced(text, ("bash", "sh", "shell", "console")):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(_strip_comment(line).split())
            if line:
                commands.append(line)
    return commands


def all_commands():
    """``(page name, command)`` for every fenced shell command of README.md and docs/*.md."""
    return [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in shell_commands(page.read_text())]


def train_invocations(command: str) -> list[list[str]]:
    """The argument lists of the ``train.py``/``jaxnets-train`` invocations in ``command``
    (also inside ``bash -c '...'`` or ``--command "..."``), the multi-process flags removed."""
    found = []
    for m in _TRAIN.finditer(command):
        args, skip = [], 0
        for token in shlex.split(m.group(1)):
            if skip:
                skip -= 1
            elif token in _DISTRIBUTED_FLAGS:
                skip = _DISTRIBUTED_FLAGS[token]
            else:
                args.append(token)
        found.append(args)
    return found


def _plain_train_command(command: str) -> bool:
    """A command that is only a train.py/jaxnets-train invocation (optionally in the
    background with ``&``), as a user types it."""
    tokens = command.removesuffix("&").split()
    starts = [i for i, t in enumerate(tokens) if t in ("train.py", "jaxnets-train")]
    if not starts:
        return False
    prefix = tokens[:starts[0]]
    return prefix in ([], ["python"], ["python3"]) or (prefix[-1:] == ["python"] and all(map(_ENV.match, prefix[:-1])))


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the project allows 3.10
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _norm_extra(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def coverage(command: str) -> str | None:
    """How ``command`` is covered (a short phrase), or None when nothing covers it."""
    if command in UNTESTED_LAUNCH:
        return "untested launch recipe: " + UNTESTED_LAUNCH[command]
    if _plain_train_command(command):
        return "train command: flags checked with --dry-run"
    if command == "python -m pytest -n 2":
        return "the test command CI runs"
    m = re.fullmatch(r'pip install -e (\.|"\.\[([\w,-]+)\]")', command)
    if m:
        extras = (m.group(2) or "").split(",") if m.group(2) else []
        declared = {_norm_extra(e) for e in _pyproject()["project"].get("optional-dependencies", {})}
        missing = [e for e in extras if _norm_extra(e) not in declared]
        return None if missing else "project install; extras declared in pyproject.toml"
    m = re.fullmatch(r'pip install -U "jax\[([\w-]+)\]"', command)
    if m:
        provided = {_norm_extra(e) for e in (metadata.metadata("jax").get_all("Provides-Extra") or [])}
        return f"JAX extra {m.group(1)} exists" if _norm_extra(m.group(1)) in provided else None
    m = re.fullmatch(r"python results/reproduce\.py (run|list|table)((?: \S+)*)", command)
    if m:
        names = m.group(2).split()
        if m.group(1) == "run" and (not names or not all((RESULTS / n).is_dir() for n in names)):
            return None
        return "documented results command"
    m = re.fullmatch(r"python -m benchmarks\.(\w+)( .*)?", command)
    if m and m.group(1) in BENCHMARK_FILES and (RESULTS / results_file(command)).exists():
        if "--markdown" in command:
            return "prints the committed benchmark's table (test_performance_table_is_the_generators_output runs it)"
        return f"documented results command: writes results/{results_file(command)}"
    return None


def _cli_main():
    """``main(argv)`` of the command line (train.py and jaxnets-train run jaxnets.cli)."""
    from jaxnets import cli

    return cli.main


# --------------------------------------------------------------------------- commands


def test_readme_at_most_12_kb():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; keep it at most {MAX_README_BYTES} (move depth to docs/)"


def test_every_fenced_shell_command_is_covered():
    commands = all_commands()
    assert len(commands) >= 10, commands  # the parser found the blocks at all
    uncovered = [f"{page}: {c}" for page, c in commands if coverage(c) is None]
    assert not uncovered, "fenced commands neither run in a test nor listed as results/launch commands:\n" + \
        "\n".join(uncovered)
    unused = set(UNTESTED_LAUNCH) - {c for _, c in commands}
    assert not unused, f"UNTESTED_LAUNCH entries no page shows any more: {unused}"


def test_quick_start_is_install_train_test():
    text = README.read_text()
    quick = shell_commands(text.split("## Quick start", 1)[1].split("\n## ", 1)[0])
    assert quick[:2] == ["pip install -e .", "python train.py --model mlp --dataset mnist --epochs 1"], quick
    assert "python -m pytest -n 2" in quick


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -n 2" in ci
    assert any(c == "python -m pytest -n 2" for _, c in all_commands())


def test_console_script_is_declared():
    # The console script is added with issue 17's CLI work: jaxnets-train runs jaxnets.cli:run (main, then an immediate exit after an interrupt).
    scripts = _pyproject()["project"].get("scripts", {})
    assert scripts.get("jaxnets-train") == "jaxnets.cli:run", scripts


TRAIN_COMMANDS = [(page, c, args) for page, c in all_commands() for args in train_invocations(c)]


@pytest.mark.parametrize("page,command,args", TRAIN_COMMANDS,
                         ids=[f"{p}:{c.split(' --')[0]} {' '.join(a)[:60]}" for p, c, a in TRAIN_COMMANDS])
def test_train_command_parses_and_validates(page, command, args, monkeypatch, tmp_path, capsys):
    """The command's flags exist and its settings validate: ``--dry-run`` prints the config
    (or a sweep's plan) and exits 0 without loading data. jaxnets-train is the same
    jaxnets.cli:run (checked above)."""
    monkeypatch.chdir(tmp_path)  # relative --out paths land here, not in the checkout
    monkeypatch.setenv("JAXNETS_COMPILE_CACHE", "off")
    monkeypatch.setenv("JAXNETS_DATA_DIR", str(tmp_path / "data"))
    for name in ("JAXNETS_COORDINATOR_ADDRESS", "JAXNETS_NUM_PROCESSES", "JAXNETS_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    try:
        code = _cli_main()([*args, "--dry-run"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    assert code in (0, None), f"{page}: `{command}` --dry-run exited {code}: {out.err[-2000:]}"
    assert out.out.strip(), f"{page}: `{command}` --dry-run printed nothing"


def test_results_list_command_runs():
    proc = subprocess.run([sys.executable, "results/reproduce.py", "list"], cwd=ROOT, capture_output=True, text=True,
                          timeout=scaled_timeout(60))
    assert proc.returncode == 0, proc.stderr
    assert "grid243" in proc.stdout and "python train.py" in proc.stdout


def test_benchmark_commands_match_their_recorded_runs():
    """A documented benchmark command is the one its results file records (``DIR`` standing
    for the data directory), where the file records one."""
    for page, command in all_commands():
        m = re.fullmatch(r"python -m benchmarks\.(\w+)( .*)?", command)
        if not m or "--markdown" in command:
            continue
        recorded = json.loads((RESULTS / results_file(command)).read_text()).get("command")
        if recorded:
            recorded = re.sub(r"--data-dir \S+", "--data-dir DIR", recorded)
            assert command == recorded, f"{page}: `{command}`, but results/{results_file(command)} " \
                                        f"was written by `{recorded}`"


@pytest.mark.parametrize("block", ["bench_cpu", "bench_cpu_models"])
def test_performance_table_is_the_generators_output(block):
    """docs/performance.md's table of results/BLOCK.json is what `python -m benchmarks.cpu
    --markdown results/BLOCK.json` prints (`--update-docs results/BLOCK.json` writes it)."""
    page = (ROOT / "docs" / "performance.md").read_text()
    table = page.split(f"<!-- {block} table: begin -->", 1)[1].split(f"<!-- {block} table: end -->", 1)[0]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu", "--markdown", f"results/{block}.json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=scaled_timeout(120))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert table.strip() == proc.stdout.strip()


def test_data_page_names_the_downloaders_urls():
    download = importlib.import_module("jaxnets.download")
    page = (ROOT / "docs" / "data.md").read_text()
    urls = [u for mirrors in download.MIRRORS.values() for u in mirrors]
    assert urls, download.MIRRORS
    missing = [u for u in urls if u not in page]
    assert not missing, f"docs/data.md does not name the download URLs {missing}"
    readme = README.read_text()
    assert download.MIRRORS["cifar10"][0] + "cifar-10-python.tar.gz" in readme
    assert download.MIRRORS["mnist"][0] in readme


#: Pages linked before they exist, and who writes them (remove an entry once it lands).
PENDING_PAGES: dict[str, str] = {}


def test_relative_links_resolve():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() and path.relative_to(ROOT).as_posix() not in PENDING_PAGES:
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing


# --------------------------------------------------------------------------- python examples


def _python_block(containing: str) -> str:
    blocks = [b for b in fenced(README.read_text(), ("python",)) if containing in b]
    assert len(blocks) == 1, f"expected one README python block with {containing!r}"
    return blocks[0]


def test_research_example_runs(capsys):
    exec(compile(_python_block("autodiff_value_and_grad"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    worst = float(re.search(r"max \|manual - autodiff\| = (\S+)", out).group(1))
    assert worst < 1e-5


def test_docs_list_every_registered_family():
    from jaxnets.config import MODELS
    from jaxnets.models import FAMILIES

    table = (ROOT / "docs" / "training.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert set(FAMILIES) <= listed, f"docs/training.md's --model table lacks {sorted(set(FAMILIES) - listed)}"
    assert MODELS == tuple(FAMILIES)


def test_own_network_example_runs(capsys):
    """The README's composed network with a layer of the user's own trains one manual step
    and passes check_model, as printed."""
    namespace = {}
    exec(compile(_python_block("nn.Composed"), "README.md", "exec"), namespace)
    assert "gradcheck ok: True" in capsys.readouterr().out and namespace["report"].ok
    assert set(namespace["params"]) == {"stem", "res", "fc"} and set(namespace["params"]["res"]) == {"bn", "conv"}


def test_load_run_example_runs(mnist_dir, monkeypatch, tmp_path, capsys):
    """The README's load-a-run block, on a tiny MNIST run trained here: it runs as written
    (only the run directory substituted), predicts probabilities, and evaluates to the test
    accuracy the run's summary.json recorded."""
    monkeypatch.setenv("JAXNETS_COMPILE_CACHE", "off")
    monkeypatch.setenv("JAXNETS_DATA_DIR", str(mnist_dir.parent))  # load_dataset("mnist") reads DIR/mnist/
    run_dir = tmp_path / "run"
    code = _cli_main()(["--model", "mlp", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--hidden-units", "32",
                        "--epochs", "1", "--max-steps", "20", "--val-size", "500", "--out", str(run_dir),
                        "--no-progress"])
    assert code == 0
    capsys.readouterr()
    block = _python_block("load_run(")
    literal = re.search(r'load_run\("([^"]+)"\)', block).group(1)
    namespace = {}
    exec(compile(block.replace(literal, str(run_dir)), "README.md", "exec"), namespace)
    probs = namespace["probs"]
    assert probs.shape == (8, 10)
    assert abs(float(probs.sum(axis=1).min()) - 1) < 1e-5 and abs(float(probs.sum(axis=1).max()) - 1) < 1e-5
    summary = json.loads((run_dir / "summary.json").read_text())
    result = namespace["run"].evaluate(namespace["mnist"])
    assert abs(result["accuracy"] - summary["test_accuracy"]) < 1e-6, (result, summary)


def _attribute_chains(tree, aliases):
    """``(alias, [attr, ...])`` for each ``alias.a.b`` chain in ``tree`` rooted at a jaxnets alias."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                yield base.id, chain


def test_python_examples_in_docs_name_existing_api():
    """Every ``jaxnets`` name the python blocks of README.md and docs/*.md use exists (the
    blocks that train are not run; this catches a renamed or removed function)."""
    problems = []
    for page in PAGES:
        for block in fenced(page.read_text(), ("python",)):
            tree = ast.parse(block)
            aliases = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxnets"):
                    for a in node.names:
                        aliases[a.asname or a.name] = importlib.import_module(f"{node.module}.{a.name}")
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.startswith("jaxnets"):
                            aliases[a.asname or a.name] = importlib.import_module(a.name)
            for alias, chain in _attribute_chains(tree, aliases):
                obj = aliases[alias]
                for attr in chain:
                    if not hasattr(obj, attr):
                        problems.append(f"{page.name}: {alias}.{'.'.join(chain)}")
                        break
                    obj = getattr(obj, attr)
    assert not problems, problems


def test_api_table_names_exist():
    """Each function or class docs/training.md's API table names exists in its module."""
    import jaxnets

    page = (ROOT / "docs" / "training.md").read_text()
    rows = re.findall(r"^\| (`jaxnets\.[^|]+) \| (.+) \|$", page, re.M)
    assert len(rows) >= 8, rows
    missing = []
    for modules, contents in rows:
        mods = [importlib.import_module(m) for m in re.findall(r"`(jaxnets\.\w+)`", modules)]
        for name in re.findall(r"`([A-Za-z_][\w.]*)(?:\(|`)", contents):
            if name.endswith("_backward") or name.startswith("*"):
                continue
            owner = jaxnets if name.startswith("jaxnets.") else None
            if owner is not None:
                found = hasattr(jaxnets, name.split(".", 1)[1])
            else:
                found = any(hasattr(m, name) for m in mods)
            if not found:
                missing.append(f"{modules}: {name}")
    assert not missing, missing


# --------------------------------------------------------------------------- results table


def _figure(name: str) -> tuple[str, str]:
    """(data, accuracy text) of committed experiment ``name``, computed from its run files as
    the README's table writes them."""
    folder = RESULTS / name
    runs = sorted(p for p in folder.iterdir() if (p / "summary.json").exists()) if (folder / "sweep.json").exists() \
        else [folder]
    accs = [100 * json.loads((r / "summary.json").read_text())["test_accuracy"] for r in runs]
    config = json.loads((runs[0] / "config.json").read_text())["config"]
    data = "MNIST" if config["dataset"] == "mnist" else "CIFAR-10 (JPEG copy)"
    if len(accs) == 1:
        return data, f"{accs[0]:.2f}%"
    return data, f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}% ({len(accs)} seeds)"


def test_results_table_figures_come_from_the_run_files():
    section = README.read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "](results/" in line]
    assert len(rows) >= 6, rows
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        name = re.search(r"\]\(results/([\w-]+)/?\)", cells[-1]).group(1)
        data, accuracy = _figure(name)
        assert cells[0] == data, (name, cells[0], data)
        assert cells[3] == accuracy, f"{name}: README says {cells[3]!r}, the run files give {accuracy!r}"


def test_gradcheck_example_runs(capsys):
    """The README's check of a layer written by hand passes, and the same check fails a
    wrong backward (the example would catch a bug)."""
    block = _python_block("gradcheck.check(")
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["report"].ok
    assert "softplus" not in capsys.readouterr().err
    wrong = namespace["gradcheck"].check(namespace["softplus"], lambda cache, dy: dy * (1 + 0 * cache),
                                         namespace["np"].random.default_rng(0).normal(size=(4, 5)))
    assert not wrong.ok
