"""What a step leaves behind: its metrics over all ranks (one line of metrics.jsonl), the held-out figures under
stable names, and the rollouts as rows (rollouts/step_N.jsonl)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..config import AlgorithmConfig
from ..distributed import Dist
from .stages import Assignment, Gradients, RolloutBatch, ScoredBatch, Step


def step_record(batch: RolloutBatch, scored: ScoredBatch, assigned: Assignment, gradients: Gradients, step: Step,
                lr: float, padding: dict, times: dict, rollout_time: float, peak_gib: float, step_time: float,
                algo: AlgorithmConfig, dist: Dist) -> dict:
    """The step's metrics over all ranks (the same figures one process would compute for the whole batch).
    padding: batch/padding_frac and batch/computed_frac of this rank's update; times: time/<stage> seconds."""
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
        "rollout_time": rollout_time, "peak": peak_gib,
        "padding_frac": padding["padding_frac"], "computed_frac": padding["computed_frac"],
        "micro_batches": gradients.micro_batches, "skipped_micro_batches": gradients.skipped_micro_batches,
        "times": times,
        # per prompt of a problem family (data with a family field): (family, majority ratio, policy lengths)
        "families": [(p.family, g.vote.majority_ratio, [len(c.token_ids) for c in group[:len(g.rewards)]])
                     for p, group, g in zip(batch.problems, batch.groups, assigned.groups) if p.family is not None],
    }
    parts = dist.all_gather_object(local)
    merged = {k: ([x for p in parts for x in p[k]] if isinstance(v, list) else [p[k] for p in parts])
              for k, v in local.items()}
    entropies = torch.tensor(merged["entropies"], dtype=torch.float64)
    rewards = torch.tensor(merged["rewards"])
    prompts, responses = sum(merged["prompts"]), sum(merged["responses"])
    q = torch.quantile(entropies, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    rollout_time = max(merged["rollout_time"])
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
        "loss": gradients.loss, "kl": gradients.kl, "grad_norm": step.grad_norm, "lr": lr,
        "completions/mean_length": sum(merged["generated"]) / responses,
        "tokens_per_second": sum(merged["generated"]) / max(rollout_time, 1e-9),
        "rollout_time": rollout_time, "step_time": step_time, "peak_memory_gib": max(merged["peak"]),
        "skipped_nonfinite": int(step.skipped),
        "batch/padding_frac": float(np.mean(merged["padding_frac"])),
        "batch/computed_frac": float(np.mean(merged["computed_frac"])),
        "batch/micro_batches": sum(merged["micro_batches"]),
        "batch/skipped_micro_batches": sum(merged["skipped_micro_batches"]),
        # per stage, the slowest rank's (the ranks wait for each other at the next collective)
        **{key: max(t.get(key, 0.0) for t in merged["times"]) for key in sorted({k for t in merged["times"] for k in t})},
        **family_figures(merged["families"]),
    }


def family_figures(prompts: list) -> dict:
    """Training signals per problem family, where the mean over the batch hides a family the vote misleads
    (README, "Collapse"): family/<family>/majority_ratio (the vote's, over the G responses) and
    family/<family>/mean_length (the policy's responses, in tokens), over this step's prompts of that family
    (family/<family>/prompts of them). prompts: [(family, majority ratio, [policy response lengths])]."""
    out = {}
    for family in sorted({f for f, _, _ in prompts}):
        mine = [(ratio, lengths) for f, ratio, lengths in prompts if f == family]
        lengths = [n for _, ls in mine for n in ls]
        out[f"family/{family}/majority_ratio"] = float(np.mean([ratio for ratio, _ in mine]))
        out[f"family/{family}/mean_length"] = float(np.mean(lengths)) if lengths else 0.0
        out[f"family/{family}/prompts"] = len(mine)
    return out


def eval_metrics(figures: dict, k: int) -> dict:
    """eval/* keys with stable names for dashboards: eval/greedy, eval/avg@k, eval/maj@k (k in eval/k), and
    eval/<family>/greedy, ... when the held-out problems have families."""
    out = {"eval/k": k}
    for key, value in figures.items():       # per family too: eval/<family>/maj@k
        head, _, name = key.rpartition("/")
        name = name.replace(f"@{k}", "@k") if name in (f"avg@{k}", f"maj@{k}") else name
        out["eval/" + (f"{head}/" if head else "") + name] = value
    return out


def rollout_rows(batch: RolloutBatch, trajectory_entropy: torch.Tensor, assigned: Assignment,
                 group_size: int, policy_samples: int) -> list:
    """This rank's rollouts as rows (one per response) for rollouts/step_N.jsonl: what was sampled, by which
    model, and what the vote, the filter and the rewards made of it."""
    G, M = group_size, policy_samples
    rows = []
    for i, (problem, group, score) in enumerate(zip(batch.problems, batch.groups, assigned.groups)):
        keep = trajectory_entropy[i * G:(i + 1) * G].double() >= score.threshold   # as the filter compares
        for j, completion in enumerate(group):
            rows.append({"problem": problem.problem, "answer": problem.answer, "family": problem.family,
                         "sampler": "policy" if j < M else
                         "momentum", "text": completion.text, "token_ids": completion.token_ids,
                         "entropy": float(trajectory_entropy[i * G + j]), "pruned": not bool(keep[j]),
                         "pseudo_label": score.vote.pseudo_label,
                         "reward": float(score.rewards[j]) if j < M else None,
                         "advantage": float(score.advantages[j]) if j < M else None})
    return rows


def write_rollouts(run_dir: Path, step: int, rows: list, dist: Dist) -> None:
    """rollouts/step_N.jsonl on rank 0, every rank's rows (a collective)."""
    gathered = [row for part in dist.all_gather_object(rows) for row in part]
    if dist.is_main:
        folder = Path(run_dir) / "rollouts"
        folder.mkdir(exist_ok=True)
        (folder / f"step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gathered))


def padding_figures(sequences, micro_batch_tokens: int, computed_tokens: int) -> dict:
    """batch/padding_frac (what a padded layout would waste on these sequences) and batch/computed_frac (tokens the
    layout used computed, relative to the padded layout)."""
    real = float(sum(len(r) for r in sequences.responses) + sum(len(p) for p in sequences.prompts))
    padded = sequences.padded_tokens(micro_batch_tokens)
    return {"padding_frac": 1.0 - real / padded if padded else 0.0,
            "computed_frac": computed_tokens / padded if padded else 0.0}


def no_answer_settings() -> dict:
    """The trainer's names for the settings the no-answer warning suggests."""
    return {"instruction": "data.instruction", "chat_template": "model.use_chat_template=true",
            "max_new_tokens": "rollout.max_new_tokens", "answer_format": "data.answer_format"}
