"""Write docs/cli.md from the commands' own ``--help`` (run: python tools/cli_reference.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

COMMANDS = ("train", "resume", "plot_logs", "build_store", "import_hdf5", "store_info",
            "make_phantom", "track", "eval")
ROOT = Path(__file__).resolve().parents[1]


def render() -> str:
    env = {**os.environ, "COLUMNS": "100"}
    parts = ["# Command-line reference", "",
             "Generated from each command's `--help` by `tools/cli_reference.py`; "
             "`tests/test_docs.py` checks it is current.", ""]
    for name in COMMANDS:
        module = f"tractrain.bin.{name}"
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                              text=True, env=env)
        if done.returncode != 0:
            continue
        parts += [f"## tractrain-{name.replace('_', '-')}", "", "```text",
                  done.stdout.rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(render())
    print(ROOT / "docs" / "cli.md")
