"""Sliding-window MC-dropout inference on grids larger than the network's patch (native-resolution mode, issue 15).

Conventions (nnU-Net's, with the differences named):

Window placement (:func:`window_starts`, :func:`window_grid`)
    Per axis the target step is ``patch * (1 - overlap)`` rounded half up to an integer >= 1; the number of windows is
    ``ceil((size - patch) / step) + 1`` and the windows are spread evenly: start i = round(i * (size - patch) / (n - 1)),
    so the first starts at 0 and the last ends at the border. Neighbours overlap by about ``overlap`` of the patch:
    rounding the step and the starts can take up to a voxel from it (13 voxels, patch 5, overlap 0.5: starts 0, 3, 5,
    8, the first pair overlapping by 2 voxels, 0.4). nnU-Net
    uses the unrounded step; rounding it first keeps the count free of float noise (``ceil(13.999999)``) and makes
    every start distinct. Windows are visited in C order over (axis 0, axis 1, axis 2); a window's index is its
    position in that order.

Padding (:func:`pad_to_patch`)
    An axis shorter than the patch is padded to exactly the patch, split evenly before/after (nnU-Net's
    ``pad_nd_image``), and every result is cropped back to the image's own grid. The pad value is, per channel, the
    image's minimum (``pad_value=None``) rather than nnU-Net's 0: the network sees the preprocessed foreground crop,
    beyond which the scan holds background, which the darkest value imitates better than the mean intensity (0 after
    z-scoring). A constant can be given instead.

Gaussian importance (:func:`gaussian_importance`)
    Separable exp(-d^2 / (2 sigma^2)) with sigma = patch * sigma_scale (1/8 by default, nnU-Net's), centred on the
    patch's middle ((p - 1) / 2, so the map is mirror-symmetric also for even sizes, where nnU-Net centres on p // 2),
    evaluated analytically (nnU-Net filters a delta with scipy, which truncates at 4 sigma), scaled so its maximum is
    1, and any value that is 0 raised to the smallest nonzero value, so no voxel of a window has weight 0.

Fusion (:class:`SlidingWindowAccumulator`)
    Each window's MC samples fill a per-window :class:`~ssl3d_cli.inference.votes.VoteAccumulator` (the running sums of
    the asked rules; memory independent of N). For every statistic S (votes, wp_votes, borda, prob_sum, entropy_sum)
    the full grid holds ``sum_k w_k S_k / sum_k w_k`` over the windows k covering a voxel, with w_k the Gaussian at
    the voxel's position in window k. The weight sum ``sum_k w_k`` is known from the window grid before any sampling,
    so each window adds ``(w_k / sum w) * S_k``: a voxel covered by one window gets ``(w / w) * S = 1 * S``, that
    window's statistic bit for bit, in float32 and without a division at the end. The fused sums are in the units of
    one window (counts out of N, N = samples per window), so the result is a ``VoteAccumulator`` with ``n = N`` and
    the existing rules, tie-break and maps (``vote_labels``, ``decide``, ``ScanVotes``) read it unchanged. Read as
    samples, a voxel's fused sums are those of the union of its windows' N samples each, sample s of window k
    weighing ``w_k / (N * sum w)``; hence the mutual information H[mean p] - mean H[p] from the fused sums is that
    of this weighted sample set (never negative, by concavity), and ``union`` counts any vote of any covering window.

Dropout masks
    Every window samples on its own: :func:`~ssl3d_cli.inference.mc.sample_probabilities` runs per window (the
    deterministic prefix computed once per window, only dropout modules sampling), seeded with
    :func:`window_seed` (seed, index): window 0 uses the seed itself (so a scan of one window samples exactly as the
    whole-volume path), window k a seed a Weyl step away. There is no sub-network shared across windows to preserve:
    element-wise dropout on feature maps draws a mask per position, and a window's positions are its own. So an
    overlap voxel's votes come from independent draws of each covering window, weighted as above.

Percentiles and std (``percentiles``, ``percentile_fusion``)
    A percentile over samples is not a running sum: per window, the N samples of p(target) are kept (uint8, as
    :class:`~ssl3d_cli.inference.uncertainty.TargetStore`, N x patch bytes, freed after the window) and the
    window's percentile and std maps computed from them. They reach the full grid by one of two rules:
    ``nearest`` (default): each voxel takes the maps of the window whose centre is nearest (per axis; ties to the
    lower start), which is the window with the highest Gaussian weight there: the exact percentile of N real samples
    (of the window that sees the voxel with the most context), with seams where the owning window changes.
    ``gaussian``: the windows' maps averaged with the fusion weights above (no seams; an average of quantiles, i.e.
    the quantile of the Vincentised mixture, not a percentile of any one sample set).
    Either way a voxel covered by one window gets that window's values exactly, and memory is bounded by the patch.

The engine never prints; ``progress(done, total)`` is called after each window.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssl3d_cli.inference.mc import sample_probabilities
from ssl3d_cli.inference.uncertainty import TargetStore, entropy
from ssl3d_cli.inference.votes import VoteAccumulator, decide, label_dtype, vote_labels
from ssl3d_cli.models.unet import UNet

Shape3 = tuple[int, int, int]

#: The running sums of a :class:`VoteAccumulator` that are fused across windows (those it keeps; None ones skipped).
STATISTICS = ("votes", "wp_votes", "borda", "prob_sum", "entropy_sum")
#: Rules for the percentile / std maps where windows overlap (see the module docstring).
PERCENTILE_FUSIONS = ("nearest", "gaussian")
#: Odd 64-bit constant (2^64 / golden ratio) between successive windows' seeds.
_SEED_STEP = 0x9E3779B97F4A7C15


def _step(patch: int, overlap: float) -> int:
    """The target step in voxels: patch * (1 - overlap) rounded half up, at least 1."""
    return max(1, int(math.floor(patch * (1.0 - overlap) + 0.5)))


def window_starts(size: int, patch: int, overlap: float = 0.5) -> list[int]:
    """Start indices of the windows along one axis of ``size`` voxels (``size >= patch``; pad first otherwise).

    Raises:
        ValueError: overlap outside [0, 1), patch < 1, or size < patch.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap {overlap}: must be in [0, 1)")
    if patch < 1 or size < patch:
        raise ValueError(f"patch {patch} must be >= 1 and fit the axis of {size} voxels (pad the axis to the patch first)")
    span = size - patch
    if span == 0:
        return [0]
    n = -(-span // _step(patch, overlap)) + 1  # integer ceil
    return [int(math.floor(i * span / (n - 1) + 0.5)) for i in range(n)]


def padded_shape(shape: Sequence[int], patch: Sequence[int]) -> Shape3:
    """The grid the windows tile: each axis at least the patch."""
    return tuple(max(s, p) for s, p in zip(shape, patch))  # type: ignore[return-value]


def window_grid(shape: Sequence[int], patch: Sequence[int], overlap: float = 0.5) -> list[Shape3]:
    """Window starts (z, y, x) over a (D, H, W) grid, C order; axes shorter than the patch count as padded to it."""
    padded = padded_shape(shape, patch)
    axes = [window_starts(s, p, overlap) for s, p in zip(padded, patch)]
    return [tuple(s) for s in itertools.product(*axes)]  # type: ignore[misc]


def pad_to_patch(image: torch.Tensor, patch: Sequence[int], value: float | None = None) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Pad axes shorter than the patch to the patch, evenly before and after.

    Args:
        image: (1, C, D, H, W).
        value: the pad value; None: each channel's minimum.
    Returns:
        the padded image (1, C, D', H', W') (``image`` itself when nothing is padded), and the slices of the
        padded grid that hold the original (D, H, W).
    """
    shape = tuple(image.shape[2:])
    target = padded_shape(shape, patch)
    before = [(t - s) // 2 for s, t in zip(shape, target)]
    crop = tuple(slice(b, b + s) for b, s in zip(before, shape))
    if target == shape:
        return image, crop  # type: ignore[return-value]
    if value is None:
        fill = image.amin(dim=(2, 3, 4), keepdim=True)  # (1, C, 1, 1, 1)
    else:
        fill = torch.full((1, image.shape[1], 1, 1, 1), float(value), dtype=image.dtype, device=image.device)
    out = fill.expand(1, image.shape[1], *target).clone()
    out[(slice(None), slice(None), *crop)] = image
    return out, crop  # type: ignore[return-value]


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1.0 / 8, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Importance weights of a window: (pd, ph, pw) float32, maximum 1, no zeros, mirror-symmetric on every axis.

    sigma = patch * sigma_scale per axis, centre (p - 1) / 2; computed in float64 as the product of three 1D
    Gaussians, then normalised by its maximum.
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale {sigma_scale}: must be > 0")
    profiles = []
    for p in patch:
        x = torch.arange(p, dtype=torch.float64)
        sigma = p * sigma_scale
        profiles.append(torch.exp(-((x - (p - 1) / 2) ** 2) / (2 * sigma * sigma)))
    g = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    g = (g / g.max()).float()
    zero = g == 0
    if bool(zero.any()):  # underflow (a very small sigma_scale): a weight of 0 could leave a voxel with no weight at all
        g[zero] = g[~zero].min()
    return g.to(device) if device is not None else g


def window_seed(seed: int, index: int) -> int:
    """The MC seed of window ``index``: ``seed`` for window 0, then Weyl steps (mod 2^63, a valid torch seed)."""
    return (seed + index * _SEED_STEP) % (1 << 63)


def nearest_centre_bounds(starts: Sequence[int], patch: int, size: int) -> list[tuple[int, int]]:
    """Per axis, the voxels [lo, hi) nearest to each window's centre (start + (patch - 1) / 2); ties to the lower start.

    The owned interval lies inside its window, and the intervals partition [0, size). Along the padded axis of a
    single window it is the whole axis.
    """
    bounds = []
    lo = 0
    for i, s in enumerate(starts):
        # voxel x belongs to window i while 2x <= c_i + c_{i+1} = s_i + s_{i+1} + patch - 1
        hi = size if i == len(starts) - 1 else (s + starts[i + 1] + patch - 1) // 2 + 1
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _box(start: Sequence[int], patch: Sequence[int]) -> tuple[slice, slice, slice]:
    return tuple(slice(s, s + p) for s, p in zip(start, patch))  # type: ignore[return-value]


class SlidingWindowAccumulator:
    """Gaussian-weighted full-grid sums of per-window MC statistics; memory independent of N.

    Holds, on the padded grid (D', H', W'): the weight sum (D', H', W'), for each statistic the window accumulators
    keep a (C, D', H', W') sum ((D', H', W') for ``entropy_sum``), and with ``percentiles`` the fused
    (Q, D', H', W') percentile and (D', H', W') std maps. Nothing grows with N or with the number of windows.

    Args:
        shape: the image's (D, H, W) (before padding).
        patch: window size (pd, ph, pw).
        percentiles: the q (0..100) whose maps are fused (empty: none).
        percentile_fusion: ``nearest`` or ``gaussian`` (module docstring).
    """

    def __init__(self, shape: Sequence[int], patch: Sequence[int], *, overlap: float = 0.5, sigma_scale: float = 1.0 / 8,
                 percentiles: Sequence[float] = (), percentile_fusion: str = "nearest", device: torch.device | str = "cpu") -> None:
        if percentile_fusion not in PERCENTILE_FUSIONS:
            raise ValueError(f"percentile_fusion {percentile_fusion!r}: choose one of {', '.join(PERCENTILE_FUSIONS)}")
        self.shape: Shape3 = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self.patch: Shape3 = tuple(int(p) for p in patch)  # type: ignore[assignment]
        self.grid: Shape3 = padded_shape(self.shape, self.patch)
        self.device = torch.device(device)
        self.starts = window_grid(self.shape, self.patch, overlap)
        self.importance = gaussian_importance(self.patch, sigma_scale, device=self.device)
        self.weight_sum = torch.zeros(self.grid, device=self.device)
        for start in self.starts:  # known before any sampling, so each window can add its normalised share
            self.weight_sum[_box(start, self.patch)] += self.importance
        axes = [window_starts(s, p, overlap) for s, p in zip(self.grid, self.patch)]
        self._owned = [dict(zip(a, nearest_centre_bounds(a, p, s))) for a, p, s in zip(axes, self.patch, self.grid)]
        self.percentile_qs = [float(q) for q in percentiles]
        self.percentile_fusion = percentile_fusion
        self.sums: dict[str, torch.Tensor] = {}
        self.percentile_maps: torch.Tensor | None = None
        self.std_map: torch.Tensor | None = None
        self.template: VoteAccumulator | None = None  # the first window's accumulator settings (classes, weights, rules)
        self.n = 0
        self.windows_done = 0

    def owned_box(self, start: Sequence[int]) -> tuple[slice, slice, slice]:
        """The voxels (padded grid) whose nearest window centre is the window at ``start``."""
        return tuple(slice(*owned[s]) for owned, s in zip(self._owned, start))  # type: ignore[return-value]

    @torch.no_grad()
    def add(self, start: Sequence[int], acc: VoteAccumulator, store: TargetStore | None = None) -> None:
        """Add one window's sums (and, with percentiles, its per-sample store of p(target)).

        Args:
            start: the window's (z, y, x) start on the padded grid.
            acc: the window's accumulator, sums (C, pd, ph, pw); every window must have the same n, classes and rules.
            store: the window's :class:`TargetStore` (N, pd, ph, pw); needed when ``percentiles`` were asked for.
        """
        if acc.prob_sum is None:
            raise ValueError("the window accumulator holds no samples")
        if self.template is None:
            # settings only: keeping ``acc`` itself would hold the first window's sums
            self.template = VoteAccumulator(acc.num_classes, weights=acc.weights, track_entropy=acc.track_entropy, rules=acc.rules)
            self.n = acc.n
            for name in STATISTICS:
                value = getattr(acc, name)
                if value is not None:
                    self.sums[name] = torch.zeros((*value.shape[:-3], *self.grid), device=self.device)
        elif acc.n != self.n or any((getattr(acc, name) is None) != (name not in self.sums) for name in STATISTICS):
            raise ValueError("every window must hold the same statistics over the same number of samples")
        box = _box(start, self.patch)
        share = self.importance / self.weight_sum[box]  # 1 exactly where this window is the only one
        for name, full in self.sums.items():
            full[(..., *box)] += share * getattr(acc, name).to(self.device)
        if self.percentile_qs:
            if store is None:
                raise ValueError("percentiles were asked for: pass each window's TargetStore")
            self._add_percentiles(start, box, share, store)
        self.windows_done += 1

    def _add_percentiles(self, start: Sequence[int], box: tuple[slice, ...], share: torch.Tensor, store: TargetStore) -> None:
        maps = torch.cat([store.percentiles(self.percentile_qs), store.std()[None]]).to(self.device)  # (Q + 1, pd, ph, pw)
        if self.percentile_maps is None:
            self.percentile_maps = torch.zeros((len(self.percentile_qs), *self.grid), device=self.device)
            self.std_map = torch.zeros(self.grid, device=self.device)
        assert self.std_map is not None
        if self.percentile_fusion == "gaussian":
            self.percentile_maps[(slice(None), *box)] += share * maps[:-1]
            self.std_map[box] += share * maps[-1]
            return
        owned = self.owned_box(start)
        local = tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(owned, box))
        self.percentile_maps[(slice(None), *owned)] = maps[(slice(None), *local)][:-1]
        self.std_map[owned] = maps[(-1, *local)]

    def result(self, crop: tuple[slice, slice, slice] | None = None) -> VoteAccumulator:
        """The fused sums as a :class:`VoteAccumulator` on the image's own grid (padding cropped off).

        Args:
            crop: where the image lies in the padded grid (from :func:`pad_to_patch`); default: centred, as it pads.
        Raises:
            ValueError: some window was not added.
        """
        if self.template is None or self.windows_done != len(self.starts):
            raise ValueError(f"{self.windows_done} of {len(self.starts)} windows added")
        crop = crop or self.crop()
        t = self.template
        weights = None if t.weights is None else t.weights.to(self.device)
        out = VoteAccumulator(t.num_classes, weights=weights, n=self.n, track_entropy=t.track_entropy, rules=t.rules)
        for name, full in self.sums.items():
            setattr(out, name, full[(..., *crop)])
        return out

    def crop(self) -> tuple[slice, slice, slice]:
        """Where the image lies in the padded grid (centred, as :func:`pad_to_patch` pads)."""
        return tuple(slice((g - s) // 2, (g - s) // 2 + s) for s, g in zip(self.shape, self.grid))  # type: ignore[return-value]

    def percentile_result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused (Q, D, H, W) percentile maps and (D, H, W) std of p(target), on the image's own grid."""
        if self.percentile_maps is None or self.std_map is None:
            raise ValueError("no percentiles were accumulated")
        crop = self.crop()
        return self.percentile_maps[(slice(None), *crop)], self.std_map[crop]


@dataclass
class SlidingWindowResult:
    """What :func:`sliding_window_votes` returns, on the image's own (D, H, W) grid.

    Attributes:
        votes: the fused sums, n = samples per window (:func:`sliding_labels`, ``ScanVotes`` and the maps read it).
        percentiles: (Q, D, H, W) of p(target), or None; std: (D, H, W), or None.
        windows: how many windows were sampled.
    """

    votes: VoteAccumulator
    percentiles: torch.Tensor | None
    std: torch.Tensor | None
    windows: int


@torch.no_grad()
def sliding_window_votes(
    model: UNet,
    image: torch.Tensor,
    *,
    patch: Sequence[int],
    mc_samples: int,
    overlap: float = 0.5,
    sigma_scale: float = 1.0 / 8,
    mc_batch: int = 0,
    autocast: Callable[[], object] | None = None,
    seed: int = 0,
    dropout_encoder: float | None = None,
    dropout_decoder: float | None = None,
    rules: Sequence[str] | None = None,
    vote_weights: torch.Tensor | None = None,
    track_entropy: bool = False,
    target: Sequence[int] | None = None,
    percentiles: Sequence[float] = (),
    percentile_fusion: str = "nearest",
    pad_value: float | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    sample_options: Mapping[str, Any] | None = None,
) -> SlidingWindowResult:
    """MC-dropout votes of a whole scan, window by window (one window at a time, ``mc_batch`` samples per forward).

    Args:
        image: (1, C, D, H, W) on the model's device; each patch size must be divisible by 2^(levels - 1).
        mc_samples: samples per window (0 or 1: one deterministic pass).
        rules, vote_weights, track_entropy: as for :class:`VoteAccumulator` (only the asked rules' sums are kept).
        target: class indices whose summed probability the percentile/std maps describe (needed with ``percentiles``).
        device: where the full-grid sums live (default: the image's device).
        sample_options: further keyword arguments of :func:`sample_probabilities` (e.g. ``compile``), passed unchanged.
    Raises:
        ValueError: a patch the U-Net cannot take, or percentiles without a target.
    """
    patch = tuple(int(p) for p in patch)
    factor = 2 ** (len(model.config.widths) - 1)
    if len(patch) != 3 or any(p < 1 or p % factor for p in patch):
        raise ValueError(f"patch {patch}: three sizes, each divisible by {factor} ({len(model.config.widths)} U-Net levels)")
    if percentiles and not target:
        raise ValueError("percentiles need a target (class indices)")
    shape = tuple(image.shape[2:])
    padded, crop = pad_to_patch(image, patch, pad_value)
    fused = SlidingWindowAccumulator(shape, patch, overlap=overlap, sigma_scale=sigma_scale, percentiles=percentiles,
                                     percentile_fusion=percentile_fusion, device=device or image.device)
    n_samples = max(1, mc_samples)
    for index, start in enumerate(fused.starts):
        acc = VoteAccumulator(model.num_classes, weights=vote_weights, track_entropy=track_entropy,
                              rules=tuple(rules) if rules is not None else None)
        store = TargetStore(list(target), n_samples) if percentiles and target else None

        def consume(probs: torch.Tensor, acc: VoteAccumulator = acc, store: TargetStore | None = store) -> None:
            acc.update(probs)
            if store is not None:
                store(probs)

        window = padded[(slice(None), slice(None), *_box(start, patch))]
        sample_probabilities(model, window, mc_samples=mc_samples, mc_batch=mc_batch, autocast=autocast,
                             seed=window_seed(seed, index), dropout_encoder=dropout_encoder, dropout_decoder=dropout_decoder,
                             consume=consume, **(sample_options or {}))
        fused.add(start, acc, store)
        if progress is not None:
            progress(index + 1, len(fused.starts))
    pct, std = fused.percentile_result() if percentiles else (None, None)
    return SlidingWindowResult(fused.result(crop), pct, std, len(fused.starts))


def sliding_labels(acc: VoteAccumulator, rule: str, union_classes: list[int] | None = None) -> torch.Tensor:
    """The rule's labels (D, H, W) from fused sums, with the whole-volume path's conventions.

    One deterministic pass (n <= 1) is the plain arg-max of the mean probability whatever the rule (as
    ``ScanVotes.labels``: there is nothing to vote on); otherwise :func:`vote_labels` (its tie-break and union).
    With N >= 2 identical samples (dropout rate 0) a vote rule fuses the windows' decisions, which where windows
    overlap may differ from the arg-max of the fused mean probability.
    """
    if acc.n <= 1 or rule == "mean":
        mean = acc.mean_prob()
        return decide(mean, mean, dtype=label_dtype(acc.num_classes))
    return vote_labels(acc, rule, union_classes).to(label_dtype(acc.num_classes))


def entropy_maps(acc: VoteAccumulator) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictive entropy H[mean p] and mutual information H[mean p] - mean H[p] (D, H, W), nats, from fused sums.

    Needs ``track_entropy``; the same formula as ``ssl3d uncertainty`` on one volume. Where windows overlap, the
    mutual information also counts the windows' disagreement (their samples are pooled), so it is above 0 there even
    for a deterministic network (one pass per window).
    """
    if acc.entropy_sum is None:
        raise ValueError("mutual information needs track_entropy=True")
    h = entropy(acc.mean_prob())
    return h, (h - acc.entropy_sum / max(acc.n, 1)).clamp_min(0)
