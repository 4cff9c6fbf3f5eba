"""Sliding-window MC-dropout engine: window placement, Gaussian weights, fusion against a float64 brute force."""

from __future__ import annotations

import math

import pytest
import torch

from ssl3d_cli.config import ModelConfig
from ssl3d_cli.inference.mc import sample_probabilities
from ssl3d_cli.inference.sliding_window import (
    STATISTICS,
    SlidingWindowAccumulator,
    entropy_maps,
    gaussian_importance,
    nearest_centre_bounds,
    pad_to_patch,
    sliding_labels,
    sliding_window_votes,
    window_grid,
    window_seed,
    window_starts,
)
from ssl3d_cli.inference.uncertainty import TargetStore
from ssl3d_cli.inference.votes import RULE_STATISTIC, VoteAccumulator, decide, vote_labels
from ssl3d_cli.models.unet import UNet

WEIGHTS = torch.tensor([1.0, 2.0, 1.5])
PATCH = (16, 16, 16)
LOWER = torch.arange(3).view(1, 3) < torch.arange(3).view(3, 1)  # [c, c']: c' < c


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: thread start-up costs more than the work (10x slower with 2 threads on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(dropout: float, seed: int = 0) -> UNet:
    """A tiny 3-class U-Net whose head is scaled so classes are confidently and variously predicted."""
    torch.manual_seed(seed)
    model = UNet(ModelConfig(widths=(4, 8), dropout_encoder=dropout, dropout_decoder=dropout), 3)
    with torch.no_grad():
        model.head.weight.mul_(6.0)
    return model.eval()


def make_image(shape: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool3d(torch.randn(1, 1, *shape, generator=g), 3, stride=1, padding=1)
    return smooth * 3.0


# ---------------------------------------------------------------- window placement


@pytest.mark.parametrize(("size", "patch", "overlap", "expected"), [
    (16, 16, 0.5, [0]),
    (24, 16, 0.5, [0, 8]),
    (40, 16, 0.5, [0, 8, 16, 24]),
    (41, 16, 0.5, [0, 6, 13, 19, 25]),  # ceil(25 / 8) + 1 = 5 windows, 6.25 apart, rounded half up
    (32, 16, 0.0, [0, 16]),
    (33, 16, 0.0, [0, 9, 17]),
    (512, 64, 0.5, [round(32 * i) for i in range(15)]),
    (100, 64, 0.5, [0, 18, 36]),
])
def test_window_starts_expected(size, patch, overlap, expected):
    assert window_starts(size, patch, overlap) == expected


@pytest.mark.parametrize("size", range(16, 60))
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_window_starts_cover_every_voxel(size, overlap):
    patch = 16
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] + patch == size
    assert starts == sorted(set(starts))  # distinct, increasing
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + patch] = True
    assert bool(covered.all())
    step = max(1, math.floor(patch * (1 - overlap) + 0.5))
    assert len(starts) == math.ceil((size - patch) / step) + 1
    assert max([b - a for a, b in zip(starts, starts[1:])] or [0]) <= step  # neighbours overlap by at least patch - step


def test_window_starts_rejects_bad_arguments():
    for args in [(8, 16, 0.5), (16, 16, 1.0), (16, 16, -0.1), (16, 0, 0.5)]:
        with pytest.raises(ValueError):
            window_starts(*args)


def test_window_grid_counts_and_padding():
    starts = window_grid((20, 24, 40), PATCH)
    assert len(starts) == 2 * 2 * 4 and starts[0] == (0, 0, 0) and starts[-1] == (4, 8, 24)
    padded = window_grid((10, 24, 5), PATCH)  # axes 0 and 2 shorter than the patch: one window there
    assert [s[0] for s in padded] == [0, 0] and [s[2] for s in padded] == [0, 0] and [s[1] for s in padded] == [0, 8]


