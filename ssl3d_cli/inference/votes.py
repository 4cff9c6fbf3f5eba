"""Vote rules over N sampled sub-networks (paper section 2.3), from running sums.

All rules are computed from accumulators that do not grow with N:
    votes[c]     = #samples whose arg-max is c                      (majority, weighted, union)
    wp_votes[c]  = #samples whose arg-max of (p * w) is c          (weighted-probs, the authors' variant)
    borda[c]     = sum over samples of the rank points of c (C-1 for the most probable ... 0)
    prob_sum[c]  = sum over samples of p_c                          (mean rule, ties, probabilities)

An accumulator keeps only the sums its rules read (``rules``; all of them when not given): prob_sum always
(the mean rule, the tie-break and the probability maps read it), the others per rule (:data:`RULE_STATISTIC`),
so ``--vote majority`` never pays for Borda points.

Rules:
    majority       arg-max of votes
    weighted       arg-max of votes * w                (each vote for c counts w_c)
    weighted-probs arg-max of wp_votes                 (p * w before each sample's arg-max)
    borda          arg-max of borda
    union          majority, then every voxel where >= 1 sample voted X becomes X, for the union classes
                   in reverse order so the first named class wins
    mean           arg-max of the mean probability

Ties (equal scores) go to the class with the higher mean probability, then to the lower class index.
A sample's arg-max is the lowest class among equal maxima; its Borda points are the ranks of a stable
ascending sort (among equal probabilities the higher class ranks higher); NaN counts as the largest value
in both (what ``torch.argmax`` and ``torch.argsort(stable=True)`` do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

#: The running sum each vote rule reads (``prob_sum`` is always kept).
RULE_STATISTIC = {"majority": "votes", "weighted": "votes", "union": "votes", "weighted-probs": "wp_votes", "borda": "borda",
                  "mean": "prob_sum"}
#: Above this many classes Borda points come from a stable double argsort rather than C(C-1)/2 comparisons.
BORDA_PAIRWISE_MAX_CLASSES = 8
#: Voxels per slab in :func:`decide`: the temporaries of a slab stay small whatever the scan's size.
DECIDE_SLAB_VOXELS = 1 << 20


def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds class indices 0..num_classes-1."""
    return torch.uint8 if num_classes <= 256 else torch.int64


def sample_argmax(probs: torch.Tensor) -> torch.Tensor:
    """Each sample's class, ``probs.argmax(1)``: (n, C, ...) -> (n, ...) long.

    On the CPU torch's arg-max over a short, strided class axis is slow (1.4 s for (2, 3, 128^3) on 2 cores); C - 1
    comparisons give the same answer (the lowest class among equal maxima) in a fifth of that. With a NaN present,
    or on another device (where arg-max is fast), it is ``torch.argmax`` itself.
    """
    if probs.device.type != "cpu" or bool(torch.isnan(probs).any()):
        return probs.argmax(1)
    best = probs[:, 0]
    labels = torch.zeros(best.shape, dtype=torch.long)
    for c in range(1, probs.shape[1]):
        better = probs[:, c] > best  # strict: an equal later class does not take the voxel
        best = torch.maximum(best, probs[:, c])
        labels.masked_fill_(better, c)
    return labels


def add_counts(counts: torch.Tensor, labels: torch.Tensor) -> None:
    """counts (C, ...) += one vote per sample for its class; labels (n, ...) long. Counts are exact integers."""
    n = labels.shape[0]
    if counts.device.type == "cpu":
        flat = counts.view(counts.shape[0], -1)
        flat.scatter_add_(0, labels.reshape(n, -1), torch.ones(1, 1).expand(n, flat.shape[1]))
    else:  # no atomics (deterministic mode would warn about scatter_add_ on CUDA)
        ids = torch.arange(counts.shape[0], device=counts.device).view(1, -1, *([1] * (labels.ndim - 1)))
        counts += (labels[:, None] == ids).sum(0, dtype=torch.float32)


