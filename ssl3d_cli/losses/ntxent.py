"""NT-Xent, paper Eq. 1, as a float32 cross-entropy over masked cosine-similarity logits.

At temperature 0.05 the logits reach 1/0.05 = 20 and exp(20) overflows float16 if written as
exp/sum; cross-entropy over float32 logits (log-sum-exp) is exact and stable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: float,
    groups: torch.Tensor | None = None,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NT-Xent over anchors, and the positive-pair top-1 accuracy.

    Args:
        z1, z2: (N, d) projections of the two views; row i of z1 and row i of z2 are a positive pair.
        temperature: tau > 0.
        groups: (N,) volume id per sample. If given, only views of the same volume are negatives
            (the authors' code); otherwise all 2(N-1) other views are (the paper's text).
        rows: anchors to average over, as a slice of 0..N-1 applied to both views (each rank of a
            distributed run takes its own samples; the columns are always all 2N views).
    Returns:
        (loss, accuracy), scalars; loss in float32.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)  # (2N, d)
    idx = torch.arange(n, device=z.device)
    if rows is not None:
        idx = idx[rows]
    anchors = torch.cat([idx, idx + n])  # (2n,) rows of z used as anchors
    logits = z[anchors] @ z.T / temperature  # (2n, 2N)
    targets = torch.cat([idx + n, idx])
    # k != i, as a comparison: an indexed assignment of True copies the scalar to the GPU and synchronises every step
    mask = anchors[:, None] == torch.arange(z.shape[0], device=z.device)[None, :]
    if groups is not None:
        g = torch.cat([groups, groups]).to(z.device)
        mask |= g[anchors][:, None] != g[None, :]
    logits = logits.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, targets)
    accuracy = (logits.argmax(dim=1) == targets).float().mean()
    return loss, accuracy
