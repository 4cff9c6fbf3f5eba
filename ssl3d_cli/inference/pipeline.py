"""From a fine-tuned segmenter and a scan to labels and maps on the scan's own grid.

Order of operations (and why): votes are counted per MC sample on the network's cache grid, giving
per-class score maps (vote counts, Borda points, mean probabilities). These score maps are resampled
trilinearly back onto the scan's grid and the arg-max (with the documented tie-break) is taken
there. Resampling the scores rather than a finished label map is the same as resampling a soft
one-hot map: boundaries land between voxels where the scores cross, not on the coarse grid's
nearest voxel, and only C maps are resampled once per scan, not N samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl3d_cli import checkpoints
from ssl3d_cli.config import MCConfig, ModelConfig, PreprocessConfig
from ssl3d_cli.data.datasets import CaseSpec
from ssl3d_cli.data.nifti import load_scan
from ssl3d_cli.data.preprocessing import CaseGeometry, preprocess_arrays, restore_scores
from ssl3d_cli.errors import ConfigError, InputDataError
from ssl3d_cli.inference.mc import sample_probabilities
from ssl3d_cli.inference.votes import VoteAccumulator, apply_union, decide
from ssl3d_cli.models.unet import UNet
from ssl3d_cli.runtime.device import Precision


@dataclass
class Segmenter:
    """A loaded ``model.pt`` with everything needed to preprocess a scan and name its classes."""

    model: UNet
    payload: dict[str, Any]
    device: torch.device
    precision: Precision
    path: Path

    @property
    def num_classes(self) -> int:
        return int(self.payload["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.payload["class_names"])

    @property
    def label_values(self) -> list[int]:
        return list(self.payload["label_values"])

    @property
    def channel_names(self) -> list[str]:
        return list(self.payload["channel_names"])

    @property
    def regions(self) -> dict[str, list[int]]:
        return dict(self.payload.get("regions") or {})

    @property
    def preprocess_config(self) -> PreprocessConfig:
        s = self.payload["preprocess"]
        return PreprocessConfig(size=tuple(s["size"]), modality=s["modality"], ct_body_threshold_hu=s["ct_body_threshold_hu"],
                                clip_percentiles=tuple(s["clip_percentiles"]), dtype=s["dtype"])

    def class_index(self, name_or_index: str) -> int:
        """A class by name (case-insensitive), original label value or internal index."""
        key = str(name_or_index).strip().lower()
        names = [n.lower() for n in self.class_names]
        if key in names:
            return names.index(key)
        if key.lstrip("-").isdigit():
            value = int(key)
            if value in self.label_values:
                return self.label_values.index(value)
        raise ConfigError(f"class {name_or_index!r} is not one of this model's classes: "
                          + ", ".join(f"{n} ({v})" for n, v in zip(self.class_names, self.label_values)))


def load_segmenter(path: Path | str, *, device: torch.device, precision: Precision) -> Segmenter:
    """Load ``model.pt`` (weights only), rebuild the U-Net and move it to ``device``."""
    payload = checkpoints.load_checkpoint(path, fmt=checkpoints.SEGMENTER)
    m = payload["model"]
    config = ModelConfig(in_channels=m["in_channels"], widths=tuple(m["widths"]), dropout_encoder=m["dropout_encoder"],
                         dropout_decoder=m["dropout_decoder"])
    model = UNet(config, payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return Segmenter(model, payload, device, precision, Path(path))


def prepare_case(seg: Segmenter, case: CaseSpec) -> tuple[torch.Tensor, CaseGeometry]:
    """Read a scan and apply the model's own preprocessing (image-only crop, normalise, resize).

    Returns:
        image (1, C, D, H, W) on the device, and the geometry that maps results back.
    """
    expected = len(seg.channel_names)
    if len(case.image_paths) == 1:
        scan = load_scan(case.image_paths)
        if scan.data.shape[0] != expected:
            raise InputDataError(f"{case.image_paths[0]}: has {scan.data.shape[0]} channel(s); the model expects {expected} "
                                 f"({', '.join(seg.channel_names)})")
    else:
        if len(case.image_paths) != expected:
            raise InputDataError(f"case {case.case_id}: {len(case.image_paths)} channel files; the model expects {expected} "
                                 f"({', '.join(seg.channel_names)})")
        scan = load_scan(case.image_paths)
    pre = preprocess_arrays(scan.data, scan.affine, modality=seg.payload["modality"], config=seg.preprocess_config)
    # round through the cache dtype (float16 by default) so the network sees exactly what it was trained on
    image = torch.from_numpy(pre.image.astype(seg.preprocess_config.dtype).astype(np.float32))[None].to(seg.device)
    return image, pre.geometry


def accumulate(seg: Segmenter, image: torch.Tensor, mc: MCConfig, *, track_entropy: bool = False,
               extra: Any = None) -> VoteAccumulator:
    """Sample (or run once) and count votes. ``extra(probs)`` sees each batch too (uncertainty stores)."""
    weights = torch.tensor(mc.vote_weights, dtype=torch.float32) if mc.vote_weights else None
    acc = VoteAccumulator(seg.num_classes, weights=weights, track_entropy=track_entropy)

    def consume(probs: torch.Tensor) -> None:
        acc.update(probs)
        if extra is not None:
            extra(probs)

    sample_probabilities(seg.model, image, mc_samples=mc.mc_samples, mc_batch=mc.mc_batch, autocast=seg.precision.autocast,
                         seed=mc.seed, dropout_encoder=mc.dropout_encoder, dropout_decoder=mc.dropout_decoder, consume=consume)
    return acc


def background_fill(num_classes: int) -> list[float]:
    """Scores outside the crop box: class 0 wins."""
    return [1.0] + [0.0] * (num_classes - 1)


class ScanVotes:
    """One scan's vote sums mapped onto its grid; the mean probabilities are resampled once, whatever
    the number of rules asked for (the experiment asks for six).
    """

    def __init__(self, acc: VoteAccumulator, geometry: CaseGeometry) -> None:
        self.acc, self.geometry = acc, geometry
        self._fill = background_fill(acc.num_classes)
        self._mean: torch.Tensor | None = None

    def _restore(self, scores: torch.Tensor, background: list[float] | float) -> torch.Tensor:
        return torch.from_numpy(restore_scores(scores.cpu(), self.geometry, background=background))

    def mean_prob(self) -> torch.Tensor:
        """(C, X, Y, Z) mean class probabilities on the scan's grid."""
        if self._mean is None:
            self._mean = self._restore(self.acc.mean_prob(), self._fill)
        return self._mean

    def labels(self, rule: str, union_classes: list[int] | None = None) -> np.ndarray:
        """The rule's labels (class indices) on the scan's grid (X, Y, Z).

        A single (deterministic) pass is the plain arg-max whatever the rule: there is nothing to vote on.
        """
        if self.acc.n <= 1 or rule == "mean":
            return decide(self.mean_prob(), self.mean_prob()).numpy()
        labels = decide(self._restore(self.acc.scores(rule), self._fill), self.mean_prob())
        if rule == "union" and union_classes:
            labels = apply_union(labels, self._restore((self.acc.votes > 0).float(), 0.0) >= 0.5, union_classes)
        return labels.numpy()


def labels_on_scan(acc: VoteAccumulator, geometry: CaseGeometry, *, rule: str, union_classes: list[int] | None = None) -> np.ndarray:
    """The rule's labels (class indices) on the scan's grid (X, Y, Z); see :class:`ScanVotes`."""
    return ScanVotes(acc, geometry).labels(rule, union_classes)


def validate_vote_options(seg: Segmenter, mc: MCConfig) -> list[int]:
    """Check vote weights and union classes against the model; returns the union class indices."""
    if mc.vote_weights and len(mc.vote_weights) != seg.num_classes:
        raise ConfigError(f"--vote-weights has {len(mc.vote_weights)} value(s); the model has {seg.num_classes} classes "
                          f"({', '.join(seg.class_names)})")
    return [seg.class_index(c) for c in mc.union_classes]
