"""The algorithm's pure functions against hand-computed values."""
import math

import pytest
import torch

from mgrpo import algorithm as alg

# ---- IQR filter ------------------------------------------------------------------------------------------

def test_iqr_threshold_hand_computed():
    # sorted [1, 2, 3, 4, 10]: Q1 = 2, Q3 = 4 (linear interpolation), IQR = 2, T = 2 - 0.75 * 2 = 0.5
    h = torch.tensor([3.0, 1.0, 10.0, 2.0, 4.0])
    assert alg.iqr_threshold(h, 0.75) == pytest.approx(0.5)
    keep, t = alg.iqr_keep_mask(h, 0.75)
    assert keep.tolist() == [True] * 5 and t == pytest.approx(0.5)


def test_iqr_prunes_low_entropy_outlier():
    # sorted [0.1, 2, 2.2, 2.4, 2.6, 2.8, 3, 3.2]: Q1 = 2.15, Q3 = 2.85, T = 2.15 - 1.0 * 0.7 = 1.45
    h = torch.tensor([2.0, 2.2, 0.1, 2.4, 2.6, 2.8, 3.0, 3.2])
    keep, t = alg.iqr_keep_mask(h, 1.0)
    assert t == pytest.approx(1.45)
    assert keep.tolist() == [True, True, False, True, True, True, True, True]


def test_iqr_k_zero_prunes_below_q1():
    h = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])     # Q1 = 2
    keep, t = alg.iqr_keep_mask(h, 0.0)
    assert t == pytest.approx(2.0) and keep.tolist() == [False, True, True, True, True]


def test_iqr_degenerate_cases():
    keep, t = alg.iqr_keep_mask(torch.tensor([0.1, 5.0, 9.0]), 0.75)       # fewer than 4: keep all
    assert t == float("-inf") and keep.all()
    keep, t = alg.iqr_keep_mask(torch.full((6,), 1.25), 0.75)             # all equal: IQR 0, none pruned
    assert t == pytest.approx(1.25) and keep.all()


# ---- majority vote ---------------------------------------------------------------------------------------

def test_vote_by_equivalence_and_ratio():
    vote = alg.majority_vote(["0.5", "\\frac12", "3", None, "\\frac{1}{2}", "3"])
    assert vote.pseudo_label == "0.5"              # first member of the winning cluster
    assert vote.majority_ratio == pytest.approx(3 / 5)   # no-answer response abstains
    assert vote.votes_cast == 5


def test_vote_tie_goes_to_earliest_first_vote():
    assert alg.majority_vote(["7", "8", "8", "7"]).pseudo_label == "7"
    assert alg.majority_vote(["8", "7", "7", "8"]).pseudo_label == "8"


def test_vote_respects_filter_and_all_abstain():
    vote = alg.majority_vote(["1", "2", "2", "1", "1"], voting=[True, True, True, False, False])
    assert vote.pseudo_label == "2" and vote.majority_ratio == pytest.approx(2 / 3)
    empty = alg.majority_vote([None, None, "5"], voting=[True, True, False])
    assert empty.pseudo_label is None and empty.majority_ratio == 0.0 and empty.votes_cast == 0


# ---- rewards and advantages ------------------------------------------------------------------------------

def test_binary_rewards():
    r = alg.binary_rewards([0, 0, 1, None], 0)
    assert r.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert alg.binary_rewards([1, None], None).tolist() == [0.0, 0.0]


def test_rewards_are_membership_of_the_vote_cluster_where_math_verify_is_asymmetric():
    """math-verify is asymmetric: "x<2" verifies against "(-\\infty, 2)" one way and not the other. The vote
    clusters "(-\\infty, 2)" with "x<2" (checked against the cluster's first member, "x<2"); a second check of
    each answer against the pseudo-label in the other order would give those voters reward 0."""
    from mgrpo.answers import answers_equivalent
    interval, inequality = "(-\\infty, 2)", "x<2"
    assert answers_equivalent(inequality, interval) and not answers_equivalent(interval, inequality)
    answers = [inequality, interval, interval, "5", interval]
    result = alg.score_group(answers, torch.ones(5), num_policy=4, iqr_filter=False, iqr_k=0.75)
    assert result.vote.pseudo_label == inequality and result.vote.majority_ratio == pytest.approx(4 / 5)
    assert result.rewards.tolist() == [1.0, 1.0, 1.0, 0.0]       # everyone who voted for the winner
    assert result.advantages[:3].gt(0).all() and result.advantages[3] < 0


