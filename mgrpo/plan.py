"""`mgrpo plan`: will it fit? Every part's memory per GPU, from the model's config.json alone, before anything loads.

    mgrpo plan --config configs/qwen3_4b_1gpu.yaml --gpus 1 --gpu-memory 80
    mgrpo plan --config configs/qwen3_4b.yaml --gpus 8 --gpu-memory 80 optim.name=adamw8bit
    mgrpo plan --config configs/qwen3_4b.yaml --nodes 2 --gpus 8 --inter-node-gbps 400 algorithm.prompts_per_step=16

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
(plan.check) and refuses a config that does not fit. Ranks (--nodes x --gpus) that algorithm.prompts_per_step does
not split over are an error before any planning: mgrpo train refuses them at its start.

On several nodes (--nodes N, --gpus G per node) the table is per GPU under the run's mesh (distributed.mesh, or
--mesh): fsdp shards every parameter over all N x G ranks, hsdp over the G GPUs of a node (replicated across the
nodes, so its per-GPU state is the one-node G-GPU plan's). A traffic section then sets the two meshes side by side:
the bytes per step per rank over the inter-node link and inside a node (the weight pushes, FSDP2's parameter
gathers, the gradient reduce-scatter and, for hsdp, the gradients' all-reduce across the nodes), and the seconds
they take at the given bandwidths: modeled (ring collectives, bandwidth only, nothing overlapped with compute).
The mesh line says which pays: hsdp when it fits and crosses the nodes in less time, else fsdp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from mgrpo_kernels.fused_logprob_entropy import default_chunk_tokens, reference_chunk_tokens
from mgrpo_kernels.momentum_int8 import PUSH_CHUNK, QUANT_BLOCK

from .config import load_config_from
from .data.tiny import TINY_MODEL_CONFIG
from .errors import MgrpoError, TrainingError
from .models.loading import model_source

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
ROW_TOKENS = 256                     # a micro-batch row's length the CPU attention's probabilities are counted for


class PlanError(MgrpoError, ValueError):
    """The plan cannot be made; the message says what to fix."""


def check_positive(flag: str, value: float, unit: str) -> None:
    """A size or a speed: finite and > 0 (inf and nan pass a bare "> 0" or "<= 0" test)."""
    if not (math.isfinite(value) and value > 0):
        raise PlanError(f"{flag} {value:g}: must be > 0 and finite ({unit})")


def check_gpus(gpus: int) -> None:
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: must be >= 1")


def splits(cfg, world: int) -> bool:
    """Whether algorithm.prompts_per_step splits evenly over `world` ranks: the rule mgrpo train enforces at its start
    (mgrpo/loop/trainer.py, train), since every prompt's group of responses stays on one rank."""
    return cfg.algorithm.prompts_per_step % world == 0


def check_world_size(cfg, nodes: int, gpus: int) -> None:
    """Refuse the ranks mgrpo train would refuse, in its words, with the settings that would run: a plan saying
    "fits" for them would promise a run that stops at its first line."""
    check_gpus(gpus)
    world, prompts = nodes * gpus, cfg.algorithm.prompts_per_step
    if splits(cfg, world):
        return
    flags = f"--gpus {gpus}" if nodes == 1 else f"--nodes {nodes} --gpus {gpus}"
    per_node = prompts // nodes if prompts % nodes == 0 else 0      # 0: no GPU count per node splits them
    fewer = next((g for g in range(min(gpus, per_node), 0, -1) if per_node % g == 0), None)
    raise PlanError(f"{flags}: algorithm.prompts_per_step={prompts} does not split over {world} ranks (every "
                    f"prompt's group stays on one rank; mgrpo train refuses it): make it a multiple of the world "
                    f"size, e.g. algorithm.prompts_per_step={math.ceil(prompts / world) * world}"
                    + (f", or use --gpus {fewer}" if fewer else ""))


PHASES = ("load", "rollout", "score", "backward", "gradients", "step")
"""The phases of a step whose peaks the plan predicts (mgrpo/measure.py measures them): after setup; the rollouts
(engine awake, weights pushed one tensor at a time); the no-grad scoring (and the KL reference's forward); the
update, at its two peaks: the start of the backward (every layer's saved activations and the head's backward) and
its end (every gradient made, the activations freed); the optimizer step (and the momentum update)."""
UPDATE = ("backward", "gradients")        # one stage of the loop (its update), two peaks


@dataclass
class Part:
    name: str
    bytes: dict             # phase -> bytes per GPU (a phase it is absent from: 0)
    kind: str               # computed | modeled
    note: str = ""

    def at(self, phase: str) -> float:
        return self.bytes.get(phase, 0.0)


def size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def gpu_gib(n: float) -> str:
    """A GPU's memory in GiB as given (80, 79.2), and under 1 GiB to two significant digits (0.1, 0.05): never 0."""
    gib = n / GIB
    return f"{round(gib, 1):g}" if gib >= 1 else f"{gib:.2g}"


