"""The stages of one M-GRPO step. Each takes what it uses and returns what it makes; none writes into another's
result, and none reads the config whole. The loop (trainer.py) calls them in order.

    1. rollout          push the policy into the engine, sample M per prompt; push the momentum model, sample N
    2. score            the current policy's log-probs and token entropies of all G trajectories (no grad)
    3. assign_rewards   per prompt: IQR filter -> majority vote (pseudo-label) -> binary rewards -> GRPO
                        advantages (algorithm.score_group)
    4. reference        the KL reference's log-probs of the trained responses (no grad)
    5. policy_gradients the clipped policy loss + k3 KL, micro-batched, normalised over the whole batch (all
                        ranks), backward
    6. optimizer_step   gradient clipping by the global norm, the optimizer (and, for the int8 momentum model,
                        its update: it needs this step's dq), the schedule; the gradients are freed
    7. momentum_update  theta_k <- m theta_k + (1 - m) theta_q (the fp32 storage)
       validate         held-out greedy / avg@k / maj@k of the policy, through the engine
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import algorithm as alg
from ..answers import answers_equivalent, extract_answer
from ..config import AlgorithmConfig, EvalConfig
from ..distributed import Dist, full_tensors, local_tensor, reduce_across_nodes
from ..engines.base import RolloutEngine, SamplingParams
from ..evaluation.harness import evaluate
from ..models.batching import Sequences, dummy_micro_batch, micro_batches, resolve_layout
from ..models.logprobs import TokenScorer
from ..models.momentum import MomentumModel


@dataclass(frozen=True)
class Scoring:
    """How sequences go through a model: the micro-batch layout and budget, the attention that reads it, the head,
    the sampling temperature, and the ranks that must run as many passes."""
    layout: str
    micro_batch_tokens: int
    attn_implementation: str
    pad_id: int
    temperature: float
    impl: str
    dist: Dist


def synced_micro_batches(seqs: Sequences, scoring: Scoring) -> list:
    """This rank's micro-batches of `seqs`, padded with dummy passes to the largest count over ranks: under
    FSDP2 every forward and backward is a collective, so every rank must run as many."""
    layout = resolve_layout(scoring.layout, seqs, scoring.micro_batch_tokens, scoring.attn_implementation)
    batches = micro_batches(seqs, layout, scoring.micro_batch_tokens, scoring.pad_id,
                            mask_for_flash=scoring.attn_implementation == "flash_attention_2",
                            blockwise=scoring.attn_implementation == "sdpa")   # see models.loading.training_attention
    count = int(scoring.dist.all_reduce([len(batches)], op="max")[0])
    return batches + [dummy_micro_batch() for _ in range(count - len(batches))]


@torch.no_grad()
def score_sequences(model: TokenScorer, seqs: Sequences, scoring: Scoring) -> tuple:
    """No-grad log-probs and entropies [B, L] of the response tokens of `seqs`, micro-batched."""
    logps = torch.zeros((len(seqs), seqs.width), dtype=torch.float32)
    ents = torch.zeros((len(seqs), seqs.width), dtype=torch.float32)
    for batch in synced_micro_batches(seqs, scoring):
        lp, ent = model(batch.to(scoring.dist.device), scoring.temperature, scoring.impl)   # [N], [N]
        logps[batch.seq_index, batch.seq_pos] = lp.float().cpu()
        ents[batch.seq_index, batch.seq_pos] = ent.float().cpu()
    if hasattr(model, "reshard"):
        # FSDP2 keeps the root's parameters (embedding = lm_head, final norm) unsharded after a forward, for
        # the backward that usually follows; after no-grad forwards nothing follows: free them, and let the
        # reference's local shards be written (kl_reference=momentum) rather than a stale full copy.
        model.reshard()
    return logps, ents


# ---------------------------------------------------------------------------------------------------------
# 1. rollout

@dataclass
class RolloutBatch:
    problems: list          # [P] this rank's problems
    prompts: list           # [P] token ids
    groups: list            # [P][G] Completions: the policy's M, then the momentum model's N


def policy_weights(policy: TokenScorer, dtype: torch.dtype):
    """The policy's full weights in `dtype`, gathered one tensor at a time."""
    return full_tensors(policy.hf_named_parameters(), dtype)


def rollout(engine: RolloutEngine, policy: TokenScorer, momentum: Optional[MomentumModel], prompts: list,
            problems: list, sampling: SamplingParams, policy_samples: int, momentum_samples: int,
            times: Callable) -> RolloutBatch:
    """M samples per prompt from the policy's weights, then N from the momentum model's. sampling.seed is the
    first of the step's streams: the momentum model's start M further, so no two draws share a stream
    (engines.base.sampling_seed). times: the stage clock (engine pushes count as weight_push)."""
    with times("weight_push"):       # the engine's memory hand-off (wake, sleep) counts here too
        engine.wake_up()
        engine.push_weights(policy_weights(policy, engine.weight_dtype))
    with times("rollout_policy"):
        groups = engine.generate(prompts, SamplingParams(**{**vars(sampling), "n": policy_samples}))
    if momentum_samples:
        with times("weight_push"):
            engine.push_weights(momentum.named_weights(engine.weight_dtype))
        with times("rollout_momentum"):
            momentum_groups = engine.generate(prompts, SamplingParams(**{**vars(sampling), "n": momentum_samples,
                                                                         "seed": sampling.seed + policy_samples}))
        groups = [g + k for g, k in zip(groups, momentum_groups)]
    with times("weight_push"):
        engine.sleep()
    return RolloutBatch(problems, prompts, groups)