def test_grpo_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])        # mean 0.5, unbiased std sqrt(1/3)
    a = alg.grpo_advantages(r, eps=0.0)
    expected = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(a, torch.tensor([expected, -expected, -expected, expected]))


def test_grpo_advantages_all_equal_and_invalid():
    assert alg.grpo_advantages(torch.ones(4)).tolist() == [0.0] * 4
    assert alg.grpo_advantages(torch.zeros(4)).tolist() == [0.0] * 4
    a = alg.grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), valid=torch.tensor([True, True, False, True]), eps=0.0)
    # valid rewards [1, 0, 0]: mean 1/3, std sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(a, torch.tensor([(2 / 3) / s, (-1 / 3) / s, 0.0, (-1 / 3) / s]))
    assert alg.grpo_advantages(torch.tensor([1.0, 0.0]), valid=torch.tensor([True, False])).tolist() == [0.0, 0.0]


# ---- losses ----------------------------------------------------------------------------------------------

def test_policy_loss_ratio_one_is_advantage_weighted_loglik():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([[2.0], [-1.0]])                           # each token's sequence's advantage
    loss = alg.policy_loss_per_token(logp, logp.detach(), adv, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]))


def test_policy_loss_clipping():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))    # ratios 1.5 and 0.5
    pos = alg.policy_loss_per_token(logp, old, torch.tensor([[1.0]]), 0.2)
    # A > 0: -min(r, clip(r)) -> ratio 1.5 clipped to 1.2; ratio 0.5 stays (pessimistic)
    torch.testing.assert_close(pos, torch.tensor([[-1.2, -0.5]]))
    neg = alg.policy_loss_per_token(logp, old, torch.tensor([[-1.0]]), 0.2)
    # A < 0: max(r, clip(r)) -> 1.5 stays, 0.5 clipped to 0.8
    torch.testing.assert_close(neg, torch.tensor([[1.5, 0.8]]))


def test_kl_k3_hand_computed():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    d = ref - logp                                 # [0, 1, -1]
    expected = torch.exp(d) - d - 1                # [0, e - 2, 1/e]
    torch.testing.assert_close(alg.kl_k3(logp, ref), expected)
    assert alg.kl_k3(torch.tensor([0.0]), torch.tensor([-100.0])).item() <= 10.0   # clamped


def test_aggregate_token_and_sequence_mean():
    # two sequences: [1, 2, 3] and [10]; their tokens flattened, as a micro-batch holds them
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    sequence_tokens = torch.tensor([3.0, 3.0, 3.0, 1.0])
    assert alg.aggregate(x, sequence_tokens, "token_mean", 4, 2).item() == pytest.approx(16 / 4)
    assert alg.aggregate(x, sequence_tokens, "seq_mean", 4, 2).item() == pytest.approx((2 + 10) / 2)
    # micro-batches add up to the whole batch's mean when given the batch totals
    parts = [alg.aggregate(x[s], sequence_tokens[s], mode, 4, 2) for mode in ("token_mean", "seq_mean")
             for s in (slice(0, 3), slice(3, 4))]
    assert sum(parts[:2]).item() == pytest.approx(4.0) and sum(parts[2:]).item() == pytest.approx(6.0)
    with pytest.raises(ValueError):
        alg.aggregate(x, sequence_tokens, "sum", 4, 2)


