"""Smoke test of the loader benchmark (bench/loader.py), plus its PASS/MISS verdicts."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "loader.py"


def _load_bench():
    """bench/ is not an installed package: load bench/loader.py by path."""
    spec = importlib.util.spec_from_file_location("tractrain_bench_loader", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row(config, lazy, workers, streamlines_per_s):
    return {"config": config, "dtype": "float32", "lazy": lazy, "workers": workers,
            "streamlines_per_s": streamlines_per_s, "points_per_s": 50 * streamlines_per_s,
            "peak_rss_mb": 300.0, "worker_peak_rss_mb": None if workers == 0 else 280.0,
            "first_batch_s": 0.1}


def test_verdicts_follow_the_targets():
    bench = _load_bench()
    rows = [_row("b", True, 0, 2100.0), _row("b", True, 2, 9000.0), _row("b", False, 0, 900.0),
            _row("c", True, 0, 1900.0)]
    naive = [{"config": "b", "lazy": True, "streamlines_per_s": 100.0},
             {"config": "b", "lazy": False, "streamlines_per_s": 30.0},
             {"config": "c", "lazy": True, "streamlines_per_s": 100.0}]
    bare = {
        "float32": {"ratio": 1.4, "interp_s": 1.4, "bare_s": 1.0, "interpolated_points": 7000,
                    "features": 45, "bare_points_per_s": 7000.0},
        "float16": {"ratio": 1.6, "interp_s": 1.6, "bare_s": 1.0, "interpolated_points": 7000,
                    "features": 45, "bare_points_per_s": 7000.0},
    }
    lines = bench.ratio_lines(rows, naive, bare)
    # one line per naive result, against the 0-worker row of the same config and laziness
    assert len(lines) == 5
    assert lines[0].startswith("(b) lazy=True workers=0") and "21.0x" in lines[0]
    assert lines[0].endswith("PASS")
    assert lines[1].startswith("(b) lazy=False workers=0") and "30.0x" in lines[1]
    assert lines[1].endswith("PASS")
    assert lines[2].startswith("(c)") and "19.0x" in lines[2] and lines[2].endswith("MISS")
    assert lines[3].startswith("(d) ") and lines[3].endswith("PASS")
    assert lines[4].startswith("(d16) ") and lines[4].endswith("MISS")
    table = bench.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert "| b (resample 1 mm) | float32 | True | 2 | 9,000 | 450,000 | 300 | 280 |" in table[3]


@pytest.mark.slow
def test_quick_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cache", str(tmp_path / "cache"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "| config | dtype | lazy | workers | streamlines/s | points/s | peak RSS MB |" in text
    rows = [line for line in text.splitlines() if re.match(r"\| (a|b|c|d|d16) \(", line)]
    assert len(rows) == 5 * 2 * 2  # configurations x lazy x workers
    for name in ("b", "c"):
        for lazy in (True, False):
            assert re.search(rf"^\({name}\) lazy={lazy} workers=0 vs naive loader .*: "
                             r"[0-9.]+x .* (PASS|MISS)$", text, re.M)
    for name in ("d", "d16"):
        assert re.search(rf"^\({name}\) interpolation / bare gather, float(32|16): [0-9.]+x .* "
                         r"(PASS|MISS)$", text, re.M)

    results = json.loads(out.read_text())
    size, batches = results["sizes"]["batch_size"], results["sizes"]["batches"]
    loader = {(r["config"], r["lazy"], r["workers"]): r for r in results["loader"]}
    assert len(loader) == 20
    for r in loader.values():
        assert r["batches"] == batches
        assert r["streamlines"] == batches * size  # every quick batch is full
        assert r["points_per_s"] == pytest.approx(r["points"] / r["seconds"])
        assert (r["worker_peak_rss_mb"] is None) == (r["workers"] == 0)
    # same batch ids for every configuration at a given worker count: resampling 0.5 mm
    # streamlines to 1 mm about halves the points; split/reverse/noise keep them
    for lazy in (True, False):
        for workers in (0, 2):
            raw = loader[("a", lazy, workers)]["points"]
            resampled = loader[("b", lazy, workers)]["points"]
            assert 0.4 * raw < resampled < 0.6 * raw
            assert loader[("c", lazy, workers)]["points"] == resampled
            assert loader[("d", lazy, workers)]["points"] == resampled
            assert loader[("d16", lazy, workers)]["points"] == resampled
    # the naive baselines did the same work on the same batches as the 0-worker loader
    naive = {(r["config"], r["lazy"]): r for r in results["naive"]}
    assert set(naive) == {(name, lazy) for name in ("b", "c") for lazy in (True, False)}
    for r in naive.values():
        assert r["batches"] == batches
        assert r["points"] == loader[("b", True, 0)]["points"]
    for dtype in ("float32", "float16"):
        bare = results["bare_gather"][dtype]
        assert bare["interpolated_points"] == 7 * bare["points"]  # 7-point neighbourhood
        assert bare["ratio"] == pytest.approx(bare["interp_s"] / bare["bare_s"])


@pytest.mark.parametrize("corner_major", [True, False])
def test_bare_gather_returns_the_corner_voxels_in_the_interpolation_order(monkeypatch,
                                                                           corner_major):
    """The baseline gathers exactly the 8 corners `interpolate` reads, in its layout."""
    import itertools

    import numpy as np
    import torch

    from tractrain.data import interpolation

    bench = _load_bench()
    monkeypatch.setattr(interpolation, "is_corner_major", lambda device: corner_major)
    rng = np.random.default_rng(8)
    vol = rng.standard_normal((5, 6, 4, 3)).astype(np.float32)
    pts = rng.uniform(0.0, 1.0, (50, 3)) * (np.array(vol.shape[:3]) - 1)
    got = bench.bare_gather(torch.from_numpy(vol), torch.from_numpy(pts)).numpy()
    assert got.shape == (50 * 8, 3)
    dims = np.array(vol.shape[:3])
    corners = [[vol[tuple(np.minimum(np.floor(p).astype(int) + c, dims - 1))] for p in pts]
               for c in itertools.product((0, 1), repeat=3)]  # [corner][point], C order of bits
    expected = np.array(corners) if corner_major else np.array(corners).transpose(1, 0, 2)
    np.testing.assert_array_equal(got, expected.reshape(-1, 3))
    half = bench.bare_gather(torch.from_numpy(vol).half(), torch.from_numpy(pts))
    assert half.dtype == torch.half
