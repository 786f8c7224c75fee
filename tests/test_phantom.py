"""The synthetic phantom: files, geometry, signal physics, determinism, config and CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from nibabel.streamlines import Field
from scipy import ndimage

from tractrain.bin.make_phantom import main
from tractrain.data.phantom import default_splits, make_phantom
from tractrain.errors import ConfigError

SHAPE = (20, 20, 12)
SMALL = {"shape": SHAPE, "streamlines_per_subject": 90}
B_VALUE_TOL = 30.0  # small_64D b-values spread around 1000
AXIS = np.array([0.6, 0.7, 0.39])  # sign reference for orientation-free tangents


def _gradients():
    """small_64D's diffusion-weighted directions and b-values, read independently."""
    from dipy.data import get_fnames
    from dipy.io.gradients import read_bvals_bvecs

    _, fbval, fbvec = get_fnames(name="small_64D")
    bvals, bvecs = read_bvals_bvecs(str(fbval), str(fbvec))
    keep = bvals > 50
    return bvals[keep], bvecs[keep] / np.linalg.norm(bvecs[keep], axis=1, keepdims=True)


def _load(folder, subject):
    dwi = nib.load(folder / subject / "dwi.nii.gz")
    mask = nib.load(folder / subject / "mask.nii.gz")
    trk = nib.streamlines.load(folder / subject / "bundles.trk")
    return dwi, mask, trk