# ---------------------------------------------------------------------------------------------------------
# 2. score

@dataclass
class ScoredBatch:
    sequences: Sequences        # [P*G] prompts and responses, grouped by prompt
    old_logp: torch.Tensor      # [P*G, L] log-probs at rollout time (the PPO ratio's denominator)
    trajectory_entropy: torch.Tensor   # [P*G] mean token entropy of each response under the current policy


def score(policy: TokenScorer, batch: RolloutBatch, scoring: Scoring) -> ScoredBatch:
    seqs = Sequences([p for p, g in zip(batch.prompts, batch.groups) for _ in g],
                     [c.token_ids for g in batch.groups for c in g],
                     [i for i, g in enumerate(batch.groups) for _ in g])
    old_logp, token_entropy = score_sequences(policy, seqs, scoring)                          # [P*G, L]
    response_mask = seqs.response_mask()
    trajectory_entropy = (token_entropy * response_mask).sum(1) / response_mask.sum(1).clamp(min=1)   # [P*G]
    return ScoredBatch(seqs, old_logp, trajectory_entropy)


# ---------------------------------------------------------------------------------------------------------
# 3. assign rewards

@dataclass
class Assignment:
    advantages: torch.Tensor    # [P*G] (0 for the momentum model's responses and pruned ones)
    in_loss: torch.Tensor       # [P*G] bool: responses that enter the loss
    groups: list                # [P] algorithm.GroupScore
    label_hits: list = field(default_factory=list)    # pseudo-label == ground truth, per prompt with one
    policy_hits: list = field(default_factory=list)   # policy response == ground truth (monitoring only)
    no_answer: int = 0                                 # responses (all G) with no extractable answer
    no_answer_cut: int = 0                             # ... of which generation was cut at max_new_tokens
    no_answer_example: Optional[str] = None            # one such response, for the warning


def assign_rewards(batch: RolloutBatch, trajectory_entropy: torch.Tensor, algo: AlgorithmConfig,
                   answer_format: str) -> Assignment:
    G, M = algo.group_size, algo.policy_samples
    out = Assignment(torch.zeros(len(batch.problems) * G), torch.zeros(len(batch.problems) * G, dtype=torch.bool), [])
    for i, (problem, group) in enumerate(zip(batch.problems, batch.groups)):
        answers = [extract_answer(c.text, answer_format) for c in group]
        for completion, answer in zip(group, answers):
            if answer is None:
                out.no_answer += 1
                out.no_answer_cut += not completion.finished
                out.no_answer_example = out.no_answer_example or completion.text
        result = alg.score_group(answers, trajectory_entropy[i * G:(i + 1) * G], M, iqr_filter=algo.iqr_filter,
                                 iqr_k=algo.iqr_k, prune_from=algo.prune_from, adv_eps=algo.adv_eps)
        out.advantages[i * G:i * G + M] = result.advantages
        out.in_loss[i * G:i * G + M] = result.in_loss
        out.groups.append(result)
        if problem.answer is not None:   # ground truth: monitoring only, never the reward
            # math-verify's order: the gold answer first (its verify is asymmetric)
            out.label_hits.append(answers_equivalent(problem.answer, result.vote.pseudo_label))
            out.policy_hits.extend(answers_equivalent(problem.answer, a) for a in answers[:M])
    return out


@dataclass
class TrainingBatch:
    """The responses the update trains on, with what the loss needs of them."""
    sequences: Sequences        # the B trained responses (and their prompts)
    old_logp: torch.Tensor      # [B, L]
    advantages: torch.Tensor    # [B]
    response_tokens: torch.Tensor   # [B]
    total_tokens: float         # response tokens of the whole batch, all ranks (the token_mean normaliser)
    total_sequences: float      # trained responses of the whole batch, all ranks (the seq_mean normaliser)


def training_batch(scored: ScoredBatch, assigned: Assignment, dist: Dist) -> TrainingBatch:
    train_index = assigned.in_loss.nonzero().squeeze(-1).tolist()
    seqs = scored.sequences.subset(train_index)
    response_tokens = torch.tensor([len(r) for r in seqs.responses], dtype=torch.float32)   # [B]
    # Normalisers over the whole batch on every rank: FSDP2 sums the ranks' gradients, so each rank's loss is
    # its share of one global mean.
    totals = dist.all_reduce([float(response_tokens.sum()), float((response_tokens > 0).sum())])
    return TrainingBatch(seqs, scored.old_logp[train_index][:, :seqs.width], assigned.advantages[train_index],
                         response_tokens, *totals)


# ---------------------------------------------------------------------------------------------------------
# 4. reference

