"""M-GRPO training: one loop that owns the order of events; the stages are in stages.py, the math in algorithm.py.

Per step (`train_step`), each stage given only what it uses:

    1. rollout          policy weights into the engine, M samples per prompt; momentum weights, N samples
    2. score            the current policy's log-probs and entropies of all G trajectories (no grad)
    3. assign_rewards   IQR filter -> majority vote -> binary rewards -> GRPO advantages, per prompt
    4. reference        the KL reference's log-probs of the trained responses
    5. policy_gradients the clipped policy loss + k3 KL over the whole batch, backward
    6. optimizer_step   clip by the global norm, step (the int8 momentum model moves here: it needs the step's dq),
                        free the gradients
    7. momentum_update  theta_k <- m theta_k + (1 - m) theta_q (the fp32 momentum model)

then, in `train`: the step's metrics (reduced over ranks), the collapse monitor, validation every
data.eval_every steps, checkpoints and snapshots.

Launch:
  mgrpo train                                          the embedded default, one process
  mgrpo train --config configs/qwen3_4b.yaml ...       one process (one GPU)
  torchrun --nproc_per_node=8 -m mgrpo train --config configs/qwen3_4b.yaml ...
                                                       FSDP2 over 8 GPUs, one vLLM engine per rank

Under torchrun each rank takes prompts_per_step / world_size prompts with their whole groups, so stages 1-3
are local; stage 5 normalises by the global token count and FSDP2 sums the gradients; the metrics are reduced.
The parts are built once by mgrpo/build.py (`setup`); checkpoints and exports are mgrpo/storage/checkpoint.py's.
"""
from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import yaml

from ..build import Parts, memory_report, setup
from ..config import INVOCATION_KEYS, TrainConfig, config_to_dict, save_config
from ..distributed import Dist, init_distributed
from ..engines.base import RolloutEngine, SamplingParams, sampling_seed
from ..errors import TrainingError
from ..evaluation.harness import agreement_with_votes, figures_line, held_out_votes, no_answer_warning
from ..metrics import CollapseMonitor, MetricsLogger, StageTimes, format_metrics_line, peak_memory_gib
from ..storage.checkpoint import (
    check_resumable,
    checkpoint_state,
    export_policy,
    prepare_run_dir,
    restore,
    resume_settings,
    rng_state,
    save_checkpoint,
)
from ..storage.run_dir import RunDirLock, clear_run
from .preemption import Preempted, PreemptionWatch, StepAbandoned, clear_marker, write_marker
from .records import eval_metrics, no_answer_settings, padding_figures, rollout_rows, step_record, write_rollouts
from .stages import (
    Assignment,
    Gradients,
    RolloutBatch,
    ScoredBatch,
    Scoring,
    Step,
    assign_rewards,
    momentum_update,
    optimizer_step,
    policy_gradients,
    reference_logprobs,
    rollout,
    score,
    training_batch,
    validate,
)


@dataclass
class StepOutcome:
    batch: RolloutBatch
    scored: ScoredBatch
    assigned: Assignment
    gradients: Gradients
    step: Step
    padding: dict
    rollout_time: float


def scoring_for(cfg: TrainConfig, parts: Parts, dist: Dist) -> Scoring:
    return Scoring(cfg.optim.layout, cfg.optim.micro_batch_tokens, cfg.model.attn_implementation,
                   parts.tokenizer.pad_token_id, cfg.rollout.temperature, parts.impl, dist)


def train_step(parts: Parts, scoring: Scoring, cfg: TrainConfig, step: int, times: StageTimes,
               preempted=lambda: False) -> StepOutcome:
    """One step of M-GRPO (SRT without a momentum model) on the stream's next prompts (this rank's share).
    preempted: a collective asked once the rewards are known; True abandons the step (StepAbandoned) before
    anything is updated."""
    algo, dist, models = cfg.algorithm, scoring.dist, parts.models
    share = algo.prompts_per_step // dist.world_size
    problems = parts.stream.next_batch(algo.prompts_per_step)[dist.rank * share:(dist.rank + 1) * share]
    sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              max_new_tokens=cfg.rollout.max_new_tokens, seed=sampling_seed(cfg.seed, step, dist.rank))
    started = time.perf_counter()
    batch = rollout(parts.engine, models.policy, models.momentum, [parts.encode(p.problem) for p in problems],   # 1
                    problems, sampling, algo.policy_samples, algo.momentum_samples, times)
    rollout_time = time.perf_counter() - started
    with times("score"):
        scored = score(models.policy, batch, scoring)                                                           # 2
    with times("rewards"):
        assigned = assign_rewards(batch, scored.trajectory_entropy, algo, cfg.data.answer_format)               # 3
    if preempted():                                     # nothing updated yet: the step can be redone from its start
        raise StepAbandoned
    trained = training_batch(scored, assigned, dist)
    ref_logp = None
    if models.reference is not None:
        with times("reference"):
            ref_logp = reference_logprobs(models.reference, models.momentum, algo.kl_reference,                # 4
                                          trained.sequences, scoring)
    optimizer, scheduler = parts.optimization.optimizer, parts.optimization.scheduler
    for _ in range(algo.updates_per_batch):
        with times("update"):
            gradients = policy_gradients(models.policy, trained, ref_logp, algo, scoring)                      # 5
        with times("optimizer_step"):
            stepped = optimizer_step(optimizer, scheduler, models.params, cfg.optim.max_grad_norm, gradients.loss)   # 6
        if stepped.skipped:
            break
        if models.momentum is not None and not models.momentum.updated_by_optimizer:
            with times("momentum_update"):
                momentum_update(models.momentum)                                                               # 7
    padding = padding_figures(trained.sequences, cfg.optim.micro_batch_tokens, gradients.computed_tokens)
    return StepOutcome(batch, scored, assigned, gradients, stepped, padding, rollout_time)


