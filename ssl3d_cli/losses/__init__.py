"""NT-Xent (paper Eq. 1) and the weighted soft Dice (paper Eq. 2)."""

from ssl3d_cli.losses.dice import soft_dice_loss
from ssl3d_cli.losses.ntxent import nt_xent

__all__ = ["nt_xent", "soft_dice_loss"]
