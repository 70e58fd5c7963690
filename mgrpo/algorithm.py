"""M-GRPO as small pure functions (see shared notes/algorithm.md for the decisions where the paper is silent).

Per prompt, G = M + N trajectories: the policy's M first, then the momentum model's N.

    entropies [G] --iqr_keep_mask--> keep [G]
    answers   [G] --group_equivalent_answers--> clusters [G] --majority_vote(keep)--> winning cluster,
                                                                      pseudo_label, majority_ratio
    policy clusters [M] --binary_rewards(winner)--> rewards [M] --grpo_advantages--> advantages [M]

and for the update, over the response tokens of a micro-batch [N] (each with its sequence's advantage):

    policy_loss_per_token(logp, old_logp, advantages) + kl_coef * kl_k3(logp, ref_logp), reduced by `aggregate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .answers import group_equivalent_answers

# ---------------------------------------------------------------------------------------------------------
# IQR entropy filter

def iqr_threshold(entropies: torch.Tensor, k: float) -> float:
    """T = Q1 - k (Q3 - Q1) over one prompt's trajectory entropies [G].

    Degenerate cases: fewer than 4 trajectories have no meaningful quartiles, so T = -inf (nothing pruned).
    All entropies equal gives IQR = 0 and T = Q1 = that value: nothing is strictly below it, nothing pruned.
    Quartiles use linear interpolation (numpy's and torch.quantile's default).
    """
    if entropies.numel() < 4:
        return float("-inf")
    q1, q3 = torch.quantile(entropies.double(), torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    return q1 - k * (q3 - q1)


def iqr_keep_mask(entropies: torch.Tensor, k: float) -> tuple:
    """keep [G] bool (H >= T) and the threshold T; a trajectory with entropy strictly below T is pruned."""
    threshold = iqr_threshold(entropies, k)
    return entropies.double() >= threshold, threshold


# ---------------------------------------------------------------------------------------------------------
# Majority vote

@dataclass
class Vote:
    pseudo_label: Optional[str]
    """The winning answer (first-seen member of the winning cluster), None when nobody voted."""
    majority_ratio: float
    """Votes for the pseudo-label / votes cast (0 when nobody voted)."""
    votes_cast: int
    """Responses that voted: kept by the filter and with an extractable answer."""
    cluster: Optional[int] = None
    """The winning cluster's id among the answers' equivalence clusters (None when nobody voted): the one
    source of truth for the rewards, which are membership of this cluster."""


def vote_counts(clusters: Sequence[Optional[int]], voting: Optional[Sequence[bool]] = None) -> dict:
    """cluster id -> [votes, position of its first vote], over the responses that vote (voting mask) and have an
    answer (a cluster id)."""
    counts: dict = {}
    for position, cluster in enumerate(clusters):
        if cluster is not None and (voting is None or voting[position]):
            counts.setdefault(cluster, [0, position])[0] += 1
    return counts


def winning_cluster(counts: dict) -> Optional[int]:
    """Tie rule (deterministic): among clusters with the most votes, the one whose first vote comes earliest in
    pool order wins. The pool lists the policy's responses before the momentum model's, so ties favour the
    answer the policy produced first. None when nobody voted."""
    return min(counts, key=lambda c: (-counts[c][0], counts[c][1])) if counts else None


def majority_vote(answers: Sequence[Optional[str]], voting: Optional[Sequence[bool]] = None,
                  clusters: Optional[Sequence[Optional[int]]] = None) -> Vote:
    """Majority vote over equivalent answers. answers [G] (None = no answer, abstains); voting [G] mask;
    clusters [G]: cluster ids from `group_equivalent_answers(answers)` when the caller already has them.
    Ties: `winning_cluster`."""
    clusters = group_equivalent_answers(list(answers)) if clusters is None else clusters
    counts = vote_counts(clusters, None if voting is None else list(voting))
    winner = winning_cluster(counts)
    if winner is None:
        return Vote(None, 0.0, 0)
    votes_cast = sum(votes for votes, _ in counts.values())
    return Vote(answers[counts[winner][1]], counts[winner][0] / votes_cast, votes_cast, winner)


# ---------------------------------------------------------------------------------------------------------
# Rewards and advantages

def binary_rewards(clusters: Sequence[Optional[int]], winner: Optional[int]) -> torch.Tensor:
    """rewards [M]: 1 where the response's answer is in the vote's winning cluster, else 0 (no answer: 0).

    clusters: the policy responses' cluster ids from the same `group_equivalent_answers` call the vote
    counted. Membership, not a second equivalence check against the pseudo-label: math-verify is asymmetric
    (verify(a, b) != verify(b, a) for some pairs, e.g. "x<2" and "(-\\infty, 2)"), so re-checking could give
    reward 0 to an answer that voted for the winner.
    """
    return torch.tensor([float(winner is not None and c == winner) for c in clusters], dtype=torch.float32)


def grpo_advantages(rewards: torch.Tensor, valid: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) over the valid members of one group. rewards [M] -> [M].

    std is the unbiased sample std (as in GRPO/verl). A group whose valid rewards are all equal, or that has
    fewer than 2 valid members, gets A = 0; invalid (pruned) members get A = 0.
    """
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    r = rewards[valid].float()
    if r.numel() < 2 or bool((r == r[0]).all()):
        return advantages
    advantages[valid] = (r - r.mean()) / (r.std() + eps)
    return advantages


