"""Ranking metrics against hand-computed cases (numbers derived in the comments)."""
from __future__ import annotations

import math

import pytest
import torch

from m2rec.metrics import metrics_from_ranks, random_baseline, standard_errors, target_ranks

NEG_INF = float("-inf")


def test_ranks_by_hand():
    # 5 items (+ padding column 0). User 0: target 3 scores 0.7; items 1 (0.9) and 4 (0.8) beat it -> rank 3.
    # User 1: target 5 is the best -> rank 1. User 2: target 2 ties with item 1 (0.5) -> ties count
    # against the target, rank 2 (items 3, 4, 5 are lower).
    scores = torch.tensor([[NEG_INF, 0.9, 0.1, 0.7, 0.8, 0.2],
                           [NEG_INF, 0.1, 0.2, 0.3, 0.4, 0.5],
                           [NEG_INF, 0.5, 0.5, 0.1, 0.2, 0.3]])
    ranks = target_ranks(scores, torch.tensor([3, 5, 2]))
    assert ranks.tolist() == [3, 1, 2]


def test_metrics_by_hand():
    # ranks 3, 1, 2, 15: with K = 10 the last one misses.
    # HR@10 = 3/4. NDCG@10 = (1/log2(4) + 1/log2(2) + 1/log2(3) + 0)/4 = (0.5 + 1 + 0.63093)/4.
    # MRR@10 = (1/3 + 1 + 1/2 + 0)/4. With K = 20 rank 15 counts: + 1/log2(16) = 0.25 and + 1/15.
    m = metrics_from_ranks(torch.tensor([3, 1, 2, 15]), ks=(10, 20))
    assert m["hr@10"] == pytest.approx(0.75)
    assert m["ndcg@10"] == pytest.approx((0.5 + 1.0 + 0.6309297535714575) / 4)
    assert m["mrr@10"] == pytest.approx((1 / 3 + 1 + 0.5) / 4)
    assert m["hr@20"] == pytest.approx(1.0)
    assert m["ndcg@20"] == pytest.approx((0.5 + 1.0 + 0.6309297535714575 + 0.25) / 4)
    assert m["mrr@20"] == pytest.approx((1 / 3 + 1 + 0.5 + 1 / 15) / 4)


def test_rank_exactly_k_counts_and_k_plus_one_does_not():
    m = metrics_from_ranks(torch.tensor([10, 11]), ks=(10,))
    assert m["hr@10"] == 0.5
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(11) / 2)
    assert m["mrr@10"] == pytest.approx(0.1 / 2)


def test_constant_scores_get_the_worst_rank_not_the_best():
    scores = torch.zeros(2, 6)
    scores[:, 0] = NEG_INF
    assert target_ranks(scores, torch.tensor([1, 4])).tolist() == [5, 5]


def test_padding_is_never_ranked_and_must_be_minus_inf():
    scores = torch.tensor([[NEG_INF, 1.0, 2.0]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [1]
    with pytest.raises(ValueError, match="padding column"):
        target_ranks(torch.tensor([[5.0, 1.0, 2.0]]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"item ids in \[1, 2\]"):
        target_ranks(scores, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"item ids in \[1, 2\]"):
        target_ranks(scores, torch.tensor([3]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[NEG_INF, float("nan"), 1.0]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="targets must have shape"):
        target_ranks(torch.tensor([[NEG_INF, 1.0]]), torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="integer item ids"):
        target_ranks(torch.tensor([[NEG_INF, 1.0]]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=">= 1"):
        metrics_from_ranks(torch.tensor([0, 1]))


def test_random_baseline_matches_simulation():
    # A uniformly random ranking: the rank of the target is uniform over 1..n.
    n = 50
    exact = random_baseline(n, ks=(10,))
    assert exact["hr@10"] == pytest.approx(10 / n)
    ranks = torch.arange(1, n + 1)  # every rank once = the expectation over a uniform rank
    assert metrics_from_ranks(ranks, ks=(10,)) == pytest.approx(exact)


def test_standard_errors_by_hand():
    # ranks 1 and 20, K = 10: HR values 1 and 0 -> mean 0.5, sample std sqrt(0.5) = 0.7071,
    # SE = 0.7071 / sqrt(2) = 0.5. NDCG values 1 and 0 the same; MRR values 1 and 0 the same.
    se = standard_errors(torch.tensor([1, 20]), ks=(10,))
    assert se == pytest.approx({"hr@10": 0.5, "ndcg@10": 0.5, "mrr@10": 0.5})
    # ranks 3, 3: every user identical -> no spread
    assert standard_errors(torch.tensor([3, 3]), ks=(10,))["ndcg@10"] == 0.0
