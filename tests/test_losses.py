import math

import pytest
import torch

from ssl3d_cli.losses.dice import dice_ce_loss, soft_dice_loss, soft_dice_per_class
from ssl3d_cli.losses.ntxent import nt_xent


def reference_nt_xent(z1, z2, tau, groups=None):
    """Eq. 1 written out literally with loops."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    g = None if groups is None else torch.cat([groups, groups])
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = 0.0
        for k in range(n2):
            if k == i or (g is not None and g[k] != g[i]):
                continue
            denom += math.exp(float(z[i] @ z[k]) / tau)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
def test_nt_xent_matches_hand_written_reference(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    loss, _ = nt_xent(z1, z2, temperature=tau)
    assert float(loss) == pytest.approx(reference_nt_xent(z1, z2, tau), rel=1e-5)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, _ = nt_xent(z1, z2, temperature=tau, groups=groups)
    assert float(loss) == pytest.approx(reference_nt_xent(z1, z2, tau, groups), rel=1e-5)


def test_nt_xent_closed_form_identical_views_and_half_precision():
    z = torch.ones(4, 8)
    loss, _ = nt_xent(z, z, temperature=0.05)
    assert float(loss) == pytest.approx(math.log(2 * 4 - 1), rel=1e-6)
    # float16 inputs at tau 0.05: computed in float32, finite
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 16, generator=g).half(), torch.randn(8, 16, generator=g).half()
    loss, acc = nt_xent(z1, z2, temperature=0.05)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_nt_xent_accuracy_and_rows():
    z1 = torch.eye(4)
    loss, acc = nt_xent(z1, z1 + 0.01, temperature=0.1)
    assert float(acc) == 1.0
    full, _ = nt_xent(z1, z1 * 0.5 + torch.randn(4, 4) * 0.1, temperature=0.1)
    z2 = z1 * 0.5
    a, _ = nt_xent(z1, z2, temperature=0.1, rows=slice(0, 2))
    b, _ = nt_xent(z1, z2, temperature=0.1, rows=slice(2, 4))
    c, _ = nt_xent(z1, z2, temperature=0.1)
    assert float((a + b) / 2) == pytest.approx(float(c), rel=1e-6)


def test_soft_dice_hand_computed():
    # 1 sample, 2 classes, 4 voxels; probabilities given directly through logits of +-inf style
    probs = torch.tensor([[[0.9, 0.2, 0.6, 0.1], [0.1, 0.8, 0.4, 0.9]]]).view(1, 2, 4, 1, 1)
    target = torch.tensor([[0, 1, 1, 1]]).view(1, 4, 1, 1)
    s = 1e-5
    d0 = (2 * 0.9 + s) / ((0.9 + 0.2 + 0.6 + 0.1) + 1 + s)
    d1 = (2 * (0.8 + 0.4 + 0.9) + s) / ((0.1 + 0.8 + 0.4 + 0.9) + 3 + s)
    dice = soft_dice_per_class(probs, target, smooth=s)
    assert dice.tolist() == pytest.approx([d0, d1], rel=1e-6)
    logits = probs.log()
    assert float(soft_dice_loss(logits, target, smooth=s)) == pytest.approx(1 - (d0 + d1) / 2, rel=1e-5)
    w = torch.tensor([1.0, 3.0])
    assert float(soft_dice_loss(logits, target, weights=w, smooth=s)) == pytest.approx(1 - (d0 + 3 * d1) / 4, rel=1e-5)
    assert float(soft_dice_loss(logits, target, smooth=s, include_background=False)) == pytest.approx(1 - d1, rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert float(dice_ce_loss(logits, target, smooth=s)) == pytest.approx(1 - (d0 + d1) / 2 + float(ce), rel=1e-5)


def test_dice_empty_class_with_smoothing():
    logits = torch.full((1, 2, 2, 2, 2), -20.0)
    logits[:, 0] = 20.0
    target = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    dice = soft_dice_per_class(torch.softmax(logits, 1), target, smooth=1e-5)
    assert float(dice[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(dice[1]) == pytest.approx(1.0, abs=1e-3)  # absent and (almost) not predicted
