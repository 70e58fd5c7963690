"""M-GRPO as small pure functions (see shared notes/algorithm.md for the decisions where the paper is silent).

Per prompt, G = M + N trajectories: the policy's M first, then the momentum model's N.

    entropies [G] --iqr_keep_mask--> keep [G]
    answers   [G] --majority_vote(keep)--> pseudo_label, majority_ratio
    policy answers [M] --binary_rewards--> rewards [M] --grpo_advantages--> advantages [M]

and for the update, over the flat batch of policy responses [B, L]:

    policy_loss(logp, old_logp, advantages, mask) + kl_coef * kl_k3(logp, ref_logp) aggregated by `aggregate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .answers import answers_equivalent, group_equivalent_answers


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


def majority_vote(answers: Sequence[Optional[str]], voting: Optional[Sequence[bool]] = None) -> Vote:
    """Majority vote over equivalent answers. answers [G] (None = no answer, abstains); voting [G] mask.

    Tie rule (deterministic): among clusters with the most votes, the one whose first vote comes earliest in
    pool order wins. The pool lists the policy's responses before the momentum model's, so ties favour the
    answer the policy produced first.
    """
    voting = [True] * len(answers) if voting is None else list(voting)
    ballots = [a if v else None for a, v in zip(answers, voting)]
    cluster_ids = group_equivalent_answers(ballots)
    counts: dict = {}
    first_seen: dict = {}
    for position, cluster in enumerate(cluster_ids):
        if cluster is None:
            continue
        counts[cluster] = counts.get(cluster, 0) + 1
        first_seen.setdefault(cluster, position)
    votes_cast = sum(counts.values())
    if votes_cast == 0:
        return Vote(None, 0.0, 0)
    winner = min(counts, key=lambda c: (-counts[c], first_seen[c]))
    return Vote(ballots[first_seen[winner]], counts[winner] / votes_cast, votes_cast)


# ---------------------------------------------------------------------------------------------------------
# Rewards and advantages

def binary_rewards(policy_answers: Sequence[Optional[str]], pseudo_label: Optional[str]) -> torch.Tensor:
    """rewards [M]: 1 where the answer is equivalent to the pseudo-label, else 0 (no answer: 0)."""
    return torch.tensor([float(answers_equivalent(a, pseudo_label)) for a in policy_answers], dtype=torch.float32)


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
# Losses (per token; aggregation below)

def policy_loss_per_token(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                          clip_eps: float) -> torch.Tensor:
    """PPO-clipped advantage-weighted log-likelihood. logp, old_logp [B, L]; advantages [B] -> loss [B, L].

    With one update per rollout batch old_logp == logp.detach(), the ratio is 1 and the gradient is exactly
    that of -A * logp.
    """
    ratio = torch.exp(logp - old_logp)                          # [B, L]
    adv = advantages[:, None]                                   # [B, 1]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 ("low_var_kl") estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1, clamped as verl."""
    log_ratio = torch.clamp(ref_logp - logp, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, min=-10.0, max=10.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, total_tokens: Optional[float] = None,
              total_sequences: Optional[float] = None) -> torch.Tensor:
    """Reduce a per-token quantity [B, L] under mask [B, L] to a scalar.

    token_mean: sum / total_tokens (tokens of the whole batch, so micro-batches add up to the batch mean).
    seq_mean:   sum over sequences of (per-sequence token mean) / total_sequences.
    Without totals the micro-batch's own counts are used.
    """
    mask = mask.to(per_token.dtype)
    if mode == "token_mean":
        denominator = mask.sum() if total_tokens is None else total_tokens
        return (per_token * mask).sum() / max(float(denominator), 1.0)
    if mode == "seq_mean":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)      # [B]
        has_tokens = (mask.sum(-1) > 0).to(per_token.dtype)
        denominator = has_tokens.sum() if total_sequences is None else total_sequences
        return (per_sequence * has_tokens).sum() / max(float(denominator), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}: use token_mean or seq_mean")


# ---------------------------------------------------------------------------------------------------------
# Momentum update (full-precision reference; the 8-bit path lives in momentum.py / mgrpo_kernels)

@torch.no_grad()
def momentum_update_(momentum_params: Sequence[torch.Tensor], policy_params: Sequence[torch.Tensor], m: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q, in place, for every pair of tensors."""
    policy = [p.detach().to(k.dtype) for k, p in zip(momentum_params, policy_params)]
    torch._foreach_lerp_(list(momentum_params), policy, 1.0 - m)
