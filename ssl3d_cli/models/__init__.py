"""The U-Net encoder (shared by SimCLR and the segmenter), the decoder and the projection head."""

from ssl3d_cli.models.unet import Encoder, LevelDropout, ProjectionHead, SimCLRModel, UNet

__all__ = ["Encoder", "LevelDropout", "ProjectionHead", "SimCLRModel", "UNet"]
