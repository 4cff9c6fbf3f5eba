"""Vote rules over N sampled sub-networks (paper section 2.3), from running sums.

All rules are computed from accumulators that do not grow with N:
    votes[c]     = #samples whose arg-max is c                      (majority, weighted, union)
    wp_votes[c]  = #samples whose arg-max of (p * w) is c          (weighted-probs, the authors' variant)
    borda[c]     = sum over samples of the rank points of c (C-1 for the most probable ... 0)
    prob_sum[c]  = sum over samples of p_c                          (mean rule, ties, probabilities)

Rules:
    majority       arg-max of votes
    weighted       arg-max of votes * w                (each vote for c counts w_c)
    weighted-probs arg-max of wp_votes                 (p * w before each sample's arg-max)
    borda          arg-max of borda
    union          majority, then every voxel where >= 1 sample voted X becomes X, for the union classes
                   in reverse order so the first named class wins
    mean           arg-max of the mean probability

Ties (equal scores) go to the class with the higher mean probability, then to the lower class index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VoteAccumulator:
    """Running sums over MC samples on one grid (D, H, W); memory independent of N."""

    num_classes: int
    weights: torch.Tensor | None = None  # (C,) vote weights
    votes: torch.Tensor | None = None
    wp_votes: torch.Tensor | None = None
    borda: torch.Tensor | None = None
    prob_sum: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None  # sum of per-sample predictive entropies (for mutual information)
    n: int = 0
    track_entropy: bool = False
    _class_ids: torch.Tensor | None = field(default=None, repr=False)

    def _init(self, probs: torch.Tensor) -> None:
        shape = (self.num_classes, *probs.shape[2:])
        dev = probs.device
        self.votes = torch.zeros(shape, device=dev)
        self.wp_votes = torch.zeros(shape, device=dev)
        self.borda = torch.zeros(shape, device=dev)
        self.prob_sum = torch.zeros(shape, device=dev)
        if self.track_entropy:
            self.entropy_sum = torch.zeros(shape[1:], device=dev)
        w = torch.ones(self.num_classes) if self.weights is None else self.weights
        self.weights = w.to(dev, torch.float32)
        self._class_ids = torch.arange(self.num_classes, device=dev).view(1, -1, *([1] * (probs.ndim - 2)))

    def _count(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (n, D, H, W) -> per-class counts (C, D, H, W)."""
        return (labels[:, None] == self._class_ids).sum(0, dtype=torch.float32)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """Add samples. probs: (n, C, D, H, W) softmax probabilities (float32)."""
        if self.votes is None:
            self._init(probs)
        probs = probs.float()
        self.votes += self._count(probs.argmax(1))
        self.wp_votes += self._count((probs * self.weights.view(1, -1, *([1] * (probs.ndim - 2)))).argmax(1))
        # rank points: the least probable class gets 0, the most probable C-1 (double argsort)
        self.borda += probs.argsort(1).argsort(1).sum(0, dtype=torch.float32)
        self.prob_sum += probs.sum(0)
        if self.entropy_sum is not None:
            self.entropy_sum += -(probs * torch.log(probs.clamp_min(1e-12))).sum(1).sum(0)
        self.n += probs.shape[0]

    def mean_prob(self) -> torch.Tensor:
        return self.prob_sum / max(self.n, 1)

    def scores(self, rule: str) -> torch.Tensor:
        """Per-class scores (C, D, H, W) whose arg-max is the rule's label (union: its majority base)."""
        if rule in ("majority", "union"):
            return self.votes
        if rule == "weighted":
            return self.votes * self.weights.view(-1, *([1] * (self.votes.ndim - 1)))
        if rule == "weighted-probs":
            return self.wp_votes
        if rule == "borda":
            return self.borda
        if rule == "mean":
            return self.mean_prob()
        raise ValueError(rule)


def decide(scores: torch.Tensor, mean_prob: torch.Tensor, *, rel_tol: float = 1e-6) -> torch.Tensor:
    """Arg-max over classes with ties broken by higher mean probability, then lower class index.

    Args:
        scores, mean_prob: (C, ...) on the same grid.
    Returns:
        (...) long labels.
    """
    top = scores.max(0, keepdim=True).values
    tied = scores >= top - rel_tol * top.abs().clamp_min(1.0)
    masked = torch.where(tied, mean_prob, torch.full_like(mean_prob, -1.0))
    return masked.argmax(0)  # the first (lowest) index among equal mean probabilities


def apply_union(labels: torch.Tensor, any_vote: torch.Tensor, union_classes: list[int]) -> torch.Tensor:
    """Set voxels to class X where at least one sample voted X; earlier classes in the list take precedence.

    Args:
        labels: (...) majority labels; any_vote: (C, ...) bool.
    """
    out = labels.clone()
    for c in reversed(union_classes):
        out[any_vote[c]] = c
    return out


def vote_labels(acc: VoteAccumulator, rule: str, union_classes: list[int] | None = None) -> torch.Tensor:
    """The rule's label map on the accumulator's own grid."""
    labels = decide(acc.scores(rule), acc.mean_prob())
    if rule == "union":
        labels = apply_union(labels, acc.votes > 0, union_classes or [])
    return labels
