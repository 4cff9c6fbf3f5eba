import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ssl3d_cli.augment.segmentation import augment_pair
from ssl3d_cli.augment.simclr import (
    PLANES,
    augment_view,
    colour_apply,
    cutout,
    draw_ops,
    gaussian_blur,
    rotate90,
    rotate90_grid,
    rotate_arbitrary,
    sobel_magnitude,
    split_into_patches,
)
from ssl3d_cli.config import DEFAULT_SIMCLR_AUGMENTATIONS

ALL = ("rotate", "colour", "identity", "noise", "blur", "sobel", "cutout")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_split_into_patches_non_overlapping_and_volume_major():
    v = torch.arange(2 * 1 * 4 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4, 4)
    p = split_into_patches(v, 2)
    assert p.shape == (16, 1, 2, 2, 2)
    assert torch.equal(p[0], v[0, :, :2, :2, :2]) and torch.equal(p[7], v[0, :, 2:, 2:, 2:])
    assert torch.equal(p[8], v[1, :, :2, :2, :2])
    assert torch.equal(p.sort(dim=0)[0].flatten().sort()[0], v.flatten().sort()[0])


@pytest.mark.parametrize("aug", ALL)
def test_each_augmentation_shape_dtype_device_determinism(aug):
    x = torch.randn(6, 2, 8, 8, 8)
    a = augment_view(x, augmentations=(aug,), gen=gen(3))
    b = augment_view(x, augmentations=(aug,), gen=gen(3))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    if aug == "identity":
        assert torch.equal(a, x)
    else:
        assert not torch.equal(a, x)


def test_composite_views_differ_and_identity_only_keeps_input():
    x = torch.randn(16, 1, 8, 8, 8)
    g = gen(1)
    v1 = augment_view(x, augmentations=ALL, gen=g)
    v2 = augment_view(x, augmentations=ALL, gen=g)
    assert not torch.equal(v1, v2)
    assert torch.equal(augment_view(x, augmentations=("identity",), gen=g), x)


def _same(a, b):
    return (a == b).flatten(1).all(1)


def test_positive_pairs_are_rarely_identical_with_the_default_augmentations():
    """Two views drawn as pretraining draws them (one generator, view 1 then view 2): at most 5 % bit-identical pairs.

    The old identity veto (identity with prob. 0.5 left the whole view untouched) gave about 28 % here.
    """
    x = torch.randn(3000, 1, 8, 8, 8, generator=gen(11))
    g = gen(12)
    v1 = augment_view(x, augmentations=DEFAULT_SIMCLR_AUGMENTATIONS, gen=g)
    v2 = augment_view(x, augmentations=DEFAULT_SIMCLR_AUGMENTATIONS, gen=g)
    identical = _same(v1, v2).float().mean().item()
    assert identical <= 0.05, identical


@pytest.mark.parametrize(
    ("augs", "ops", "documented"),
    [
        (DEFAULT_SIMCLR_AUGMENTATIONS, 2, 0.0),  # identity takes at most one slot of two: the other one transforms
        (ALL, 2, 0.0),
        (("identity", "noise"), 2, 0.0),
        (DEFAULT_SIMCLR_AUGMENTATIONS, 1, 1 / 6),  # one slot: identity is 1 of 6 equally likely options
        (("identity", "rotate"), 1, 1 / 2),
    ],
)
def test_views_are_untouched_no_more_often_than_documented(augs, ops, documented):
    n = 2000
    x = torch.randn(n, 1, 8, 8, 8, generator=gen(21))
    v = augment_view(x, augmentations=augs, gen=gen(22), ops=ops)
    untouched = _same(v, x).float().mean().item()
    slack = 4 * math.sqrt(documented * (1 - documented) / n)  # 4 binomial standard deviations
    assert untouched <= documented + slack, (untouched, documented)
    if documented:
        assert untouched >= documented - slack, (untouched, documented)  # identity is really drawn, not ignored