def test_pad_to_patch_centres_and_crops_back():
    image = make_image((10, 24, 5))
    padded, crop = pad_to_patch(image, PATCH)
    assert padded.shape == (1, 1, 16, 24, 16)
    assert crop == (slice(3, 13), slice(0, 24), slice(5, 10))
    assert torch.equal(padded[(slice(None), slice(None), *crop)], image)
    outside = torch.ones(padded.shape[2:], dtype=torch.bool)
    outside[crop] = False
    assert bool((padded[0, 0][outside] == image.min()).all())  # default: the channel's minimum
    assert bool((pad_to_patch(image, PATCH, 0.0)[0][0, 0][outside] == 0).all())
    same, crop = pad_to_patch(make_image((16, 20, 16)), PATCH)
    assert same.shape[2:] == (16, 20, 16) and crop == (slice(0, 16), slice(0, 20), slice(0, 16))


def test_nearest_centre_bounds_partition_inside_windows():
    for size in range(16, 60):
        starts = window_starts(size, 16, 0.5)
        bounds = nearest_centre_bounds(starts, 16, size)
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        for s, (lo, hi) in zip(starts, bounds):
            assert s <= lo < hi <= s + 16
            centre = s + 7.5
            for x in range(lo, hi):  # no other centre strictly nearer
                assert all(abs(x - centre) <= abs(x - (t + 7.5)) for t in starts)


# ---------------------------------------------------------------- Gaussian importance


@pytest.mark.parametrize("patch", [(16, 16, 16), (8, 12, 20), (7, 9, 16)])
def test_gaussian_importance_symmetric_max_one_no_zeros(patch):
    g = gaussian_importance(patch)
    assert g.shape == patch and g.dtype == torch.float32
    assert float(g.max()) == 1.0 and float(g.min()) > 0
    for axis in range(3):
        assert torch.equal(g, g.flip(axis))
    x = torch.arange(patch[0], dtype=torch.float64)  # one profile against the formula: sigma = p / 8, centre (p - 1) / 2
    profile = torch.exp(-((x - (patch[0] - 1) / 2) ** 2) / (2 * (patch[0] / 8) ** 2))
    c1, c2 = (patch[1] - 1) // 2, (patch[2] - 1) // 2
    assert torch.allclose(g[:, c1, c2].double() / g[:, c1, c2].double().max(), profile / profile.max(), rtol=1e-6)


def test_gaussian_importance_tiny_sigma_has_no_zeros():
    g = gaussian_importance((16, 16, 16), sigma_scale=1 / 200)
    assert float(g.min()) > 0 and float(g.max()) == 1.0


# ---------------------------------------------------------------- fusion


def whole_volume(model, image, n, seed, rules=None, track_entropy=True, target=None):
    acc = VoteAccumulator(3, weights=WEIGHTS, rules=rules, track_entropy=track_entropy)
    store = TargetStore(target, max(n, 1)) if target else None

    def consume(p):
        acc.update(p)
        if store is not None:
            store(p)

    sample_probabilities(model, image, mc_samples=n, mc_batch=2, seed=seed, consume=consume)
    return acc, store


@pytest.mark.parametrize("n", [1, 3])
def test_one_window_equals_the_whole_volume_path(n):
    model, image = make_model(0.3), make_image(PATCH)
    ref, store = whole_volume(model, image, n, seed=7, target=[1, 2])
    res = sliding_window_votes(model, image, patch=PATCH, mc_samples=n, mc_batch=2, seed=7, vote_weights=WEIGHTS,
                               track_entropy=True, target=[1, 2], percentiles=[5, 50, 95])
    assert res.windows == 1 and res.votes.n == ref.n
    for name in STATISTICS:
        assert torch.equal(getattr(res.votes, name), getattr(ref, name)), name
    for rule in RULE_STATISTIC:
        assert torch.equal(vote_labels(res.votes, rule, [2]), vote_labels(ref, rule, [2])), rule
    assert torch.equal(res.percentiles, store.percentiles([5, 50, 95])) and torch.equal(res.std, store.std())


