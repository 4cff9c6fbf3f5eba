"""Weighted soft Dice, paper Eq. 2.

    Dice_i = (2 * sum_j Y_ij T_ij + s) / (sum_j Y_ij + sum_j T_ij + s)
    loss   = 1 - sum_i w_i Dice_i / sum_i w_i

Y: softmax probabilities, T: one-hot truth, s: smoothing, sums over every voxel of the batch.
With uniform weights this is 1 + Eq. 2 (the paper writes the negative mean Dice); the gradient is
the same. The background class is included by default, as in Eq. 2 (``include_background``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_per_class(probs: torch.Tensor, target: torch.Tensor, *, smooth: float = 1e-5) -> torch.Tensor:
    """Per-class soft Dice.

    Args:
        probs: (B, C, D, H, W) probabilities.
        target: (B, D, H, W) class indices.
    Returns:
        (C,) Dice per class, float32.
    """
    num_classes = probs.shape[1]
    probs = probs.float()
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).float()
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (2 * inter + smooth) / (denom + smooth)


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    smooth: float = 1e-5,
    include_background: bool = True,
) -> torch.Tensor:
    """1 - weighted mean soft Dice. logits (B, C, D, H, W), target (B, D, H, W) -> scalar."""
    dice = soft_dice_per_class(torch.softmax(logits.float(), dim=1), target, smooth=smooth)
    w = torch.ones_like(dice) if weights is None else weights.to(dice.device, torch.float32)
    if not include_background:
        dice, w = dice[1:], w[1:]
    return 1 - (w * dice).sum() / w.sum()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, weights: torch.Tensor | None = None,
                 smooth: float = 1e-5, include_background: bool = True) -> torch.Tensor:
    """Soft Dice + (class-weighted) cross-entropy."""
    ce = F.cross_entropy(logits.float(), target.long(), weight=None if weights is None else weights.to(logits.device, torch.float32))
    return soft_dice_loss(logits, target, weights=weights, smooth=smooth, include_background=include_background) + ce
