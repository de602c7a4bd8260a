"""`.ci/run` runs exactly the README's test command (up to `python -m` prefixes and pip's `-q`)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _normalise(command: str) -> list[str]:
    steps = []
    for step in command.split("&&"):
        words = [w for w in step.split() if w != "-q"]
        if words[:2] == ["python", "-m"]:
            words = words[2:]
        steps.append(" ".join(words))
    return steps


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"Run the tests[^\n]*\n+```bash\n(.+?)\n```", readme)
    assert match, "README has no 'Run the tests' bash block"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    command = ci[-1]
    assert _normalise(command) == _normalise(match.group(1)), (command, match.group(1))
    assert "mypy" in _normalise(command), "the type check is part of the test command"