def add_borda_points(points: torch.Tensor, probs: torch.Tensor) -> None:
    """points (C, ...) += the samples' rank points; probs (n, C, ...).

    A sample gives class c one point per class ranked below it in a stable ascending sort: c' < c with
    p_c' <= p_c, or c' > c with p_c' < p_c (NaN the largest). For a few classes that is one comparison per class
    pair, exact, in place of a double argsort (five times faster on the CPU, no sort on the GPU).
    """
    n, num_classes = probs.shape[:2]
    if num_classes > BORDA_PAIRWISE_MAX_CLASSES:
        points += probs.argsort(dim=1, stable=True).argsort(dim=1).sum(0, dtype=torch.float32)
        return
    for i in range(num_classes):
        for j in range(i + 1, num_classes):
            # j (the higher class) ranks above i unless p_j < p_i; a NaN p_j ranks above anything, a NaN p_i above finite p_j
            j_above = (probs[:, j] >= probs[:, i]) | torch.isnan(probs[:, j])
            above = j_above.sum(0, dtype=torch.float32)
            points[j] += above
            points[i] += n - above


@dataclass
class VoteAccumulator:
    """Running sums over MC samples on one grid (D, H, W); memory independent of N.

    Attributes:
        rules: the vote rules that will be asked for (:meth:`scores`); None: every rule. Only their sums are kept.
        track_entropy: also sum each sample's predictive entropy (mutual information maps).
    """

    num_classes: int
    weights: torch.Tensor | None = None  # (C,) vote weights
    votes: torch.Tensor | None = None
    wp_votes: torch.Tensor | None = None
    borda: torch.Tensor | None = None
    prob_sum: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None  # sum of per-sample predictive entropies (for mutual information)
    n: int = 0
    track_entropy: bool = False
    rules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.rules is not None:
            self.rules = tuple(self.rules)
            unknown = [r for r in self.rules if r not in RULE_STATISTIC]
            if unknown:
                raise ValueError(f"unknown vote rule(s) {unknown}; known: {', '.join(RULE_STATISTIC)}")

    def tracks(self, rule: str) -> bool:
        """Whether :meth:`scores` can answer ``rule``."""
        return self.rules is None or rule in self.rules or RULE_STATISTIC.get(rule) == "prob_sum"

    def _needs(self, statistic: str) -> bool:
        rules: Iterable[str] = RULE_STATISTIC if self.rules is None else self.rules
        return any(RULE_STATISTIC[r] == statistic for r in rules)

    def _init(self, probs: torch.Tensor) -> None:
        shape = (self.num_classes, *probs.shape[2:])
        dev = probs.device
        self.prob_sum = torch.zeros(shape, device=dev)
        if self._needs("votes"):
            self.votes = torch.zeros(shape, device=dev)
        if self._needs("wp_votes"):
            self.wp_votes = torch.zeros(shape, device=dev)
        if self._needs("borda"):
            self.borda = torch.zeros(shape, device=dev)
        if self.track_entropy:
            self.entropy_sum = torch.zeros(shape[1:], device=dev)
        w = torch.ones(self.num_classes) if self.weights is None else self.weights
        self.weights = w.to(dev, torch.float32)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """Add samples. probs: (n, C, D, H, W) softmax probabilities (float32)."""
        if self.prob_sum is None:
            self._init(probs)
        probs = probs.float()
        if self.votes is not None:
            add_counts(self.votes, sample_argmax(probs))
        if self.wp_votes is not None:
            add_counts(self.wp_votes, sample_argmax(probs * self.weights.view(1, -1, *([1] * (probs.ndim - 2)))))
        if self.borda is not None:
            add_borda_points(self.borda, probs)
        self.prob_sum += probs.sum(0)
        if self.entropy_sum is not None:
            self.entropy_sum += -(probs * torch.log(probs.clamp_min(1e-12))).sum(1).sum(0)
        self.n += probs.shape[0]

    def mean_prob(self) -> torch.Tensor:
        return self.prob_sum / max(self.n, 1)

    def scores(self, rule: str) -> torch.Tensor:
        """Per-class scores (C, D, H, W) whose arg-max is the rule's label (union: its majority base).

        Raises:
            ValueError: an unknown rule, or one this accumulator was not asked to track.
        """
        if rule not in RULE_STATISTIC:
            raise ValueError(rule)
        if not self.tracks(rule):
            raise ValueError(f"vote rule {rule!r} was not tracked (rules={self.rules}); create the accumulator with it in rules")
        if rule in ("majority", "union"):
            return self.votes
        if rule == "weighted":
            return self.votes * self.weights.view(-1, *([1] * (self.votes.ndim - 1)))
        if rule == "weighted-probs":
            return self.wp_votes
        if rule == "borda":
            return self.borda
        return self.mean_prob()


