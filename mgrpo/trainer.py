"""M-GRPO training: one loop that owns the order of events; the math lives in algorithm.py.

Per step, five named stages:
  1. rollout         push the policy into the engine, sample M per prompt; push the momentum model, sample N
  2. score           the current policy's log-probs and token entropies of all G trajectories (no grad)
  3. assign_rewards  per prompt: IQR filter -> majority vote (pseudo-label) -> binary rewards -> GRPO
                     advantages (algorithm.score_group)
  4. update          KL reference log-probs, micro-batched clipped policy loss + k3 KL normalised over the
                     whole batch, gradient clipping by the global norm, AdamW, then the momentum update
                     theta_k <- m theta_k + (1 - m) theta_q
  5. log             the step's metrics, reduced over ranks; collapse monitor; validation; checkpoint

Launch:
  mgrpo train                                          the embedded default, one process
  mgrpo train --config configs/qwen3_4b.yaml ...       one process (one GPU)
  torchrun --nproc_per_node=8 -m mgrpo train --config configs/qwen3_4b.yaml ...
                                                       FSDP2 over 8 GPUs, one vLLM engine per rank

Under torchrun each rank takes prompts_per_step / world_size prompts with their whole groups, so stages 1-3
are local; stage 4 normalises by the global token count and FSDP2 sums the gradients; stage 5 reduces the
metrics. Rank handling lives in mgrpo/distributed.py; every collective below is the identity on one process.
What the loop touches is built once by mgrpo/run.py (`setup`: data, engine, models, optimizer; loading in
mgrpo/loading.py); what a checkpoint holds, restoring it and exporting the policy live in mgrpo/checkpoint.py.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import algorithm as alg
from .answers import answers_equivalent, extract_answer
from .checkpoint import (check_resumable, checkpoint_state, export_policy, prepare_run_dir, restore, resume_settings,
                         save_checkpoint)
from .batching import Sequences, dummy_micro_batch, micro_batches, resolve_layout
from .config import TrainConfig, save_config
from .distributed import full_tensors, init_distributed, local_tensor
from .evaluation import evaluate, figures_line, no_answer_warning
from .loading import TrainingError
from .logprobs import TokenScorer
from .metrics import CollapseMonitor, MetricsLogger, format_metrics_line, peak_memory_gib
from .rollout import RolloutEngine, SamplingParams, sampling_seed
from .run import Run, report_memory, setup
from .run_dir import RunDirLock

__all__ = ["train", "TrainingError", "Run"]

TRAIN_SETTING_NAMES = {"instruction": "data.instruction", "chat_template": "model.use_chat_template=true",
                       "max_new_tokens": "rollout.max_new_tokens", "answer_format": "data.answer_format"}


# ---------------------------------------------------------------------------------------------------------
# Micro-batches (layouts: mgrpo/batching.py)

def synced_micro_batches(seqs: Sequences, run: Run) -> list:
    """This rank's micro-batches of `seqs` in the run's layout, padded with dummy passes to the largest count
    over ranks: under FSDP2 every forward and backward is a collective, so every rank must run as many."""
    cfg = run.cfg
    layout = resolve_layout(cfg.optim.layout, seqs, cfg.optim.micro_batch_tokens, cfg.model.attn_implementation)
    batches = micro_batches(seqs, layout, cfg.optim.micro_batch_tokens, run.tokenizer.pad_token_id,
                            mask_for_flash=cfg.model.attn_implementation == "flash_attention_2",
                            blockwise=cfg.model.attn_implementation == "sdpa")   # see loading.training_attention
    count = int(run.dist.all_reduce([len(batches)], op="max")[0])
    return batches + [dummy_micro_batch() for _ in range(count - len(batches))]


@torch.no_grad()
def score_sequences(model: TokenScorer, seqs: Sequences, run: Run) -> tuple:
    """No-grad log-probs and entropies [B, L] of the response tokens of `seqs`, micro-batched."""
    logps = torch.zeros((len(seqs), seqs.width), dtype=torch.float32)
    ents = torch.zeros((len(seqs), seqs.width), dtype=torch.float32)
    for batch in synced_micro_batches(seqs, run):
        lp, ent = model(batch.to(run.dist.device), run.cfg.rollout.temperature, run.impl)   # [N], [N]
        logps[batch.seq_index, batch.seq_pos] = lp.float().cpu()
        ents[batch.seq_index, batch.seq_pos] = ent.float().cpu()
    if hasattr(model, "reshard"):
        # FSDP2 keeps the root's parameters (embedding = lm_head, final norm) unsharded after a forward, for
        # the backward that usually follows; after no-grad forwards nothing follows: free them, and let the
        # reference's local shards be written (kl_reference=momentum) rather than a stale full copy.
        model.reshard()
    return logps, ents


# ---------------------------------------------------------------------------------------------------------
# Stage 1: rollout

@dataclass
class RolloutBatch:
    problems: list          # [P] this rank's problems
    prompts: list           # [P] token ids
    groups: list            # [P][G] Completions: the policy's M, then the momentum model's N
    rollout_time: float


def policy_weights(run: Run):
    """The policy's full weights in the engine's dtype, gathered one tensor at a time."""
    return full_tensors(run.policy.hf_named_parameters(), run.engine.weight_dtype)


def rollout(run: Run, problems: list, step: int) -> RolloutBatch:
    cfg, algo, engine = run.cfg, run.cfg.algorithm, run.engine
    t0 = time.perf_counter()
    prompts = [run.encode(p.problem) for p in problems]
    sampling = dict(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                    max_new_tokens=cfg.rollout.max_new_tokens)
    seed = sampling_seed(cfg.seed, step, run.dist.rank)       # the momentum model's streams start M further
    with run.times("weight_push"):       # the engine's memory hand-off (wake, sleep) counts here too
        engine.wake_up()
        engine.push_weights(policy_weights(run))
    with run.times("rollout_policy"):
        groups = engine.generate(prompts, SamplingParams(n=algo.policy_samples, seed=seed, **sampling))
    if algo.momentum_samples:
        with run.times("weight_push"):
            engine.push_weights(run.momentum.named_weights(engine.weight_dtype))
        with run.times("rollout_momentum"):
            momentum_groups = engine.generate(prompts, SamplingParams(n=algo.momentum_samples,
                                                                      seed=seed + algo.policy_samples, **sampling))
        groups = [g + k for g, k in zip(groups, momentum_groups)]
    with run.times("weight_push"):
        engine.sleep()
    return RolloutBatch(problems, prompts, groups, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------
# Stage 2: score

@dataclass
class ScoredBatch:
    sequences: Sequences        # [P*G] prompts and responses, grouped by prompt
    old_logp: torch.Tensor      # [P*G, L] log-probs at rollout time (the PPO ratio's denominator)
    trajectory_entropy: torch.Tensor   # [P*G] mean token entropy of each response under the current policy


def score(run: Run, batch: RolloutBatch) -> ScoredBatch:
    seqs = Sequences([p for p, g in zip(batch.prompts, batch.groups) for _ in g],
                     [c.token_ids for g in batch.groups for c in g],
                     [i for i, g in enumerate(batch.groups) for _ in g])
    old_logp, token_entropy = score_sequences(run.policy, seqs, run)                          # [P*G, L]
    response_mask = seqs.response_mask()
    trajectory_entropy = (token_entropy * response_mask).sum(1) / response_mask.sum(1).clamp(min=1)   # [P*G]
    return ScoredBatch(seqs, old_logp, trajectory_entropy)


# ---------------------------------------------------------------------------------------------------------
# Stage 3: assign rewards

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


def assign_rewards(run: Run, batch: RolloutBatch, scored: ScoredBatch) -> Assignment:
    algo = run.cfg.algorithm
    G, M = algo.group_size, algo.policy_samples
    out = Assignment(torch.zeros(len(batch.problems) * G), torch.zeros(len(batch.problems) * G, dtype=torch.bool), [])
    for i, (problem, group) in enumerate(zip(batch.problems, batch.groups)):
        answers = [extract_answer(c.text, run.cfg.data.answer_format) for c in group]
        for completion, answer in zip(group, answers):
            if answer is None:
                out.no_answer += 1
                out.no_answer_cut += not completion.finished
                out.no_answer_example = out.no_answer_example or completion.text
        result = alg.score_group(answers, scored.trajectory_entropy[i * G:(i + 1) * G], M, iqr_filter=algo.iqr_filter,
                                 iqr_k=algo.iqr_k, prune_from=algo.prune_from, adv_eps=algo.adv_eps)
        out.advantages[i * G:i * G + M] = result.advantages
        out.in_loss[i * G:i * G + M] = result.in_loss
        out.groups.append(result)
        if problem.answer is not None:   # ground truth: monitoring only, never the reward
            # math-verify's order: the gold answer first (its verify is asymmetric)
            out.label_hits.append(answers_equivalent(problem.answer, result.vote.pseudo_label))
            out.policy_hits.extend(answers_equivalent(problem.answer, a) for a in answers[:M])
    return out


# ---------------------------------------------------------------------------------------------------------
# Stage 4: update

@dataclass
class UpdateResult:
    loss: float = 0.0
    kl: float = 0.0
    grad_norm: float = float("nan")
    skipped: bool = False
    padding_frac: float = 0.0      # of the padded layout for this batch (what padding would waste)
    computed_tokens: int = 0       # tokens the update's forward passes computed, in the layout used
    computed_frac: float = 0.0     # ... relative to the padded layout


def refresh_reference_from_momentum(run: Run) -> None:
    """kl_reference=momentum: the reference module holds theta_k (local shards, no communication)."""
    with torch.no_grad():
        for p, w in zip(run.reference.parameters(), run.momentum.local_weights(torch.float32)):
            local_tensor(p).copy_(w)


def update(run: Run, scored: ScoredBatch, assigned: Assignment) -> UpdateResult:
    algo, dist = run.cfg.algorithm, run.dist
    train_index = assigned.in_loss.nonzero().squeeze(-1).tolist()
    seqs = scored.sequences.subset(train_index)                                  # the B trained responses
    old_logp = scored.old_logp[train_index][:, :seqs.width]                      # [B, L]
    advantages = assigned.advantages[train_index]                                # [B]
    response_tokens = torch.tensor([len(r) for r in seqs.responses], dtype=torch.float32)   # [B]
    # Normalisers over the whole batch on every rank: FSDP2 sums the ranks' gradients, so each rank's loss is
    # its share of one global mean.
    totals = dist.all_reduce([float(response_tokens.sum()), float((response_tokens > 0).sum())])

    ref_logp = None
    if run.reference is not None:
        with run.times("reference"):
            if algo.kl_reference == "momentum":
                refresh_reference_from_momentum(run)
            ref_logp, _ = score_sequences(run.reference, seqs, run)

    result = UpdateResult()
    real = float(response_tokens.sum() + sum(len(p) for p in seqs.prompts))
    padded = seqs.padded_tokens(run.cfg.optim.micro_batch_tokens)
    result.padding_frac = 1.0 - real / padded if padded else 0.0
    for _ in range(algo.updates_per_batch):
        with run.times("update"):
            optimizer_step(run, seqs, old_logp, advantages, ref_logp, response_tokens, totals, result)
        if result.skipped:
            break
        if run.momentum is not None:
            with run.times("momentum_update"):       # ~0 for the int8 storage: fused into the optimizer step
                run.momentum.update()
    result.computed_frac = result.computed_tokens / padded if padded else 0.0
    return result


def optimizer_step(run: Run, seqs: Sequences, old_logp: torch.Tensor, advantages: torch.Tensor,
                   ref_logp: Optional[torch.Tensor], response_tokens: torch.Tensor, totals: list,
                   result: UpdateResult) -> None:
    """One optimizer step on the batch, micro-batched: clipped policy loss + k3 KL normalised over the whole
    batch (all ranks), gradient clipping by the global norm, AdamW. A non-finite loss or gradient skips it."""
    cfg, algo, dist, device = run.cfg, run.cfg.algorithm, run.dist, run.dist.device
    total_tokens, total_sequences = totals
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = kl_sum = 0.0
    result.computed_tokens = 0
    for batch in synced_micro_batches(seqs, run):
        logp, _ = run.policy(batch.to(device), cfg.rollout.temperature, run.impl)          # [N]
        if batch.targets.numel() == 0:   # a dummy pass (or nothing to train): zero loss through every layer
            (logp.sum() * 0.0).backward()
            continue
        result.computed_tokens += batch.tokens
        b, l = batch.seq_index, batch.seq_pos                                               # [N], [N]
        per_token = alg.policy_loss_per_token(logp, old_logp[b, l].to(device), advantages[b].to(device),
                                              algo.clip_eps)                                  # [N]
        if ref_logp is not None:
            kl = alg.kl_k3(logp, ref_logp[b, l].to(device))                                  # [N]
            per_token = per_token + algo.kl_coef * kl
            kl_sum += float(kl.detach().sum()) / max(total_tokens, 1.0)
        loss = alg.aggregate(per_token, response_tokens[b].to(device), algo.loss_agg, total_tokens, total_sequences)
        loss.backward()
        loss_sum += float(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.optim.max_grad_norm or float("inf"))
    result.grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    result.loss, result.kl = dist.all_reduce([loss_sum, kl_sum])
    if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
        # A non-finite loss or gradient: skip this update (weights, optimizer, momentum untouched).
        run.optimizer.zero_grad(set_to_none=True)
        result.skipped = True
        return
    run.optimizer.step()
    run.scheduler.step()


# ---------------------------------------------------------------------------------------------------------
# Stage 5: log

def step_record(run: Run, batch: RolloutBatch, scored: ScoredBatch, assigned: Assignment, result: UpdateResult,
                step_time: float) -> dict:
    """The step's metrics over all ranks (the same figures one process would compute for the whole batch)."""
    local = {
        "entropies": scored.trajectory_entropy.tolist(),
        "rewards": [r for g in assigned.groups for r in g.rewards[g.in_loss].tolist()],
        "thresholds": [g.threshold for g in assigned.groups if math.isfinite(g.threshold)],
        "pruned": sum(g.pruned for g in assigned.groups),
        "ratios": [g.vote.majority_ratio for g in assigned.groups],
        "zero_std": sum(bool((g.advantages == 0).all()) for g in assigned.groups),
        "no_answer": sum(g.vote.pseudo_label is None for g in assigned.groups),
        "no_answer_responses": assigned.no_answer, "no_answer_cut": assigned.no_answer_cut,
        "unanimous": sum(g.unanimous for g in assigned.groups),
        "agreement": [g.momentum_agrees for g in assigned.groups if g.momentum_agrees is not None],
        "label_hits": assigned.label_hits, "policy_hits": assigned.policy_hits,
        "generated": sum(len(c.token_ids) for g in batch.groups for c in g),
        "responses": sum(len(g) for g in batch.groups), "prompts": len(batch.problems),
        "rollout_time": batch.rollout_time, "peak": peak_memory_gib(run.dist.device),
        "padding_frac": result.padding_frac, "computed_frac": result.computed_frac,
        "times": run.times.pop(),
    }
    parts = run.dist.all_gather_object(local)
    merged = {k: ([x for p in parts for x in p[k]] if isinstance(v, list) else [p[k] for p in parts])
              for k, v in local.items()}
    entropies = torch.tensor(merged["entropies"], dtype=torch.float64)
    rewards = torch.tensor(merged["rewards"])
    prompts, responses = sum(merged["prompts"]), sum(merged["responses"])
    q = torch.quantile(entropies, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    rollout_time = max(merged["rollout_time"])
    algo = run.cfg.algorithm
    return {
        "reward": float(rewards.mean()) if rewards.numel() else 0.0,
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "pseudo_label_accuracy": float(np.mean(merged["label_hits"])) if merged["label_hits"] else None,
        "policy_accuracy": float(np.mean(merged["policy_hits"])) if merged["policy_hits"] else None,
        "majority_ratio": float(np.mean(merged["ratios"])),
        "frac_reward_zero_std": sum(merged["zero_std"]) / prompts,
        "groups_no_answer": sum(merged["no_answer"]),
        "no_answer_frac": sum(merged["no_answer_responses"]) / responses,
        "no_answer_cut_frac": sum(merged["no_answer_cut"]) / max(sum(merged["no_answer_responses"]), 1),
        "entropy": float(entropies.mean()), "entropy/q1": q[0], "entropy/median": q[1], "entropy/q3": q[2],
        "iqr/threshold": float(np.mean(merged["thresholds"])) if merged["thresholds"] else None,
        "iqr/pruned_frac": sum(merged["pruned"]) / responses if algo.iqr_filter else 0.0,
        "collapse/unanimous_frac": sum(merged["unanimous"]) / prompts,
        "collapse/momentum_agreement": float(np.mean(merged["agreement"])) if merged["agreement"] else None,
        "loss": result.loss, "kl": result.kl, "grad_norm": result.grad_norm, "lr": run.scheduler.get_last_lr()[0],
        "completions/mean_length": sum(merged["generated"]) / responses,
        "tokens_per_second": sum(merged["generated"]) / max(rollout_time, 1e-9),
        "rollout_time": rollout_time, "step_time": step_time, "peak_memory_gib": max(merged["peak"]),
        "skipped_nonfinite": int(result.skipped),
        "batch/padding_frac": float(np.mean(merged["padding_frac"])),
        "batch/computed_frac": float(np.mean(merged["computed_frac"])),
        # per stage, the slowest rank's (the ranks wait for each other at the next collective)
        **{key: max(t.get(key, 0.0) for t in merged["times"]) for key in sorted({k for t in merged["times"] for k in t})},
    }


def rollout_rows(run: Run, batch: RolloutBatch, scored: ScoredBatch, assigned: Assignment) -> list:
    """This rank's rollouts as rows (one per response) for rollouts/step_N.jsonl: what was sampled, by which
    model, and what the vote, the filter and the rewards made of it."""
    G, M = run.cfg.algorithm.group_size, run.cfg.algorithm.policy_samples
    rows = []
    for i, (problem, group, score_) in enumerate(zip(batch.problems, batch.groups, assigned.groups)):
        keep = scored.trajectory_entropy[i * G:(i + 1) * G].double() >= score_.threshold   # as the filter compares
        for j, completion in enumerate(group):
            rows.append({"problem": problem.problem, "answer": problem.answer, "sampler": "policy" if j < M else
                         "momentum", "text": completion.text, "token_ids": completion.token_ids,
                         "entropy": float(scored.trajectory_entropy[i * G + j]), "pruned": not bool(keep[j]),
                         "pseudo_label": score_.vote.pseudo_label,
                         "reward": float(score_.rewards[j]) if j < M else None,
                         "advantage": float(score_.advantages[j]) if j < M else None})
    return rows


def write_rollouts(run: Run, step: int, rows: list) -> None:
    """rollouts/step_N.jsonl on rank 0, every rank's rows (a collective)."""
    gathered = [row for part in run.dist.all_gather_object(rows) for row in part]
    if run.dist.is_main:
        folder = run.run_dir / "rollouts"
        folder.mkdir(exist_ok=True)
        (folder / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gathered))