def refresh_reference_from_momentum(reference: TokenScorer, momentum: MomentumModel) -> None:
    """kl_reference=momentum: the reference module holds theta_k (local shards, no communication)."""
    with torch.no_grad():
        for p, w in zip(reference.parameters(), momentum.local_weights(torch.float32)):
            local_tensor(p).copy_(w)


def reference_logprobs(reference: TokenScorer, momentum: Optional[MomentumModel], kl_reference: str,
                       sequences: Sequences, scoring: Scoring) -> torch.Tensor:
    """[B, L] log-probs of the trained responses under the KL reference (the initial policy, or theta_k)."""
    if kl_reference == "momentum":
        refresh_reference_from_momentum(reference, momentum)
    ref_logp, _ = score_sequences(reference, sequences, scoring)
    return ref_logp


# ---------------------------------------------------------------------------------------------------------
# 5. policy gradients

@dataclass
class Gradients:
    loss: float = 0.0
    kl: float = 0.0
    computed_tokens: int = 0          # tokens the forward passes computed, in the layout used
    micro_batches: int = 0            # this rank's real micro-batches
    skipped_micro_batches: int = 0    # ... whose advantages were all zero: no forward, no backward


def policy_gradients(policy: TokenScorer, batch: TrainingBatch, ref_logp: Optional[torch.Tensor],
                     algo: AlgorithmConfig, scoring: Scoring) -> Gradients:
    """Micro-batched clipped policy loss + k3 KL, normalised over the whole batch (all ranks), backward: the
    gradients accumulate on the policy's parameters. Without a KL term (kl_coef 0, or no reference), a micro-batch
    whose responses all have zero advantage has a loss of zero and is not run (a dummy pass keeps the ranks'
    collectives in step). With one, it is: the KL pulls every trained response towards the reference, a unanimous
    group's too, whichever responses the micro-batch budget happened to pack together (skipping it made the loss
    depend on optim.micro_batch_tokens: review of 2026-12-08)."""
    device, result = scoring.dist.device, Gradients()
    loss_sum = kl_sum = 0.0
    with_kl = ref_logp is not None and algo.kl_coef > 0
    micro = synced_micro_batches(batch.sequences, scoring)
    for i, mb in enumerate(micro):
        reduce_across_nodes(policy, scoring.dist, i == len(micro) - 1)
        b, l = mb.seq_index, mb.seq_pos                                                      # [N], [N]
        real = mb.targets.numel() > 0
        result.micro_batches += int(real)
        if real and not with_kl and not bool(batch.advantages[b].any()):
            result.skipped_micro_batches += 1
            mb, real = dummy_micro_batch(), False
        logp, _ = policy(mb.to(device), scoring.temperature, scoring.impl)                   # [N]
        if not real:        # a dummy pass (or nothing to train): zero loss through every layer
            (logp.sum() * 0.0).backward()
            continue
        result.computed_tokens += mb.tokens
        per_token = alg.policy_loss_per_token(logp, batch.old_logp[b, l].to(device), batch.advantages[b].to(device),
                                              algo.clip_eps)                                  # [N]
        if ref_logp is not None:
            kl = alg.kl_k3(logp, ref_logp[b, l].to(device))                                  # [N]
            per_token = per_token + algo.kl_coef * kl
            kl_sum += float(kl.detach().sum()) / max(batch.total_tokens, 1.0)
        loss = alg.aggregate(per_token, batch.response_tokens[b].to(device), algo.loss_agg, batch.total_tokens,
                             batch.total_sequences)
        loss.backward()
        loss_sum += float(loss.detach())
    result.loss, result.kl = scoring.dist.all_reduce([loss_sum, kl_sum])
    return result


# ---------------------------------------------------------------------------------------------------------
# 6. optimizer step

@dataclass
class Step:
    grad_norm: float
    skipped: bool       # a non-finite loss or gradient: weights, optimizer and momentum untouched


def optimizer_step(optimizer, scheduler, params: list, max_grad_norm: float, loss: float) -> Step:
    """Clip by the global norm (over all ranks: FSDP2's DTensors), step, advance the schedule; a non-finite loss or
    gradient skips the step. The gradients are freed (set to None) either way: they are not held through the
    next rollout (the memory plan counts them in the update and step phases only)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return Step(grad_norm, skipped)


# ---------------------------------------------------------------------------------------------------------
# 7. momentum update, and validation

def momentum_update(momentum: MomentumModel) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q, after the optimizer step (storages the optimizer does not update)."""
    momentum.update()


def validate(engine: RolloutEngine, policy: TokenScorer, held_out: list, encode: Callable, settings: EvalConfig,
             max_new_tokens: int, dist: Dist, answer_format: str) -> tuple:
    """(held-out figures of the current policy (greedy, avg@k, maj@k), its per-problem results); (None, None)
    without held-out data."""
    if not held_out:
        return None, None
    engine.wake_up()
    engine.push_weights(policy_weights(policy, engine.weight_dtype))
    figures, results = evaluate(engine, held_out, encode, settings, max_new_tokens, dist, answer_format)
    engine.sleep()
    return figures, results
