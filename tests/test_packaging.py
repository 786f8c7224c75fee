"""The built wheel installs tractrain.* only (no generic top-level data/engine modules),
with its py.typed marker and every console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_subpackages_and_cli(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT, check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("tractrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tractrain"}, tops
    assert "tractrain/py.typed" in names  # type checkers use the package's annotations
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "tractrain-eval = tractrain.bin.eval:main" in zipfile.ZipFile(wheel).read(
        entry_points).decode()
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True,
    )
    code = (
        "import tractrain.data, tractrain.engine, tractrain.hooks, tractrain.bin;"
        "print(tractrain.data.__file__)"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.startswith(str(target))
    cli = subprocess.run([sys.executable, "-m", "tractrain.bin.make_phantom", "--help"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 0 and "usage" in cli.stdout.lower()