def _voxels(points, affine):
    return np.rint(nib.affines.apply_affine(np.linalg.inv(affine), points)).astype(int)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ph"
    summary = make_phantom(out, n_subjects=2, seed=3, **SMALL)
    return out, summary


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Noise-free twin of ``phantom`` (same seed, so the same streamlines)."""
    out = tmp_path_factory.mktemp("clean") / "ph"
    make_phantom(out, n_subjects=1, seed=3, snr=None, **SMALL)
    return out


def test_files_load_with_expected_shapes_dtypes_and_affine(phantom):
    out, summary = phantom
    assert summary["subjects"] == ["sub-00", "sub-01"] and summary["n_features"] == 64
    affines = []
    for subject in summary["subjects"]:
        dwi, mask, trk = _load(out, subject)
        assert dwi.shape == (*SHAPE, 64) and dwi.get_data_dtype() == np.float32
        assert mask.shape == SHAPE and mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1}
        affine = dwi.affine
        assert np.allclose(np.diag(affine)[:3], 2.0) and np.count_nonzero(affine[:3, :3]) == 3
        assert np.all(affine[:3, 3] != 0)
        assert np.allclose(mask.affine, affine)
        header = trk.header
        assert np.allclose(header[Field.VOXEL_TO_RASMM], affine)
        assert tuple(header[Field.DIMENSIONS]) == SHAPE
        assert np.allclose(header[Field.VOXEL_SIZES], 2.0)
        assert len(trk.streamlines) == 90
        bundle = trk.tractogram.data_per_streamline["bundle"].ravel()
        sizes = np.bincount(bundle.astype(int))
        assert len(sizes) == 6 and sizes.sum() == 90 and sizes.max() >= 2 * sizes.min()
        affines.append(affine)
    assert np.array_equal(affines[0], affines[1])
    data = np.asarray(dwi.dataobj)
    assert np.isfinite(data).all() and data.min() >= 0


@pytest.mark.parametrize("step_mm", [0.5, 0.8])
def test_streamlines_inside_volume_with_regular_steps(tmp_path, phantom, step_mm):
    if step_mm == 0.5:
        out = phantom[0]
    else:
        out = tmp_path / "ph"
        make_phantom(out, n_subjects=1, step_mm=step_mm, **SMALL)
    dwi, _, trk = _load(out, "sub-00")
    points = trk.streamlines.get_data()
    ijk = nib.affines.apply_affine(np.linalg.inv(dwi.affine), points)
    assert np.all(ijk >= -0.5) and np.all(ijk <= np.array(SHAPE) - 0.5)
    steps = np.concatenate([np.linalg.norm(np.diff(s, axis=0), axis=1) for s in trk.streamlines])
    assert abs(steps.mean() - step_mm) < 0.02 * step_mm
    assert np.all(np.abs(steps - step_mm) < 0.3 * step_mm)
    lengths_mm = np.array([np.linalg.norm(np.diff(s, axis=0), axis=1).sum()
                           for s in trk.streamlines])
    assert lengths_mm.min() > 15  # real bundles, not specks


def test_mask_is_the_streamline_voxels_dilated_by_one(phantom):
    out, _ = phantom
    dwi, mask, trk = _load(out, "sub-00")
    ijk = _voxels(trk.streamlines.get_data(), dwi.affine)
    touched = np.zeros(SHAPE, dtype=bool)
    touched[tuple(ijk.T)] = True
    expected = ndimage.binary_dilation(touched, ndimage.generate_binary_structure(3, 1))
    got = np.asarray(mask.dataobj).astype(bool)
    assert np.array_equal(got, expected)
    assert got.sum() < 0.5 * got.size


def _single_bundle_voxels(trk, affine, min_points=8, coherence=0.97):
    """Voxels crossed by one bundle only, with their mean unit tangent."""
    vox, tangents, bundles = [], [], []
    dps = trk.tractogram.data_per_streamline["bundle"].ravel()
    for s, b in zip(trk.streamlines, dps, strict=True):
        t = np.gradient(s, axis=0)
        t = t * np.sign(t @ AXIS)[:, None]  # fibres have no orientation: align the signs
        vox.append(_voxels(s, affine))
        tangents.append(t / np.linalg.norm(t, axis=1, keepdims=True))
        bundles.append(np.full(len(s), b))
    vox, tangents, bundles = map(np.concatenate, (vox, tangents, bundles))
    flat = np.ravel_multi_index(vox.T, SHAPE)
    result = []
    for v in np.unique(flat):
        sel = flat == v
        if sel.sum() < min_points or len(np.unique(bundles[sel])) != 1:
            continue
        mean = tangents[sel].mean(axis=0)
        if np.linalg.norm(mean) > coherence:
            result.append((np.unravel_index(v, SHAPE), mean / np.linalg.norm(mean)))
    return result


def test_signal_is_lower_along_the_fibre_than_across_it(phantom):
    out, _ = phantom
    dwi, _, trk = _load(out, "sub-00")
    data = np.asarray(dwi.dataobj)
    _, bvecs = _gradients()
    voxels = _single_bundle_voxels(trk, dwi.affine)
    assert len(voxels) > 20
    along, across = [], []
    for ijk, u in voxels:
        cos = np.abs(bvecs @ u)
        along.append(data[ijk][np.argmax(cos)])  # gradient nearest the fibre
        across.append(data[ijk][np.argmin(cos)])  # gradient nearest perpendicular
    along, across = np.array(along), np.array(across)
    assert np.mean(along < across) > 0.95
    assert along.mean() < 0.6 * across.mean()


def test_noise_free_signal_matches_the_tensor_model(clean):
    """Single-fibre voxels follow S = 0.85 exp(-b g'Dg) + 0.15 exp(-b d_iso) (Stejskal-Tanner)
    up to the orientation quantisation; voxels away from bundles are isotropic."""
    dwi, mask, trk = _load(clean, "sub-00")
    data = np.asarray(dwi.dataobj)
    bvals, bvecs = _gradients()
    l1, l2, d_gm = 1.5e-3, 0.3e-3, 0.8e-3
    errors = []
    for ijk, u in _single_bundle_voxels(trk, dwi.affine):
        adc = l2 + (l1 - l2) * (bvecs @ u) ** 2
        model = 0.85 * np.exp(-bvals * adc) + 0.15 * np.exp(-bvals * d_gm)
        errors.append(np.abs(data[ijk] - model).max())
    assert len(errors) > 20 and np.median(errors) < 0.03
    outside = data[np.asarray(mask.dataobj) == 0]
    assert np.all(outside.std(axis=1) < 0.02)  # isotropic: the same for every gradient


def test_crossing_voxels_mix_two_fibre_signals(clean):
    """Where two bundles cross at a large angle, the noise-free signal is the two-fibre mixture
    weighted by each bundle's share of the voxel's points, not the dominant fibre alone."""
    dwi, _, trk = _load(clean, "sub-00")
    data = np.asarray(dwi.dataobj)
    bvals, bvecs = _gradients()
    dps = trk.tractogram.data_per_streamline["bundle"].ravel().astype(int)
    flat = np.ravel_multi_index(_voxels(trk.streamlines.get_data(), dwi.affine).T, SHAPE)
    bundle = np.repeat(dps, trk.streamlines._lengths)
    tangents = np.concatenate([np.gradient(s, axis=0) for s in trk.streamlines])
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    tangents *= np.sign(tangents @ AXIS)[:, None]  # half the streamlines run backwards

    def fibre(u):
        return np.exp(-bvals * (0.3e-3 + 1.2e-3 * (bvecs @ u) ** 2))

    iso = 0.15 * np.exp(-bvals * 0.8e-3)
    mixture_err, single_err = [], []
    for v in np.unique(flat):
        sel = flat == v
        counts = np.bincount(bundle[sel], minlength=6)
        b1, b2 = np.argsort(-counts, kind="stable")[:2]
        share = counts[b1] / (counts[b1] + counts[b2])
        if counts[b2] == 0 or share > 0.75:
            continue
        u1, u2 = (tangents[sel & (bundle == b)].mean(axis=0) for b in (b1, b2))
        u1, u2 = u1 / np.linalg.norm(u1), u2 / np.linalg.norm(u2)
        if abs(u1 @ u2) > 0.7:
            continue
        signal = data[np.unravel_index(v, SHAPE)]
        mixture = 0.85 * (share * fibre(u1) + (1 - share) * fibre(u2)) + iso
        mixture_err.append(np.abs(signal - mixture).max())
        single_err.append(np.abs(signal - 0.85 * fibre(u1) - iso).max())
    assert len(mixture_err) >= 3
    assert np.max(mixture_err) < 0.06
    assert np.all(np.array(mixture_err) < np.array(single_err))


def test_noise_level_follows_snr(phantom, clean):
    noisy = np.asarray(nib.load(phantom[0] / "sub-00" / "dwi.nii.gz").dataobj)
    ref = np.asarray(nib.load(clean / "sub-00" / "dwi.nii.gz").dataobj)
    tissue = ref[..., 0] > 0.2  # drop free-water voxels (signal near the noise floor)
    residual = (noisy - ref)[tissue]
    # Rician noise of sigma = 1/snr on the signal, divided by a b0 also noisy: ~1/30 to ~2/30
    assert 0.5 / 30 < residual.std() < 2.5 / 30
    assert abs(residual.mean()) < 0.01


def test_sh_features_fit_the_signal(tmp_path, clean):
    from dipy.core.geometry import cart2sphere
    from dipy.reconst.shm import real_sh_descoteaux

    summary = make_phantom(tmp_path / "sh", n_subjects=1, seed=3, snr=None, features="sh",
                           **SMALL)
    sh = np.asarray(nib.load(tmp_path / "sh" / "sub-00" / "dwi.nii.gz").dataobj)
    assert summary["n_features"] == 45 and sh.shape == (*SHAPE, 45)
    assert sh.dtype == np.float32
    _, bvecs = _gradients()
    _, theta, phi = cart2sphere(*bvecs.T)
    basis, _, _ = real_sh_descoteaux(8, theta, phi, legacy=False)
    signal = np.asarray(nib.load(clean / "sub-00" / "dwi.nii.gz").dataobj)
    rebuilt = sh @ basis.T.astype(np.float32)
    assert np.median(np.abs(rebuilt - signal)) < 0.01
    six = make_phantom(tmp_path / "sh6", n_subjects=1, features="sh", sh_order=6, **SMALL)
    assert six["n_features"] == 28


def test_same_arguments_same_arrays_other_seed_differs(tmp_path):
    def arrays(folder, subject="sub-00"):
        dwi, mask, trk = _load(folder, subject)
        return (np.asarray(dwi.dataobj), np.asarray(mask.dataobj), trk.streamlines.get_data(),
                trk.streamlines._lengths.copy())

    make_phantom(tmp_path / "a", n_subjects=2, seed=5, **SMALL)
    make_phantom(tmp_path / "b", n_subjects=2, seed=5, **SMALL)
    make_phantom(tmp_path / "c", n_subjects=2, seed=6, **SMALL)
    make_phantom(tmp_path / "d", n_subjects=3, seed=5, **SMALL)
    for subject in ("sub-00", "sub-01"):
        a, b = arrays(tmp_path / "a", subject), arrays(tmp_path / "b", subject)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        # a subject only depends on the seed and its index, not on how many subjects there are
        d = arrays(tmp_path / "d", subject)
        assert all(np.array_equal(x, y) for x, y in zip(a, d, strict=True))
    a, c = arrays(tmp_path / "a"), arrays(tmp_path / "c")
    assert not np.array_equal(a[0], c[0])
    assert a[2].shape != c[2].shape or not np.allclose(a[2], c[2])
    assert not np.array_equal(a[1], c[1])


def test_subjects_differ_a_little_around_shared_bundles(phantom):
    out, _ = phantom

    def centroids(subject):
        trk = nib.streamlines.load(out / subject / "bundles.trk")
        bundle = trk.tractogram.data_per_streamline["bundle"].ravel()
        labels = np.repeat(bundle, trk.streamlines._lengths)
        points = trk.streamlines.get_data()
        return np.array([points[labels == b].mean(axis=0) for b in range(6)]), trk

    c0, t0 = centroids("sub-00")
    c1, t1 = centroids("sub-01")
    assert not np.array_equal(t0.streamlines.get_data()[:50], t1.streamlines.get_data()[:50])
    shift = np.linalg.norm(c0 - c1, axis=1)
    assert 0 < shift.min() and shift.max() < 4.0  # same bundle, a few mm apart between subjects


def test_config_json_format_and_splits(tmp_path, phantom):
    out, summary = phantom
    config = json.loads((out / "config.json").read_text())
    assert summary["config"] == str(out / "config.json")
    assert config == {
        "groups": {
            "dwi": {"type": "volume", "files": ["dwi.nii.gz"], "standardization": "independent",
                    "mask": "mask.nii.gz"},
            "bundles": {"type": "streamlines", "files": ["bundles.trk"],
                        "reference": "dwi.nii.gz"},
        },
        "subjects": {"train": ["sub-00"], "valid": ["sub-01"], "test": []},
    }
    for subject in summary["subjects"]:  # every file the config names exists
        for group in config["groups"].values():
            for name in group["files"] + [group.get("mask", group.get("reference"))]:
                assert (out / subject / name).is_file()
    names = [f"sub-{i:02d}" for i in range(5)]
    assert default_splits(names[:1]) == {"train": names[:1], "valid": [], "test": []}
    assert default_splits(names[:3]) == {"train": names[:2], "valid": names[2:3], "test": []}
    assert default_splits(names) == {"train": names[:3], "valid": names[4:], "test": names[3:4]}
    splits = {"train": ["sub-01"], "test": ["sub-00"]}
    make_phantom(tmp_path / "s", n_subjects=2, splits=splits, **SMALL)
    written = json.loads((tmp_path / "s" / "config.json").read_text())["subjects"]
    assert written == {"train": ["sub-01"], "valid": [], "test": ["sub-00"]}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"features": "fodf"}, "features"),
        ({"shape": (20, 20)}, "shape"),
        ({"features": "sh", "sh_order": 7}, "sh_order"),
        ({"splits": {"train": ["sub-09"]}}, "splits.train"),
        ({"splits": {"train": ["sub-00"], "valid": ["sub-00"]}}, "splits.valid"),
        ({"shape": (3, 3, 3)}, "shape"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_phantom(tmp_path / "x", n_subjects=2, **{**SMALL, **kwargs})
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_refuses_non_empty_outdir_unless_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        make_phantom(tmp_path, n_subjects=1, **SMALL)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    make_phantom(tmp_path, n_subjects=1, overwrite=True, **SMALL)
    assert not (tmp_path / "keep.txt").exists() and (tmp_path / "config.json").is_file()


def test_cli_writes_then_refuses_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [str(out), "--subjects", "2", "--shape", *map(str, SHAPE), "--streamlines", "60",
            "--bundles", "2", "--features", "sh", "--seed", "1"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "sub-00" in stdout and "sub-01" in stdout and "config.json" in stdout
    assert nib.load(out / "sub-01" / "dwi.nii.gz").shape == (*SHAPE, 45)
    trk = nib.streamlines.load(out / "sub-00" / "bundles.trk")
    assert len(trk.streamlines) == 60
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(out) in err
    assert err.startswith("tractrain-make-phantom: error:")
    with pytest.raises(ConfigError, match="not empty"):  # --debug: the error propagates
        main(argv + ["--debug"])
    assert main(argv + ["--force", "--seed", "2"]) == 0
    proc = subprocess.run([sys.executable, "-m", "tractrain.bin.make_phantom", *argv],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_demo_store_builds_once_and_reopens(tmp_path):
    pytest.importorskip("tractrain.data.builder")
    pytest.importorskip("tractrain.data.store")
    from tractrain.data.phantom import demo_store

    kwargs = {"n_subjects": 2, **SMALL}
    store = demo_store(tmp_path, **kwargs)
    assert store.subjects == ["sub-00", "sub-01"]
    assert store.splits["valid"] == ["sub-01"]
    # the store holds the phantom's streamlines in voxel coordinates of the dwi volume
    (root,) = tmp_path.glob("phantom-*")
    dwi, _, trk = _load(root, "sub-00")
    points, lengths = store.gather("sub-00", "bundles", np.arange(5))
    assert np.array_equal(lengths, trk.streamlines._lengths[:5])
    expected = nib.affines.apply_affine(np.linalg.inv(dwi.affine),
                                        np.concatenate(list(trk.streamlines[:5])))
    assert np.allclose(points, expected, atol=1e-3)
    assert store.volume("sub-00", "dwi").shape == (*SHAPE, 64)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = demo_store(tmp_path, **kwargs)
    assert again.subjects == store.subjects
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps


def _streamline_bundles(trk):
    return trk.tractogram.data_per_streamline["bundle"].ravel().astype(int)


def _turns(streamline, chord_points=4):
    """Unit chords every ``chord_points`` points and the angles (rad) between successive ones."""
    chords = np.diff(streamline[::chord_points], axis=0)
    chords /= np.linalg.norm(chords, axis=1, keepdims=True)
    return chords, np.arccos(np.clip(np.sum(chords[1:] * chords[:-1], axis=1), -1, 1))


def test_bundles_curve_like_real_ones(phantom):
    """An arc turning over 120 degrees, an S that turns over 90 degrees in all but ends
    almost parallel to its start, and nowhere a bend tighter than a 4 mm radius."""
    out, _ = phantom
    _, _, trk = _load(out, "sub-00")
    bundle = _streamline_bundles(trk)
    end_to_end, total, radius = [], [], []
    for s in trk.streamlines:
        chords, angles = _turns(s)  # chords of 2 mm at step 0.5 mm
        end_to_end.append(np.degrees(np.arccos(np.clip(chords[0] @ chords[-1], -1, 1))))
        total.append(np.degrees(angles.sum()))
        radius.append(2.0 / max(angles.max(), 1e-9))
    end_to_end, total = np.array(end_to_end), np.array(total)
    median = {k: (np.median(end_to_end[bundle == k]), np.median(total[bundle == k]))
              for k in range(6)}
    assert any(e2e > 120 for e2e, _ in median.values())  # an arc
    assert any(e2e < 45 and tot > 90 for e2e, tot in median.values())  # an S-shape
    assert min(radius) > 4.0


def _voxel_bundle_directions(trk, affine):
    """Per (voxel, bundle) present with >= 3 points: the bundle's orientation (sign-free unit
    vector, principal axis of its tangents) in the voxel."""
    bundle = _streamline_bundles(trk)
    vox, tangents, labels = [], [], []
    for s, b in zip(trk.streamlines, bundle, strict=True):
        t = np.gradient(s, axis=0)
        tangents.append(t / np.linalg.norm(t, axis=1, keepdims=True))
        vox.append(np.ravel_multi_index(_voxels(s, affine).T, SHAPE))
        labels.append(np.full(len(s), b))
    vox, tangents, labels = map(np.concatenate, (vox, tangents, labels))
    out: dict[int, dict[int, np.ndarray]] = {}
    for key in np.unique(vox * 6 + labels):
        sel = vox * 6 + labels == key
        if sel.sum() >= 3:
            _, _, vt = np.linalg.svd(tangents[sel], full_matrices=False)
            out.setdefault(int(key // 6), {})[int(key % 6)] = vt[0]
    return out


def test_phantom_has_a_true_crossing_and_a_kissing_pair(phantom):
    """Some voxels hold two bundles at over 60 degrees (crossing); others hold two bundles
    running parallel (within 25 degrees) although those bundles share few of their voxels
    (kissing: they touch, then part)."""
    out, _ = phantom
    dwi, _, trk = _load(out, "sub-00")
    per_voxel = _voxel_bundle_directions(trk, dwi.affine)
    voxels_of = {b: {v for v, d in per_voxel.items() if b in d} for b in range(6)}
    crossing, kissing = set(), set()
    for directions in per_voxel.values():
        bundles = sorted(directions)
        for i, a in enumerate(bundles):
            for b in bundles[i + 1:]:
                cos = abs(directions[a] @ directions[b])
                shared = len(voxels_of[a] & voxels_of[b])
                if cos < 0.5:
                    crossing.add((a, b))
                elif cos > 0.9 and shared < 0.3 * min(len(voxels_of[a]), len(voxels_of[b])):
                    kissing.add((a, b))
    assert crossing and kissing
    assert kissing - crossing  # a pair that only kisses


def test_streamlines_are_stored_in_both_orientations(phantom):
    """Every bundle has streamlines running each way, each way a fair share."""
    out, _ = phantom
    _, _, trk = _load(out, "sub-00")
    bundle = _streamline_bundles(trk)
    chord = np.array([s[-1] - s[0] for s in trk.streamlines])
    reversed_count = 0
    for b in range(6):
        c = chord[bundle == b]
        _, _, vt = np.linalg.svd(c, full_matrices=False)
        forward = c @ vt[0] > 0
        assert 0.2 <= forward.mean() <= 0.8, (b, forward.mean())
        reversed_count += min(forward.sum(), (~forward).sum())
    assert reversed_count / len(chord) >= 0.3  # minority direction, summed over bundles