# ---------------------------------------------------------------------------------------------------------
# The run

def train(cfg: TrainConfig, log=print, stop_after_steps: Optional[int] = None,
          engine: Optional[RolloutEngine] = None) -> dict:
    """Run M-GRPO (or SRT) as configured; returns a summary with held-out figures before and after.

    stop_after_steps ends this invocation early (as an interruption would), leaving a resumable checkpoint.
    engine replaces the rollout engine (tests inject fixed rollouts).
    """
    dist = init_distributed(cfg.device, cfg.model.precision, cfg.distributed.mesh)
    if cfg.algorithm.prompts_per_step % dist.world_size:
        raise TrainingError(f"algorithm.prompts_per_step={cfg.algorithm.prompts_per_step} does not split over "
                            f"{dist.world_size} ranks (every prompt's group stays on one rank): make it a multiple "
                            "of the world size")
    log = log if dist.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run_dir or dist.broadcast_object(f"runs/{datetime.now():%Y%m%d-%H%M%S}"))
    made_here = dist.is_main and not run_dir.exists()
    lock = lock_run_dir(run_dir, dist)                        # one writer per run directory, for the whole run
    try:
        # the metrics writer closes however the run ends (an error too): a torchrun rank leaves through
        # os._exit (mgrpo/distributed.py, exit_process), which runs no finalizer to flush it
        with ExitStack() as open_files:
            return _train(cfg, dist, run_dir, log, stop_after_steps, engine, open_files)
    except BaseException:
        if made_here and {p.name for p in run_dir.iterdir()} <= {".lock"}:
            shutil.rmtree(run_dir, ignore_errors=True)    # a run that stopped before writing anything leaves no trace
        raise
    finally:
        lock.release()