#: :func:`clear_winners`' mark for a voxel whose label must be computed from the resampled scores.
UNDECIDED = 255
#: A coarse voxel's winner is clear when it leads every other class by this fraction of max(1, largest |score|): 20x
#: what trilinear resampling's float32 rounding (about 1e-6 of it) and the tie tolerance (1e-6) could take away.
CLEAR_MARGIN = 1e-4


def _window(volume: torch.Tensor, op: Callable[..., torch.Tensor], before: int = 1, after: int = 2) -> torch.Tensor:
    """``op`` (torch.maximum / torch.minimum) over [i - before, i + after] along each axis of (D, H, W), indices clamped."""
    out = volume
    for axis in range(out.ndim):
        n = out.shape[axis]
        padded = torch.cat([out.narrow(axis, 0, 1)] * before + [out] + [out.narrow(axis, n - 1, 1)] * after, dim=axis)
        best = padded.narrow(axis, 0, n).clone()
        for shift in range(1, before + after + 1):
            op(best, padded.narrow(axis, shift, n), out=best)
        out = best
    return out


def clear_winners(scores: torch.Tensor) -> torch.Tensor:
    """Coarse voxels whose trilinearly resampled label is known without resampling: (C, D, H, W) -> (D, H, W) uint8.

    A voxel gets class k when k leads every other class by more than ``CLEAR_MARGIN * max(1, max |score|)`` at it and
    at every neighbour from one index before to two after along each axis; :data:`UNDECIDED` elsewhere. Why that is
    exact: a resampled voxel is a convex combination of its 2 x 2 x 2 lower/upper neighbours (the window holds them even
    if an index were rounded one off), so k's lead over any class there is at least the smallest lead at those
    neighbours, less float32 rounding of about 1e-6 of the largest score; the lead then exceeds the tie tolerance of
    :func:`decide`, k is its only top class, and its answer is k whatever the mean probabilities. NaN anywhere leaves
    every voxel undecided.

    Raises:
        ValueError: more than 255 classes (the labels are uint8).
    """
    num_classes = scores.shape[0]
    if num_classes > UNDECIDED:
        raise ValueError(f"{num_classes} classes: clear_winners labels are uint8")
    scores = scores.float()
    top = scores[0].clone()
    second = torch.full_like(top, -float("inf"))
    winner = torch.zeros(top.shape, dtype=torch.uint8, device=scores.device)
    for c in range(1, num_classes):
        better = scores[c] > top
        torch.maximum(second, torch.minimum(top, scores[c]), out=second)
        torch.maximum(top, scores[c], out=top)
        winner.masked_fill_(better, c)
    safe = CLEAR_MARGIN * torch.clamp_min(scores.abs().amax(), 1.0)
    winner.masked_fill_(~(top - second > safe), UNDECIDED)  # NaN: not greater, so undecided
    high, low = _window(winner, torch.maximum), _window(winner, torch.minimum)
    return torch.where(high == low, high, UNDECIDED)  # one class, clear at every neighbour (all UNDECIDED stays so)


