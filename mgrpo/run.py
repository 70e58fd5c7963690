"""The run: everything the training loop touches, built once by `setup`, in the order memory needs.

    1. the data (read and validated before any model work) and the held-out problems
    2. the model's tokenizer and config, no weights: prompt and response lengths checked against the model
    3. the rollout engine, before the trainer allocates anything (vLLM sizes its KV cache from the free memory);
       then the peak-memory counter starts over, so peak_memory_gib is the trainer's own peak
    4. the policy (fp32 master weights; this rank's FSDP2 shards under torchrun), the KL reference, the
       momentum model and the optimizer (mgrpo/loading.py: how each is loaded without a full copy per rank)
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import TrainConfig
from .data import PromptStream, check_prompt_ids, encode_prompt, eval_problems
from .distributed import Dist, compute_dtype, tensor_bytes
from .loading import (TrainingError, build_reference, load_policy, load_tokenizer_and_config, parameter_names,
                      resolve_model_path, stored_dtype)
from .logprobs import TokenScorer, resolve_logprob_impl, triton_can_run
from .metrics import MetricsLogger, StageTimes, process_memory_gib, reset_peak_memory
from .momentum import MomentumModel, make_momentum
from .optimizers import make_optimizer
from .rollout import RolloutEngine, make_engine, quiet_libraries


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""
    cfg: TrainConfig
    dist: Dist
    run_dir: Path
    tokenizer: object
    policy: TokenScorer
    reference: Optional[TokenScorer]
    momentum: Optional[MomentumModel]
    optimizer: torch.optim.Optimizer
    scheduler: object
    engine: RolloutEngine
    stream: PromptStream
    held_out: list
    impl: str
    base_model: str
    export_dtype: torch.dtype
    compute_dtype: torch.dtype = torch.float32
    metrics: Optional[MetricsLogger] = None
    engine_gib: float = 0.0
    """Memory the engine took when it was built (measured)."""
    times: StageTimes = field(default_factory=StageTimes)
    """Wall time per stage of the current step (time/... in the metrics)."""

    @property
    def params(self) -> list:
        return [p for _, p in self.policy.hf_named_parameters()]

    def encode(self, problem: str) -> list:
        return encode_prompt(self.tokenizer, problem, self.cfg.data.instruction, self.cfg.model.use_chat_template)


def longest_sequence(cfg: TrainConfig, tokenizer, stream: PromptStream, held_out: list, config=None) -> int:
    """The longest prompt plus the longest response budget (rollout or validation) the engine must hold.
    With a model `config`, a budget it cannot hold is a config error, not a crash deep inside generation."""
    problems = held_out + (stream.problems if stream.problems is not None else [stream.peek(i) for i in range(64)])
    longest = 0
    for problem in problems:
        ids = encode_prompt(tokenizer, problem.problem, cfg.data.instruction, cfg.model.use_chat_template)
        if config is not None:   # before any generation: ids of this model's vocabulary, or a clear error
            check_prompt_ids(ids, config.vocab_size, f"model.path={cfg.model.path or 'the embedded default'}")
        longest = max(longest, len(ids))
    limit = getattr(config, "max_position_embeddings", None)
    for key, new_tokens in (("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
                            ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if limit is not None and longest + new_tokens > limit:
            raise TrainingError(f"{key}={new_tokens} plus the longest prompt ({longest} tokens) exceeds what the model "
                                f"can hold (max_position_embeddings={limit}): set {key} <= {limit - longest}")
    return longest + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_memory(cfg: TrainConfig, dist: Dist, log=print):
    """On a GPU (or with plan.gpu_memory_gib): the run's memory plan (mgrpo/plan.py) before any weights load: a
    TrainingError naming the settings that would fit when it does not (plan.check), and the rollout settings
    with gpu_memory_utilization=auto resolved to the largest share that fits."""
    memory = cfg.plan.gpu_memory_gib
    if not memory and dist.device.type == "cuda":
        memory = torch.cuda.get_device_properties(dist.device).total_memory / 2**30
    if not memory:
        return dataclasses.replace(cfg.rollout, gpu_memory_utilization=0.35) \
            if cfg.rollout.gpu_memory_utilization == "auto" else cfg.rollout
    from .plan import PlanError, check_fits, make_plan
    try:
        plan = check_fits(cfg, dist.world_size, memory) if cfg.plan.check else make_plan(cfg, dist.world_size, memory)
    except PlanError as e:
        raise TrainingError(str(e)) from None
    if cfg.rollout.gpu_memory_utilization == "auto":
        log(f"[plan] rollout.gpu_memory_utilization=auto: {plan.max_gpu_memory_utilization:.2f}")
        return dataclasses.replace(cfg.rollout, gpu_memory_utilization=plan.max_gpu_memory_utilization)
    return cfg.rollout


def build_engine(cfg: TrainConfig, dist: Dist, log=print) -> RolloutEngine:
    """The engine `setup` would build, without loading the policy (mgrpo compare shares one over its runs)."""
    quiet_libraries(cfg.verbose)
    path = resolve_model_path(cfg, dist, log)
    tokenizer, config = load_tokenizer_and_config(path)
    longest = longest_sequence(cfg, tokenizer, PromptStream(cfg.data, cfg.seed), eval_problems(cfg.data), config)
    return make_engine(plan_memory(cfg, dist, log), cfg.seed, path, tokenizer, longest, dist,
                       dtype=compute_dtype(cfg.model.precision, dist.device),
                       parameter_names=parameter_names(config, cfg), verbose=cfg.verbose)


def setup(cfg: TrainConfig, dist: Dist, run_dir: Path, log, engine: Optional[RolloutEngine] = None) -> Run:
    algo = cfg.algorithm
    try:
        impl = resolve_logprob_impl(algo.logprob_impl, dist.device)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    if algo.uses_momentum and algo.momentum_dtype == "int8" and not triton_can_run(torch.empty(0, device=dist.device)):
        raise TrainingError("algorithm.momentum_dtype=int8 updates the momentum model with a Triton kernel: on a CPU "
                            "set TRITON_INTERPRET=1 (slow; tests) or use algorithm.momentum_dtype=fp32")
    from .liger import LigerError, use_liger
    try:
        use_liger(cfg.model.liger, dist.device)          # model.liger=true where it cannot run: refused now
    except LigerError as e:
        raise TrainingError(str(e)) from None
    dtype = compute_dtype(cfg.model.precision, dist.device)
    if dtype != torch.float32 and not dist.fsdp:
        raise TrainingError(f"model.precision={cfg.model.precision} computes in {dtype} through FSDP2's mixed "
                            "precision: start the run with init_distributed(..., precision=cfg.model.precision)")
    stream = PromptStream(cfg.data, cfg.seed)             # 1. reads and validates the data before any model work
    held_out = eval_problems(cfg.data)
    quiet_libraries(cfg.verbose)
    model_path = resolve_model_path(cfg, dist, log)      # 2.
    tokenizer, config = load_tokenizer_and_config(model_path)
    max_sequence_len = longest_sequence(cfg, tokenizer, stream, held_out, config)   # checked before any weights

    rollout_cfg = plan_memory(cfg, dist, log)             # refuses a run that would not fit, before any weights
    memory_before_engine = process_memory_gib(dist.device)   # 3.
    if engine is None:
        engine = make_engine(rollout_cfg, cfg.seed, model_path, tokenizer, max_sequence_len, dist, dtype=dtype,
                             parameter_names=parameter_names(config, cfg), verbose=cfg.verbose)
    engine_gib = process_memory_gib(dist.device) - memory_before_engine
    reset_peak_memory(dist.device)

    seed_everything(cfg.seed)                             # 4.
    policy = load_policy(model_path, config, cfg, dist, dtype if dtype != torch.float32 else None, log).train()
    policy.compute_dtype = dtype
    reference = None
    if algo.kl_coef > 0:   # frozen KL reference: the initial policy in the compute dtype, or refreshed from theta_k
        reference = build_reference(policy, config, cfg, dist, dtype)
    named = list(policy.hf_named_parameters())
    momentum = (make_momentum(algo.momentum_dtype, named, algo.momentum, seed=cfg.seed * 1_000_003 + dist.rank)
                if algo.uses_momentum else None)
    params = [p for _, p in named]
    if not all(p.requires_grad for p in params):
        raise TrainingError("every policy parameter must be trainable (frozen parameters are not supported)")
    optimizer = momentum.make_optimizer(params, cfg.optim) if momentum else make_optimizer(params, cfg.optim)
    from transformers import get_cosine_schedule_with_warmup
    total_updates = cfg.steps * algo.updates_per_batch
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.optim.warmup_steps, total_updates), total_updates)
    run = Run(cfg, dist, run_dir, tokenizer, policy, reference, momentum, optimizer, scheduler, engine, stream,
              held_out, impl, model_path, stored_dtype(config), dtype)
    run.engine_gib = engine_gib
    return run


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors on this rank, each storage once (bitsandbytes' code maps are
    shared by every parameter's state)."""
    seen, total = set(), 0
    for state in optimizer.state.values():
        for t in state.values():
            for tensor in (t.values() if isinstance(t, dict) else [t]):
                if torch.is_tensor(tensor):
                    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                    key = (local.untyped_storage().data_ptr(), local.storage_offset(), local.numel())
                    if key not in seen:
                        seen.add(key)
                        total += local.numel() * local.element_size()
    return total


def measured_memory(run: Run) -> dict:
    """Exact tensor bytes of each part this rank holds, under the names of mgrpo/plan.py's computed parts."""
    parts = {"master weights (fp32)": tensor_bytes(run.params),
             "optimizer state": optimizer_state_bytes(run.optimizer),
             "momentum model": run.momentum.state_bytes() if run.momentum is not None else 0,
             "KL reference": tensor_bytes(run.reference.parameters()) if run.reference is not None else 0}
    if run.momentum is not None and run.momentum.optimizer_holds_state:
        parts["optimizer state"] -= parts["momentum model"]     # its codes and scales live in the optimizer
    return parts


def report_memory(run: Run, log) -> None:
    """Rank 0 logs the measured memory of each part on this rank, after the first step (when the optimizer's
    states exist); peak_memory_gib stays in the metrics."""
    from .metrics import peak_memory_gib
    report = {name: b / 2**30 for name, b in measured_memory(run).items()}
    report["engine (measured at build)"] = run.engine_gib
    report["peak after step 1"] = peak_memory_gib(run.dist.device)
    log("[memory] per rank, GiB: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
