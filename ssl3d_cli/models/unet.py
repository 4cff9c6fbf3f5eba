"""3D U-Net (Ronneberger et al.) with instance normalisation and a dropout module after every block.

Encoder level i:  f_i = Dropout_i(Block_i(Down(f_{i-1})))      (no Down at level 0; f_{-1} = image)
Decoder level i:  d_i = Dropout_i(Block_i(cat(Up_i(d_{i+1}), f_i)))   (d_{L-1} = f_{L-1})
Output:           logits = Conv1x1(d_0)

Dropout modules are :class:`LevelDropout` tagged ``encoder``/``decoder`` so their rates can be set at
prediction time independently of training, and so MC sampling can switch exactly these modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl3d_cli.config import ModelConfig


class LevelDropout(nn.Dropout):
    """Element-wise dropout tagged with the part of the U-Net it belongs to."""

    def __init__(self, p: float, part: str) -> None:
        super().__init__(p=p)
        self.part = part


class ConvBlock(nn.Sequential):
    """(Conv3d 3x3x3 -> InstanceNorm -> LeakyReLU) x 2."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_ch, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_ch, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class Encoder(nn.Module):
    """U-Net encoder. ``forward(x: (B, C, D, H, W)) -> [f_0 (B, w0, D, H, W), ..., f_{L-1}]``."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.widths = tuple(widths)
        blocks = []
        for i, w in enumerate(widths):
            conv = ConvBlock(in_channels if i == 0 else widths[i - 1], w)
            blocks.append(conv if i == 0 else nn.Sequential(nn.MaxPool3d(2), conv))
        self.blocks = nn.ModuleList(blocks)
        self.dropouts = nn.ModuleList(LevelDropout(dropout, "encoder") for _ in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        h = x
        for block, drop in zip(self.blocks, self.dropouts):
            h = drop(block(h))
            feats.append(h)
        return feats


class Decoder(nn.Module):
    """U-Net decoder with skip connections; ``forward(feats) -> d_0 (B, w0, D, H, W)``."""

    def __init__(self, widths: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        levels = len(widths)
        # index i handles decoder level i (0 = full resolution), for i in 0..L-2
        self.ups = nn.ModuleList(nn.ConvTranspose3d(widths[i + 1], widths[i], 2, stride=2) for i in range(levels - 1))
        self.blocks = nn.ModuleList(ConvBlock(2 * widths[i], widths[i]) for i in range(levels - 1))
        self.dropouts = nn.ModuleList(LevelDropout(dropout, "decoder") for _ in range(levels - 1))

    def level(self, i: int, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Block_i(cat(Up_i(d_{i+1}), f_i)) before dropout. Skip may have batch 1 (broadcast for MC samples)."""
        up = self.ups[i](below)
        if skip.shape[0] != up.shape[0]:
            skip = skip.expand(up.shape[0], *skip.shape[1:])
        return self.blocks[i](torch.cat([up, skip], dim=1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        d = feats[-1]
        for i in reversed(range(len(self.blocks))):
            d = self.dropouts[i](self.level(i, d, feats[i]))
        return d


class UNet(nn.Module):
    """Encoder + decoder + 1x1 conv. ``forward(x: (B, C, D, H, W)) -> logits (B, num_classes, D, H, W)``."""

    def __init__(self, config: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.encoder = Encoder(config.in_channels, config.widths, config.dropout_encoder)
        self.decoder = Decoder(config.widths, config.dropout_decoder)
        self.head = nn.Conv3d(config.widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))

    def set_dropout(self, *, encoder: float | None = None, decoder: float | None = None) -> None:
        """Set dropout rates by part (None keeps the current rate). MC prediction sets the training rates
        unless told otherwise (``inference.pipeline.sampling_rates``)."""
        for m in self.modules():
            if isinstance(m, LevelDropout):
                rate = encoder if m.part == "encoder" else decoder
                if rate is not None:
                    m.p = float(rate)


class ProjectionHead(nn.Module):
    """SimCLR head: global average pooling -> Dense -> ReLU -> Dense. (B, w, d, h, w) -> (B, dim)."""

    def __init__(self, in_features: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.adaptive_avg_pool3d(h, 1).flatten(1))


class SimCLRModel(nn.Module):
    """Encoder + projection head on the deepest features. (B, C, p, p, p) -> (B, projection_dim)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.in_channels, config.widths, config.dropout_encoder)
        self.head = ProjectionHead(config.widths[-1], config.projection_hidden, config.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1])


@dataclass
class Prefix:
    """The deterministic part of a forward pass, computed once per scan for MC sampling.

    ``stage`` is ("enc", k): ``pre`` = Block_k output before encoder dropout k, ``feats`` = f_0..f_{k-1};
    or ("dec", j): ``pre`` = decoder level j before its dropout, ``feats`` = all encoder features;
    or ("out", -1): ``pre`` = logits (no active dropout at all).
    """

    stage: tuple[str, int]
    pre: torch.Tensor
    feats: list[torch.Tensor]


def deterministic_prefix(model: UNet, x: torch.Tensor) -> Prefix:
    """Run ``model`` on x (1, C, D, H, W) up to the first dropout module with p > 0."""
    feats: list[torch.Tensor] = []
    h = x
    for k, (block, drop) in enumerate(zip(model.encoder.blocks, model.encoder.dropouts)):
        h = block(h)
        if drop.p > 0:
            return Prefix(("enc", k), h, feats)
        feats.append(h)
    d = feats[-1]
    dec = model.decoder
    for j in reversed(range(len(dec.blocks))):
        d = dec.level(j, d, feats[j])
        if dec.dropouts[j].p > 0:
            return Prefix(("dec", j), d, feats)
    return Prefix(("out", -1), model.head(d), feats)


def sample_from_prefix(model: UNet, prefix: Prefix, n: int) -> torch.Tensor:
    """Finish ``n`` dropout-sampled passes from a prefix. Returns logits (n, num_classes, D, H, W).

    Dropout modules must be in training mode (sampling) and everything else in eval mode.
    """
    kind, k = prefix.stage
    if kind == "out":
        return prefix.pre.expand(n, *prefix.pre.shape[1:])
    pre = prefix.pre.expand(n, *prefix.pre.shape[1:])
    if kind == "enc":
        feats = list(prefix.feats) + [model.encoder.dropouts[k](pre)]
        h = feats[-1]
        for i in range(k + 1, len(model.encoder.blocks)):
            h = model.encoder.dropouts[i](model.encoder.blocks[i](h))
            feats.append(h)
        return model.head(model.decoder(feats))
    dec = model.decoder
    d = dec.dropouts[k](pre)
    for j in reversed(range(k)):
        d = dec.dropouts[j](dec.level(j, d, prefix.feats[j]))
    return model.head(d)
