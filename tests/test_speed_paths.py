"""The fast paths of issue 14 give the answers of the code they replaced.

References: a brute-force float64 implementation of every vote rule written here, independent of the package; and
the replaced functions themselves, frozen in ``benchmarks/_baseline.py`` (which the benchmarks time against).
Exact equality is asked wherever the new code does the same float operations (vote sums, decisions, restoring,
masks); the resample that builds the cache is compared within a stated float tolerance.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.data.nifti import load_scan
from ssl3d_cli.data.preprocessing import (
    CaseGeometry,
    fill_holes,
    foreground_mask,
    from_canonical,
    lookup_on_crop,
    paste_on_scan,
    preprocess_arrays,
    resample_image,
    restore_label,
    restore_scores,
    to_canonical,
)
from ssl3d_cli.data.synthetic import make_ct_case, make_mr_case
from ssl3d_cli.inference.pipeline import ScanVotes
from ssl3d_cli.inference.votes import UNDECIDED, VoteAccumulator, clear_winners, decide, vote_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _baseline as before  # noqa: E402

RULES = ("majority", "weighted", "weighted-probs", "borda", "union", "mean")
#: The cache image may move by this much (values are z-scores of a few units): the resample composes the blur and the
#: interpolation in float64 and applies them as float32 matrices instead of a float32 conv3d then F.interpolate. Measured
#: about 2e-6 here; torch's own float32 source-index rounding can differ by up to 4e-5 between builds.
RESAMPLE_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# brute-force float64 vote rules, voxel by voxel (the paper's definitions and the documented tie-break)

def brute_force_labels(probs: np.ndarray, rule: str, weights: list[float], union: list[int]) -> list[int]:
    """probs (N, C, V) float64 -> label per voxel."""
    n, num_classes, voxels = probs.shape
    out = []
    for v in range(voxels):
        p = probs[:, :, v]
        votes, wp_votes, borda = [0.0] * num_classes, [0.0] * num_classes, [0.0] * num_classes
        for s in range(n):
            row = list(p[s])
            votes[max(range(num_classes), key=lambda c: (row[c], -c))] += 1  # first index among equal maxima
            weighted = [row[c] * weights[c] for c in range(num_classes)]
            wp_votes[max(range(num_classes), key=lambda c: (weighted[c], -c))] += 1
            for c in range(num_classes):  # stable ascending rank: lower classes rank lower among equals
                borda[c] += sum(1 for d in range(num_classes) if row[d] < row[c] or (row[d] == row[c] and d < c))
        mean = [float(p[:, c].sum()) / n for c in range(num_classes)]
        scores = {"majority": votes, "union": votes, "weighted": [votes[c] * weights[c] for c in range(num_classes)],
                  "weighted-probs": wp_votes, "borda": borda, "mean": mean}[rule]
        top = max(scores)
        tied = [c for c in range(num_classes) if scores[c] >= top - 1e-6 * max(abs(top), 1.0)]
        label = max(tied, key=lambda c: (mean[c], -c))
        if rule == "union":
            for c in reversed(union):
                if votes[c] > 0:
                    label = c
        out.append(label)
    return out


@pytest.mark.parametrize("num_classes", [2, 3, 5, 10])
@pytest.mark.parametrize("rule", RULES)
def test_every_rule_matches_the_brute_force_reference(rule, num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    # quarter steps: sums, products with power-of-two weights and means are exact in float32, and ties are frequent
    probs = torch.randint(0, 5, (7, num_classes, 5, 4, 3), generator=gen).float() / 4
    weights = [1.0, 2.0, 0.5, 4.0, 1.0, 2.0, 0.25, 1.0, 2.0, 0.5][:num_classes]
    union = [num_classes - 1, 1] if num_classes > 2 else [1]
    expected = brute_force_labels(probs.reshape(7, num_classes, -1).double().numpy(), rule, weights, union)
    for rules in (None, (rule,)):
        for batch in (1, 3, 7):
            acc = VoteAccumulator(num_classes, weights=torch.tensor(weights), rules=rules)
            for start in range(0, 7, batch):
                acc.update(probs[start:start + batch])
            assert vote_labels(acc, rule, union).flatten().tolist() == expected, (rules, batch)


def _todays_sums(probs: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums as the accumulator computed them before (every statistic, every sample)."""
    acc = before.VoteAccumulator(probs.shape[1], weights=weights, track_entropy=True)
    acc.update(probs)
    return {"votes": acc.votes, "wp_votes": acc.wp_votes, "borda": acc.borda, "prob_sum": acc.prob_sum, "entropy_sum": acc.entropy_sum}