def reference_fusion(model, image, n, seed, overlap=0.5):
    """Float64 brute force: every window's statistics by hand from its samples, a dense weight volume, F / W."""
    shape = image.shape[2:]
    padded, crop = pad_to_patch(image, PATCH)
    g = gaussian_importance(PATCH).double()
    grid = padded.shape[2:]
    weight = torch.zeros(grid, dtype=torch.float64)
    sums = {"votes": torch.zeros(3, *grid, dtype=torch.float64), "wp_votes": torch.zeros(3, *grid, dtype=torch.float64),
            "borda": torch.zeros(3, *grid, dtype=torch.float64), "prob_sum": torch.zeros(3, *grid, dtype=torch.float64),
            "entropy_sum": torch.zeros(grid, dtype=torch.float64)}
    for k, start in enumerate(window_grid(shape, PATCH, overlap)):
        box = tuple(slice(s, s + p) for s, p in zip(start, PATCH))
        batches = []
        sample_probabilities(model, padded[(slice(None), slice(None), *box)], mc_samples=n, mc_batch=2,
                             seed=window_seed(seed, k), consume=batches.append)
        p = torch.cat(batches).double()  # (N, C, pd, ph, pw)
        one_hot = torch.nn.functional.one_hot(p.argmax(1), 3).permute(0, 4, 1, 2, 3).sum(0)
        wp = torch.nn.functional.one_hot((p * WEIGHTS.double().view(1, 3, 1, 1, 1)).argmax(1), 3).permute(0, 4, 1, 2, 3).sum(0)
        # Borda points by definition: class c gets one per class c' below it (p_c' < p_c, or equal with c' < c)
        below = (p[:, None] < p[:, :, None]) | ((p[:, None] == p[:, :, None]) & LOWER.view(1, 3, 3, 1, 1, 1))
        stats = {"votes": one_hot, "wp_votes": wp, "borda": below.sum(2).sum(0),
                 "prob_sum": p.sum(0), "entropy_sum": -(p * p.clamp_min(1e-12).log()).sum(1).sum(0)}
        weight[box] += g
        for name, s in stats.items():
            sums[name][(..., *box)] += g * s
    return {name: (s / weight)[(..., *crop)] for name, s in sums.items()}


@pytest.mark.parametrize(("dropout", "n", "shape"), [(0.0, 1, (20, 24, 32)), (0.3, 3, (16, 24, 40)), (0.3, 2, (10, 20, 17))])
def test_fusion_matches_float64_brute_force(dropout, n, shape):
    """Tolerance: float32 accumulation of normalised shares vs float64 F / W, relative 1e-5 (+ 1e-5 absolute)."""
    model, image = make_model(dropout), make_image(shape)
    ref = reference_fusion(model, image, n, seed=3)
    res = sliding_window_votes(model, image, patch=PATCH, mc_samples=n, mc_batch=2, seed=3, vote_weights=WEIGHTS, track_entropy=True)
    assert res.windows == len(window_grid(shape, PATCH))
    for name in STATISTICS:
        got = getattr(res.votes, name)
        assert got.shape == ref[name].shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref[name], rtol=1e-5, atol=1e-5, msg=name)
    for rule in ("majority", "borda", "weighted-probs"):  # labels agree wherever the reference's top two scores differ clearly
        scores = ref[RULE_STATISTIC[rule]] if n > 1 else ref["prob_sum"]  # one pass: every rule is the mean's arg-max
        top2 = scores.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-4
        want = decide(scores, ref["prob_sum"]) if n > 1 else ref["prob_sum"].argmax(0)
        got = sliding_labels(res.votes, rule).long()
        assert torch.equal(got[clear], want[clear]), rule
        assert float(clear.float().mean()) > 0.5