def keep_changed_config(run_dir: Path, cfg: TrainConfig, checkpoint: str, log) -> None:
    """A resume that changes settings (the command line over the run's config.yaml) says which, and keeps the
    config.yaml they replace as config.until_<checkpoint>.yaml: what ran up to that checkpoint stays on record."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        before = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        before = {}
    changes = changed_settings(before, config_to_dict(cfg))
    if changes:
        kept = run_dir / f"config.until_{checkpoint}.yaml"
        path.replace(kept)
        log(f"[resume] settings changed from the run's config.yaml: {', '.join(changes)} (the earlier config is "
            f"kept as {kept.name})")


def changed_settings(before: dict, after: dict, prefix: str = "") -> list:
    """["key: old -> new", ...] between two config mappings, less how the run was invoked (run_dir, resume, ...)."""
    changes = []
    for key in sorted(set(before) | set(after)):
        name = f"{prefix}{key}"
        if name in INVOCATION_KEYS:
            continue
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, f"{name}.")
        elif old != new:
            changes.append(f"{name}: {old} -> {new}")
    return changes


def lock_run_dir(run_dir: Path, dist: Dist) -> RunDirLock:
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


def _train(cfg: TrainConfig, dist: Dist, run_dir: Path, log, stop_after_steps: Optional[int],
           engine: Optional[RolloutEngine], open_files: ExitStack) -> dict:
    algo = cfg.algorithm
    resume_from = prepare_run_dir(run_dir, cfg.resume, cfg.overwrite, dist, cfg.resume_from, log)
    written_by = None
    if resume_from is not None:
        written_by = check_resumable(resume_from, dist, resume_settings(cfg))["world_size"]   # before any model
    parts = setup(cfg, dist, log, engine)
    models, optimization = parts.models, parts.optimization
    scoring = scoring_for(cfg, parts, dist)

    def record_settings():
        # Only once the model, the data and the engine were built from these settings, and a resumed checkpoint
        # loaded into them: a bad one has stopped the run with the directory as it was (an earlier run is deleted
        # by overwrite=true here, not before, and the run's config.yaml is replaced only by settings that work, so
        # a failed resume leaves the run resumable as it was).
        if not dist.is_main:
            return
        if resume_from is None and cfg.overwrite:
            clear_run(run_dir)
        if resume_from is not None:
            keep_changed_config(run_dir, cfg, resume_from.name, log)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "base_model.txt").write_text(parts.base_model + "\n")

    base_votes = None     # the base model's majority answer per held-out problem: what later greedy answers are held to

    def held_out_figures() -> tuple:
        """(figures, per-problem results) of the policy now; with the base model's votes known, the figures include
        base_vote_agreement (label-free drift on held-out prompts)."""
        figures, results = validate(parts.engine, models.policy, parts.held_out, parts.encode, cfg.eval,
                                    cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens, dist, cfg.data.answer_format)
        if figures is not None and base_votes is not None:     # None: resumed from a checkpoint older than the votes
            figures.update(agreement_with_votes(results, base_votes))
        return figures, results

    start_step, nonfinite_in_a_row, before, monitor_state, warned_no_answer = 0, 0, None, None, False
    if resume_from is not None:
        trainer = restore(resume_from, models, optimization, dist, algo.kl_reference)
        record_settings()
        parts.stream.position = trainer["data_position"]
        start_step, nonfinite_in_a_row = trainer["step"], trainer["nonfinite_in_a_row"]
        before, monitor_state, base_votes = trainer.get("before"), trainer.get("monitor"), trainer.get("base_votes")
        log(f"[resume] from {resume_from} at step {start_step}" + (
            f" (written by {written_by} ranks, resharded to {dist.world_size})" if written_by != dist.world_size else ""))
    else:
        record_settings()
        before, results = held_out_figures()
        if before is not None:
            base_votes = held_out_votes(results, cfg.eval.k)
            before.update(agreement_with_votes(results, base_votes))
            log(f"[eval] before training: {figures_line(before)} ({len(parts.held_out)} held-out problems)")
    metrics = None
    if dist.is_main:
        metrics = MetricsLogger(run_dir, resume_step=start_step if resume_from is not None else None)
        open_files.callback(metrics.close)
        if before is not None and resume_from is None:
            metrics.log(0, eval_metrics(before, cfg.eval.k))
    monitor = CollapseMonitor.from_state(monitor_state, log, CollapseMonitor.thresholds_for(algo))
    times = StageTimes()

    end_step = cfg.steps if stop_after_steps is None else min(cfg.steps, start_step + stop_after_steps)
    progress = None
    if cfg.progress and dist.is_main:
        from tqdm import tqdm
        progress = tqdm(total=cfg.steps, initial=start_step, desc="M-GRPO" if algo.uses_momentum else "SRT",
                        dynamic_ncols=True)
    say = progress.write if progress is not None else log
    if dist.nodes > 1 and start_step == 0:
        log(f"[distributed] {dist.nodes} nodes x {dist.world_size // dist.nodes} ranks, mesh {dist.mesh}")
    if dist.is_main:
        clear_marker(run_dir)

    # Checkpoints of this run written or resumed from by this process: the state at that step. A stop at the start
    # of a step whose state is one of them (a resumed run stopped in its first step, a stop signalled during a
    # save_every write) names it instead of writing the same checkpoint again over it.
    ours = resume_from is not None and Path(resume_from).resolve().parent == (run_dir / "checkpoints").resolve()
    held = {start_step: Path(resume_from)} if ours else {}

    def checkpoint(steps_done: int, data_position: int, nonfinite: int, rng=None) -> Path:
        if steps_done in held and held[steps_done].is_dir():
            return held[steps_done]
        trainer = {"step": steps_done, "data_position": data_position, "nonfinite_in_a_row": nonfinite,
                   "before": before, "monitor": monitor.state(), "base_votes": base_votes}
        held[steps_done] = save_checkpoint(run_dir, steps_done,
                                           checkpoint_state(models, optimization, dist, algo.kl_reference, rng),
                                           {"base_model": parts.base_model, "trainer": trainer,
                                            "settings": resume_settings(cfg)}, cfg.keep_checkpoints, dist, log=say)
        return held[steps_done]

    def stop_for(watch: PreemptionWatch, steps_done: int, saved: Path):
        if dist.is_main and watch.preempted:     # a Ctrl-C is no preemption: nothing for a batch script to requeue
            write_marker(run_dir, watch.signal_name, steps_done, saved)
        dist.barrier()                       # no rank exits (and has torchrun stop the others) before the marker
        if metrics is not None:
            metrics.close()
        if progress is not None:
            progress.close()
        say(f"[{'preempted' if watch.preempted else 'stopped'}] {watch.signal_name}: checkpoint {saved} "
            f"({steps_done} steps); continue with resume=true")
        return Preempted(watch.signal_name, steps_done, saved, watch.exit_code)

    with PreemptionWatch(dist) as watch:
        for step in range(start_step, end_step):
            t_step = time.perf_counter()
            position, rng_at_start = parts.stream.position, rng_state()      # what an abandoned step restarts from
            try:
                out = train_step(parts, scoring, cfg, step, times, watch.requested)                       # 1-7
            except StepAbandoned:
                raise stop_for(watch, step, checkpoint(step, position, nonfinite_in_a_row, rng_at_start)) from None
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if out.step.skipped else 0
            if nonfinite_in_a_row >= algo.max_nonfinite_in_a_row:
                raise TrainingError(f"the loss was not finite in {nonfinite_in_a_row} steps in a row (last at step "
                                    f"{step + 1}): lower optim.lr, raise optim.max_grad_norm clipping, or check the data")

            record = step_record(out.batch, out.scored, out.assigned, out.gradients, out.step,              # metrics
                                 optimization.scheduler.get_last_lr()[0], out.padding, times.pop(), out.rollout_time,
                                 peak_memory_gib(dist.device), time.perf_counter() - t_step, algo, dist)
            if cfg.rollouts_every and (step + 1) % cfg.rollouts_every == 0:
                write_rollouts(run_dir, step + 1, rollout_rows(out.batch, out.scored.trajectory_entropy, out.assigned,
                                                               algo.group_size, algo.policy_samples), dist)
            record.update(monitor.observe(step + 1, record))
            if record["no_answer_frac"] > 0.5 and not warned_no_answer:
                warned_no_answer = True
                say(no_answer_warning(f"step {step + 1}", record["no_answer_frac"], out.assigned.no_answer_example or "",
                                      record["no_answer_cut_frac"], cfg.data.answer_format, no_answer_settings()))
            if step == start_step and resume_from is None:
                log(memory_report(parts, dist.device))
            if cfg.data.eval_every and (step + 1) % cfg.data.eval_every == 0 and step + 1 < cfg.steps:
                with times("validation"):                                                                  # validation
                    figures, _ = held_out_figures()
                if figures is not None:
                    record.update(eval_metrics(figures, cfg.eval.k))
                record.update(times.pop())
            if metrics is not None:
                metrics.log(step + 1, record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{record['reward']:.2f}", maj=f"{record['majority_ratio']:.2f}",
                                     ent=f"{record['entropy']:.2f}")
            if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                say(format_metrics_line(step + 1, cfg.steps, record))
            stopping = watch.requested()                                                                   # preemption
            if stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == end_step:    # checkpoint
                saved = checkpoint(step + 1, parts.stream.position, nonfinite_in_a_row)
            if stopping:
                raise stop_for(watch, step + 1, saved)
            if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0 and step + 1 < cfg.steps:
                export_policy(models.policy, parts.tokenizer, parts.export_dtype, dist,
                              run_dir / "snapshots" / f"step_{step + 1:06d}")
    if progress is not None:
        progress.close()

    summary = {"run_dir": str(run_dir), "steps_done": end_step, "before": before}
    if start_step == cfg.steps and (run_dir / "final").is_dir():
        log(f"[resume] the run had already finished at step {cfg.steps}: nothing to do (final model in "
            f"{run_dir / 'final'})")
    elif end_step == cfg.steps:
        summary["after"] = after = held_out_figures()[0]
        if after is not None and metrics is not None:
            metrics.log(end_step, eval_metrics(after, cfg.eval.k))
        export_policy(models.policy, parts.tokenizer, parts.export_dtype, dist, run_dir / "final")
        if before is not None and after is not None:
            log(f"[eval] held-out ({len(parts.held_out)} problems): "
                + " | ".join(f"{k} {before[k]:.1%} -> {after[k]:.1%}" for k in before
                             if k == "greedy" or k.startswith(("avg@", "maj@"))))
        log(f"[done] run directory: {run_dir} (final model in {run_dir / 'final'})")
    if metrics is not None:
        metrics.close()
    summary["accuracy_before"] = before.get("greedy") if before else None
    summary["accuracy_after"] = summary.get("after", {}).get("greedy") if summary.get("after") else None
    summary.update(parts=parts, models=models, dist=dist)
    return summary
