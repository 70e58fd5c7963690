"""Loading what a run trains: the tokenizer and config first (cheap), the engine, then the policy and the KL
reference, in the run's precision.

Memory is the point. One process in fp32 loads the policy with transformers' `from_pretrained` (the master
weights). Under FSDP2 (torchrun, or one process in bf16 mixed precision) no rank ever holds the whole model: each builds it on the meta device (no storage),
shards it with FSDP2, allocates only its own shards and reads only its own rows of every tensor from the
safetensors files (dim-0 slices, torchtitan's and verl's recipe). The KL reference is built the same way and
filled from the policy's local shards, cast to the reference's dtype one tensor at a time: never a second fp32
copy, never a second read of the files. What a Qwen3-4B rank holds after loading on 8 ranks: its fp32 shard
(1.9 GB) and its bf16 reference shard (0.9 GB), instead of the 32 GB that a full fp32 model per rank plus a
deep copy for the reference took.

Precision (model.precision): "bf16" is the GPU's mixed precision: FSDP2 computes in bf16 from the fp32 master
shards and reduces gradients in fp32 (one process too, on a one-rank group), the KL reference and the engine hold bf16
weights. "fp32" computes in fp32. "auto" is bf16 on CUDA and fp32 on a CPU; bf16 on a CPU runs the GPU's
numerics where a test can see them.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from ..config import TrainConfig, looks_like_a_path
from ..distributed import Dist, is_dtensor, local_tensor, shard_model
from ..errors import TrainingError
from ..hub import hub_unreachable
from . import grouped_attention
from .liger import LigerError, apply_liger, use_liger
from .logprobs import TokenScorer

# ---------------------------------------------------------------------------------------------------------
# The model directory, its tokenizer and config (no weights)

def check_model_path(path: str) -> None:
    """A model.path that names a local directory must be one: before the hub, which would answer with its repo-id
    rules (or minutes of retries offline). A hub name (Qwen/Qwen3-4B) goes on to transformers."""
    if looks_like_a_path(path) and not Path(path).expanduser().is_dir():
        raise TrainingError(f"model.path={path}: no such directory: give a Hugging Face model directory (or a hub "
                            "name such as Qwen/Qwen3-4B)")


def missing_files(directory: Path, whole: bool = True) -> list:
    """What a model directory lacks to load: config.json, and (whole) a tokenizer and its weight files, every
    shard an index names. A cached snapshot holds only what was fetched from it (`mgrpo plan` reads config.json
    alone)."""
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    if not whole:
        return missing
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        missing.append("a tokenizer (tokenizer.json)")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index_name).is_file():
            shards = sorted(set(json.loads((directory / index_name).read_text()).get("weight_map", {}).values()))
            return missing + [name for name in shards if not (directory / name).is_file()]
    if not any((directory / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        missing.append("the weights (model.safetensors)")
    return missing


def model_source(path: str, log=print, whole: bool = True, probe=hub_unreachable) -> str:
    """model.path as transformers and vLLM should open it. A local directory: itself. A hub name (Qwen/Qwen3-4B)
    where the hub answers: itself (they download it, or check that the cached copy is current). Where the hub
    cannot be reached (an offline node): the cached snapshot's directory, because transformers would first retry
    every file's request five times with back-off (2 min 23 s for a tiny model's config and tokenizer, measured
    2026-12-07; then the weights, then vLLM again). Neither reachable nor cached (config.json, and with `whole`
    the tokenizer and every weight file): a TrainingError saying so. `probe`: why the hub cannot be reached, or
    None (under torchrun, rank 0's answer for every rank: build.py)."""
    check_model_path(path)
    directory = Path(path).expanduser()
    if directory.is_dir():
        if not (directory / "config.json").is_file():     # else transformers asks for sentencepiece or tiktoken
            final = directory / "final"
            hint = (f": a run's trained model is its final/ directory (model.path={final})"
                    if (final / "config.json").is_file() else
                    ": give a Hugging Face model directory (config.json, tokenizer, weights) or a hub name")
            raise TrainingError(f"model.path={path} is a directory without config.json, not a model{hint}")
        return path
    why = probe()
    if why is None:
        return path
    from huggingface_hub import constants, snapshot_download
    get = f"download it where the hub can be reached (`hf download {path}`), then copy the cache here or set " \
          "model.path to the model's directory"
    try:
        cached = snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not a valid name): one answer either way
        raise TrainingError(f"model.path={path}: the Hugging Face hub cannot be reached ({why}) and the model is not "
                            f"in its cache ({constants.HF_HUB_CACHE}): {get}") from None
    lacking = missing_files(Path(cached), whole)
    if lacking:
        raise TrainingError(f"model.path={path}: the Hugging Face hub cannot be reached ({why}) and its cached copy "
                            f"{cached} lacks {', '.join(lacking)}: {get}")
    log(f"[model] the Hugging Face hub cannot be reached ({why}): {path} from its cache, {cached}")
    return cached


