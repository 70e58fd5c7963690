"""`mgrpo plan`: will it fit? Every part's memory per GPU, from the model's config.json alone, before anything loads.

    mgrpo plan --config configs/qwen3_4b_1gpu.yaml --gpus 1 --gpu-memory 80
    mgrpo plan --config configs/qwen3_4b.yaml --gpus 8 --gpu-memory 80 optim.name=adamw8bit

The model is built on the meta device (shapes and names, no storage), so the plan needs only config.json (for
Qwen3-1.7B, 4B and 8B not even that: their configs are built in). Per GPU, for the two phases of a step:

    rollout   the trainer's resident state (master weights, optimizer state, momentum model, KL reference) and
              the vLLM engine awake (its share of the GPU: weights and KV cache)
    update    the resident state, gradients, parameters unsharded in flight, activations of one micro-batch,
              the fused head's workspace, gradient reduce buffers, and the engine asleep

Each part is "computed" (exact tensor bytes from shapes and dtypes: what the trainer's [memory] line measures,
tested to match within 2%) or "modeled" (an estimate of what libraries allocate: activations, FSDP2's buffers,
the engine, the CUDA runtime; modeled until a GPU measures them, bench/run_gpu.sh). The last line says whether
it fits and by how much; the exit status is 0 if it fits, 1 if not, with the settings that would make it fit,
each checked by planning again with it. `mgrpo train` runs the same plan before any weights load on a GPU
(plan.check) and refuses a config that does not fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from mgrpo_kernels.fused_logprob_entropy import default_chunk_tokens
from mgrpo_kernels.momentum_int8 import QUANT_BLOCK

from .config import load_config_from
from .data.tiny import TINY_MODEL_CONFIG
from .errors import MgrpoError

GIB = 2 ** 30

# Configs of models the plan knows without a download (the published config.json values that matter here).
BUILT_IN = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                     max_position_embeddings=32768),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                     max_position_embeddings=32768),
}

BNB_BLOCK = 256                      # bitsandbytes' 8-bit optimizer state: one fp32 absmax per 256 elements

# Modeled constants (estimates until a GPU measures them).
RUNTIME_BYTES = 1.5 * GIB            # CUDA context, NCCL, cuBLAS workspaces: outside torch's allocator
FRAGMENTATION = 0.05                 # the caching allocator's slack on top of the trainer's tensors
ENGINE_ASLEEP_BYTES = 0.5 * GIB      # what a level-1 sleeping vLLM engine keeps on the GPU
ENGINE_RUNTIME_BYTES = 2.0 * GIB     # vLLM's own activations and buffers inside its share (its profile run)


class PlanError(MgrpoError, ValueError):
    """The plan cannot be made; the message says what to fix."""


@dataclass
class Part:
    name: str
    rollout: float          # bytes per GPU during the rollout phase
    update: float           # bytes per GPU during the update phase
    kind: str               # computed | modeled
    note: str = ""


@dataclass
class Plan:
    model: str
    gpus: int
    gpu_memory: float
    parts: list
    kv_cache_tokens: int
    max_model_len: int
    max_gpu_memory_utilization: float
    host_per_rank: float
    suggestions: list = field(default_factory=list)

    def phase(self, name: str) -> float:
        return sum(getattr(p, name) for p in self.parts)

    @property
    def peak(self) -> float:
        return max(self.phase("rollout"), self.phase("update"))

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory and self.kv_cache_tokens >= self.max_model_len

    def bytes_of(self, name: str) -> float:
        """A part's larger phase, in bytes (0 for a part this run does not have)."""
        return max((max(p.rollout, p.update) for p in self.parts if p.name == name), default=0.0)

    def table(self) -> str:
        rows = [(p.name, f"{p.rollout / GIB:.2f}", f"{p.update / GIB:.2f}", p.kind, p.note) for p in self.parts]
        rows.append(("total per GPU", f"{self.phase('rollout') / GIB:.2f}", f"{self.phase('update') / GIB:.2f}", "", ""))
        header = ("part (GiB per GPU)", "rollout", "update", "", "")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
        lines = ["  ".join(c.ljust(w) if i in (0, 3, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 .rstrip() for r in [header] + rows]
        return "\n".join(lines)

    def verdict(self) -> str:
        spare = self.gpu_memory - self.peak
        where = "rollout" if self.phase("rollout") >= self.phase("update") else "update"
        kv = (f"; KV cache holds {self.kv_cache_tokens} tokens ({self.kv_cache_tokens // max(self.max_model_len, 1)} "
              f"full-length sequences of {self.max_model_len})")
        if self.fits:
            return (f"fits: peak {self.peak / GIB:.1f} GiB ({where} phase) of {self.gpu_memory / GIB:.0f} GiB per GPU, "
                    f"{spare / GIB:.1f} GiB to spare" + kv)
        why = (f"peak {self.peak / GIB:.1f} GiB ({where} phase) of {self.gpu_memory / GIB:.0f} GiB per GPU, "
               f"{-spare / GIB:.1f} GiB over" if spare < 0 else
               f"the KV cache holds {self.kv_cache_tokens} tokens, less than one sequence of {self.max_model_len}")
        fixes = "; ".join(self.suggestions) if self.suggestions else "no single setting found: use more or larger GPUs"
        return f"does not fit: {why}. Would fit with: {fixes}"


# ---------------------------------------------------------------------------------------------------------
# The model's shapes, from its config

def model_config(path: Optional[str]):
    """(config, label): a directory's config.json, a built-in Qwen3 config by name, or the embedded default's."""
    from transformers import AutoConfig, Qwen3Config
    if path is None:
        return Qwen3Config(**{k: v for k, v in TINY_MODEL_CONFIG.items() if k != "torch_dtype"}), "the embedded default"
    directory = Path(path).expanduser()
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise PlanError(f"model.path={path}: the directory has no config.json (a Hugging Face model directory "
                            "has one)")
        return AutoConfig.from_pretrained(directory), str(directory)
    key = Path(path).name.lower().removesuffix("-base").removesuffix("-instruct")
    if key in BUILT_IN:
        return Qwen3Config(**BUILT_IN[key]), f"{path} (built-in {key} config)"
    try:
        return AutoConfig.from_pretrained(path), path
    except Exception as e:  # noqa: BLE001 - not a directory, not built in, not in the local hub cache
        raise PlanError(f"model.path={path}: no config.json there, not a built-in config ({', '.join(BUILT_IN)}) "
                        f"and not loadable from the Hugging Face cache ({type(e).__name__})") from None


def parameter_shapes(config) -> list:
    """(name, shape) of every parameter (tied ones once), from a meta-device model."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def local_numel(shape: tuple, world: int) -> int:
    """Elements rank 0 holds of a parameter FSDP2 shards along dim 0 (torch.chunk: the first rank the most)."""
    if world == 1 or not shape:
        return math.prod(shape)
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def _layer_of(name: str) -> Optional[int]:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


# ---------------------------------------------------------------------------------------------------------
# Bytes of each part

def optimizer_bytes(numels: list, name: str) -> int:
    """AdamW's moments: fp32 (8 bytes per element), or bitsandbytes' blockwise 8-bit (uint8 moments and an fp32
    absmax per BNB_BLOCK elements each; tensors under 4096 elements keep fp32 moments) plus its two 256-entry maps."""
    if name == "adamw":
        return 8 * sum(numels)
    total = 0
    for n in numels:
        total += 8 * n if n < 4096 else 2 * n + 8 * math.ceil(n / BNB_BLOCK)
    return total + 2 * 256 * 4


def int8_delta_bytes(numels: list) -> int:
    """int8 codes and one fp32 scale per QUANT_BLOCK elements (mgrpo_kernels.momentum_int8)."""
    return sum(n + 4 * math.ceil(n / QUANT_BLOCK) for n in numels)


def make_plan(cfg, gpus: int, gpu_memory_gib: float, on_gpu: bool = True) -> Plan:
    """The plan for TrainConfig `cfg` on `gpus` GPUs of `gpu_memory_gib` each (on_gpu=False: the CPU run's
    dtypes, for comparing with a CPU measurement; its phases then say nothing about a GPU)."""
    if gpu_memory_gib <= 0:
        raise PlanError(f"--gpu-memory {gpu_memory_gib}: must be > 0 GiB")
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: must be >= 1")
    config, label = model_config(cfg.model.path)
    shapes = parameter_shapes(config)
    algo, optim, rollout = cfg.algorithm, cfg.optim, cfg.rollout
    bf16 = cfg.model.precision == "bf16" or (cfg.model.precision == "auto" and on_gpu)
    compute = 2 if bf16 else 4
    local = [local_numel(s, gpus) for _, s in shapes]
    total = sum(math.prod(s) for _, s in shapes)
    master = 4 * sum(local)
    parts = [Part("master weights (fp32)", master, master, "computed", "the policy's shard on this GPU")]
    parts.append(Part("gradients (fp32)", 0, master, "computed", "sharded; freed between steps"))
    parts.append(Part("optimizer state", *[optimizer_bytes(local, optim.name)] * 2, "computed", optim.name))
    if algo.uses_momentum:
        momentum = int8_delta_bytes(local) if algo.momentum_dtype == "int8" else 4 * sum(local)
        parts.append(Part("momentum model", momentum, momentum, "computed", f"{algo.momentum_dtype} "
                          + ("delta, 1.016 B/param" if algo.momentum_dtype == "int8" else "copy")))
    if algo.kl_coef > 0:
        reference = compute * sum(local)
        parts.append(Part("KL reference", reference, reference, "computed", ("bf16" if bf16 else "fp32")
                          + (" (refreshed from the momentum model)" if algo.kl_reference == "momentum" else "")))
    # in flight during forwards and backwards (the update phase; the engine sleeps by then)
    layers = {}
    root = 0
    for (name, s) in shapes:
        layer = _layer_of(name)
        if layer is None:
            root += math.prod(s)
        else:
            layers[layer] = layers.get(layer, 0) + math.prod(s)
    layer_numel = max(layers.values(), default=0)
    parts.append(Part("parameters in flight", 0, compute * (root + 2 * layer_numel), "modeled",
                      "unsharded: root (embedding, head, norm) + 2 decoder layers (prefetch)"))
    T, H = optim.micro_batch_tokens, config.hidden_size
    I = getattr(config, "intermediate_size", 4 * H)
    kv_dim = config.num_key_value_heads * getattr(config, "head_dim", H // config.num_attention_heads)
    per_token_layer = (8 * H + 4 * I + 2 * kv_dim) * compute     # one layer's saved tensors, per token
    n_layers = config.num_hidden_layers
    if cfg.model.gradient_checkpointing:
        activations = T * H * compute * n_layers + T * per_token_layer
        how = f"{T} tokens: {n_layers} layer inputs + one layer recomputed"
    else:
        activations = T * per_token_layer * n_layers
        how = f"{T} tokens, every layer's tensors (model.gradient_checkpointing=false)"
    parts.append(Part("activations", 0, activations, "modeled", how))
    V = config.vocab_size
    chunk = default_chunk_tokens(V, torch.bfloat16 if compute == 2 else torch.float32)
    head = 4 * V * H + chunk * V * (4 + (0 if compute == 4 else compute)) + 2 * T * H * compute
    parts.append(Part("fused head workspace", 0, head, "computed",
                      f"fp32 dW accumulator V x H + [{chunk}, V] logits and gradient + hidden and its gradient"))
    parts.append(Part("gradient reduce buffers", 0, (compute + 4) * (root + layer_numel), "modeled",
                      "unsharded gradients of the root and one layer, cast to fp32 to reduce"))
    if algo.uses_momentum and algo.momentum_dtype == "int8" and optim.name != "adamw":
        parts.append(Part("optimizer step copy", 0, 4 * max(local), "computed",
                          "the largest parameter before its 8-bit AdamW update, for the int8 momentum's step"))
    # the engine
    weights = 2 * total if on_gpu else 4 * total
    kv_per_token = 2 * n_layers * kv_dim * 2
    util = max_util = 0.0
    trainer_rollout = sum(p.rollout for p in parts)
    runtime = RUNTIME_BYTES + FRAGMENTATION * max(trainer_rollout, sum(p.update for p in parts))
    if on_gpu:
        max_util = max(0.0, min(0.95, (gpu_memory_gib * GIB - trainer_rollout - runtime) / (gpu_memory_gib * GIB)))
        max_util = math.floor(max_util * 100) / 100
        util = max_util if rollout.gpu_memory_utilization == "auto" else float(rollout.gpu_memory_utilization)
        engine = util * gpu_memory_gib * GIB
        kv_tokens = int(max(0.0, engine - weights - ENGINE_RUNTIME_BYTES) // kv_per_token)
        parts.append(Part("vLLM engine", engine, ENGINE_ASLEEP_BYTES, "modeled",
                          f"gpu_memory_utilization {util:.2f}: bf16 weights {weights / GIB:.1f} + KV cache "
                          f"{kv_tokens} tokens; asleep (level {rollout.sleep_level}) in the update"))
    else:
        kv_tokens = 1 << 30
    parts.append(Part("CUDA runtime and fragmentation", runtime if on_gpu else 0, runtime if on_gpu else 0,
                      "modeled", "context, NCCL, cuBLAS; 5% allocator slack"))
    # the engine must hold one whole sequence: the longest prompt (unknown here: 1024 tokens assumed) + response
    max_model_len = rollout.max_model_len or (1024 + max(rollout.max_new_tokens, cfg.eval.max_new_tokens))
    host = (2 * total if rollout.sleep_level == 1 else 0) + 4 * GIB
    return Plan(label, gpus, gpu_memory_gib * GIB, parts, kv_tokens, max_model_len, max_util, host)


def with_suggestions(plan: Plan, cfg, gpus: int, gpu_memory_gib: float) -> Plan:
    """The settings that would make a plan that does not fit fit, each checked by planning with it."""
    if plan.fits:
        return plan
    candidates = []
    if cfg.optim.name == "adamw":
        candidates.append(["optim.name=adamw8bit"])
    if cfg.algorithm.uses_momentum and cfg.algorithm.momentum_dtype == "fp32":
        candidates.append(["algorithm.momentum_dtype=int8"])
    if not cfg.model.gradient_checkpointing:
        candidates.append(["model.gradient_checkpointing=true"])
    for tokens in (8192, 4096, 2048):
        if tokens < cfg.optim.micro_batch_tokens:
            candidates.append([f"optim.micro_batch_tokens={tokens}"])
    if cfg.rollout.gpu_memory_utilization != "auto":
        candidates.append(["rollout.gpu_memory_utilization=auto"])
    for overrides in candidates:
        if make_plan(load_config_from(cfg, overrides), gpus, gpu_memory_gib).fits:
            plan.suggestions.append(" ".join(overrides))
    if not plan.suggestions:   # no single setting: the fewest of them together, in the order above
        together = []
        for overrides in candidates:
            together += overrides
            if make_plan(load_config_from(cfg, together), gpus, gpu_memory_gib).fits:
                plan.suggestions.append(" ".join(together))
                break
    for more in (2, 4, 8):
        if more > gpus and make_plan(cfg, more, gpu_memory_gib).fits:
            plan.suggestions.append(f"{more} GPUs (torchrun --nproc_per_node={more})")
            break
    return plan


def check_fits(cfg, gpus: int, gpu_memory_gib: float) -> Plan:
    """The plan `mgrpo train` makes before loading weights; a PlanError with the verdict if it does not fit."""
    plan = with_suggestions(make_plan(cfg, gpus, gpu_memory_gib), cfg, gpus, gpu_memory_gib)
    if not plan.fits:
        raise PlanError(f"mgrpo plan: {plan.verdict()}. Run `mgrpo plan` with the same config for the table; "
                        "plan.check=false proceeds anyway")
    return plan


# ---------------------------------------------------------------------------------------------------------
# Printing it

def print_plan(cfg, gpus: int = 1, gpu_memory_gib: Optional[float] = None) -> int:
    """`mgrpo plan` (mgrpo/commands/plan.py: its flags): the table, the host memory, the largest KV share, the
    verdict; 0 if it fits, 1 if not."""
    memory = gpu_memory_gib
    if memory is None:
        memory = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    plan = with_suggestions(make_plan(cfg, gpus, memory), cfg, gpus, memory)
    print(f"[plan] {plan.model} on {gpus} x {memory:g} GiB (per GPU; computed = exact tensor bytes, "
          "modeled = an estimate until measured on a GPU)")
    print(plan.table())
    print(f"host memory per rank: {plan.host_per_rank / GIB:.1f} GiB (pinned bf16 weights while vLLM sleeps at "
          "level 1, plus ~4 GiB for the process)")
    print(f"largest rollout.gpu_memory_utilization that fits: {plan.max_gpu_memory_utilization:.2f}")
    print(plan.verdict())
    return 0 if plan.fits else 1