def test_each_option_is_drawn_equally_often_and_views_draw_distinct_options():
    n = 6000
    drawn = draw_ops(n, DEFAULT_SIMCLR_AUGMENTATIONS, gen(5), torch.device("cpu"))
    assert set(drawn) == set(DEFAULT_SIMCLR_AUGMENTATIONS)
    counts = torch.stack(list(drawn.values()), 1).sum(1)
    assert (counts == 2).all()
    for name, mask in drawn.items():
        assert abs(mask.float().mean().item() - 1 / 3) < 0.03, name
    one = draw_ops(10, ("noise",), gen(5), torch.device("cpu"), ops=2)
    assert one["noise"].all()  # fewer options than slots: every option is applied
    with pytest.raises(ValueError, match="flip"):
        draw_ops(4, ("rotate", "flip"), gen(5), torch.device("cpu"))


def test_views_are_deterministic_given_the_generator_seed():
    x = torch.randn(8, 1, 8, 8, 16)
    a1, a2 = (augment_view(x, augmentations=ALL, gen=g) for g in [gen(9)] * 2)
    g = gen(9)
    b1, b2 = augment_view(x, augmentations=ALL, gen=g), augment_view(x, augmentations=ALL, gen=g)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(x, augment_view(x, augmentations=ALL, gen=gen(10)))


def test_rotations_are_exact():
    x = torch.randn(3, 1, 6, 6, 6)
    chosen = torch.tensor([True, True, False])
    out = rotate90(x, chosen, plane=torch.tensor([0, 2, 1]), turns=torch.tensor([1, 2, 3]))
    assert torch.equal(out[0], torch.rot90(x[0], 1, (1, 2)))
    assert torch.equal(out[1], torch.rot90(x[1], 2, (2, 3)))
    assert torch.equal(out[2], x[2])
    same = rotate_arbitrary(x, torch.zeros(3, 3))
    assert torch.allclose(same, x, atol=1e-5)
    quarter = rotate_arbitrary(x, torch.tensor([[0.0, 0.0, torch.pi / 2]] * 3))
    ref = torch.stack([torch.rot90(v, 1, (2, 3)) for v in x])
    ref2 = torch.stack([torch.rot90(v, -1, (2, 3)) for v in x])
    assert torch.allclose(quarter, ref, atol=1e-4) or torch.allclose(quarter, ref2, atol=1e-4)


def _bar(shape=(16, 16, 32), length=10, axis=2):
    """One channel, zeros with a 2x2-thick bar of ``length`` voxels along ``axis``, centred in the patch."""
    x = torch.zeros(1, 1, *shape)
    index = []
    for a, size in enumerate(shape):
        half = length // 2 if a == axis else 1
        index.append(slice(size // 2 - half, size // 2 + half))
    x[(0, 0, *index)] = 1.0
    return x


def _principal(v):
    """Length (voxels) and unit direction (d, h, w) of the intensity-weighted principal axis of each sample (N, 1, a, b, c)."""
    w = v[:, 0].clamp_min(0).double()
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in w.shape[1:]], indexing="ij")
    p = torch.stack(grids, -1)  # (a, b, c, 3)
    mass = w.sum((1, 2, 3))
    mu = torch.einsum("nabc,abcj->nj", w, p) / mass[:, None]
    q = p[None] - mu[:, None, None, None]
    cov = torch.einsum("nabc,nabci,nabcj->nij", w, q, q) / mass[:, None, None]
    vals, vecs = torch.linalg.eigh(cov)
    return torch.sqrt(12 * vals[:, -1] + 1), vecs[:, :, -1]  # a uniform line of n voxels has variance (n^2 - 1) / 12


