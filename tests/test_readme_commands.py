"""Every shell command of README.md runs as written, in order, in a fresh folder after the demo.

The two setup lines (``make demo``, ``make test``) are the only ones not run from here: the
demo is run first as the Makefile's ``demo`` target runs it, and ``make test`` is this suite.
The same demo experiment then checks that eval and track find the demo store in the cache that
training recorded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP_LINES = ("make demo", "make test")  # run by hand on a fresh machine, not from a test
TIMEOUT_S = 300


def bash_blocks(text: str) -> list[str]:
    """The contents of the ```bash blocks of a Markdown text, in order."""
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def strip_comment(line: str) -> str:
    """``line`` without its ``#`` comment (a ``#`` starting a word, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    if quote:
        raise ValueError(f"unclosed quote in README command: {line!r}")
    return line


def split_and(command: str) -> list[str]:
    """``command`` split at its top-level ``&&`` (not inside quotes)."""
    parts, quote, start = [], None, 0
    for i, char in enumerate(command):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif command.startswith("&&", i) and (i == 0 or command[i - 1] != "&"):
            parts.append(command[start:i])
            start = i + 2
    parts.append(command[start:])
    return [" ".join(p.split()) for p in parts]


def commands(block: str) -> list[str]:
    """The commands of a bash block: ``\\`` continuations joined, comments dropped, ``&&``
    chains split into their commands."""
    out, pending = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = strip_comment(pending + line)
        pending = ""
        if line.strip():
            out.extend(split_and(line))
    assert not pending, f"README bash block ends with a continuation: {block!r}"
    assert all(out), f"empty command in a README bash block: {block!r}"
    return out


def readme_commands() -> list[str]:
    """Every README shell command, in order, the setup lines excepted (each must be there)."""
    blocks = bash_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md has no ```bash block"
    found = [c for block in blocks for c in commands(block)]
    for line in SETUP_LINES:
        assert found.count(line) == 1, f"README: expected the setup line {line!r} once"
    return [c for c in found if c not in SETUP_LINES]


def demo_command() -> list[str]:
    """The Makefile's ``demo`` recipe, with the venv's python for ``$(PY)``."""
    make = (ROOT / "Makefile").read_text()
    (recipe,) = re.findall(r"^demo:.*\n\t([^\n]*)", make, flags=re.M)
    words = strip_comment(recipe).split()
    assert words[0] == "$(PY)", f"Makefile demo recipe: expected $(PY) first, got {recipe!r}"
    return [sys.executable, *words[1:]]


def readme_env(home: Path) -> dict:
    """The environment of a README user: the venv's console scripts first on PATH, a home and
    cache of their own, Comet offline (as tests/conftest.py sets it)."""
    env = dict(os.environ)
    env.pop("COMET_API_KEY", None)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), COMET_START_ONLINE="false",
               COMET_DISABLE_AUTO_LOGGING="1", COMET_ERROR_TRACKING_ENABLE="false")
    return env


def run_bash(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Run the demo, then every README command, in a fresh folder; ``(folder, env, times)``."""
    cwd = tmp_path_factory.mktemp("readme")
    env = readme_env(tmp_path_factory.mktemp("home"))
    times = {}
    start = time.perf_counter()
    done = subprocess.run(demo_command(), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, f"make demo's command failed:\n{done.stderr}"
    times["make demo"] = time.perf_counter() - start
    for command in readme_commands():
        start = time.perf_counter()
        done = run_bash(command, cwd, env)
        assert done.returncode == 0, (f"README command failed (status {done.returncode}):\n"
                                      f"$ {command}\n{done.stderr}")
        times[command] = time.perf_counter() - start
    return cwd, env, times


def test_readme_commands_run_as_written(readme_run):
    cwd, _, times = readme_run
    print("\n".join(f"{t:6.1f} s  {c}" for c, t in times.items()))
    for made in ("tracks.trk", "compare.png", "table.csv", "experiments/demo/eval/test.json",
                 "experiments/gen/logs/gen_endpoint_dist.npy"):
        assert (cwd / made).exists(), made


def test_command_splitting():
    block = ("a --x 1 \\\n    --y 2   # comment\n# whole line\nb 'it''s # not' && c \"&&\"\n"
             "d#e\n")
    assert commands(block) == ["a --x 1 --y 2", "b 'it''s # not'", "c \"&&\"", "d#e"]
    text = "x\n```bash\nmake demo\nfalse\n```\n```python\nno\n```\n"
    assert [c for b in bash_blocks(text) for c in commands(b)] == ["make demo", "false"]


def test_a_failing_command_fails(tmp_path):
    assert run_bash("tractrain-nonexistent", tmp_path, readme_env(tmp_path)).returncode != 0


def test_demo_experiment_records_its_cache(readme_run):
    cwd, env, _ = readme_run
    config = json.loads((cwd / "experiments/demo/config.json").read_text())
    assert config["store"] is None
    assert Path(config["cache_dir"]) == Path(env["XDG_CACHE_HOME"]).resolve() / "tractrain"


def test_track_and_eval_find_the_recorded_cache(readme_run, tmp_path):
    """Another user's cache settings do not matter; a cache that is gone is one line naming
    the command that rebuilds it; ``--store`` overrides."""
    cwd, env, _ = readme_run
    other = {**env, "XDG_CACHE_HOME": str(tmp_path / "elsewhere")}
    track = "tractrain-track experiments/demo --subject sub-02 --seeds 20 --out t.trk"
    done = run_bash(track, cwd, other)
    assert done.returncode == 0, done.stderr
    cache = Path(json.loads((cwd / "experiments/demo/config.json").read_text())["cache_dir"])
    moved = tmp_path / "moved"
    shutil.move(cache, moved)
    try:
        for command in (track, "tractrain-eval experiments/demo --gen-streamlines 0"):
            done = run_bash(command, cwd, env)
            assert done.returncode == 2
            assert done.stderr.count("\n") == 1, done.stderr
            assert f"no longer cached in {cache}" in done.stderr
            assert f"tractrain-train --cache-dir {cache}" in done.stderr
        (store,) = moved.glob("store-*.zarr")
        done = run_bash(f"{track} --store {store}", cwd, env)
        assert done.returncode == 0, done.stderr
        done = run_bash(f"tractrain-eval experiments/demo --gen-streamlines 0 --store {store}",
                        cwd, env)
        assert done.returncode == 0, done.stderr
        assert str(store) in json.loads((cwd / "experiments/demo/eval/test.json")
                                        .read_text())["store"]
    finally:
        shutil.move(moved, cache)