def _threshold(scores: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """(C, ...) -> (...) the tie threshold top - rel_tol * max(|top|, 1), in the reference's float32 operations."""
    top = scores[0].clone()
    for c in range(1, scores.shape[0]):
        torch.maximum(top, scores[c], out=top)  # NaN propagates, as in max over the class axis
    margin = top.abs().clamp_min_(1.0).mul_(rel_tol)
    return torch.sub(top, margin, out=margin)


def _decide_slab(out: torch.Tensor, scores: torch.Tensor, mean_prob: torch.Tensor, rel_tol: float) -> None:
    """:func:`decide` on one slab without NaN in mean_prob: out (...) = the decision for scores, mean_prob (C, ...).

    One pass per class over a slab, no (C, ...) temporaries; the same float32 operations as the reference
    formulation (max, threshold, masked mean, first arg-max), so the same labels bit for bit.
    """
    threshold = _threshold(scores, rel_tol)
    best = torch.where(scores[0] >= threshold, mean_prob[0], -1.0)
    out.zero_()
    for c in range(1, scores.shape[0]):
        candidate = torch.where(scores[c] >= threshold, mean_prob[c], -1.0)
        better = candidate > best  # strict: among equal mean probabilities the lower class keeps the voxel
        torch.maximum(best, candidate, out=best)
        out.masked_fill_(better, c)


def _slab_rows(shape: torch.Size) -> int:
    return max(1, DECIDE_SLAB_VOXELS // max(1, math.prod(shape[1:])))


def _any_ties(scores: torch.Tensor, rel_tol: float) -> bool:
    """Whether at some voxel of (C, ...) two or more classes reach the tie threshold (so the mean probabilities matter)."""
    step = _slab_rows(scores.shape[1:])
    for start in range(0, scores.shape[1], step):
        part = scores[:, start:start + step]
        threshold = _threshold(part, rel_tol)
        count = (part[0] >= threshold).to(torch.uint8)
        for c in range(1, part.shape[0]):
            count += part[c] >= threshold
        if bool((count > 1).any()):
            return True
    return False


def decide(scores: torch.Tensor, mean_prob: torch.Tensor | Callable[[], torch.Tensor], *, rel_tol: float = 1e-6,
           dtype: torch.dtype | None = None, known: torch.Tensor | None = None) -> torch.Tensor:
    """Arg-max over classes with ties broken by higher mean probability, then lower class index.

    A class ties with the top score when it is within ``rel_tol * max(|top|, 1)`` of it; among the tied classes the
    one with the highest mean probability wins, the lowest index among equal ones. Computed in slabs along the first
    spatial axis (memory flat in the grid's size).

    Args:
        scores: (C, ...).
        mean_prob: (C, ...) probabilities on the same grid and device, or a function returning them, called only when
            some voxel (among those to compute) has tied scores: elsewhere the mean probabilities decide nothing.
        dtype: of the labels; default long (:func:`label_dtype` gives the smallest that fits).
        known: (...) uint8 labels already known to be the answer (e.g. from :func:`clear_winners`), :data:`UNDECIDED`
            where the answer is to be computed; only those voxels are read.
    Returns:
        (...) labels.
    """
    out = torch.empty(scores.shape[1:], dtype=dtype or torch.long, device=scores.device)
    if out.numel() == 0:
        return out
    if known is not None:
        out.copy_(known)
        todo = (known.reshape(-1) == UNDECIDED).nonzero().squeeze(1)
        if todo.numel():
            flat = scores.shape[0], -1

            def part_mean() -> torch.Tensor:
                mean = mean_prob() if callable(mean_prob) else mean_prob
                return mean.reshape(flat).index_select(1, todo)

            part = decide(scores.reshape(flat).index_select(1, todo), part_mean, rel_tol=rel_tol, dtype=out.dtype)
            out.view(-1).index_copy_(0, todo, part)
        return out
    if callable(mean_prob):
        # no ties: one class reaches the threshold at each voxel and wins whatever its mean probability (in [0, 1])
        mean_prob = mean_prob() if _any_ties(scores, rel_tol) else torch.zeros((), device=scores.device).expand(scores.shape)
    if scores.ndim == 1 or bool(torch.isnan(mean_prob).any()):  # the reference formulation (NaN: the largest mean probability)
        top = scores.max(0, keepdim=True).values
        tied = scores >= top - rel_tol * top.abs().clamp_min(1.0)
        out.copy_(torch.where(tied, mean_prob, torch.full_like(mean_prob, -1.0)).argmax(0))
        return out
    step = _slab_rows(scores.shape[1:])
    for start in range(0, out.shape[0], step):
        stop = min(start + step, out.shape[0])
        _decide_slab(out[start:stop], scores[:, start:stop], mean_prob[:, start:stop], rel_tol)
    return out


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