def test_single_window_voxels_are_exact_copies():
    """A voxel covered by one window holds that window's statistic bit for bit (share w / w == 1)."""
    model, image = make_model(0.3), make_image((16, 16, 40))
    fused = SlidingWindowAccumulator((16, 16, 40), PATCH)
    accs = []
    for k, start in enumerate(fused.starts):
        acc = VoteAccumulator(3, track_entropy=True)
        box = (slice(None), slice(None), *[slice(s, s + p) for s, p in zip(start, PATCH)])
        sample_probabilities(model, image[box], mc_samples=2, seed=window_seed(0, k), consume=acc.update)
        fused.add(start, acc)
        accs.append(acc)
    out = fused.result()
    # along the last axis windows start at 0, 8, 16, 24: voxels 0..7 are covered by window 0 alone
    for name in STATISTICS:
        assert torch.equal(getattr(out, name)[..., :8], getattr(accs[0], name)[..., :8]), name
        assert torch.equal(getattr(out, name)[..., 32:], getattr(accs[-1], name)[..., 8:]), name


def test_windows_sample_independently_and_reproducibly():
    model, image = make_model(0.3), make_image((16, 16, 24))
    a = sliding_window_votes(model, image, patch=PATCH, mc_samples=2, seed=5)
    b = sliding_window_votes(model, image, patch=PATCH, mc_samples=2, seed=5)
    c = sliding_window_votes(model, image, patch=PATCH, mc_samples=2, seed=6)
    assert torch.equal(a.votes.prob_sum, b.votes.prob_sum) and not torch.equal(a.votes.prob_sum, c.votes.prob_sum)
    assert window_seed(5, 0) == 5 and len({window_seed(5, k) for k in range(1000)}) == 1000


def test_memory_is_independent_of_n():
    """The accumulator holds the same fixed-size tensors whatever N: running sums, the weight sum, fused maps."""
    model, image = make_model(0.3), make_image((20, 16, 24))

    def held(n):
        fused = SlidingWindowAccumulator((20, 16, 24), PATCH, percentiles=[50])
        for k, start in enumerate(fused.starts):
            acc = VoteAccumulator(3, rules=("majority", "borda"), track_entropy=True)
            store = TargetStore([1], n)
            box = (slice(None), slice(None), *[slice(s, s + p) for s, p in zip(start, PATCH)])
            padded = pad_to_patch(image, PATCH)[0]

            def consume(p, acc=acc, store=store):
                acc.update(p)
                store(p)

            sample_probabilities(model, padded[box], mc_samples=n, mc_batch=2, seed=window_seed(0, k), consume=consume)
            fused.add(start, acc, store)
        tensors = {k: v for k, v in vars(fused).items() if isinstance(v, torch.Tensor)}
        tensors.update({f"sums.{k}": v for k, v in fused.sums.items()})
        return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, fused

    small, fused2 = held(2)
    large, fused7 = held(7)
    assert small == large
    assert fused2.n == 2 and fused7.n == 7
    assert set(fused7.sums) == {"votes", "borda", "prob_sum", "entropy_sum"}  # only the asked rules' sums (+ prob_sum)
    assert fused7.template.prob_sum is None  # the first window's sums are not kept
    grid = fused7.grid
    assert all(v.shape[-3:] == grid for v in fused7.sums.values())
    assert not any(isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor) for v in vars(fused7).values())


@pytest.mark.parametrize("n", [1, 3])
def test_every_rule_runs_and_deterministic_rules_agree(n):
    model, image = make_model(0.3 if n > 1 else 0.0), make_image((20, 24, 18))
    res = sliding_window_votes(model, image, patch=PATCH, mc_samples=n, vote_weights=WEIGHTS, track_entropy=True)
    mean_argmax = res.votes.mean_prob().argmax(0)
    for rule in RULE_STATISTIC:
        labels = sliding_labels(res.votes, rule, [2])
        assert labels.shape == (20, 24, 18) and labels.dtype == torch.uint8
        if n == 1:  # one deterministic pass: every rule is the arg-max of the fused mean probability
            assert torch.equal(labels.long(), mean_argmax), rule
    h, mi = entropy_maps(res.votes)
    assert h.shape == mi.shape == (20, 24, 18) and float(mi.min()) >= 0 and float(h.max()) <= math.log(3) + 1e-5


