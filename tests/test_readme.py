"""The README's research-code example runs as written, and its test command is CI's."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CI = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def test_research_example_runs(capsys):
    example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    worst = float(re.search(r"max \|manual - autodiff\| = (\S+)", out).group(1))
    assert worst < 1e-5


def test_ci_runs_the_readme_test_command():
    command = re.search(r"JAXNETS_SHARED_DATA=\S+ (python -m pytest[^\n]*)", README).group(1)
    assert command.replace("python", ".venv/bin/python", 1) in CI