def test_momentum_update_hand_computed():
    k = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    q = [torch.tensor([3.0, 0.0]), torch.tensor([10.0])]
    alg.momentum_update_(k, q, 0.9)
    torch.testing.assert_close(k[0], torch.tensor([1.2, 1.8]))
    torch.testing.assert_close(k[1], torch.tensor([1.0]))


# ---- one prompt's group, end to end ---------------------------------------------------------------------

def test_score_group_hand_computed():
    # G = 8: the policy's M = 6 first, then the momentum model's N = 2.
    answers = ["4", "4", "5", None, "4", "5", "5", "5"]
    # trajectory 2 ("5", entropy 0.1) is a low-entropy outlier: sorted [0.1, 1, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]
    # Q1 = 1.075, Q3 = 1.425, T = 1.075 - 0.75 * 0.35 = 0.8125 -> only trajectory 2 is pruned
    entropies = torch.tensor([1.0, 1.1, 0.1, 1.2, 1.3, 1.4, 1.5, 1.6])
    g = alg.score_group(answers, entropies, 6, iqr_filter=True, iqr_k=0.75)
    assert g.threshold == pytest.approx(0.8125) and g.pruned == 1
    # the vote without trajectory 2: "4" x3 vs "5" x3 (policy 5, momentum 6, 7); tie -> "4" (first vote at 0)
    assert g.vote.pseudo_label == "4" and g.vote.votes_cast == 6 and g.vote.majority_ratio == pytest.approx(0.5)
    assert g.rewards.tolist() == [1, 1, 0, 0, 1, 0]
    assert g.in_loss.tolist() == [True, True, False, True, True, True]
    # advantages over the 5 kept policy responses: r = [1, 1, 0, 1, 0], mean 0.6, unbiased std sqrt(0.3)
    std = math.sqrt(0.3)
    expected = [0.4 / std, 0.4 / std, 0.0, -0.6 / std, 0.4 / std, -0.6 / std]
    assert g.advantages.tolist() == pytest.approx(expected, rel=1e-5)
    # policy majority "4" (3 of 5 answers) vs momentum majority "5": they disagree
    assert g.momentum_agrees is False and g.unanimous is False


def test_score_group_prune_from_loss_only_still_votes():
    answers = ["4", "5", "5", "4", "4", "5", "5", "5"]
    entropies = torch.tensor([1.0, 1.1, 0.1, 1.2, 1.3, 1.4, 1.5, 1.6])
    both = alg.score_group(answers, entropies, 6, iqr_filter=True, iqr_k=0.75)
    loss_only = alg.score_group(answers, entropies, 6, iqr_filter=True, iqr_k=0.75, prune_from="loss")
    assert both.vote.votes_cast == 7 and loss_only.vote.votes_cast == 8
    assert both.in_loss.tolist() == loss_only.in_loss.tolist() == [True, True, False, True, True, True]
    assert loss_only.vote.pseudo_label == "5" and loss_only.vote.majority_ratio == pytest.approx(5 / 8)


def test_score_group_unanimous_srt_and_degenerate():
    same = alg.score_group(["7", "7.0", "7", "7"], torch.ones(4), 4, iqr_filter=False, iqr_k=0.75)
    assert same.unanimous and same.momentum_agrees is None and same.threshold == float("-inf")
    assert same.advantages.tolist() == [0, 0, 0, 0] and same.rewards.tolist() == [1, 1, 1, 1]
    abstain = alg.score_group(["7", None, "7", "7"], torch.ones(4), 4, iqr_filter=False, iqr_k=0.75)
    assert not abstain.unanimous                                   # a response without an answer breaks it
    nobody = alg.score_group([None] * 6, torch.ones(6), 4, iqr_filter=True, iqr_k=0.75)
    assert nobody.vote.pseudo_label is None and nobody.rewards.sum() == 0 and nobody.momentum_agrees is None
    agree = alg.score_group(["3", "3", "2", "3", "3", "2"], torch.ones(6), 4, iqr_filter=False, iqr_k=0.75)
    assert agree.momentum_agrees is True                           # policy majority 3, momentum tie 3/2 -> 3
