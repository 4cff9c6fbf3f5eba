import pytest
import torch

from ssl3d_cli.augment.segmentation import augment_pair
from ssl3d_cli.augment.simclr import (
    augment_view,
    cutout,
    gaussian_blur,
    rotate90,
    rotate_arbitrary,
    sobel_magnitude,
    split_into_patches,
)

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