def load_tokenizer_and_config(path: str):
    """The tokenizer and the model config (cheap: no weights), or a TrainingError naming model.path."""
    check_model_path(path)
    from transformers import AutoConfig, AutoTokenizer
    try:
        tokenizer, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - surface any loading failure with the setting to fix
        raise TrainingError(f"model.path={path!r} does not load as a Hugging Face causal LM: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, config


def training_attention(cfg: TrainConfig) -> str:
    """The attention the trained models (policy, reference) run: sdpa becomes mgrpo_grouped, which is sdpa for
    padded and packed micro-batches and computes grouped rows block by block (mgrpo/models/grouped_attention.py)."""
    if cfg.model.attn_implementation == "sdpa":
        return grouped_attention.register()
    return cfg.model.attn_implementation


def stored_dtype(config) -> torch.dtype:
    """The dtype the model's own files declare (bf16 for Qwen3-4B-Base): exports are written in it."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def empty_model(config, cfg: TrainConfig, dtype: torch.dtype):
    """The architecture on the meta device: shapes and names, no storage, no initialisation."""
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                    attn_implementation=training_attention(cfg))
    except Exception as e:  # noqa: BLE001
        raise TrainingError(f"model.path={cfg.model.path!r}: transformers cannot build this architecture: {e}") from e


def parameter_names(config, cfg: TrainConfig) -> list:
    """The Hugging Face parameter names (what engines are pushed), from the config alone."""
    return [name for name, _ in empty_model(config, cfg, torch.float32).named_parameters()]


# ---------------------------------------------------------------------------------------------------------
# Materialising a meta model: local shards only

@contextmanager
def _swap_params_on_conversion():
    """Module._apply keeps each Parameter object (torch.utils.swap_tensors): a tied lm_head stays the
    embedding's own Parameter after to_empty, instead of becoming a second, untrained tensor."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate a meta model's (local shards of) parameters on `device`, uninitialised, and compute its
    non-persistent buffers (rotary inv_freq), which no checkpoint holds, with the architecture's own code."""
    causal_lm = model.causal_lm if isinstance(model, TokenScorer) else model
    with _swap_params_on_conversion():
        model.to_empty(device=device)
    for module in causal_lm.modules():
        if module._non_persistent_buffers_set:
            causal_lm._init_weights(module)   # transformers recomputes rotary tables here


def _dim0_slice(param: torch.Tensor) -> tuple:
    """(first row, rows) of this rank's shard of `param` (FSDP2 shards dim 0 like torch.chunk)."""
    if not is_dtensor(param):
        return 0, param.shape[0] if param.dim() else 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return (offset[0], shape[0]) if param.dim() else (0, 1)


def safetensors_files(path: str) -> Optional[dict]:
    """name -> file for a model directory's safetensors (single file or index), or None if it has none."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    single = root / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open
        with safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}
    return None


@torch.no_grad()
def load_local_shards(causal_lm: torch.nn.Module, path: str) -> bool:
    """Fill every parameter's local shard with its rows from the safetensors files, each file opened once,
    each rank reading only its rows. False (nothing written) when the files do not hold every parameter
    under its name (another layout: the caller falls back to transformers' loader)."""
    from safetensors import safe_open
    files = safetensors_files(path)
    params = dict(causal_lm.named_parameters())            # tied parameters appear once
    if files is None or not set(params) <= set(files):
        return False
    by_file: dict = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as f:
            for name in names:
                local = local_tensor(params[name])
                start, rows = _dim0_slice(params[name])
                if local.numel() == 0:
                    continue
                part = f.get_slice(name)[start:start + rows] if params[name].dim() else f.get_tensor(name)
                local.copy_(part.reshape(local.shape))
    return True


@torch.no_grad()
def copy_full_into_shards(causal_lm: torch.nn.Module, full: torch.nn.Module) -> None:
    """Fallback for checkpoints whose names do not map 1:1: every parameter's rows from a full model."""
    source = dict(full.named_parameters())
    for name, param in causal_lm.named_parameters():
        start, rows = _dim0_slice(param)
        local = local_tensor(param)
        if local.numel():
            local.copy_(source[name].detach().reshape(-1, *source[name].shape[1:])[start:start + rows]
                        .reshape(local.shape))


# ---------------------------------------------------------------------------------------------------------
# The policy and the KL reference

def prepare_for_training(model: torch.nn.Module, cfg: TrainConfig, dist: Dist, checkpointing: bool = True) -> None:
    """Before sharding: activation checkpointing (model.gradient_checkpointing) and Liger's kernels
    (model.liger; the policy and the reference alike, so that their log-probs agree at step 0)."""
    if checkpointing and cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        if use_liger(cfg.model.liger, dist.device):
            apply_liger(model)
    except LigerError as e:
        raise TrainingError(str(e)) from None


@torch.no_grad()
def random_init_(model: torch.nn.Module) -> None:
    """Random weights for a materialized model (local shards under FSDP2): normal(0, 0.02) matrices, unit norm
    weights. For measuring memory and speed at a model's shape without its weights (mgrpo plan --measure)."""
    for param in model.parameters():
        local = local_tensor(param)
        local.fill_(1.0) if param.dim() == 1 else local.normal_(0.0, 0.02)


def load_policy(path: Optional[str], config, cfg: TrainConfig, dist: Dist, param_dtype: Optional[torch.dtype],
                log=print) -> TokenScorer:
    """The policy with fp32 master weights: whole on one process, this rank's FSDP2 shards under torchrun.
    param_dtype: FSDP2's compute dtype (bf16 mixed precision) or None (the parameters' own). path=None: random
    weights at `config`'s shape (nothing is read)."""
    if path is None:
        model = empty_model(config, cfg, torch.float32)
        prepare_for_training(model, cfg, dist)
        policy = TokenScorer(model)
        if dist.fsdp:
            shard_model(policy, list(policy.decoder_layers), dist, param_dtype)
        materialize(policy, dist.device)
        random_init_(model)
        return policy
    if not dist.fsdp:
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         attn_implementation=training_attention(cfg))
        except Exception as e:  # noqa: BLE001
            raise TrainingError(f"model.path={path!r} does not load as a Hugging Face causal LM: {e}") from e
        prepare_for_training(model, cfg, dist)
        return TokenScorer(model).to(dist.device)
    model = empty_model(config, cfg, torch.float32)
    prepare_for_training(model, cfg, dist)
    policy = TokenScorer(model)
    shard_model(policy, list(policy.decoder_layers), dist, param_dtype)
    materialize(policy, dist.device)
    if not load_local_shards(model, path):
        log(f"[load] {path}: the safetensors names do not match the model's parameters one to one; every rank "
            "loads the whole model once to take its shard (more host memory)")
        from transformers import AutoModelForCausalLM
        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        copy_full_into_shards(model, full)
        del full
    return policy


@torch.no_grad()
def build_reference(policy: TokenScorer, config, cfg: TrainConfig, dist: Dist, dtype: torch.dtype) -> TokenScorer:
    """The frozen KL reference: the initial policy in `dtype` (bf16 in mixed precision), laid out like the
    policy (the same shards under FSDP2) and filled from its local shards one tensor at a time."""
    model = empty_model(config, cfg, dtype)
    prepare_for_training(model, cfg, dist, checkpointing=False)
    reference = TokenScorer(model)
    if dist.fsdp:
        shard_model(reference, list(reference.decoder_layers), dist, None)
    materialize(reference, dist.device)
    for (name, target), (_, source) in zip(model.named_parameters(), policy.hf_named_parameters()):
        local_tensor(target).copy_(local_tensor(source.detach()))
    return reference.eval().requires_grad_(False)