@pytest.mark.parametrize("num_classes", [2, 3, 4, 9, 10])
def test_sums_equal_todays_bit_for_bit(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    probs = torch.softmax(3 * torch.randn(4, num_classes, 6, 5, 4, generator=gen), 1)
    probs[:, :, 0] = probs[:, :, 0].round(decimals=1)  # exact ties between classes
    probs[:, -1, 1] = probs[:, 0, 1]
    probs[:, :, 2, 0] = 0.0  # saturated: several classes at exactly 0
    weights = torch.linspace(1.0, 2.0, num_classes)
    acc = VoteAccumulator(num_classes, weights=weights, track_entropy=True)
    acc.update(probs[:3])
    acc.update(probs[3:])
    reference = _todays_sums(probs, weights)
    for name, expected in reference.items():
        assert torch.equal(getattr(acc, name), expected), name


def test_nan_samples_count_as_before():
    probs = torch.softmax(torch.randn(3, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0)), 1)
    probs[0, 1, 0, 0, 0] = float("nan")
    probs[1, 0, 1, 0, 0] = float("nan")
    probs[2, :, 2, 0, 0] = float("nan")
    acc = VoteAccumulator(3)
    acc.update(probs)
    reference = before.VoteAccumulator(3)
    reference.update(probs)
    assert torch.equal(acc.votes, reference.votes) and torch.equal(acc.wp_votes, reference.wp_votes)
    # Borda as a stable double argsort (NaN the largest); the CPU's argsort was stable before too
    assert torch.equal(acc.borda, probs.argsort(dim=1, stable=True).argsort(dim=1).sum(0, dtype=torch.float32))
    assert torch.equal(acc.borda, reference.borda)


def test_accumulator_keeps_only_what_its_rules_read():
    probs = torch.softmax(torch.randn(2, 3, 4, 4, 4), 1)
    acc = VoteAccumulator(3, rules=("majority",))
    acc.update(probs)
    assert acc.votes is not None and acc.borda is None and acc.wp_votes is None and acc.entropy_sum is None
    assert acc.tracks("mean") and not acc.tracks("borda")
    with pytest.raises(ValueError, match="borda.*not tracked"):
        acc.scores("borda")
    acc = VoteAccumulator(3, rules=("borda",), track_entropy=True)
    acc.update(probs)
    assert acc.votes is None and acc.borda is not None and acc.entropy_sum is not None
    with pytest.raises(ValueError, match="unknown vote rule"):
        VoteAccumulator(3, rules=("plurality",))


# ----------------------------------------------------------------------------------------------------------------------
# decide, clear winners, restoring onto the scan

