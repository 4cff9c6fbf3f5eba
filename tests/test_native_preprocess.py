"""Native-resolution preprocessing (issue 15, first part): crops resampled to a target spacing, each at its own size,
with the foundation's exact inverse back to the scan's grid; checked on the real RAS, LPS and DICOM scans."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ssl3d_cli.cli.app import app
from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.data.nifti import load_label, load_scan
from ssl3d_cli.data.preprocessing import file_box, map_labels, preprocess_arrays, restore_label, restore_scores
from ssl3d_cli.data.spacing import canonical_spacing, native_size, target_spacing

runner = CliRunner()
PAIRS = [("example_ct_sm.nii.gz", "example_seg.nii.gz", "ct"), ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "mr")]


def _case(real_dir: Path, image: str, label: str):
    scan = load_scan([real_dir / image])
    raw = load_label(real_dir / label, shape=scan.spatial_shape, affine=scan.affine, image_path=real_dir / image)
    values = sorted(int(v) for v in np.unique(raw))
    return scan, map_labels(raw, values, label), values


@pytest.mark.parametrize("image,label,modality", PAIRS)
def test_at_the_scans_own_spacing_the_cache_grid_is_the_crop_and_restores_exactly(real_dir, image, label, modality):
    """Target = the scan's spacing: the cache grid is the crop box voxel for voxel, so restoring the cached label gives
    the scan's label inside the box exactly (any flip, swap or offset in the inverse would break this)."""
    scan, classes, values = _case(real_dir, image, label)
    own = canonical_spacing(scan.affine)
    case = preprocess_arrays(scan.data, scan.affine, modality=modality, config=PreprocessConfig(spacing=own), label=classes)
    assert tuple(case.geometry.size) == tuple(case.geometry.crop_shape)
    assert case.image.shape[1:] == case.label.shape == tuple(case.geometry.crop_shape)
    restored = restore_label(case.label, case.geometry, num_classes=len(values))
    box = file_box(case.geometry)
    assert restored.shape == scan.spatial_shape
    assert np.array_equal(restored[box], classes[box])
    outside = np.ones(scan.spatial_shape, bool)
    outside[box] = False
    assert not restored[outside].any()  # class 0 outside the crop box


@pytest.mark.parametrize("image,label,modality", PAIRS)
def test_a_coarser_target_keeps_the_extent_and_restores_onto_the_scan(real_dir, image, label, modality):
    scan, classes, values = _case(real_dir, image, label)
    own = canonical_spacing(scan.affine)
    target = tuple(2.0 * s for s in own)
    case = preprocess_arrays(scan.data, scan.affine, modality=modality, config=PreprocessConfig(spacing=target), label=classes)
    assert tuple(case.geometry.size) == native_size(case.geometry.crop_shape, own, target)
    restored = restore_label(case.label, case.geometry, num_classes=len(values))
    assert restored.shape == scan.spatial_shape
    big = [v for v in range(1, len(values)) if (classes == v).sum() > 5000]  # organs large enough to survive 2x down and up
    assert big
    for v in big:
        a, b = classes == v, restored == v
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.75, (v, values[v])
    scores = restore_scores(np.stack([case.label == v for v in range(len(values))]).astype(np.float32), case.geometry)
    assert scores.shape == (len(values), *scan.spatial_shape)


def test_dicom_series_native_grid(real_dir):
    scan = load_scan([real_dir / "example_ct_dicom"])
    own = canonical_spacing(scan.affine)
    assert own == pytest.approx((0.977, 0.977, 2.0), abs=1e-3)
    case = preprocess_arrays(scan.data, scan.affine, modality="ct", config=PreprocessConfig(spacing=(1.5, 1.5, 2.0)))
    assert tuple(case.geometry.size) == native_size(case.geometry.crop_shape, own, (1.5, 1.5, 2.0))
    assert case.geometry.size[2] == case.geometry.crop_shape[2]  # the slice axis already at 2 mm
    assert restore_scores(np.zeros((1, *case.geometry.size), np.float32), case.geometry).shape == (1, *scan.spatial_shape)


def _anisotropic_dataset(root: Path) -> Path:
    """A plain folder of three CT-like scans with different in-plane spacings and slice thicknesses."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (xy, z) in enumerate(((0.7, 2.5), (0.8, 5.0), (0.9, 5.0))):
        data = np.full((40, 36, 12), -1000, np.int16)
        data[8:32, 8:28, 2:10] = rng.integers(-100, 200, size=(24, 20, 8))
        nib.save(nib.Nifti1Image(data, np.diag([xy, xy, z, 1.0])), str(root / f"case{i}.nii.gz"))
    return root


def test_preprocess_cli_native_uses_the_dataset_target_spacing(tmp_path):
    data = _anisotropic_dataset(tmp_path / "scans")
    r = runner.invoke(app, ["preprocess", str(data), "--resolution", "native", "--cache-dir", str(tmp_path / "c"), "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    expected = target_spacing([(0.7, 0.7, 2.5), (0.8, 0.8, 5.0), (0.9, 0.9, 5.0)], [(40, 36, 12)] * 3)
    assert result["spacing_mm"] == pytest.approx(expected)
    cache = Path(result["cache_dir"])
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["settings"]["spacing"] == pytest.approx(list(expected))
    sizes = {json.loads(p.read_text())["geometry"]["size"][0] for p in (cache / "cases").glob("*.json")}
    assert len(sizes) > 1  # each case at its own size

    r = runner.invoke(app, ["pretrain", str(cache), "--region-size", "30,30,30", "--epochs", "1", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 2 and "--region-size 30,30,30: three sides, each a multiple of 32" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["preprocess", str(data), "--spacing", "1,1,1", "--no-progress"])
    assert r.exit_code == 2 and "--spacing 1,1,1: only with --resolution native" in r.output
    r = runner.invoke(app, ["preprocess", str(data), "--resolution", "native", "--spacing", "1,1", "--no-progress"])
    assert r.exit_code == 2 and "--spacing '1,1': give three spacings" in r.output


def test_fixed_grid_settings_are_unchanged():
    """The paper's recipe keeps its settings dict (and so every existing cache key and model record)."""
    assert "spacing" not in PreprocessConfig().to_dict()
    assert PreprocessConfig().hash() == "5f31c4b093a7"


@pytest.mark.parametrize("command", ["preprocess", "pretrain", "finetune"])
def test_conflicting_grid_options_are_refused(command, tmp_path):
    data = _anisotropic_dataset(tmp_path / "scans")
    r = runner.invoke(app, [command, str(data), "--resolution", "native", "--size", "64", "--no-progress"])
    assert r.exit_code == 2 and "--size 64 with --resolution native" in r.output
    r = runner.invoke(app, [command, str(data), "--resolution", "32", "--size", "64", "--no-progress"])
    assert r.exit_code == 2 and "--resolution 32 and --size 64: two grid sizes" in r.output
