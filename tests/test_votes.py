"""Vote rules on hand-made sample stacks with known answers."""

import pytest
import torch

from ssl3d_cli.inference.votes import VoteAccumulator, vote_labels


def stack(*samples):
    """samples: per-sample per-voxel class probabilities [[p_voxel0], [p_voxel1], ...] -> (N, C, V, 1, 1)."""
    t = torch.tensor(samples, dtype=torch.float32)  # (N, V, C)
    return t.permute(0, 2, 1)[..., None, None]


def labels(probs, rule, weights=None, union=None, batch=None):
    acc = VoteAccumulator(probs.shape[1], weights=None if weights is None else torch.tensor(weights, dtype=torch.float32))
    for start in range(0, probs.shape[0], batch or probs.shape[0]):  # batches must not change the answer
        acc.update(probs[start:start + (batch or probs.shape[0])])
    return vote_labels(acc, rule, union).flatten().tolist()


def test_majority_and_mean():
    p = stack([[0.6, 0.3, 0.1]], [[0.2, 0.7, 0.1]], [[0.1, 0.8, 0.1]])
    assert labels(p, "majority") == [1]
    assert labels(p, "mean", batch=1) == [1]


def test_weighted_and_weighted_probs_disagree_as_in_the_issue():
    p = stack(*[[[0.6, 0.4, 0.0]]] * 5)  # every sample: p = (0.6, 0.4, 0.0)
    assert labels(p, "weighted", weights=[1, 2, 2]) == [0]  # five votes for 0 count 5 x 1 > 0
    assert labels(p, "weighted-probs", weights=[1, 2, 2]) == [1]  # 0.4 * 2 > 0.6 * 1 in every sample


def test_weighted_majority_changes_the_winner():
    p = stack([[0.9, 0.1, 0.0]], [[0.9, 0.1, 0.0]], [[0.9, 0.1, 0.0]], [[0.1, 0.9, 0.0]], [[0.1, 0.9, 0.0]])
    assert labels(p, "majority") == [0]  # 3 votes vs 2
    assert labels(p, "weighted", weights=[1, 2, 2]) == [1]  # 3 x 1 < 2 x 2


def test_borda_and_majority_disagree():
    # class 0 wins 2 of 3 samples narrowly but is last in the third; class 1 is always a strong second or first
    p = stack([[0.5, 0.4, 0.1]], [[0.5, 0.4, 0.1]], [[0.0, 0.6, 0.4]])
    assert labels(p, "majority") == [0]
    # points: class0 2+2+0 = 4, class1 1+1+2 = 4, class2 0+0+1 = 1 -> tie 0/1, broken by mean prob (0.333 vs 0.467) -> 1
    assert labels(p, "borda") == [1]


def test_union_precedence_and_base_majority():
    # voxel 0: one sample says 2, one says 1, rest 0; voxel 1: one sample says 1; voxel 2: all 0
    p = stack(
        [[0.1, 0.1, 0.8], [0.2, 0.7, 0.1], [0.9, 0.05, 0.05]],
        [[0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05]],
        [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05]],
    )
    assert labels(p, "majority") == [0, 0, 0]
    assert labels(p, "union", union=[2]) == [2, 0, 0]
    assert labels(p, "union", union=[2, 1]) == [2, 1, 0]  # 2 named first wins voxel 0
    assert labels(p, "union", union=[1, 2]) == [1, 1, 0]


def test_ties_go_to_higher_mean_probability_then_lower_index():
    p = stack([[0.55, 0.45]], [[0.30, 0.70]])  # one vote each; mean prob 0.425 vs 0.575
    assert labels(p, "majority") == [1]
    q = stack([[0.6, 0.4]], [[0.4, 0.6]])  # one vote each, equal mean probabilities -> lower index
    assert labels(q, "majority") == [0]
    assert labels(q, "borda") == [0]


@pytest.mark.parametrize("rule", ["majority", "weighted", "weighted-probs", "borda", "mean"])
def test_single_confident_sample_every_rule_agrees(rule):
    p = stack([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]])
    assert labels(p, rule, weights=[1, 1, 1]) == [2, 0]