def validate(run: Run) -> Optional[dict]:
    """Held-out figures (eval/greedy, eval/avg@k, eval/maj@k) of the current policy; None without held-out data."""
    if not run.held_out:
        return None
    run.engine.wake_up()
    run.engine.push_weights(policy_weights(run))
    figures, _ = evaluate(run.engine, run.held_out, run.encode, run.cfg.eval,
                          run.cfg.eval.max_new_tokens or run.cfg.rollout.max_new_tokens, run.dist,
                          run.cfg.data.answer_format)
    run.engine.sleep()
    return figures


def eval_metrics(figures: dict, k: int) -> dict:
    """eval/* keys with stable names for dashboards: eval/greedy, eval/avg@k, eval/maj@k (k in eval/k)."""
    out = {"eval/k": k}
    for key, value in figures.items():
        out["eval/" + key.replace(f"@{k}", "@k") if key in (f"avg@{k}", f"maj@{k}") else "eval/" + key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig, log=print, stop_after_steps: Optional[int] = None,
          engine: Optional[RolloutEngine] = None) -> dict:
    """Run M-GRPO (or SRT) as configured; returns a summary with held-out figures before and after.

    stop_after_steps ends this invocation early (as an interruption would), leaving a resumable checkpoint.
    engine replaces the rollout engine (tests inject fixed rollouts).
    """
    algo = cfg.algorithm
    dist = init_distributed(cfg.device, cfg.model.precision)
    if algo.prompts_per_step % dist.world_size:
        raise TrainingError(f"algorithm.prompts_per_step={algo.prompts_per_step} does not split over {dist.world_size} "
                            "ranks (every prompt's group stays on one rank): make it a multiple of the world size")
    log = log if dist.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run_dir or dist.broadcast_object(f"runs/{datetime.now():%Y%m%d-%H%M%S}"))
    lock = lock_run_dir(run_dir, dist)                        # one writer per run directory, for the whole run
    try:
        return _train(cfg, dist, run_dir, log, stop_after_steps, engine)
    finally:
        lock.release()