@pytest.mark.parametrize("shape", [(16, 16, 32), (8, 8, 16)])
@pytest.mark.parametrize("degrees", [90.0, 37.0, -63.0])
@pytest.mark.parametrize("about", [0, 1, 2])  # angles are about w, h, d
def test_arbitrary_rotation_is_rigid_on_non_cubic_patches(shape, degrees, about):
    """A bar along the long side keeps its length (within a voxel) and turns by the angle (the old normalised-coordinate
    rotation shrank a line turned from the long side to a short one: 10 voxels -> 5 after 90 degrees)."""
    length = 10 if shape[2] == 32 else 6
    x = _bar(shape, length)
    before, _ = _principal(x)
    assert abs(before.item() - length) < 0.1
    angles = torch.zeros(1, 3)
    angles[0, about] = math.radians(degrees)
    out = rotate_arbitrary(x, angles)
    after, direction = _principal(out)
    assert abs(after.item() - length) < 1.0, (after.item(), length)
    cos_to_w = direction[0, 2].abs().item()  # the bar started along w; a turn about w leaves it there
    expected = 1.0 if about == 0 else abs(math.cos(math.radians(degrees)))
    assert abs(cos_to_w - expected) < 0.05, (cos_to_w, expected)
    mass = out.sum().item()
    assert abs(mass - x.sum().item()) < 0.1 * x.sum().item()  # nothing squashed or stretched


def test_rotate_view_on_non_cubic_patches_always_turns_and_keeps_lengths():
    """With only ``rotate`` every view is rotated (exact turns included: 180 degrees where a plane is not square,
    never silently skipped) and the bar keeps its length."""
    noise = torch.randn(48, 1, 16, 16, 32, generator=gen(3))  # a centred bar is symmetric: 180 degrees would keep it
    turned = augment_view(noise, augmentations=("rotate",), gen=gen(4))
    assert turned.shape == noise.shape
    assert not _same(turned, noise).any()
    x = _bar((16, 16, 32), 10).expand(48, 1, 16, 16, 32).contiguous()
    v = augment_view(x, augmentations=("rotate",), gen=gen(4))
    lengths, _ = _principal(v)
    assert ((lengths - 10).abs() < 1.0).all(), lengths


def test_exact_turns_in_planes_with_unequal_sides_are_half_turns():
    x = torch.randn(2, 1, 6, 6, 10)
    out = rotate90(x, torch.tensor([True, True]), plane=torch.tensor([1, 2]), turns=torch.tensor([2, 2]))
    assert torch.equal(out[0], torch.rot90(x[0], 2, (1, 3))) and torch.equal(out[1], torch.rot90(x[1], 2, (2, 3)))
    with pytest.raises(ValueError, match="changes its shape"):
        rotate90(x, torch.tensor([True, False]), plane=torch.tensor([2, 2]), turns=torch.tensor([1, 1]))
    assert torch.equal(rotate90(x, torch.tensor([True, False]), plane=torch.tensor([0, 0]), turns=torch.tensor([1, 3]))[0], torch.rot90(x[0], 1, (1, 2)))


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_colour_matches_applying_the_three_steps_in_order(order):
    x = torch.randn(3, 2, 5, 6, 7) * 2 + 1
    bright = torch.tensor([0.3, -0.2, 0.1]).view(-1, 1, 1, 1, 1)
    contrast = torch.tensor([0.7, 1.3, 1.0]).view(-1, 1, 1, 1, 1)
    gamma = torch.tensor([0.8, 1.4, 1.1]).view(-1, 1, 1, 1, 1)
    dims = (1, 2, 3, 4)
    ref = x.clone()
    for op in order:
        if op == 0:
            ref = ref + bright
        elif op == 1:
            mean = ref.mean(dim=dims, keepdim=True)
            ref = (ref - mean) * contrast + mean
        else:
            lo = ref.amin(dim=dims, keepdim=True)
            rng = ref.amax(dim=dims, keepdim=True) - lo
            ref = lo + rng * ((ref - lo) / rng) ** gamma
    out = colour_apply(x, bright, contrast, gamma, torch.tensor([order] * 3))
    assert torch.allclose(out, ref, atol=1e-5)


