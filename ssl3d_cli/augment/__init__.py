"""Batched, on-device 3D augmentations: SimCLR views and segmentation training."""