def lock_run_dir(run_dir: Path, dist) -> RunDirLock:
    """Rank 0 takes the run directory's lock (every rank stops if it is held elsewhere)."""
    lock, refused = RunDirLock(run_dir), None
    if dist.is_main:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - told to every rank, raised on every rank
            refused = e
    refused = dist.broadcast_object(refused)
    if refused is not None:
        lock.release()
        raise refused
    return lock


def _train(cfg: TrainConfig, dist, run_dir: Path, log, stop_after_steps: Optional[int],
           engine: Optional[RolloutEngine]) -> dict:
    algo = cfg.algorithm
    resume_from = prepare_run_dir(run_dir, cfg.resume, cfg.overwrite, dist, cfg.resume_from, log)
    if resume_from is not None:
        check_resumable(resume_from, dist, resume_settings(cfg))          # before loading any model
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")
    run = setup(cfg, dist, run_dir, log, engine)
    if dist.is_main:
        (run_dir / "base_model.txt").write_text(run.base_model + "\n")

    start_step, nonfinite_in_a_row, before, monitor_state, warned_no_answer = 0, 0, None, None, False
    if resume_from is not None:
        trainer = restore(run, resume_from)
        run.stream.position = trainer["data_position"]
        start_step, nonfinite_in_a_row = trainer["step"], trainer["nonfinite_in_a_row"]
        before, monitor_state = trainer.get("before"), trainer.get("monitor")
        log(f"[resume] from {resume_from} at step {start_step}")
    else:
        before = validate(run)
        if before is not None:
            log(f"[eval] before training: {figures_line(before)} ({len(run.held_out)} held-out problems)")
    if dist.is_main:
        run.metrics = MetricsLogger(run_dir, resume_step=start_step if resume_from is not None else None)
        if before is not None and resume_from is None:
            run.metrics.log(0, eval_metrics(before, cfg.eval.k))
    monitor = CollapseMonitor.from_state(monitor_state, log)

    end_step = cfg.steps if stop_after_steps is None else min(cfg.steps, start_step + stop_after_steps)
    share = algo.prompts_per_step // dist.world_size
    progress = None
    if cfg.progress and dist.is_main:
        from tqdm import tqdm
        progress = tqdm(total=cfg.steps, initial=start_step, desc="M-GRPO" if algo.uses_momentum else "SRT",
                        dynamic_ncols=True)
    for step in range(start_step, end_step):
        t_step = time.perf_counter()
        problems = run.stream.next_batch(algo.prompts_per_step)[dist.rank * share:(dist.rank + 1) * share]

        batch = rollout(run, problems, step)                 # 1
        with run.times("score"):
            scored = score(run, batch)                       # 2
        with run.times("rewards"):
            assigned = assign_rewards(run, batch, scored)    # 3
        result = update(run, scored, assigned)               # 4
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if result.skipped else 0
        if nonfinite_in_a_row >= algo.max_nonfinite_in_a_row:
            raise TrainingError(f"the loss was not finite in {nonfinite_in_a_row} steps in a row (last at step "
                                f"{step + 1}): lower optim.lr, raise optim.max_grad_norm clipping, or check the data")

        record = step_record(run, batch, scored, assigned, result, time.perf_counter() - t_step)   # 5
        if cfg.rollouts_every and (step + 1) % cfg.rollouts_every == 0:
            write_rollouts(run, step + 1, rollout_rows(run, batch, scored, assigned))
        record.update(monitor.observe(step + 1, record))
        if record["no_answer_frac"] > 0.5 and not warned_no_answer:
            warned_no_answer = True
            say = progress.write if progress is not None else log
            say(no_answer_warning(f"step {step + 1}", record["no_answer_frac"], assigned.no_answer_example or "",
                                  record["no_answer_cut_frac"], cfg.data.answer_format, TRAIN_SETTING_NAMES))
        if step == start_step and resume_from is None:
            report_memory(run, log)
        if cfg.data.eval_every and (step + 1) % cfg.data.eval_every == 0 and step + 1 < cfg.steps:
            with run.times("validation"):
                figures = validate(run)
            if figures is not None:
                record.update(eval_metrics(figures, cfg.eval.k))
            record.update(run.times.pop())
        if dist.is_main:
            run.metrics.log(step + 1, record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{record['reward']:.2f}", maj=f"{record['majority_ratio']:.2f}",
                                 ent=f"{record['entropy']:.2f}")
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            (progress.write if progress is not None else log)(format_metrics_line(step + 1, cfg.steps, record))
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == end_step:
            trainer = {"step": step + 1, "data_position": run.stream.position, "nonfinite_in_a_row": nonfinite_in_a_row,
                       "before": before, "monitor": monitor.state()}
            save_checkpoint(run_dir, step + 1, checkpoint_state(run), {"base_model": run.base_model, "trainer": trainer,
                            "settings": resume_settings(cfg)}, cfg.keep_checkpoints, dist,
                            log=progress.write if progress is not None else log)
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0 and step + 1 < cfg.steps:
            export_policy(run, run_dir / "snapshots" / f"step_{step + 1:06d}")
    if progress is not None:
        progress.close()

    summary = {"run_dir": str(run_dir), "steps_done": end_step, "before": before}
    if start_step == cfg.steps and (run_dir / "final").is_dir():
        log(f"[resume] the run had already finished at step {cfg.steps}: nothing to do (final model in "
            f"{run_dir / 'final'})")
    elif end_step == cfg.steps:
        summary["after"] = after = validate(run)
        if after is not None and dist.is_main:
            run.metrics.log(end_step, eval_metrics(after, cfg.eval.k))
        export_policy(run, run_dir / "final")
        if before is not None and after is not None:
            log(f"[eval] held-out ({len(run.held_out)} problems): "
                + " | ".join(f"{k} {before[k]:.1%} -> {after[k]:.1%}" for k in before
                             if k == "greedy" or k.startswith(("avg@", "maj@"))))
        log(f"[done] run directory: {run_dir} (final model in {run_dir / 'final'})")
    if run.metrics is not None:
        run.metrics.close()
    summary["accuracy_before"] = before.get("greedy") if before else None
    summary["accuracy_after"] = summary.get("after", {}).get("greedy") if summary.get("after") else None
    summary["run"] = run
    return summary