def test_sobel_matches_the_3x3x3_kernels():
    x = torch.randn(2, 3, 7, 8, 9)
    smooth, deriv = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([-1.0, 0.0, 1.0])
    kernels = []
    for axis in range(3):
        parts = [deriv if a == axis else smooth for a in range(3)]
        kernels.append(torch.einsum("i,j,k->ijk", *parts))
    grad = F.conv3d(F.pad(x.reshape(6, 1, 7, 8, 9), [1] * 6, mode="replicate"), torch.stack(kernels)[:, None])
    mag = grad.pow(2).sum(1).add(1e-12).sqrt().view_as(x)
    mean, std = mag.mean(dim=(1, 2, 3, 4), keepdim=True), mag.std(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(sobel_magnitude(x), (mag - mean) / (std + 1e-6), atol=1e-4)


def test_sobel_safe_on_constant_and_blur_preserves_constant():
    const = torch.full((2, 1, 6, 6, 6), 3.0)
    assert torch.equal(sobel_magnitude(const), torch.zeros_like(const))
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.5, 1.5])), const, atol=1e-5)
    ramp = torch.arange(6.0).view(1, 1, 6, 1, 1).expand(1, 1, 6, 6, 6).contiguous()
    assert sobel_magnitude(ramp).abs().sum() > 0


def test_cutout_sets_a_box_to_the_mean():
    x = torch.randn(4, 1, 10, 10, 10)
    out = cutout(x, gen(2))
    changed = (out != x).flatten(1).sum(1)
    assert (changed > 0).all() and (changed < 1000).all()


def test_segmentation_augmentation_keeps_image_and_label_aligned():
    img = torch.zeros(4, 1, 8, 8, 8)
    img[:, :, 1:6, 2:7, 2:7] = 1.0
    lab = (img[:, 0] > 0.5).long()
    a, b = augment_pair(img.clone(), lab.clone(), gen(5))
    assert a.shape == img.shape and b.shape == lab.shape and b.dtype == torch.long
    lo, hi = a[:, 0].amin(dim=(1, 2, 3), keepdim=True), a[:, 0].amax(dim=(1, 2, 3), keepdim=True)
    fg = a[:, 0] > (lo + hi) / 2
    agree = (fg == (b > 0)).float().flatten(1).mean(1)
    assert (agree > 0.95).all(), agree


@pytest.mark.parametrize("shape", [(2, 8, 8, 8), (1, 8, 8, 12), (1, 6, 10, 10)])
@pytest.mark.parametrize("ops", [1, 2, 3])
def test_blend_and_subset_strategies_give_identical_views(shape, ops):
    """The synchronisation-free strategy (every transform on every sample, kept with torch.where: the GPU default) and
    the subset one (chosen samples only: the CPU default) give the same views, bit for bit, from the same seed."""
    x = torch.randn(24, *shape, generator=gen(31))
    for seed in range(3):
        a = augment_view(x, augmentations=ALL, gen=gen(seed), ops=ops, blend=True)
        b = augment_view(x, augmentations=ALL, gen=gen(seed), ops=ops, blend=False)
        assert torch.equal(a, b), (seed, (a - b).abs().max())
        assert torch.equal(b, augment_view(x, augmentations=ALL, gen=gen(seed), ops=ops))  # CPU default: subset


@pytest.mark.parametrize("shape,dtype", [((6, 6, 6), torch.float32), ((6, 6, 10), torch.float32), ((4, 6, 6), torch.float32),
                                         ((96, 96, 8), torch.bfloat16), ((128, 8, 128), torch.float16)])
