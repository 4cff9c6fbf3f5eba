"""From a fine-tuned segmenter and a scan to labels and maps on the scan's own grid.

Order of operations (and why): votes are counted per MC sample on the network's cache grid, giving
per-class score maps (vote counts, Borda points, mean probabilities). These score maps are resampled
trilinearly back onto the scan's grid and the arg-max (with the documented tie-break) is taken
there. Resampling the scores rather than a finished label map is the same as resampling a soft
one-hot map: boundaries land between voxels where the scores cross, not on the coarse grid's
nearest voxel, and only C maps are resampled once per scan, not N samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl3d_cli import checkpoints
from ssl3d_cli.config import MCConfig, ModelConfig, RuntimeConfig
from ssl3d_cli.data.datasets import CaseSpec
from ssl3d_cli.data.nifti import Scan, load_scan
from ssl3d_cli.data.preprocessing import CaseGeometry, lookup_on_crop, paste_on_scan, preprocess_arrays, resample_to_crop, unmap_labels
from ssl3d_cli.data.summary import DatasetSummary
from ssl3d_cli.errors import CheckpointError, ConfigError, InputDataError
from ssl3d_cli.inference.mc import sample_probabilities
from ssl3d_cli.inference.sliding_window import SlidingWindowResult, sliding_window_votes
from ssl3d_cli.inference.votes import UNDECIDED, VoteAccumulator, apply_union, clear_winners, decide, label_dtype
from ssl3d_cli.models.unet import UNet
from ssl3d_cli.runs import find_model
from ssl3d_cli.runtime.device import Precision, resolve_device, resolve_precision, set_threads

log = logging.getLogger("ssl3d")


@dataclass
class Segmenter:
    """A loaded ``model.pt``: the network and the dataset it was trained on (classes, preprocessing)."""

    model: UNet
    dataset: DatasetSummary
    payload: dict[str, Any]
    device: torch.device
    precision: Precision
    path: Path
    chosen_by: str | None = None  # how the model was found when no --model was given (named in the result)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes


def load_segmenter(path: Path | str, *, device: torch.device, precision: Precision) -> Segmenter:
    """Load ``model.pt`` (weights only), rebuild the U-Net and move it to ``device``."""
    payload = checkpoints.load_checkpoint(path, fmt=checkpoints.SEGMENTER)
    dataset = DatasetSummary.from_dict(payload["dataset"])
    if payload["num_classes"] != dataset.num_classes:
        raise CheckpointError(f"{path}: the network has {payload['num_classes']} outputs but {dataset.num_classes} classes are named; "
                              "the file is inconsistent, retrain it")
    m = payload["model"]
    config = ModelConfig(in_channels=m["in_channels"], widths=tuple(m["widths"]), dropout_encoder=m["dropout_encoder"],
                         dropout_decoder=m["dropout_decoder"])
    model = UNet(config, payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return Segmenter(model, dataset, payload, device, precision, Path(path))


def open_segmenter(model: Path | None, runtime: RuntimeConfig, *, dataset_name: str | None = None) -> Segmenter:
    """The given model (``model.pt`` or its run folder), else one fine-tuned on ``dataset_name``, on the runtime's device.

    Args:
        model: ``--model``; None: chosen by :func:`ssl3d_cli.runs.find_model` (logged at WARNING level).
        dataset_name: the dataset the inputs belong to (None: loose scans).

    Raises:
        ConfigError: no model given and none fine-tuned on the inputs' dataset (or, for loose scans, not exactly one).
    """
    choice = find_model(model, dataset_name)
    device = resolve_device(runtime.device)
    set_threads(runtime.threads)
    seg = load_segmenter(choice.path, device=device, precision=resolve_precision(runtime.precision, device))
    seg.chosen_by = choice.how
    if dataset_name is not None and seg.dataset.name != dataset_name:
        if choice.how is not None:
            raise ConfigError(f"{choice.path}: was fine-tuned on {seg.dataset.name}, not on the inputs' dataset {dataset_name}, "
                              "although its run folder names that dataset; pass --model")
        log.warning("%s was fine-tuned on %s but the inputs belong to %s: its classes and preprocessing may not fit them",
                    choice.path, seg.dataset.name, dataset_name)
    return seg


def read_case_scan(seg: Segmenter, case: CaseSpec) -> Scan:
    """Read a case's scan (C, X, Y, Z) on its own grid, checking its channels against the model's."""
    channels = seg.dataset.channel_names
    if len(case.image_paths) > 1 and len(case.image_paths) != len(channels):
        raise InputDataError(f"case {case.case_id}: {len(case.image_paths)} channel files; the model expects {len(channels)} "
                             f"({', '.join(channels)})")
    scan = load_scan(case.image_paths, series_uid=case.series_uid)
    if scan.data.shape[0] != len(channels):
        raise InputDataError(f"{case.image_paths[0]}: has {scan.data.shape[0]} channel(s); the model expects {len(channels)} "
                             f"({', '.join(channels)})")
    return scan


def prepare_scan(seg: Segmenter, scan: Scan) -> tuple[torch.Tensor, CaseGeometry]:
    """Apply the model's own preprocessing (image-only crop, normalise, resize) to a scan read by :func:`read_case_scan`.

    Returns:
        image (1, C, D, H, W) on the device, and the geometry that maps results back.
    """
    config = seg.dataset.preprocess_config()
    pre = preprocess_arrays(scan.data, scan.affine, modality=seg.dataset.modality, config=config)
    # round through the cache dtype (float16 by default) so the network sees exactly what it was trained on
    image = torch.from_numpy(pre.image.astype(config.dtype).astype(np.float32))[None].to(seg.device)
    return image, pre.geometry


def native_patch(seg: Segmenter) -> tuple[int, int, int] | None:
    """The training patch of a native-resolution model (``model.pt``'s ``training.patch_size``), None for the fixed grid."""
    if not seg.dataset.preprocess_config().native:
        return None
    patch = (seg.payload.get("training") or {}).get("patch_size")
    if not patch:
        raise ConfigError(f"{seg.path}: a native-resolution model without its training patch size; fine-tune it again")
    return int(patch[0]), int(patch[1]), int(patch[2])


def prepare_case(seg: Segmenter, case: CaseSpec) -> tuple[torch.Tensor, CaseGeometry]:
    """Read a scan and apply the model's own preprocessing: :func:`read_case_scan` then :func:`prepare_scan`."""
    return prepare_scan(seg, read_case_scan(seg, case))


def sampling_rates(seg: Segmenter, mc: MCConfig, *, warn: bool = True) -> MCConfig:
    """``mc`` with concrete dropout rates: the rates the model was trained with, unless ``mc`` names others.

    MC dropout approximates Bayesian inference only at the rates the network was trained with (Gal &
    Ghahramani); other rates are honoured (experiments compare them) with one warning line naming both.

    Raises:
        ConfigError: MC sampling asked of a model with no dropout anywhere (every sample would be identical).
    """
    trained = (seg.model.config.dropout_encoder, seg.model.config.dropout_decoder)
    rates = (trained[0] if mc.dropout_encoder is None else mc.dropout_encoder, trained[1] if mc.dropout_decoder is None else mc.dropout_decoder)
    if mc.stochastic:
        if rates == (0.0, 0.0) and trained == (0.0, 0.0):
            raise ConfigError(f"{seg.path}: the model was trained without dropout, so {mc.mc_samples} MC samples would all be the same pass; "
                              "fine-tune with --dropout-encoder 0.3 (the paper's best), or give --dropout-encoder to sample anyway "
                              "(noise injection, not MC dropout)")
        if rates == (0.0, 0.0):
            raise ConfigError(f"--dropout-encoder 0 --dropout-decoder 0 with --mc-samples {mc.mc_samples}: no dropout to sample, every pass "
                              f"would be the same; leave the rates out to sample at the model's training rates ({trained[0]:g} / {trained[1]:g})")
        if warn and rates != trained:
            untrained = [part for part, rate, t in zip(("encoder", "decoder"), rates, trained) if rate > 0 and t == 0]
            log.warning("sampling with dropout encoder %g / decoder %g, but the model was trained with encoder %g / decoder %g%s: "
                        "MC dropout approximates the posterior only at the training rates", *rates, *trained,
                        f" (the {' and '.join(untrained)} never saw dropout: noise injection there)" if untrained else "")
    return replace(mc, dropout_encoder=rates[0], dropout_decoder=rates[1])


#: Sliding-window settings of native-resolution models (nnU-Net's): window overlap and the Gaussian's sigma / patch.
SLIDING_OVERLAP = 0.5
SLIDING_SIGMA_SCALE = 1.0 / 8


def sliding_window_settings(seg: Segmenter, percentile_fusion: str | None = None) -> dict[str, Any] | None:
    """How a native-resolution model samples a scan (recorded with its outputs); None for a fixed-grid model.

    Args:
        percentile_fusion: how percentile / std maps combine where windows overlap (``nearest`` / ``gaussian``);
            None when no such maps are made (then not named).
    """
    patch = native_patch(seg)
    if patch is None:
        return None
    settings: dict[str, Any] = {"patch": list(patch), "overlap": SLIDING_OVERLAP, "sigma_scale": SLIDING_SIGMA_SCALE}
    if percentile_fusion is not None:
        settings["percentile_fusion"] = percentile_fusion
    return settings


def sliding_votes(seg: Segmenter, image: torch.Tensor, mc: MCConfig, *, track_entropy: bool = False,
                  rules: Sequence[str] | None = None, target: Sequence[int] | None = None, percentiles: Sequence[float] = (),
                  percentile_fusion: str = "nearest") -> SlidingWindowResult:
    """A native-resolution model's votes over a whole scan by Gaussian-weighted sliding window of its training patch.

    The full-grid running sums (and, with ``percentiles``, the fused percentile / std maps of p(target)) live on
    the image's device; each window's per-sample store is freed after the window, so memory does not grow with N.

    Args:
        image: (1, C, D, H, W) native cache grid of any size.
        mc: MC settings (dropout rates left as None are the model's training rates).
        rules: the vote rules that will be read from the result (default: ``mc.vote`` alone).
        target, percentiles, percentile_fusion: as :func:`~ssl3d_cli.inference.sliding_window.sliding_window_votes`.
    Returns:
        the fused sums (n = samples per window) and maps, on the (D, H, W) image grid.
    Raises:
        ValueError: a fixed-grid model (no training patch).
    """
    patch = native_patch(seg)
    if patch is None:
        raise ValueError(f"{seg.path}: a fixed-grid model samples the whole volume at once, not by sliding window")
    mc = sampling_rates(seg, mc, warn=False)
    weights = torch.tensor(mc.vote_weights, dtype=torch.float32) if mc.vote_weights else None
    return sliding_window_votes(seg.model, image, patch=patch, mc_samples=mc.mc_samples, overlap=SLIDING_OVERLAP,
                                sigma_scale=SLIDING_SIGMA_SCALE, mc_batch=mc.mc_batch, autocast=seg.precision.autocast, seed=mc.seed,
                                dropout_encoder=mc.dropout_encoder, dropout_decoder=mc.dropout_decoder,
                                rules=tuple(rules) if rules is not None else (mc.vote,), vote_weights=weights,
                                track_entropy=track_entropy, target=target, percentiles=percentiles,
                                percentile_fusion=percentile_fusion, sample_options={"compile": mc.compile})


def accumulate(seg: Segmenter, image: torch.Tensor, mc: MCConfig, *, track_entropy: bool = False,
               extra: Any = None, rules: Sequence[str] | None = None) -> VoteAccumulator:
    """Sample (or run once) and count votes. ``extra(probs)`` sees each batch too (uncertainty stores).

    Dropout rates left as None in ``mc`` are the model's training rates (see :func:`sampling_rates`). A native-resolution
    model goes through :func:`sliding_votes`.

    Args:
        rules: the vote rules that will be read from the result (default: ``mc.vote`` alone); only their sums are kept.
    Raises:
        ValueError: ``extra`` with a native-resolution model: its batches are windows, not the scan (ask
            :func:`sliding_votes` for the percentile maps instead).
    """
    if native_patch(seg) is not None:  # a native-resolution model: a Gaussian-weighted sliding window of its training patch
        if extra is not None:
            raise ValueError(f"{seg.path}: a native-resolution model samples window by window; a per-batch consumer would see "
                             "windows, not the scan: use sliding_votes(target=..., percentiles=...)")
        return sliding_votes(seg, image, mc, track_entropy=track_entropy, rules=rules).votes
    mc = sampling_rates(seg, mc, warn=False)
    weights = torch.tensor(mc.vote_weights, dtype=torch.float32) if mc.vote_weights else None
    acc = VoteAccumulator(seg.num_classes, weights=weights, track_entropy=track_entropy,
                          rules=tuple(rules) if rules is not None else (mc.vote,))

    def consume(probs: torch.Tensor) -> None:
        acc.update(probs)
        if extra is not None:
            extra(probs)

    sample_probabilities(seg.model, image, mc_samples=mc.mc_samples, mc_batch=mc.mc_batch, autocast=seg.precision.autocast,
                         seed=mc.seed, dropout_encoder=mc.dropout_encoder, dropout_decoder=mc.dropout_decoder, compile=mc.compile,
                         consume=consume)
    return acc


def background_fill(num_classes: int) -> list[float]:
    """Scores outside the crop box: class 0 wins."""
    return [1.0] + [0.0] * (num_classes - 1)


class ScanVotes:
    """One scan's vote sums mapped onto its grid.

    Score maps are resampled onto the crop box only, on the accumulator's device (or ``device``), and decided there
    in slabs: outside the box every rule's answer is class 0 (the background fill makes class 0 the only top score
    there), so the scan's full grid is touched once, by the labels. The mean probabilities are resampled once,
    whatever the number of rules asked for (the experiment asks for six), and put on the full grid only when asked
    for (:meth:`mean_prob`). On the CPU the labels are those of resampling onto the full grid and deciding there
    bit for bit; on a GPU the trilinear resample rounds like the GPU's kernel.
    """

    def __init__(self, acc: VoteAccumulator, geometry: CaseGeometry, *, device: torch.device | str | None = None) -> None:
        self.acc, self.geometry = acc, geometry
        self.device = torch.device(device) if device is not None else None
        self._fill = background_fill(acc.num_classes)
        self._mean_crop: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None

    def _crop(self, scores: torch.Tensor) -> torch.Tensor:
        """(C, D, H, W) cache-grid scores -> (C, *crop_shape) float32 on the crop box, canonical order."""
        return resample_to_crop(scores if self.device is None else scores.to(self.device), self.geometry)

    def mean_prob_crop(self) -> torch.Tensor:
        """(C, *crop_shape) mean class probabilities on the crop box (canonical order)."""
        if self._mean_crop is None:
            self._mean_crop = self._crop(self.acc.mean_prob())
        return self._mean_crop

    def mean_prob(self) -> torch.Tensor:
        """(C, X, Y, Z) mean class probabilities on the scan's grid (CPU)."""
        if self._mean is None:
            self._mean = torch.from_numpy(paste_on_scan(self.mean_prob_crop().cpu().numpy(), self.geometry, self._fill))
        return self._mean

    def labels(self, rule: str, union_classes: list[int] | None = None) -> np.ndarray:
        """The rule's labels (class indices, uint8 up to 256 classes) on the scan's grid (X, Y, Z).

        A single (deterministic) pass is the plain arg-max whatever the rule: there is nothing to vote on.
        """
        dtype = label_dtype(self.acc.num_classes)
        plain = self.acc.n <= 1 or rule == "mean"
        coarse = self.acc.mean_prob() if plain else self.acc.scores(rule)
        if self.device is not None:
            coarse = coarse.to(self.device)
        # voxels whose label is clear on the cache grid are not decided again (exact: see clear_winners); when most are
        # unclear (noisy votes), gathering the rest would cost more than deciding every voxel in slabs
        known = None
        if self.acc.num_classes < UNDECIDED:
            clear = clear_winners(coarse)
            if float((clear == UNDECIDED).float().mean()) < 0.5:
                known = lookup_on_crop(clear, self.geometry)
        if plain:
            crop = decide(self.mean_prob_crop(), self.mean_prob_crop(), dtype=dtype, known=known)
        else:  # the mean probabilities are resampled only if some undecided voxel has tied scores
            crop = decide(self._crop(coarse), self.mean_prob_crop, dtype=dtype, known=known)
        if rule == "union" and union_classes and not plain:
            votes = self.acc.votes[union_classes] > 0  # only the union classes' maps are resampled
            any_vote = torch.zeros((self.acc.num_classes, *crop.shape), dtype=torch.bool, device=crop.device)
            any_vote[union_classes] = self._crop(votes.float()) >= 0.5
            crop = apply_union(crop, any_vote, union_classes)
        return paste_on_scan(crop.cpu().numpy(), self.geometry, 0)


def vote_case(seg: Segmenter, image: torch.Tensor, geometry: CaseGeometry, mc: MCConfig, *,
              rules: Sequence[str] | None = None) -> ScanVotes:
    """MC-dropout samples (or one deterministic pass) of a prepared case, as votes mapped onto its scan.

    Args:
        image: (1, C, D, H, W) from :func:`prepare_case`; ``geometry`` maps the cache grid back to the scan.
        rules: the vote rules that will be asked of the result (default: ``mc.vote``).
    """
    return ScanVotes(accumulate(seg, image, mc, rules=rules), geometry)


def segmentation(seg: Segmenter, votes: ScanVotes, rule: str, union_classes: list[int] | None = None) -> np.ndarray:
    """The rule's label map (X, Y, Z) on the scan's grid, in the dataset's own label values (e.g. BraTS 0/1/2/4)."""
    return unmap_labels(votes.labels(rule, union_classes), list(seg.dataset.label_values))


def labels_on_scan(acc: VoteAccumulator, geometry: CaseGeometry, *, rule: str, union_classes: list[int] | None = None) -> np.ndarray:
    """The rule's labels (class indices) on the scan's grid (X, Y, Z); see :class:`ScanVotes`."""
    return ScanVotes(acc, geometry).labels(rule, union_classes)


def validate_vote_options(seg: Segmenter, mc: MCConfig) -> list[int]:
    """Check vote weights and union classes against the model; returns the union class indices.

    Raises:
        ConfigError: ``weighted`` / ``weighted-probs`` without ``--vote-weights`` (they would equal majority), or a
            weight count that is not the model's class count.
    """
    if mc.vote in ("weighted", "weighted-probs") and not mc.vote_weights:
        raise ConfigError(f"--vote {mc.vote} needs --vote-weights, one weight per class ({', '.join(seg.dataset.class_names)}), "
                          f"e.g. --vote-weights {','.join(['1'] + ['2'] * (seg.num_classes - 1))}; without weights it is majority")
    if mc.vote_weights and len(mc.vote_weights) != seg.num_classes:
        raise ConfigError(f"--vote-weights has {len(mc.vote_weights)} value(s); the model has {seg.num_classes} classes "
                          f"({', '.join(seg.dataset.class_names)})")
    return [seg.dataset.class_index(c) for c in mc.union_classes]
