"""ssl3d: 3D SimCLR pretraining, U-Net fine-tuning and Monte-Carlo-dropout inference.

This module holds only the version so that ``ssl3d --help`` stays fast (no torch import).
"""

__version__ = "0.1.0"
