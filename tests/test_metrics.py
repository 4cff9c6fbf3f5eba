"""HD95 and NSD against an independent brute-force float64 reference on small anisotropic masks.

The reference follows the written conventions literally: surface voxels found by looking up each foreground voxel's
6 face neighbours by coordinates (a neighbour outside the array is background), distances from every surface voxel
centre to every surface voxel centre of the other mask in mm (O(n*m)), the 95th percentile by explicit linear
interpolation between order statistics, NSD as a count of surface voxels with d <= tau.
"""

from __future__ import annotations

import numpy as np
import pytest

from ssl3d_cli.metrics import bounding_box, case_metrics, conventions, hd95, nsd, surface, surface_distances, surface_metrics

FACES = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))


def ref_surface_points(mask: np.ndarray) -> np.ndarray:
    """(N, 3) integer indices of the surface voxels: foreground with a face neighbour that is background or off the array."""
    shape = np.array(mask.shape)
    points = []
    for idx in np.argwhere(mask):
        for off in FACES:
            n = idx + off
            if np.any(n < 0) or np.any(n >= shape) or not mask[tuple(n)]:
                points.append(idx)
                break
    return np.array(points, dtype=np.int64).reshape(-1, 3)


def ref_directed(src: np.ndarray, dst: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm, float64) from each src point to the nearest dst point, all pairs."""
    s = np.asarray(spacing, dtype=np.float64)
    diff = (src[:, None, :] - dst[None, :, :]).astype(np.float64) * s
    return np.sqrt((diff**2).sum(axis=-1)).min(axis=1)


def ref_p95(values: np.ndarray) -> float:
    """95th percentile, linear interpolation at rank 0.95 * (n - 1) of the sorted values."""
    v = np.sort(values)
    rank = 0.95 * (v.size - 1)
    lo = int(np.floor(rank))
    hi = min(lo + 1, v.size - 1)
    return float(v[lo] + (rank - lo) * (v[hi] - v[lo]))


def ref_metrics(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float], tau: float) -> tuple[float, float]:
    """(HD95, NSD) by brute force, with the empty-mask conventions."""
    if not a.any() and not b.any():
        return 0.0, 1.0
    if not a.any() or not b.any():
        return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(a.shape, spacing)))), 0.0
    pa, pb = ref_surface_points(a), ref_surface_points(b)
    d_ab, d_ba = ref_directed(pa, pb, spacing), ref_directed(pb, pa, spacing)
    hd = max(ref_p95(d_ab), ref_p95(d_ba))
    within = np.count_nonzero(d_ab <= tau) + np.count_nonzero(d_ba <= tau)
    return hd, within / (d_ab.size + d_ba.size)


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def random_blob(rng: np.random.Generator, shape: tuple[int, int, int], p: float) -> np.ndarray:
    """Lumpy random mask: random voxels grown once along the faces (touches the border often)."""
    seed = rng.random(shape) < p
    grown = seed.copy()
    for axis in range(3):
        grown |= np.roll(seed, 1, axis=axis) & (rng.random(shape) < 0.7)
    return grown


SPACING = (0.7, 1.3, 3.0)  # anisotropic, as (X, Y, Z)


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    shape = (9, 11, 7)
    cases = []
    a = np.zeros(shape, bool)
    a[0:4, 2:8, 0:3] = True  # touches three array faces
    b = np.zeros(shape, bool)
    b[1:5, 3:9, 0:4] = True
    cases.append(("border-touching boxes", a, b))
    full = np.ones(shape, bool)
    inner = np.zeros(shape, bool)
    inner[2:7, 2:9, 2:5] = True
    cases.append(("whole array vs inner box", full, inner))
    one = np.zeros(shape, bool)
    one[4, 5, 3] = True
    other = np.zeros(shape, bool)
    other[1, 9, 6] = True
    cases.append(("single voxels", one, other))
    cases.append(("single voxel inside a box", one, b))
    thin = np.zeros(shape, bool)
    thin[2:7, 5, 1:6] = True  # one voxel thick plate
    cases.append(("thin plate vs border box", thin, a))
    small = ellipsoid(shape, (4, 5, 3), (2.5, 3.5, 1.6))
    cases.append(("small anisotropic ellipsoid, shifted", small, np.roll(small, (1, -1, 1), axis=(0, 1, 2))))
    cases.append(("empty vs empty", np.zeros(shape, bool), np.zeros(shape, bool)))
    cases.append(("empty vs box", np.zeros(shape, bool), b))
    cases.append(("box vs empty", a, np.zeros(shape, bool)))
    rng = np.random.default_rng(7)
    for i in range(6):
        cases.append((f"random blobs {i}", random_blob(rng, shape, 0.08), random_blob(rng, shape, 0.08)))
    return cases


CASES = _cases()


@pytest.mark.parametrize("name,a,b", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("tau", [0.0, 1.3, 2.0, 4.5])
def test_hd95_and_nsd_match_brute_force(name, a, b, tau):
    want_hd, want_nsd = ref_metrics(a, b, SPACING, tau)
    got_hd, got_nsd = surface_metrics(a, b, SPACING, tau)
    assert got_hd == pytest.approx(want_hd, rel=1e-5, abs=1e-5), name
    assert got_nsd == pytest.approx(want_nsd, abs=1e-12), name
    assert hd95(b, a, SPACING) == pytest.approx(got_hd, rel=1e-6)  # symmetric
    assert nsd(b, a, SPACING, tau) == pytest.approx(got_nsd, abs=1e-12)


@pytest.mark.parametrize("seed,spacing", [(0, (1.0, 1.0, 1.0)), (1, (0.5, 0.9, 5.0)), (2, (2.5, 0.8, 0.8)), (3, (0.7, 1.3, 3.0))])
def test_random_masks_match_brute_force(seed, spacing):
    rng = np.random.default_rng(seed)
    shape = (16, 13, 10)
    a = random_blob(rng, shape, 0.03) | ellipsoid(shape, (rng.uniform(3, 12), rng.uniform(3, 9), rng.uniform(2, 7)), (3.0, 2.5, 1.5))
    b = random_blob(rng, shape, 0.03) | ellipsoid(shape, (rng.uniform(3, 12), rng.uniform(3, 9), rng.uniform(2, 7)), (2.0, 3.5, 2.5))
    for tau in (0.0, 1.0, 2.0, 3.5):
        want_hd, want_nsd = ref_metrics(a, b, spacing, tau)
        got_hd, got_nsd = surface_metrics(a, b, spacing, tau)
        assert got_hd == pytest.approx(want_hd, rel=1e-5) and got_nsd == pytest.approx(want_nsd, abs=1e-12), tau


def test_surface_is_six_connected_with_outside_as_background():
    a = np.zeros((6, 6, 6), bool)
    a[:, 1:5, 1:5] = True  # a bar through the whole first axis
    s = surface(a)
    assert s[0, 1:5, 1:5].all() and s[5, 1:5, 1:5].all()  # the faces on the array border are surface
    assert not s[1:5, 2:4, 2:4].any()  # the bar's inside
    assert s[2, 1, 1] and s[2, 1, 2]  # edges and sides
    for name, m, _ in CASES:
        got = set(map(tuple, np.argwhere(surface(m))))
        assert got == set(map(tuple, ref_surface_points(m))), name


def test_directed_distances_match_brute_force():
    a, b = CASES[0][1], CASES[0][2]
    d_ab, d_ba = surface_distances(a, b, SPACING)
    pa, pb = ref_surface_points(a), ref_surface_points(b)
    # same voxel order: the surface voxels in C order, as argwhere lists them
    np.testing.assert_allclose(d_ab, ref_directed(pa, pb, SPACING), rtol=1e-6)
    np.testing.assert_allclose(d_ba, ref_directed(pb, pa, SPACING), rtol=1e-6)


def test_embedding_in_a_larger_background_volume_changes_nothing():
    """Outside the array is background and distances are computed on the joint box: where the masks sit cannot matter.

    The old implementation (26-connected ITK contour that leaves faces on the array border out) failed this.
    """
    for name, a, b in CASES:
        if not a.any() or not b.any():
            continue
        want = surface_metrics(a, b, SPACING, 2.0)
        for offset in ((0, 0, 0), (3, 1, 5), (7, 7, 7)):
            big_a, big_b = np.zeros((30, 31, 32), bool), np.zeros((30, 31, 32), bool)
            where = tuple(slice(o, o + n) for o, n in zip(offset, a.shape))
            big_a[where], big_b[where] = a, b
            got = surface_metrics(big_a, big_b, SPACING, 2.0)
            assert got[0] == pytest.approx(want[0], rel=1e-6) and got[1] == pytest.approx(want[1], abs=1e-12), (name, offset)


def test_known_values():
    a = np.zeros((10, 10, 10), bool)
    a[2, 3, 4] = True
    b = np.zeros_like(a)
    b[5, 3, 6] = True
    want = np.hypot(3 * 0.7, 2 * 3.0)
    assert hd95(a, b, SPACING) == pytest.approx(want, rel=1e-6)
    assert nsd(a, b, SPACING, want - 0.01) == 0.0 and nsd(a, b, SPACING, want) == 1.0  # d <= tau is within
    assert nsd(a, b, SPACING, 0.0) == 0.0 and nsd(a, a, SPACING, 0.0) == 1.0
    assert hd95(np.zeros_like(a), np.zeros_like(a), SPACING) == 0.0 and nsd(np.zeros_like(a), np.zeros_like(a), SPACING) == 1.0
    assert hd95(a, np.zeros_like(a), SPACING) == pytest.approx(np.sqrt(7.0**2 + 13.0**2 + 30.0**2)) and nsd(a, np.zeros_like(a), SPACING) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        nsd(a, b, SPACING, -1.0)


def test_bounding_box():
    m = np.zeros((5, 6, 7), bool)
    assert bounding_box(m) is None
    m[1, 2, 3] = m[3, 4, 3] = True
    assert bounding_box(m) == (slice(1, 4), slice(2, 5), slice(3, 4))


def test_case_metrics_reports_nsd_beside_hd95_and_regions():
    truth = np.zeros((8, 8, 8), np.int64)
    truth[1:7, 1:7, 1:7] = 2
    truth[2:5, 2:5, 2:5] = 1
    truth[3, 3, 3] = 4
    pred = truth.copy()
    pred[pred == 4] = 1
    m = case_metrics(pred, truth, label_values=[0, 1, 2, 4], class_names=["background", "ncr", "edema", "et"], spacing_mm=SPACING,
                     regions={"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}, nsd_tolerance_mm=1.0)
    assert m["nsd_WT"] == 1.0 and m["hd95_WT"] == 0.0 and m["nsd_edema"] == 1.0
    assert m["nsd_et"] == 0.0 and m["hd95_et"] == pytest.approx(np.sqrt(5.6**2 + 10.4**2 + 24.0**2))
    assert m["nsd_ncr"] == pytest.approx(ref_metrics(pred == 1, truth == 1, SPACING, 1.0)[1])
    no_surface = case_metrics(pred, truth, label_values=[0, 1], class_names=["background", "ncr"], spacing_mm=SPACING, with_hd95=False)
    assert set(no_surface) == {"dice_ncr", "dice_mean_fg"}
    assert conventions(1.5)["nsd_tolerance_mm"] == 1.5 and "6-connected" in conventions()["surface"]


def test_evaluate_cli_reports_nsd_with_its_tolerance_and_conventions(tmp_path):
    import csv
    import json

    from typer.testing import CliRunner

    from ssl3d_cli.cli.app import app
    from ssl3d_cli.stages.evaluate import evaluate
    from tests.conftest import save_nifti

    lab = np.zeros((8, 8, 8), np.uint8)
    lab[0:4, 2:6, 2:6] = 1  # touches the array border
    shifted = np.roll(lab, 1, axis=1)
    affine = np.diag([0.7, 1.3, 3.0, 1.0])
    save_nifti(tmp_path / "labels" / "c1.nii.gz", lab, affine)
    save_nifti(tmp_path / "preds" / "c1.nii.gz", shifted, affine)
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "preds"), str(tmp_path / "labels"), "--json", "--csv", str(tmp_path / "s.csv"),
                                 "--nsd-tolerance", "1"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    want_hd, want_nsd = ref_metrics(shifted.astype(bool), lab.astype(bool), (0.7, 1.3, 3.0), 1.0)
    row = res["cases"][0]
    assert row["hd95_label1"] == pytest.approx(want_hd, rel=1e-5) and row["nsd_label1"] == pytest.approx(want_nsd)
    assert res["mean"]["nsd_label1"] == pytest.approx(want_nsd) and res["conventions"]["nsd_tolerance_mm"] == 1.0
    assert "outside the array is background" in res["conventions"]["surface"]
    table = list(csv.DictReader((tmp_path / "s.csv").read_text().splitlines()))
    assert [t["case"] for t in table] == ["c1", "mean"] and float(table[1]["nsd_label1"]) == pytest.approx(want_nsd)
    assert table[0]["nsd_tolerance_mm"] == "1.0"
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "preds"), str(tmp_path / "labels")])
    assert r.exit_code == 0 and "NSD label1" in r.stdout and "NSD at 2 mm" in r.stdout
    dice_only = evaluate(tmp_path / "preds", tmp_path / "labels", with_hd95=False)
    assert "nsd_label1" not in dice_only["mean"] and "hd95_label1" not in dice_only["mean"] and "nsd_tolerance_mm" not in dice_only["conventions"]
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "preds"), str(tmp_path / "labels"), "--nsd-tolerance", "-1"])
    assert r.exit_code != 0 and "Traceback" not in r.output