def test_rotate90_grid_copies_exactly_what_rot90_gives(shape, dtype):
    """Also in half precision at sizes where bfloat16 voxel coordinates would round by more than half a voxel."""
    x = torch.randn(9, 2, *shape, generator=gen(4)).to(dtype)
    plane, turns = torch.arange(9) // 3, torch.arange(9) % 3 + 1
    square = torch.tensor([shape[a - 2] == shape[b - 2] for a, b in PLANES])
    turns = torch.where(square[plane], turns, 2)
    out = rotate90_grid(x, plane, turns)
    for i in range(9):
        assert torch.equal(out[i], torch.rot90(x[i], int(turns[i]), tuple(d - 1 for d in PLANES[int(plane[i])]))), i


@pytest.mark.parametrize("name", ["rotate", "colour", "blur", "noise", "sobel", "cutout"])
@pytest.mark.parametrize("blend", [True, False])
def test_no_parameter_draw_depends_on_the_selection(monkeypatch, name, blend):
    """Whichever samples choose a transform, the generator ends in the same state and a chosen sample gets the same
    result as when every sample chooses it: parameters are drawn for all samples, in a fixed order."""
    import ssl3d_cli.augment.simclr as simclr

    real = simclr.draw_ops
    x = torch.randn(12, 1, 8, 8, 8, generator=gen(2))

    def run(mask):
        def fixed(n, augmentations, g, device, ops=2):
            drawn = real(n, augmentations, g, device, ops)  # consumes the stream as usual, then the selection is replaced
            return {k: mask for k in drawn}

        monkeypatch.setattr(simclr, "draw_ops", fixed)
        g = gen(8)
        out = augment_view(x, augmentations=(name,), gen=g, blend=blend)
        return out, g.get_state()

    every, state = run(torch.ones(12, dtype=torch.bool))
    for mask in (torch.zeros(12, dtype=torch.bool), torch.arange(12) % 3 == 0, torch.arange(12) >= 7):
        out, after = run(mask)
        assert torch.equal(after, state)  # the same number of draws
        assert torch.equal(out[mask], every[mask]) and torch.equal(out[~mask], x[~mask])


def test_blur_equals_a_float64_brute_force_replicate_padded_gaussian():
    x = torch.randn(3, 2, 5, 7, 9, generator=gen(30))
    sigma = torch.tensor([0.5, 1.0, 1.5])
    got = gaussian_blur(x, sigma)
    v = x.double()
    for axis in (2, 3, 4):  # one axis at a time, each output voxel summed over its taps with clamped reads
        n = v.shape[axis]
        out = torch.zeros_like(v)
        for i in range(3):
            taps = [math.exp(-0.5 * (t / float(sigma[i])) ** 2) for t in range(-3, 4)]
            total = sum(taps)
            for o in range(n):
                for t, weight in zip(range(-3, 4), taps):
                    src = min(max(o + t, 0), n - 1)
                    out[i].narrow(axis - 1, o, 1).add_(weight / total * v[i].narrow(axis - 1, src, 1))
        v = out
    assert got.dtype == x.dtype and got.shape == x.shape
    assert (got.double() - v).abs().max() < 1e-5


@pytest.mark.parametrize("shape", [(6, 2, 8, 8, 8), (6, 1, 6, 10, 14)])
def test_fused_resampling_equals_grid_sample(shape):
    """resample_affine (the compiled blend pass's rotation): exact turns bit for bit rot90, free angles within rounding
    of grid_sample, border clipping included (30 degree turns move the corners out of the box)."""
    from ssl3d_cli.augment.simclr import draw_rotation, resample_affine

    x = torch.randn(shape, generator=gen(31))
    for seed in range(3):
        params = draw_rotation(x.shape, gen(40 + seed), x.device)
        exact = params["exact"]
        theta = torch.where(exact[:, None, None], params["turn_theta"], params["free_theta"])
        got = resample_affine(x, theta, exact)
        assert torch.equal(got[exact], rotate90_grid(x, params["plane"], params["turns"])[exact])
        assert torch.allclose(got[~exact], rotate_arbitrary(x, params["angles"])[~exact], atol=2e-5)