def test_no_dropout_samples_agree_with_mean_argmax_on_single_window_voxels():
    """N identical samples (rate 0): within one window every rule is that window's arg-max. Where windows overlap the
    fused votes mix the windows' decisions, which may differ from the arg-max of the fused probabilities."""
    model, image = make_model(0.0), make_image((16, 16, 40))
    res = sliding_window_votes(model, image, patch=PATCH, mc_samples=3, dropout_encoder=0.0, vote_weights=torch.ones(3))
    single = slice(0, 8)
    mean_argmax = res.votes.mean_prob().argmax(0)[..., single]
    for rule in RULE_STATISTIC:
        assert torch.equal(sliding_labels(res.votes, rule, [2]).long()[..., single], mean_argmax), rule


@pytest.mark.parametrize("fusion", ["nearest", "gaussian"])
def test_percentile_fusion(fusion):
    model, image = make_model(0.3), make_image((16, 16, 40))
    qs = [10, 50, 90]
    res = sliding_window_votes(model, image, patch=PATCH, mc_samples=4, target=[1, 2], percentiles=qs, percentile_fusion=fusion)
    assert res.percentiles.shape == (3, 16, 16, 40) and res.std.shape == (16, 16, 40)
    assert bool((res.percentiles[0] <= res.percentiles[1] + 1e-6).all() and (res.percentiles[1] <= res.percentiles[2] + 1e-6).all())
    # reference per window, by hand
    starts = window_grid((16, 16, 40), PATCH)
    maps = []
    for k, start in enumerate(starts):
        store = TargetStore([1, 2], 4)
        sample_probabilities(model, image[..., start[2]:start[2] + 16], mc_samples=4, seed=window_seed(0, k), consume=store)
        maps.append(torch.cat([store.percentiles(qs), store.std()[None]]))
    got = torch.cat([res.percentiles, res.std[None]])
    torch.testing.assert_close(got[..., :8], maps[0][..., :8], rtol=0, atol=0)  # window 0 alone there: exact either way
    if fusion == "nearest":  # centres at 7.5, 15.5, 23.5, 31.5: owners of x are [0..11], [12..19], [20..27], [28..39]
        for k, (lo, hi) in enumerate([(0, 12), (12, 20), (20, 28), (28, 40)]):
            s = starts[k][2]
            torch.testing.assert_close(got[..., lo:hi], maps[k][..., lo - s:hi - s], rtol=0, atol=0)
    else:
        g = gaussian_importance(PATCH).double()
        num = torch.zeros(4, 16, 16, 40, dtype=torch.float64)
        den = torch.zeros(16, 16, 40, dtype=torch.float64)
        for start, m in zip(starts, maps):
            num[..., start[2]:start[2] + 16] += g * m.double()
            den[..., start[2]:start[2] + 16] += g
        torch.testing.assert_close(got.double(), num / den, rtol=1e-5, atol=1e-6)


def test_errors():
    model, image = make_model(0.3), make_image(PATCH)
    with pytest.raises(ValueError, match="divisible"):
        sliding_window_votes(model, image, patch=(15, 16, 16), mc_samples=2)
    with pytest.raises(ValueError, match="target"):
        sliding_window_votes(model, image, patch=PATCH, mc_samples=2, percentiles=[50])
    fused = SlidingWindowAccumulator(PATCH, PATCH)
    with pytest.raises(ValueError, match="windows added"):
        fused.result()
    with pytest.raises(ValueError):
        SlidingWindowAccumulator(PATCH, PATCH, percentile_fusion="median")