# ---------------------------------------------------------------------------------------------------------
# One prompt's group, end to end: filter -> vote -> rewards -> advantages

@dataclass
class GroupScore:
    """What one prompt's G trajectories give the update and the metrics."""
    advantages: torch.Tensor
    """[M] GRPO advantages of the policy's responses (0 for pruned ones)."""
    in_loss: torch.Tensor
    """[M] bool: the policy's responses that enter the loss (not pruned)."""
    rewards: torch.Tensor
    """[M] binary rewards against the pseudo-label."""
    vote: Vote
    """The pseudo-label and its majority ratio."""
    threshold: float
    """IQR entropy threshold T (-inf when the filter is off or the group is too small)."""
    pruned: int
    """Trajectories of the G pruned by the filter."""
    unanimous: bool
    """Every one of the G responses has an answer and all are equivalent (a sign of collapse when common)."""
    momentum_agrees: Optional[bool]
    """The policy's and the momentum model's own majority answers are equivalent (None without momentum
    samples, or when either side cast no vote)."""


def score_group(answers: Sequence[Optional[str]], entropies: torch.Tensor, num_policy: int, *, iqr_filter: bool,
                iqr_k: float, prune_from: str = "vote_and_loss", adv_eps: float = 1e-6) -> GroupScore:
    """Score one prompt's pool: answers [G] (policy's M first, then the momentum model's N; None = no answer),
    entropies [G] (mean token entropy of each trajectory under the current policy).

    1. IQR filter over all G entropies (prune_from=vote_and_loss: a pruned trajectory neither votes nor trains;
       prune_from=loss: it still votes);
    2. majority vote of the remaining pool -> pseudo-label;
    3. binary rewards of the policy's M responses against it; GRPO advantages over the kept ones.
    """
    G, M = len(answers), num_policy
    keep, threshold = torch.ones(G, dtype=torch.bool), float("-inf")
    if iqr_filter:
        keep, threshold = iqr_keep_mask(entropies, iqr_k)                                  # [G]
    voting = keep if prune_from == "vote_and_loss" else torch.ones(G, dtype=torch.bool)
    clusters = group_equivalent_answers(list(answers))                                      # [G] ids, once
    vote = majority_vote(answers, voting.tolist(), clusters)
    rewards = binary_rewards(clusters[:M], vote.cluster)                                    # [M]
    in_loss = keep[:M].clone()                                                              # [M]
    advantages = grpo_advantages(rewards, in_loss, adv_eps)                                 # [M]

    unanimous = G > 0 and clusters[0] is not None and all(c == clusters[0] for c in clusters)
    momentum_agrees = None
    if M < G:
        policy_majority = winning_cluster(vote_counts(clusters[:M]))
        momentum_majority = winning_cluster(vote_counts(clusters[M:]))
        if policy_majority is not None and momentum_majority is not None:
            momentum_agrees = policy_majority == momentum_majority
    return GroupScore(advantages, in_loss, rewards, vote, threshold, int((~keep).sum()), unanimous, momentum_agrees)


# ---------------------------------------------------------------------------------------------------------
# Losses (per token; aggregation below)

def policy_loss_per_token(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                          clip_eps: float) -> torch.Tensor:
    """PPO-clipped advantage-weighted log-likelihood, per token: logp, old_logp and advantages (each token's
    sequence's advantage) of one shape, e.g. [N] -> loss [N].

    With one update per rollout batch old_logp == logp.detach(), the ratio is 1 and the gradient is exactly
    that of -A * logp.
    """
    ratio = torch.exp(logp - old_logp)                          # [N]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 ("low_var_kl") estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1, clamped as verl."""
    log_ratio = torch.clamp(ref_logp - logp, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, min=-10.0, max=10.0)


def aggregate(per_token: torch.Tensor, sequence_tokens: torch.Tensor, mode: str, total_tokens: float,
              total_sequences: float) -> torch.Tensor:
    """Reduce per-token values [N] (a micro-batch's share of the batch) to its share of the batch's loss.

    sequence_tokens [N]: the token count of each token's sequence (sequences are never split between
    micro-batches). token_mean: sum / total_tokens (tokens of the whole batch, so micro-batches add up to the
    batch mean). seq_mean: sum over sequences of (per-sequence token mean) / total_sequences.
    """
    if mode == "token_mean":
        return per_token.sum() / max(float(total_tokens), 1.0)
    if mode == "seq_mean":
        return (per_token / sequence_tokens.clamp(min=1.0)).sum() / max(float(total_sequences), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}: use token_mean or seq_mean")


# ---------------------------------------------------------------------------------------------------------
# Momentum update (full-precision reference; the 8-bit path lives in momentum.py / mgrpo_kernels)

@torch.no_grad()
def momentum_update_(momentum_params: Sequence[torch.Tensor], policy_params: Sequence[torch.Tensor], m: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q, in place, for every pair of tensors."""
    policy = [p.detach().to(k.dtype) for k, p in zip(momentum_params, policy_params)]
    torch._foreach_lerp_(list(momentum_params), policy, 1.0 - m)