def everywhere(value: float) -> dict:
    return dict.fromkeys(PHASES, value)


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
    disk_per_checkpoint: int = 0       # bytes of one checkpoint, all ranks together
    disk_final: int = 0                # bytes of the final export (the base model's dtype)
    replicas: int = 1                  # copies of each shard: the nodes under hsdp, 1 under fsdp (gpus: the shards)
    mesh: str = "fsdp"                 # fsdp (1-D) or hsdp (replicas x gpus)

    def disk_line(self, keep: int) -> str:
        """A run directory's disk needs: keep_checkpoints of them, one more while a save is written (the oldest is
        deleted only after the new one is complete), and the final export."""
        one, final = self.disk_per_checkpoint, self.disk_final
        need = f"{keep + 1} x {size(one)} + {size(final)} = {size((keep + 1) * one + final)}" if keep else \
            "one more checkpoint per save (keep_checkpoints=0 keeps all)"
        return (f"disk per run directory: a checkpoint is {size(one)} (all ranks), the final export {size(final)}; "
                f"keep_checkpoints={keep} needs up to {need}")

    def phase(self, name: str) -> float:
        return sum(p.at(name) for p in self.parts)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase)

    @property
    def peak(self) -> float:
        return self.phase(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory and self.kv_cache_tokens >= self.max_model_len

    def bytes_of(self, name: str) -> float:
        """A part's largest phase, in bytes (0 for a part this run does not have)."""
        return max((max(p.bytes.values(), default=0.0) for p in self.parts if p.name == name), default=0.0)

    def table(self) -> str:
        rows = [(p.name, *(f"{p.at(ph) / GIB:.2f}" for ph in PHASES), p.kind, p.note) for p in self.parts]
        rows.append(("total per GPU", *(f"{self.phase(ph) / GIB:.2f}" for ph in PHASES), "", ""))
        header = ("part (GiB per GPU)", *PHASES, "", "")
        n = len(header)
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(n)]
        text = (0, n - 2, n - 1)
        lines = ["  ".join(c.ljust(w) if i in text else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 .rstrip() for r in [header] + rows]
        return "\n".join(lines)

    def verdict(self) -> str:
        spare = self.gpu_memory - self.peak
        where = self.peak_phase
        kv = (f"; KV cache holds {self.kv_cache_tokens} tokens ({self.kv_cache_tokens // max(self.max_model_len, 1)} "
              f"full-length sequences of {self.max_model_len})")
        if self.fits:
            return (f"fits: peak {self.peak / GIB:.1f} GiB ({where} phase) of {gpu_gib(self.gpu_memory)} GiB per GPU, "
                    f"{spare / GIB:.1f} GiB to spare" + kv)
        why = (f"peak {self.peak / GIB:.1f} GiB ({where} phase) of {gpu_gib(self.gpu_memory)} GiB per GPU, "
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
        source = model_source(path, log=lambda *a: None, whole=False)   # offline: the cached config, no retries
    except TrainingError as e:
        raise PlanError(f"{e}; or name a built-in config ({', '.join(BUILT_IN)})") from None
    try:
        return AutoConfig.from_pretrained(source), path
    except Exception as e:  # noqa: BLE001 - not a directory, not built in, not on the hub or in its cache
        raise PlanError(f"model.path={path}: no config.json there, not a built-in config ({', '.join(BUILT_IN)}) "
                        f"and not loadable from the Hugging Face hub or its cache ({type(e).__name__})") from None


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


def optimizer_phases(state: int, name: str, fused_int8: bool) -> dict:
    """torch's AdamW makes its moments at the first step (not there after setup); ours and bitsandbytes' at build."""
    lazy = name == "adamw" and not fused_int8
    return {ph: 0 if (lazy and ph == "load") else state for ph in PHASES}


def int8_delta_bytes(numels: list) -> int:
    """int8 codes and one fp32 scale per QUANT_BLOCK elements (mgrpo_kernels.momentum_int8)."""
    return sum(n + 4 * math.ceil(n / QUANT_BLOCK) for n in numels)


def make_plan(cfg, gpus: int, gpu_memory_gib: float, on_gpu: bool = True,
              shape: Optional["MicroBatchShape"] = None, replicas: int = 1) -> Plan:
    """The plan for TrainConfig `cfg` on `gpus` GPUs of `gpu_memory_gib` each, phase by phase (PHASES). on_gpu=False:
    the CPU run's dtypes and head (the PyTorch one, in chunks), no engine or CUDA runtime: what a CPU measurement
    (mgrpo plan --measure) is compared with; its figures then say nothing about a GPU. shape: the micro-batch to
    plan for (default: a full one, micro_batch_shape). gpus is the shard degree (the GPUs FSDP2 shards each
    parameter over); replicas: the copies of each shard (hsdp's nodes; plan_on_mesh gives both from a mesh)."""
    check_positive("--gpu-memory", gpu_memory_gib, "GiB")
    check_gpus(gpus)
    if replicas < 1:
        raise PlanError(f"{replicas} replicas: must be >= 1")
    config, label = model_config(cfg.model.path)
    shapes = parameter_shapes(config)
    algo, optim, rollout = cfg.algorithm, cfg.optim, cfg.rollout
    bf16 = cfg.model.precision == "bf16" or (cfg.model.precision == "auto" and on_gpu)
    compute = 2 if bf16 else 4
    sharded = gpus * replicas > 1 or bf16        # FSDP2: torchrun, or one process in mixed precision
    local = [local_numel(s, gpus) for _, s in shapes]
    total = sum(math.prod(s) for _, s in shapes)
    largest_full, largest_local = max(math.prod(s) for _, s in shapes), max(local)
    train = ("gradients", "step")
    master = 4 * sum(local)
    parts = [Part("master weights (fp32)", everywhere(master), "computed", "the policy's shard on this GPU"),
             Part("gradients (fp32)", dict.fromkeys(train, master), "computed",
                  "sharded; made by the backward, freed after the optimizer step"),
             Part("optimizer state", optimizer_phases(optimizer_bytes(local, optim.name), optim.name,
                                                      algo.uses_momentum and algo.momentum_dtype == "int8"),
                  "computed", optim.name)]
    int8 = algo.uses_momentum and algo.momentum_dtype == "int8"
    if algo.uses_momentum:
        momentum = int8_delta_bytes(local) if int8 else 4 * sum(local)
        parts.append(Part("momentum model", everywhere(momentum), "computed", f"{algo.momentum_dtype} "
                          + ("delta, 1.016 B/param" if int8 else "copy")))
    if algo.kl_coef > 0:
        parts.append(Part("KL reference", everywhere(compute * sum(local)), "computed",
                          ("bf16" if bf16 else "fp32") + (" (refreshed from the momentum model)"
                                                          if algo.kl_reference == "momentum" else "")))
    # the weight pushes: one full tensor at a time in the engine's dtype (cast, then gathered); the int8 delta is
    # dequantized in chunks into that one tensor (mgrpo_kernels.momentum_int8.momentum_weight)
    copies = (compute != 4) + sharded           # a cast and/or a gather make new tensors; fp32 on one process none
    push = compute * largest_full * copies
    if int8:
        push = max(push, compute * (largest_local + (largest_full if sharded else 0)) + 12 * min(PUSH_CHUNK, largest_local))
    parts.append(Part("weight push", {"rollout": push}, "computed", "the largest tensor, cast and gathered"
                      + (", int8 delta dequantized in chunks" if int8 else "")))
    # forwards and backwards
    layers, root = {}, 0
    for name, s in shapes:
        layer = _layer_of(name)
        if layer is None:
            root += math.prod(s)
        else:
            layers[layer] = layers.get(layer, 0) + math.prod(s)
    layer_numel = max(layers.values(), default=0)
    if sharded:
        parts.append(Part("parameters in flight", dict.fromkeys(("score", *UPDATE), compute * (root + 2 * layer_numel)),
                          "modeled", "unsharded: root (embedding, head, norm) + 2 decoder layers (prefetch)"))
    mb = shape or micro_batch_shape(cfg, config)
    saved, transient = activation_bytes(config, compute, on_gpu, mb.row)   # per token: a layer's saved, one live
    n_layers, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    if cfg.model.gradient_checkpointing:
        backward_acts, how = mb.tokens * (H * compute * n_layers + saved), \
            f"{mb.tokens} tokens: {n_layers} layer inputs + one layer recomputed"
    else:
        backward_acts, how = mb.tokens * saved * n_layers, f"{mb.tokens} tokens, every layer's saved tensors"
    parts.append(Part("activations", {"score": mb.tokens * transient, "backward": backward_acts}, "modeled", how))
    head_score, head_backward, note = head_bytes(V, H, compute, mb.targets, on_gpu)
    parts.append(Part("head workspace", {"score": max(0, head_score - mb.tokens * transient) + mb.tokens * H * compute,
                                         "backward": head_backward}, "computed", note))
    # the end of the backward: the embedding's dense gradient and, when it is the tied head's weight too, the sum
    # of the two into its .grad (measured on the CPU: three [V, H] fp32 tensors at once)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tail = (3 if tied else 1) * V * H * (compute if sharded else 4)
    parts.append(Part("embedding gradient", {"gradients": tail}, "modeled",
                      "the embedding's dense gradient" + (" + the tied head's, summed" if tied else "")))
    if sharded:
        parts.append(Part("gradient reduce buffers", dict.fromkeys(UPDATE, (compute + 4) * (root + layer_numel)),
                          "modeled", "unsharded gradients of the root and one layer, cast to fp32 to reduce"))
    step = optimizer_step_bytes(optim.name, int8, largest_local, on_gpu)
    if step:
        parts.append(Part("optimizer step transients", {"step": step[0]}, step[1], step[2]))
    # the engine
    weights = 2 * total if on_gpu else 4 * total
    kv_dim = config.num_key_value_heads * getattr(config, "head_dim", H // config.num_attention_heads)
    kv_per_token = 2 * n_layers * kv_dim * 2
    util = max_util = 0.0
    trainer_peak = max(sum(p.at(ph) for p in parts) for ph in PHASES)
    runtime = RUNTIME_BYTES + FRAGMENTATION * trainer_peak
    if on_gpu:
        trainer_rollout = sum(p.at("rollout") for p in parts)
        max_util = max(0.0, min(0.95, (gpu_memory_gib * GIB - trainer_rollout - runtime) / (gpu_memory_gib * GIB)))
        max_util = math.floor(max_util * 100) / 100
        util = max_util if rollout.gpu_memory_utilization == "auto" else float(rollout.gpu_memory_utilization)
        engine = util * gpu_memory_gib * GIB
        kv_tokens = int(max(0.0, engine - weights - ENGINE_RUNTIME_BYTES) // kv_per_token)
        parts.append(Part("vLLM engine", {**everywhere(ENGINE_ASLEEP_BYTES), "load": engine, "rollout": engine}, "modeled",
                          f"gpu_memory_utilization {util:.2f}: bf16 weights {weights / GIB:.1f} + KV cache "
                          f"{kv_tokens} tokens; asleep (level {rollout.sleep_level}) outside the rollouts"))
        parts.append(Part("CUDA runtime and fragmentation", everywhere(runtime), "modeled",
                          "context, NCCL, cuBLAS; 5% allocator slack"))
    else:
        kv_tokens = 1 << 30
    # the engine must hold one whole sequence: the longest prompt (unknown here: 1024 tokens assumed) + response
    max_model_len = rollout.max_model_len or (1024 + max(rollout.max_new_tokens, cfg.eval.max_new_tokens))
    host = (2 * total if rollout.sleep_level == 1 else 0) + 4 * GIB
    plan = Plan(label, gpus, gpu_memory_gib * GIB, parts, kv_tokens, max_model_len, max_util, host, replicas=replicas)
    plan.disk_per_checkpoint = checkpoint_bytes(cfg, [math.prod(s) for _, s in shapes], bf16)
    stored = "float32" if cfg.model.path is None else str(getattr(config, "dtype", None) or "bfloat16")
    plan.disk_final = (4 if "float32" in stored else 2) * total          # exported in the base model's dtype
    return plan


def checkpoint_bytes(cfg, numels: list, bf16: bool) -> int:
    """What one checkpoint holds on disk, all ranks together (mgrpo/storage/checkpoint.py): the fp32 policy, the
    optimizer state, the momentum model, the KL reference when it is the initial policy (its own dtype)."""
    algo = cfg.algorithm
    total = 4 * sum(numels) + optimizer_bytes(numels, cfg.optim.name)
    if algo.uses_momentum:
        total += int8_delta_bytes(numels) if algo.momentum_dtype == "int8" else 4 * sum(numels)
    if algo.kl_coef > 0 and algo.kl_reference == "initial":
        total += (2 if bf16 else 4) * sum(numels)
    return total


@dataclass(frozen=True)
class MicroBatchShape:
    tokens: int     # tokens of a micro-batch, padding included (optim.micro_batch_tokens: a full one)
    targets: int    # of which response tokens (what the head scores)
    row: int        # a row's length (the attention's keys per query)


def prompt_tokens(cfg) -> int:
    """A prompt's length as planned: the built-in task's ~100 tokens; for file data unknown: 1024 assumed (as for
    max_model_len)."""
    return 100 if cfg.data.source.startswith("builtin:") else 1024


def micro_batch_shape(cfg, config) -> MicroBatchShape:
    """A full micro-batch: optim.micro_batch_tokens, its response share from the prompt length (prompt_tokens) and
    max_new_tokens."""
    prompt = prompt_tokens(cfg)
    response = cfg.rollout.max_new_tokens
    tokens = cfg.optim.micro_batch_tokens
    return MicroBatchShape(tokens, tokens * response // (prompt + response), min(prompt + response, tokens))


def activation_bytes(config, compute: int, on_gpu: bool, row: int) -> tuple:
    """(bytes a decoder layer saves for its backward, bytes one layer's no-grad forward holds at once), per token.

    What transformers' Qwen3/Llama layer keeps for autograd: each RMSNorm its input and normalised output, the
    projections' inputs, q k v, the attention's output, the MLP's gate, up, activation and product: measured on the
    CPU (mgrpo plan --measure, tests/test_plan.py) as 5 H + 4 I + 5 q + 4 kv values per token, within 3% for the
    tiny model and a Qwen3-0.6B shape; the no-grad forward 2 H + 3 I + q + 2 kv at once. On the CPU the masked
    attention takes the math path and keeps its probabilities for the backward (heads x the row's length per
    token, fp32; the no-grad forward frees them block by block). On a GPU flash/memory-efficient attention keeps
    O(tokens): modeled until a GPU measures it (bench/run_gpu.sh)."""
    H = config.hidden_size
    I = getattr(config, "intermediate_size", 4 * H)
    head_dim = getattr(config, "head_dim", H // config.num_attention_heads)
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    saved = (5 * H + 4 * I + 5 * q_dim + 4 * kv_dim) * compute
    transient = (2 * H + 3 * I + q_dim + 2 * kv_dim) * compute
    if not on_gpu:
        saved += config.num_attention_heads * row * 4
    return saved, transient


def head_bytes(V: int, H: int, compute: int, targets: int, on_gpu: bool) -> tuple:
    """(the head's no-grad scoring, its backward, a note): the fused kernel on a GPU, the PyTorch head in chunks on a
    CPU. Scoring is bounded by whichever is larger, a layer's forward or this (not both: the head runs after)."""
    if on_gpu:       # the fused kernel: per-token statistics forward; fp32 dW and a [chunk, V] workspace backward
        chunk = min(default_chunk_tokens(V, torch.bfloat16 if compute == 2 else torch.float32), targets)
        backward = 4 * V * H + chunk * V * (4 + (0 if compute == 4 else compute)) + 2 * targets * H * compute
        return 16 * targets, backward, f"fused: fp32 dW V x H + [{chunk}, V] logits and gradient"
    chunk = min(reference_chunk_tokens(V), targets)    # logits, log-probs, probabilities, their product: fp32
    single = targets <= reference_chunk_tokens(V)
    # measured: one chunk (no recomputation) peaks at its saved tensors with their gradient, or at dW beside one
    # [chunk, V]; several chunks (each recomputed) at three [V, H] fp32 (dW accumulated) beside one [chunk, V]
    backward = max(4.6 * chunk * V * 4, 4 * V * H + chunk * V * 4) if single else 3 * 4 * V * H + chunk * V * 4
    return 4 * chunk * V * 4, backward, f"PyTorch in chunks of {chunk} tokens, each recomputed in the backward"


def optimizer_step_bytes(name: str, int8: bool, largest_local: int, on_gpu: bool):
    """(bytes, kind, note) the optimizer step allocates beyond the state, or None."""
    if name != "adamw":
        return (4 * largest_local, "computed", "the largest parameter before its 8-bit AdamW update (int8 momentum)") \
            if int8 else None
    if int8 or on_gpu:      # our fused kernel, or torch's fused AdamW on CUDA: in place
        return None
    return (2 * 4 * largest_local, "modeled", "torch's single-tensor AdamW on a CPU: temporaries of the largest parameter")


# ---------------------------------------------------------------------------------------------------------
# Several nodes: the mesh and the traffic

MESHES = ("auto", "fsdp", "hsdp")
INTER_NODE_GBPS = 400.0      # Gb/s each way per node, shared by its GPUs (e.g. one 400G NIC per node)
INTRA_NODE_GBPS = 3600.0     # Gb/s each way per GPU: NVLink 4 (H100 SXM: 900 GB/s both ways = 450 GB/s = 3600 Gb/s)
ALL_REDUCE_EVERY_BACKWARD = False
"""Under hsdp the trainer has FSDP2 all-reduce the gradients across nodes after the update's last micro-batch only
(mgrpo.distributed.reduce_across_nodes); every backward still reduce-scatters within the node."""


def config_mesh(cfg) -> str:
    """distributed.mesh of a config (auto where the config has no such setting)."""
    return getattr(getattr(cfg, "distributed", None), "mesh", "auto")


def resolve_mesh(mesh: str, nodes: int) -> str:
    """fsdp or hsdp: auto = hsdp on more than one node, else fsdp; hsdp on one node is fsdp (a 1 x G mesh
    replicates nothing), as the trainer resolves distributed.mesh (mgrpo/distributed.py)."""
    if mesh not in MESHES:
        raise PlanError(f"--mesh {mesh}: use auto, fsdp or hsdp")
    if nodes < 1:
        raise PlanError(f"--nodes {nodes}: must be >= 1")
    if mesh == "auto":
        return "hsdp" if nodes > 1 else "fsdp"
    return "fsdp" if nodes == 1 else mesh


def mesh_shape(mesh: str, nodes: int, gpus: int) -> tuple:
    """(replicas, shard degree) of `gpus` GPUs per node on `nodes` nodes: hsdp (nodes, gpus), fsdp (1, nodes x gpus)."""
    return (nodes, gpus) if resolve_mesh(mesh, nodes) == "hsdp" else (1, nodes * gpus)


def plan_on_mesh(cfg, nodes: int, gpus: int, gpu_memory_gib: float, mesh: str = "auto", on_gpu: bool = True) -> Plan:
    """make_plan for `nodes` nodes of `gpus` GPUs under `mesh`: per GPU, with the mesh's shard degree (hsdp: a node's
    GPUs, so its per-GPU state is the one-node plan's; fsdp: every GPU)."""
    replicas, shard = mesh_shape(mesh, nodes, gpus)
    plan = make_plan(cfg, shard, gpu_memory_gib, on_gpu, replicas=replicas)
    plan.mesh = "hsdp" if replicas > 1 else "fsdp"
    return plan


@dataclass
class Traffic:
    """One mesh's collectives in one training step, bytes each rank sends (a ring receives as many), split into
    what crosses the inter-node link and what stays inside a node: modeled (ring algorithms, bandwidth only)."""
    mesh: str
    nodes: int
    gpus: int                   # per node
    rows: list                  # (name, inter-node bytes, intra-node bytes, note) per rank per step
    micro_batches: dict         # per rank per step: score, reference, update (forward + backward)
    prompts_per_rank: int
    inter_node_gbps: float
    intra_node_gbps: float

    @property
    def inter(self) -> float:
        return sum(r[1] for r in self.rows)

    @property
    def intra(self) -> float:
        return sum(r[2] for r in self.rows)

    @property
    def inter_seconds(self) -> float:
        """The node's link carries its G ranks' inter-node bytes."""
        return self.gpus * self.inter / (self.inter_node_gbps * 1e9 / 8)

    @property
    def intra_seconds(self) -> float:
        return self.intra / (self.intra_node_gbps * 1e9 / 8)


def micro_batch_counts(cfg, world: int) -> tuple:
    """(prompts per rank, {score, reference, update: micro-batches per rank per step}), modeled: every response
    max_new_tokens long after a prompt of prompt_tokens, micro_batch_tokens // that many sequences per micro-batch;
    scoring runs all G responses of a prompt, the reference and the update at most its M policy responses (the IQR
    filter may drop some), the update once per algorithm.updates_per_batch."""
    algo = cfg.algorithm
    prompts = math.ceil(algo.prompts_per_step / world)
    per_micro_batch = max(1, cfg.optim.micro_batch_tokens // (prompt_tokens(cfg) + cfg.rollout.max_new_tokens))
    trained = math.ceil(prompts * algo.policy_samples / per_micro_batch)
    return prompts, dict(score=math.ceil(prompts * algo.group_size / per_micro_batch),
                         reference=trained if algo.kl_coef > 0 else 0, update=trained * algo.updates_per_batch)


def traffic(cfg, shapes: list, nodes: int, gpus: int, mesh: str, inter_node_gbps: float = INTER_NODE_GBPS,
            intra_node_gbps: float = INTRA_NODE_GBPS, on_gpu: bool = True) -> Traffic:
    """The bytes each rank moves per step under `mesh` (fsdp or hsdp), for `shapes` (parameter_shapes). A ring
    all-gather or reduce-scatter over n ranks moves (n - 1) padded shards per rank, an all-reduce of D bytes
    2 (n - 1) / n D. A group inside a node stays on its links (NVLink); hsdp's replica group (a rank per node) is all
    inter-node; fsdp's group over every rank is a ring through each node's GPUs that crosses each node's link once
    per direction: a rank's share of the inter-node bytes is 1/G of what it moves."""
    mesh = resolve_mesh(mesh, nodes)
    replicas, shard = mesh_shape(mesh, nodes, gpus)
    compute = 2 if cfg.model.precision == "bf16" or (cfg.model.precision == "auto" and on_gpu) else 4
    dtype = "bf16" if compute == 2 else "fp32"
    algo = cfg.algorithm
    prompts, counts = micro_batch_counts(cfg, nodes * gpus)
    root = sum(local_numel(s, shard) for name, s in shapes if _layer_of(name) is None)
    layers = sum(local_numel(s, shard) for name, s in shapes if _layer_of(name) is not None)

    def shard_group(moved: float) -> tuple:       # (inter, intra) of a collective over the shard group
        if mesh == "hsdp" or nodes == 1:
            return 0.0, moved
        return moved / gpus, moved * (gpus - 1) / gpus

    pushes = 1 + (algo.uses_momentum and algo.momentum_samples > 0)
    rows = [("weight push", *shard_group(pushes * compute * (shard - 1) * (root + layers)),
             f"{pushes} x {dtype}: the policy" + (" and the momentum model" if pushes > 1 else "")
             + ", all-gathered for each rank's engine")]
    # FSDP2 gathers each layer per forward and again for its backward; the root (embedding, head, norm) once per
    # update micro-batch (it stays unsharded for the backward) and once for all the no-grad scoring forwards
    gathered = counts["score"] * layers + root
    if counts["reference"]:
        gathered += counts["reference"] * layers + root
    gathered += counts["update"] * (root + 2 * layers)
    rows.append(("parameter gathers", *shard_group(compute * (shard - 1) * gathered),
                 f"{dtype}, per micro-batch: scoring, "
                 + ("reference, " if counts["reference"] else "") + "update forward + backward"))
    rows.append(("gradient reduce-scatter", *shard_group(counts["update"] * 4 * (shard - 1) * (root + layers)),
                 "fp32, after every update micro-batch's backward"))
    if replicas > 1:
        reductions = counts["update"] if ALL_REDUCE_EVERY_BACKWARD else algo.updates_per_batch
        moved = reductions * 2 * (replicas - 1) / replicas * 4 * (root + layers)
        rows.append(("gradient all-reduce", moved, 0.0,
                     f"fp32, each rank's 1/{shard} shard across the {replicas} nodes, "
                     + ("after every backward" if ALL_REDUCE_EVERY_BACKWARD else "once per optimizer step")))
    else:
        rows.append(("gradient all-reduce", 0.0, 0.0, "hsdp only"))
    return Traffic(mesh, nodes, gpus, rows, counts, prompts, inter_node_gbps, intra_node_gbps)


def traffic_table(fsdp: Traffic, hsdp: Traffic) -> str:
    cols = ("fsdp inter", "fsdp intra", "hsdp inter", "hsdp intra")
    rows = [(f[0], *(f"{v / GIB:.2f}" for v in (f[1], f[2], h[1], h[2])), h[3] if h[0] == "gradient all-reduce"
             else f[3]) for f, h in zip(fsdp.rows, hsdp.rows)]
    rows.append(("total", *(f"{v / GIB:.2f}" for v in (fsdp.inter, fsdp.intra, hsdp.inter, hsdp.intra)), ""))
    rows.append(("seconds per step", *(f"{v:.2f}" for v in (fsdp.inter_seconds, fsdp.intra_seconds,
                                                            hsdp.inter_seconds, hsdp.intra_seconds)),
                 f"each link busy: inter-node {fsdp.inter_node_gbps:g} Gb/s per node, shared by its {fsdp.gpus} "
                 f"GPUs; intra-node {fsdp.intra_node_gbps:g} Gb/s per GPU"))
    header = ("traffic (GiB per rank per step)", *cols, "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
                                for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in [header] + rows)


def _why_not(plan: Plan) -> str:
    if plan.peak > plan.gpu_memory:
        return f"peak {plan.peak / GIB:.1f} GiB of {gpu_gib(plan.gpu_memory)} GiB per GPU"
    return f"the KV cache holds {plan.kv_cache_tokens} tokens, less than one sequence of {plan.max_model_len}"


def mesh_verdict(plans: dict, traffics: dict, chosen: str) -> tuple:
    """(the mesh that pays, a line saying why): hsdp when it fits and its inter-node seconds are fewer, fsdp when hsdp
    does not fit (its shards are a node's, larger per GPU) or crosses the nodes for longer; each one's peak named."""
    f, h = plans["fsdp"], plans["hsdp"]
    ft, ht = traffics["fsdp"].inter_seconds, traffics["hsdp"].inter_seconds
    peaks = (f"per-GPU peak {h.peak / GIB:.1f} GiB under hsdp ({h.gpus}-way shards), {f.peak / GIB:.1f} GiB under "
             f"fsdp ({f.gpus}-way), of {gpu_gib(f.gpu_memory)} GiB")
    seconds = (f"{ht:.2f} s per step across the nodes under hsdp, {ft:.2f} s under fsdp (modeled at "
               f"{traffics['fsdp'].inter_node_gbps:g} Gb/s per node)")
    if not f.fits and not h.fits:
        return chosen, f"mesh: neither fits: {peaks}"
    if h.fits and ht < ft:
        best, line = "hsdp", f"mesh: hsdp pays: {seconds}; {peaks}"
    elif not h.fits:
        best, line = "fsdp", (f"mesh: fsdp: hsdp does not fit ({_why_not(h)}: its shards are only {h.gpus}-way, over "
                              f"a node's GPUs), fsdp's {f.gpus}-way shards peak at {f.peak / GIB:.1f} GiB; {seconds}")
    else:
        best, line = "fsdp", f"mesh: fsdp pays: {seconds}; {peaks}"
    if best != chosen:
        line += f". This plan is for distributed.mesh={chosen}: set distributed.mesh={best} (or --mesh {best})"
    return best, line


# ---------------------------------------------------------------------------------------------------------
# Suggestions

def with_suggestions(plan: Plan, cfg, gpus: int, gpu_memory_gib: float, nodes: int = 1, mesh: str = "auto") -> Plan:
    """The settings that would make a plan that does not fit fit, each checked by planning with it (on `nodes`
    nodes of `gpus` GPUs under `mesh`)."""
    if plan.fits:
        return plan

    def fits(config, per_node: int = gpus, on: str = mesh) -> bool:
        return plan_on_mesh(config, nodes, per_node, gpu_memory_gib, on).fits

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
        if fits(load_config_from(cfg, overrides)):
            plan.suggestions.append(" ".join(overrides))
    if not plan.suggestions:   # no single setting: the fewest of them together, in the order above
        together = []
        for overrides in candidates:
            together += overrides
            if fits(load_config_from(cfg, together)):
                plan.suggestions.append(" ".join(together))
                break
    if resolve_mesh(mesh, nodes) == "hsdp" and fits(cfg, on="fsdp"):
        plan.suggestions.append(f"distributed.mesh=fsdp (shards over all {nodes * gpus} GPUs)")
    for more in (2, 4, 8):
        if more > gpus and splits(cfg, nodes * more) and fits(cfg, more):     # one that train would run
            plan.suggestions.append(f"{more} GPUs (torchrun --nproc_per_node={more})" if nodes == 1 else
                                    f"{more} GPUs per node (torchrun --nnodes={nodes} --nproc_per_node={more})")
            break
    return plan


def check_fits(cfg, gpus: int, gpu_memory_gib: float, nodes: int = 1, mesh: Optional[str] = None) -> Plan:
    """The plan `mgrpo train` makes before loading weights; a PlanError with the verdict if it does not fit. gpus:
    per node; mesh: distributed.mesh by default."""
    mesh = config_mesh(cfg) if mesh is None else mesh
    plan = with_suggestions(plan_on_mesh(cfg, nodes, gpus, gpu_memory_gib, mesh), cfg, gpus, gpu_memory_gib, nodes, mesh)
    if not plan.fits:
        raise PlanError(f"mgrpo plan: {plan.verdict()}. Run `mgrpo plan` with the same config for the table; "
                        "plan.check=false proceeds anyway")
    return plan


# ---------------------------------------------------------------------------------------------------------
# Printing it

def print_plan(cfg, gpus: int = 1, gpu_memory_gib: Optional[float] = None, nodes: int = 1, mesh: Optional[str] = None,
               inter_node_gbps: float = INTER_NODE_GBPS, intra_node_gbps: float = INTRA_NODE_GBPS) -> int:
    """`mgrpo plan` (mgrpo/commands/plan.py: its flags): the table, the host memory, the largest KV share, on several
    nodes the traffic of both meshes and the one that pays, the verdict; 0 if it fits, 1 if not. gpus: per node;
    mesh: distributed.mesh by default."""
    mesh = config_mesh(cfg) if mesh is None else mesh
    chosen = resolve_mesh(mesh, nodes)
    for flag, value in (("--inter-node-gbps", inter_node_gbps), ("--intra-node-gbps", intra_node_gbps)):
        check_positive(flag, value, "Gb/s")
    check_world_size(cfg, nodes, gpus)
    memory = gpu_memory_gib
    if memory is None:
        memory = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    plan = with_suggestions(plan_on_mesh(cfg, nodes, gpus, memory, mesh), cfg, gpus, memory, nodes, mesh)
    where = f"{gpus} x {memory:g} GiB" if nodes == 1 else (
        f"{nodes} nodes x {gpus} GPUs x {memory:g} GiB, mesh {chosen} (" + (
            f"sharded over the {gpus} GPUs of a node, replicated across the {nodes} nodes" if chosen == "hsdp" else
            f"sharded over all {nodes * gpus} GPUs") + ")")
    print(f"[plan] {plan.model} on {where} (per GPU; computed = exact tensor bytes, "
          "modeled = an estimate until measured on a GPU)")
    print(plan.table())
    print(f"host memory per rank: {plan.host_per_rank / GIB:.1f} GiB (pinned bf16 weights while vLLM sleeps at "
          "level 1, plus ~4 GiB for the process)")
    print(f"largest rollout.gpu_memory_utilization that fits: {plan.max_gpu_memory_utilization:.2f}")
    print(plan.disk_line(cfg.keep_checkpoints))
    if nodes > 1:
        print_traffic(cfg, plan, nodes, gpus, memory, chosen, inter_node_gbps, intra_node_gbps)
    print(plan.verdict())
    return 0 if plan.fits else 1


def print_traffic(cfg, plan: Plan, nodes: int, gpus: int, memory: float, chosen: str, inter_node_gbps: float,
                  intra_node_gbps: float) -> None:
    """Both meshes' traffic per step side by side, and the line saying which pays."""
    config, _ = model_config(cfg.model.path)
    shapes = parameter_shapes(config)
    plans = {m: plan if m == chosen else plan_on_mesh(cfg, nodes, gpus, memory, m) for m in ("fsdp", "hsdp")}
    traffics = {m: traffic(cfg, shapes, nodes, gpus, m, inter_node_gbps, intra_node_gbps) for m in ("fsdp", "hsdp")}
    t = traffics["fsdp"]
    print(f"traffic per step (modeled: ring collectives, bandwidth only, nothing overlapped with compute; per rank "
          f"{t.prompts_per_rank} prompt{'s' * (t.prompts_per_rank > 1)}, {t.micro_batches['score']} scoring, {t.micro_batches['reference']} "
          f"reference and {t.micro_batches['update']} update micro-batches of full-length sequences; intra-node "
          f"{intra_node_gbps:g} Gb/s per GPU each way assumed: NVLink 4, 450 GB/s):")
    print(traffic_table(traffics["fsdp"], traffics["hsdp"]))
    print(mesh_verdict(plans, traffics, chosen)[1])