def _scores_with_ties(gen: torch.Generator, shape: tuple[int, ...], num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.randint(0, 4, (num_classes, *shape), generator=gen).float()  # integer votes: many exact ties
    mean = torch.randint(0, 3, (num_classes, *shape), generator=gen).float() / 4  # equal means too
    return scores, mean


@pytest.mark.parametrize("num_classes", [1, 2, 3, 6])
def test_decide_equals_the_reference_formulation(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    scores, mean = _scores_with_ties(gen, (9, 7, 5), num_classes)
    scores[:, 0, 0, 0] += 1e-7  # within the tie tolerance
    expected = before.decide(scores, mean)
    assert torch.equal(decide(scores, mean), expected)
    assert torch.equal(decide(scores, mean, dtype=torch.uint8).long(), expected)
    assert torch.equal(decide(scores, lambda: mean), expected)  # the mean computed on demand (ties here)
    known = expected.to(torch.uint8)
    known[torch.rand(expected.shape, generator=gen) < 0.5] = UNDECIDED
    assert torch.equal(decide(scores, mean, known=known), expected)
    mean_nan = mean.clone()
    mean_nan[:, 1, 1, 1] = float("nan")
    assert torch.equal(decide(scores, mean_nan), before.decide(scores, mean_nan))


def test_decide_reads_no_mean_without_ties():
    scores = torch.arange(24, dtype=torch.float32).reshape(3, 2, 4)  # distinct everywhere

    def no_mean() -> torch.Tensor:
        raise AssertionError("the mean probabilities were computed without a tie")

    assert torch.equal(decide(scores, no_mean), before.decide(scores, torch.zeros_like(scores)))


def _geometry(original: tuple[int, int, int], axcodes: tuple[str, str, str], start, stop, size) -> CaseGeometry:
    return CaseGeometry(original, np.eye(4).tolist(), axcodes, tuple(start), tuple(stop), tuple(size))


def _random_geometry(rng: np.random.Generator, size: tuple[int, int, int]) -> CaseGeometry:
    perm = rng.permutation(3)
    axcodes = tuple(("RL", "AP", "SI")[int(a)][int(rng.integers(2))] for a in perm)
    canonical = rng.integers(8, 40, 3)
    start = [int(rng.integers(0, c // 3)) for c in canonical]
    stop = [int(rng.integers(s + 2, c + 1)) for s, c in zip(start, canonical)]
    original = tuple(int(canonical[perm[i]]) for i in range(3))  # file axis i holds canonical axis perm[i]
    return _geometry(original, axcodes, start, stop, size)  # type: ignore[arg-type]


def test_restore_and_paste_equal_the_full_grid_path_for_every_orientation():
    rng = np.random.default_rng(0)
    for trial in range(24):
        size = tuple(int(s) for s in rng.integers(4, 20, 3))
        geometry = _random_geometry(rng, size)  # type: ignore[arg-type]
        scores = torch.rand(3, *size, generator=torch.Generator().manual_seed(trial))
        for background in ([1.0, 0.0, 0.0], 0.25):
            assert np.array_equal(restore_scores(scores, geometry, background=background),
                                  before.restore_scores(scores, geometry, background=background)), (trial, geometry)
        label = torch.randint(0, 3, size, generator=torch.Generator().manual_seed(trial)).numpy()
        assert np.array_equal(restore_label(label, geometry, 3), before.restore_label(label, geometry, 3))
        full = np.zeros(geometry.canonical_shape, dtype=np.int64)
        crop = np.arange(int(np.prod(geometry.crop_shape))).reshape(geometry.crop_shape)
        full[tuple(slice(a, b) for a, b in zip(geometry.crop_start, geometry.crop_stop))] = crop
        assert np.array_equal(paste_on_scan(crop, geometry, 0), from_canonical(full, geometry.axcodes))


def _smooth_votes(gen: torch.Generator, size: tuple[int, int, int], num_classes: int, samples: int) -> torch.Tensor:
    """(N, C, *size) probabilities shaped like a segmentation: smooth class regions, noisy boundaries."""
    coarse = torch.randn(1, num_classes, *(max(2, s // 4) for s in size), generator=gen)
    base = F.interpolate(coarse, size=size, mode="trilinear", align_corners=False) * 8
    return torch.softmax(base + torch.randn(samples, num_classes, *size, generator=gen), 1)


def test_clear_winners_never_contradict_the_resampled_decision():
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(12):
        gen = torch.Generator().manual_seed(trial)
        size = tuple(int(s) for s in rng.integers(6, 18, 3))
        geometry = _random_geometry(rng, size)  # type: ignore[arg-type]
        acc = VoteAccumulator(3, weights=torch.tensor([1.0, 2.0, 2.0]))
        acc.update(_smooth_votes(gen, size, 3, 10))  # type: ignore[arg-type]
        for rule in ("majority", "weighted", "borda", "mean"):
            coarse = acc.scores(rule)
            known = lookup_on_crop(clear_winners(coarse), geometry)
            crop = F.interpolate(coarse[None], size=geometry.crop_shape, mode="trilinear", align_corners=False)[0]
            mean = F.interpolate(acc.mean_prob()[None], size=geometry.crop_shape, mode="trilinear", align_corners=False)[0]
            truth = before.decide(crop, mean)
            clear = known != UNDECIDED
            assert torch.equal(known[clear].long(), truth[clear]), (trial, rule)
            checked += int(clear.sum())
    assert checked > 1000  # the shortcut does take most voxels


@pytest.mark.parametrize("num_classes", [2, 3])
def test_scan_labels_and_probabilities_equal_todays(num_classes):
    rng = np.random.default_rng(num_classes)
    for trial in range(6):
        gen = torch.Generator().manual_seed(trial)
        size = tuple(int(s) for s in rng.integers(8, 20, 3))
        geometry = _random_geometry(rng, size)  # type: ignore[arg-type]
        probs = _smooth_votes(gen, size, num_classes, 6)  # type: ignore[arg-type]
        weights = torch.tensor([1.0] + [2.0] * (num_classes - 1))
        union = [num_classes - 1]
        reference = before.VoteAccumulator(num_classes, weights=weights)
        reference.update(probs[:4])  # the same batches: float sums depend on their order
        reference.update(probs[4:])
        for rule in RULES:
            acc = VoteAccumulator(num_classes, weights=weights, rules=(rule,))
            acc.update(probs[:4])
            acc.update(probs[4:])
            votes = ScanVotes(acc, geometry)
            assert np.array_equal(votes.labels(rule, union), before.scan_labels(reference, geometry, rule, union)), (trial, rule)
        assert np.array_equal(votes.mean_prob().numpy(),
                              before.restore_scores(reference.mean_prob(), geometry, background=[1.0] + [0.0] * (num_classes - 1)))
        single = VoteAccumulator(num_classes, rules=("borda",))
        single.update(probs[:1])
        reference_single = before.VoteAccumulator(num_classes)
        reference_single.update(probs[:1])
        assert np.array_equal(ScanVotes(single, geometry).labels("borda"), before.scan_labels(reference_single, geometry, "borda"))


def test_scan_labels_equal_todays_on_a_ct_sized_case():
    """A synthetic CT at a realistic crop (upsampling along z, shrinking in-plane), votes shaped by its own label."""
    case = make_ct_case(np.random.default_rng(3), (200, 180, 40))
    pre = preprocess_arrays(case.image[None].astype(np.float32), case.affine, modality="ct", config=PreprocessConfig(size=(48, 48, 48)),
                            label=case.label)
    onehot = F.one_hot(torch.from_numpy(pre.label).long(), 3).permute(3, 0, 1, 2).float()[None]
    smooth = F.avg_pool3d(onehot, 3, 1, 1) * 6
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(smooth + torch.randn(8, 3, 48, 48, 48, generator=gen), 1)
    reference = before.VoteAccumulator(3)
    reference.update(probs)
    for rule in ("majority", "borda", "mean", "union"):
        acc = VoteAccumulator(3, rules=(rule,))
        acc.update(probs)
        got = ScanVotes(acc, pre.geometry).labels(rule, [2])
        assert got.shape == case.label.shape
        assert np.array_equal(got, before.scan_labels(reference, pre.geometry, rule, [2])), rule


# ----------------------------------------------------------------------------------------------------------------------
# preprocessing

def _ct_with_holes(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    case = make_ct_case(np.random.default_rng(seed), shape)
    image = case.image.astype(np.float32)[None]
    x, y, z = (s // 2 for s in image.shape[1:])
    image[0, x - 3:x + 3, y - 3:y + 3, z - 2:z + 2] = -1000.0  # an enclosed air pocket: a hole
    image[0, x - 2:x + 2, y - 2:y + 2, 0:3] = -1000.0  # air reaching the first slice: not a hole (touches the border)
    image[0, 1:3, 1:3, 1:3] = 200.0  # a speck outside the body: not the largest component
    ring = np.zeros(image.shape[1:], bool)  # a closed shell in the corner: a second component with its own hole
    ring[-8:-1, -8:-1, -6:-1] = True
    ring[-6:-3, -6:-3, -4:-3] = False
    image[0][ring & (image[0] < -500)] = 300.0
    return image


def test_foreground_mask_equals_sitk_fillhole_on_the_whole_volume():
    for seed, shape in [(0, (64, 60, 24)), (1, (50, 70, 30)), (2, (40, 40, 40))]:
        image = _ct_with_holes(seed, shape)
        expected = before.foreground_mask(image, "ct")
        got = foreground_mask(image, "ct")
        assert np.array_equal(got, expected), seed
        assert got.sum() > 0
    empty = np.full((1, 6, 6, 6), -1000.0, np.float32)
    assert np.array_equal(foreground_mask(empty, "ct"), before.foreground_mask(empty, "ct"))
    mr = make_mr_case(np.random.default_rng(0), (24, 28, 24)).image.transpose(3, 0, 1, 2).astype(np.float32)
    assert np.array_equal(foreground_mask(mr, "mr"), before.foreground_mask(mr, "mr"))


def test_fill_holes_equals_binary_fillhole():
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((12, 14, 10)) < 0.6  # many small holes, some touching the border
        expected = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(mask.astype(np.uint8)))).astype(bool)
        assert np.array_equal(fill_holes(mask), expected)


def test_real_ct_mask_and_cache_unchanged(real_dir):
    scan = load_scan([real_dir / "example_ct_sm.nii.gz"])
    canon = to_canonical(scan.data, scan.affine)
    assert np.array_equal(foreground_mask(canon, "ct"), before.foreground_mask(canon, "ct"))
    _assert_same_cache(scan.data, scan.affine, "ct", PreprocessConfig(size=(64, 64, 64)))


def _assert_same_cache(image: np.ndarray, affine: np.ndarray, modality: str, config: PreprocessConfig, label=None) -> None:
    new = preprocess_arrays(image, affine, modality=modality, config=config, label=label)
    old = before.preprocess_arrays(image, affine, modality=modality, config=config, label=label)
    assert new.geometry == old.geometry and new.intensity == old.intensity
    np.testing.assert_allclose(new.image, old.image, rtol=0, atol=RESAMPLE_ATOL)
    if label is not None:
        assert np.array_equal(new.label, old.label)
    # the float16 cache: equal, or one float16 step apart where the float32 value sat on a rounding boundary
    a, b = new.image.astype(np.float16), old.image.astype(np.float16)
    differ = a != b
    assert differ.mean() < 1e-3
    assert np.all(np.abs(a[differ].astype(np.float32) - b[differ].astype(np.float32)) <= np.spacing(np.abs(b[differ])) * 1.01)


@pytest.mark.parametrize("size", [(48, 48, 48), (32, 40, 64), (20, 20, 20)])
def test_preprocessed_cache_within_float_tolerance(size):
    case = make_ct_case(np.random.default_rng(5), (150, 140, 36))
    _assert_same_cache(case.image[None].astype(np.float32), case.affine, "ct", PreprocessConfig(size=size), label=case.label)
    mr = make_mr_case(np.random.default_rng(5), (40, 44, 36))
    _assert_same_cache(mr.image.transpose(3, 0, 1, 2).astype(np.float32), mr.affine, "mr", PreprocessConfig(size=size), label=mr.label)


def test_resample_image_equals_blur_then_trilinear():
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 1.5, (2, 41, 30, 17)).astype(np.float32)
    for size in itertools.product((9, 17, 30, 45), (12, 30), (17, 25)):
        got = resample_image(volume, size)
        expected = before.resample_image(volume, size)
        assert got.shape == expected.shape == (2, *size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=RESAMPLE_ATOL, err_msg=str(size))


def test_nifti_round_trip_of_restored_labels_keeps_geometry(tmp_path):
    """restore_label writes into the file's voxel order exactly as before (orientation codes LPS, permuted)."""
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 0], affine[2, 1], affine[3, 3] = -2.0, 1.0, -1.5, 1.0
    image = np.zeros((1, 12, 10, 8), np.float32)
    image[0, 3:9, 2:8, 1:7] = 5
    case = preprocess_arrays(image, affine, modality="mr", config=PreprocessConfig(size=(16, 16, 16)))
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:12, 4:12, 4:12] = 1
    restored = restore_label(label, case.geometry, 2)
    assert restored.shape == (12, 10, 8) and restored.dtype == np.int64
    assert nib.aff2axcodes(affine) == case.geometry.axcodes
    assert restored.sum() > 0 and restored[image[0] == 0].sum() == 0
