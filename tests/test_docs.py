"""The README's example runs, and docs/cli.md matches the commands' current --help."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_script_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, flags=re.S)
               if "trainer.run(" in c]
    assert "trainer.run(train, max_epochs=3)" in code
    code = code.replace("max_epochs=3", "max_epochs=1")  # same code path, one epoch
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "valid_loss" in done.stdout
    assert (tmp_path / "experiments" / "mine" / "checkpoint" / "state.pt").exists()
    assert (tmp_path / "experiments" / "mine" / "best_model" / "model.pt").exists()


def test_cli_reference_is_current():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from cli_reference import render
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "cli.md").read_text() == render(), \
        "docs/cli.md is stale: run python tools/cli_reference.py"
