"""Per-voxel uncertainty from MC-dropout samples.

- percentile maps: the q-th percentile over the N samples of p(target), where the target is a class,
  several classes or a region (e.g. WT = classes 1+2+4), their probabilities summed (Figure 7);
- predictive entropy H[mean_s p_s] over all classes;
- mutual information H[mean_s p_s] - mean_s H[p_s] (the epistemic part);
- standard deviation of p(target) over samples.

Samples of p(target) are kept as uint8 (resolution 1/255): 100 samples at 128^3 take 210 MB.
"""

from __future__ import annotations

import re

import torch

_CHUNK = 1 << 18  # voxels per quantile call (bounds the float copy of the store)


class TargetStore:
    """Compact per-sample store of p(target): (N, D, H, W) uint8, filled batch by batch."""

    def __init__(self, class_indices: list[int], n_samples: int) -> None:
        self.class_indices = class_indices
        self.n_samples = n_samples
        self.data: torch.Tensor | None = None
        self.filled = 0

    def __call__(self, probs: torch.Tensor) -> None:
        """probs: (n, C, D, H, W) float32."""
        target = probs[:, self.class_indices].sum(1).clamp(0, 1)
        if self.data is None:
            self.data = torch.empty((self.n_samples, *target.shape[1:]), dtype=torch.uint8, device=probs.device)
        n = target.shape[0]
        self.data[self.filled:self.filled + n] = torch.round(target * 255).to(torch.uint8)
        self.filled += n

    def percentiles(self, qs: list[float]) -> torch.Tensor:
        """(len(qs), D, H, W) float32 percentiles (linear interpolation, as numpy's default)."""
        assert self.data is not None
        flat = self.data[: self.filled].reshape(self.filled, -1)
        q = torch.tensor([x / 100 for x in qs], device=flat.device)
        out = torch.empty((len(qs), flat.shape[1]), device=flat.device)
        for start in range(0, flat.shape[1], _CHUNK):
            block = flat[:, start:start + _CHUNK].float() / 255
            out[:, start:start + _CHUNK] = torch.quantile(block, q, dim=0)
        return out.view(len(qs), *self.data.shape[1:])

    def std(self) -> torch.Tensor:
        assert self.data is not None
        flat = self.data[: self.filled].reshape(self.filled, -1)
        out = torch.empty(flat.shape[1], device=flat.device)
        for start in range(0, flat.shape[1], _CHUNK):
            out[start:start + _CHUNK] = (flat[:, start:start + _CHUNK].float() / 255).std(0, unbiased=False)
        return out.view(self.data.shape[1:])


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H over classes of (C, ...) probabilities (nats)."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(0)


def percentile_name(q: float) -> str:
    """5 -> 'p05', 50 -> 'p50', 2.5 -> 'p02_5' (zero-padded so names sort and scripts can rely on them)."""
    whole = int(q)
    return f"p{whole:02d}" if q == whole else f"p{whole:02d}_{str(q).split('.')[1]}"


def target_file_name(name: str) -> str:
    """The target's part of a file name: letters, digits, ``+``, ``-`` and ``.`` kept, anything else run together as ``-``.

    ``organ`` -> ``organ``, ``WT`` -> ``WT``, ``organ+lesion`` -> ``organ+lesion``, ``left kidney/cortex`` ->
    ``left-kidney-cortex``; a name with nothing left (``..``) -> ``target``.
    """
    token = re.sub(r"[^A-Za-z0-9+.-]+", "-", name).strip("-.")
    return token or "target"
