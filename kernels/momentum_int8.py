"""AdamW fused with the 8-bit momentum (EMA) update, one launch over all tensors.

Why a delta, and why stochastic rounding (shared notes kernels.md section 2): at lr 1e-6 and m = 0.99 the
momentum model theta_k differs from the policy theta_q by about one bf16 ulp. Stored itself in int8 or bf16,
theta_k freezes: every update rounds away. We store instead the delta d = theta_k - theta_q, in int8 codes
with one fp32 absmax scale per 256 elements (1.016 bytes per parameter), rounded stochastically so the
rounding error is unbiased. With q' = q + dq the EMA k' = m k + (1 - m) q' becomes

    d' = k' - q' = m (d - dq)

and dq, the optimizer's step, is known inside the optimizer: so one pass over memory reads p, g, the Adam
moments and the codes, and writes p, the moments and the new codes. dq is the change of the *stored* parameter
(after rounding to its dtype), so theta_q + d tracks the EMA of exactly what the policy holds.

One launch: a pointer table in device memory (grouped-GEMM pattern) lists every tensor's storage; each
program handles BLOCKS_PER_PROGRAM quantization blocks of one tensor, so a block's absmax stays inside one
program. Tensors are grouped by parameter dtype (one launch per dtype). The pointer table (8 int64 per
tensor: a few KB for ~400 tensors) is rebuilt every step because gradients are new tensors after
zero_grad(set_to_none=True). The program table (which tensor and block each program takes: one entry per
BLOCKS_PER_PROGRAM blocks, ~1M entries for Qwen3-4B on one GPU) depends only on the shapes: it is built
once per shape set, with tensor ops, and cached on the device.

Plain local tensors in and out: under FSDP2 the optimizer runs on each rank's local shards (the
quantization blocks are blocks of the shard), with no communication.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from mgrpo_kernels import runtime
from mgrpo_kernels.runtime import local_tensor

QUANT_BLOCK = 256          # elements per fp32 scale: 4 / 256 = 0.016 bytes per parameter of overhead
CODE_MAX = 127.0           # symmetric int8 codes in [-127, 127]

__all__ = ["QUANT_BLOCK", "FusedAdamWInt8Momentum", "reference_adamw_int8_momentum_step", "launch_delta_ema",
           "quantize_delta_reference", "dequantize_delta", "momentum_weight", "new_delta_state"]


# ---------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, one tensor at a time)

def new_delta_state(param: torch.Tensor) -> tuple:
    """Zero delta (theta_k = theta_q at start): int8 codes [numel] and fp32 scales [ceil(numel / 256)]."""
    n = param.numel()
    return (torch.zeros(n, dtype=torch.int8, device=param.device),
            torch.zeros(math.ceil(n / QUANT_BLOCK), dtype=torch.float32, device=param.device))


def dequantize_delta(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [n] int8, scales [ceil(n/256)] -> delta [n] fp32."""
    n = codes.numel()
    return (codes.float() * scales.repeat_interleave(QUANT_BLOCK)[:n]) if n else codes.float()


def quantize_delta_reference(delta: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple:
    """Blockwise absmax int8 with stochastic rounding: floor(x / s + u), u ~ U[0, 1), s = absmax / 127."""
    n = delta.numel()
    blocks = math.ceil(n / QUANT_BLOCK)
    padded = torch.zeros(blocks * QUANT_BLOCK, dtype=torch.float32, device=delta.device)
    padded[:n] = delta.float().reshape(-1)
    padded = padded.view(blocks, QUANT_BLOCK)
    scales = padded.abs().amax(1) / CODE_MAX                                       # [blocks]
    inv = torch.where(scales > 0, 1.0 / scales.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(scales))
    noise = torch.rand(padded.shape, generator=generator, device=delta.device)
    codes = torch.floor(padded * inv[:, None] + noise).clamp(-CODE_MAX, CODE_MAX)
    return codes.reshape(-1)[:n].to(torch.int8), scales


PUSH_CHUNK = 1 << 22        # elements per step of momentum_weight: 16 MiB of fp32 temporaries, whatever the tensor


@torch.no_grad()
def momentum_weight(param: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """theta_k = theta_q + dequant(d) for one tensor, in the engine's dtype (a stream: one tensor at a time).

    Computed in chunks of PUSH_CHUNK elements into the one output tensor: the fp32 temporaries of a whole
    tensor (codes as fp32, the repeated scales, the product, the sum: 4 x 1.45 GiB for Qwen3-4B's embedding)
    never exist at once; what the push holds is the output itself."""
    flat_param, n = param.detach().reshape(-1), param.numel()
    out = torch.empty(n, dtype=dtype, device=param.device)
    for start in range(0, n, PUSH_CHUNK):          # PUSH_CHUNK is a multiple of QUANT_BLOCK: whole blocks
        end = min(start + PUSH_CHUNK, n)
        block_scales = scales[start // QUANT_BLOCK:(end + QUANT_BLOCK - 1) // QUANT_BLOCK]
        delta = codes[start:end].float().view(-1) * block_scales.repeat_interleave(QUANT_BLOCK)[:end - start]
        out[start:end] = delta.add_(flat_param[start:end].float())
    return out.view(param.shape)


@torch.no_grad()
def reference_adamw_int8_momentum_step(param, grad, exp_avg, exp_avg_sq, codes, scales, *, step, lr, beta1, beta2,
                                       eps, weight_decay, momentum, generator=None):
    """One fused step for one tensor, in plain PyTorch (torch.optim.AdamW semantics, then the delta EMA)."""
    old = param.detach().float().clone()
    p = old * (1 - lr * weight_decay)
    g = grad.float()
    exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    p = p - (lr / (1 - beta1 ** step)) * exp_avg / denom
    param.copy_(p.to(param.dtype))
    dq = param.float() - old                                               # the stored change
    delta = momentum * (dequantize_delta(codes, scales).reshape(param.shape) - dq)
    new_codes, new_scales = quantize_delta_reference(delta, generator)
    codes.copy_(new_codes)
    scales.copy_(new_scales)


# ---------------------------------------------------------------------------------------------------------
# Triton kernel

TABLE_COLUMNS = 8   # param, grad, exp_avg, exp_avg_sq, codes, scales, numel, has_grad


@triton.jit
def _adamw_int8_momentum_kernel(
    table_ptr, program_tensor_ptr, program_block_ptr,         # device tables
    lr, beta1, beta2, eps, weight_decay, bias_correction1, inv_sqrt_bias_correction2, momentum, seed,
    PARAM_DTYPE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, QBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(program_tensor_ptr + pid)
    first_block = tl.load(program_block_ptr + pid)                      # first quantization block of this program
    row = table_ptr + tensor.to(tl.int64) * 8
    p_ptr = tl.load(row + 0).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(PARAM_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    c_ptr = tl.load(row + 4).to(tl.pointer_type(tl.int8))
    s_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 6)
    has_grad = tl.load(row + 7)

    blocks = first_block + tl.arange(0, BLOCKS_PER_PROGRAM)                               # [B]
    offs = blocks[:, None].to(tl.int64) * QBLOCK + tl.arange(0, QBLOCK)[None, :]           # [B, Q]
    mask = offs < numel
    adam = mask & ((offs * 0 + has_grad) != 0)     # broadcast the per-tensor flag to the block

    # AdamW (torch.optim.AdamW semantics), fp32 math whatever the parameter dtype
    p_old = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=adam, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=adam, other=0.0)
    v = tl.load(v_ptr + offs, mask=adam, other=0.0)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) * inv_sqrt_bias_correction2 + eps
    p_new = p_old * (1.0 - lr * weight_decay) - (lr / bias_correction1) * (m / denom)
    p_stored = p_new.to(PARAM_DTYPE)
    tl.store(p_ptr + offs, p_stored, mask=adam)
    tl.store(m_ptr + offs, m, mask=adam)
    tl.store(v_ptr + offs, v, mask=adam)
    dq = tl.where(adam, p_stored.to(tl.float32) - p_old, 0.0)

    # delta EMA: d <- m (d - dq), then blockwise absmax int8 with stochastic rounding
    block_mask = blocks < (numel + QBLOCK - 1) // QBLOCK
    scale_old = tl.load(s_ptr + blocks, mask=block_mask, other=0.0)                        # [B]
    codes = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.float32)
    d = momentum * (codes * scale_old[:, None] - dq)
    d = tl.where(mask, d, 0.0)
    scale_new = tl.max(tl.abs(d), axis=1) / 127.0                                           # [B]
    inv_scale = tl.where(scale_new > 0.0, 1.0 / tl.where(scale_new > 0.0, scale_new, 1.0), 0.0)  # zero block: 0
    noise = tl.rand(seed + tensor * 1000003, offs.to(tl.int32))
    q = tl.floor(d * inv_scale[:, None] + noise)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(c_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + blocks, scale_new, mask=block_mask)


@triton.jit
def _delta_ema_kernel(
    before_ptr, after_ptr, codes_ptr, scales_ptr,      # one tensor: the parameter before and after its step
    numel, momentum, seed, tensor_id,
    BLOCKS_PER_PROGRAM: tl.constexpr, QBLOCK: tl.constexpr,
):
    """The delta EMA alone, for an optimizer that is not ours (bitsandbytes' 8-bit AdamW): with
    dq = after - before, d <- m (d - dq), blockwise absmax int8 with stochastic rounding (as the fused kernel)."""
    blocks = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)      # [B]
    offs = blocks[:, None].to(tl.int64) * QBLOCK + tl.arange(0, QBLOCK)[None, :]           # [B, Q]
    mask = offs < numel
    before = tl.load(before_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    after = tl.load(after_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    block_mask = blocks < (numel + QBLOCK - 1) // QBLOCK
    scale_old = tl.load(scales_ptr + blocks, mask=block_mask, other=0.0)
    codes = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    d = momentum * (codes * scale_old[:, None] - (after - before))
    d = tl.where(mask, d, 0.0)
    scale_new = tl.max(tl.abs(d), axis=1) / 127.0
    inv_scale = tl.where(scale_new > 0.0, 1.0 / tl.where(scale_new > 0.0, scale_new, 1.0), 0.0)
    noise = tl.rand(seed + tensor_id * 1000003, offs.to(tl.int32))
    q = tl.minimum(tl.maximum(tl.floor(d * inv_scale[:, None] + noise), -127.0), 127.0)
    tl.store(codes_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scales_ptr + blocks, scale_new, mask=block_mask)


_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def launch_config(interpreting: bool = False) -> dict:
    """Quantization blocks per program and warps (the compile tests build exactly this configuration)."""
    return dict(BLOCKS_PER_PROGRAM=64, num_warps=1) if interpreting else dict(BLOCKS_PER_PROGRAM=4, num_warps=4)


def launch_delta_ema(before: torch.Tensor, after: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *,
                     momentum: float, seed: int, tensor_id: int) -> None:
    """d <- m (d - (after - before)) for one tensor's int8 delta, in place (see _delta_ema_kernel)."""
    if after.numel() == 0:
        return
    if not runtime.triton_can_run(after):
        raise RuntimeError("the int8 momentum update runs Triton: CUDA tensors, or TRITON_INTERPRET=1 on a CPU")
    if before.dtype != after.dtype or not (before.is_contiguous() and after.is_contiguous()):
        raise ValueError("before and after must be contiguous tensors of one dtype")
    config = launch_config(runtime.interpreting())
    bpp = config["BLOCKS_PER_PROGRAM"]
    grid = (triton.cdiv(math.ceil(after.numel() / QUANT_BLOCK), bpp),)
    _delta_ema_kernel[grid](before, after, codes, scales, after.numel(), momentum, seed, tensor_id,
                            QBLOCK=QUANT_BLOCK, **config)


_PROGRAM_TABLES: dict = {}


def program_table(numels: tuple, blocks_per_program: int, device: torch.device) -> tuple:
    """(tensor index, first quantization block) of every program, [programs] int32 each, on `device`: built
    once per (shapes, blocks per program, device) with tensor ops, then reused every step."""
    key = (numels, blocks_per_program, str(device))
    if key not in _PROGRAM_TABLES:
        blocks = torch.tensor([math.ceil(n / QUANT_BLOCK) for n in numels], dtype=torch.int64)
        programs = (blocks + blocks_per_program - 1) // blocks_per_program                 # [tensors]
        tensor = torch.repeat_interleave(torch.arange(len(numels)), programs)              # [programs]
        first_program = torch.cumsum(programs, 0) - programs                               # [tensors]
        block = (torch.arange(tensor.numel()) - first_program[tensor]) * blocks_per_program
        if len(_PROGRAM_TABLES) > 16:      # shape sets change only when a run changes models: keep a few
            _PROGRAM_TABLES.clear()
        _PROGRAM_TABLES[key] = (tensor.to(torch.int32).to(device), block.to(torch.int32).to(device))
    return _PROGRAM_TABLES[key]


def launch_fused_step(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, codes: list, scales: list, *,
                      step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                      momentum: float, seed: int, blocks_per_program: Optional[int] = None) -> int:
    """One launch per parameter dtype over all given tensors. grads[i] may be None (no AdamW, d <- m d).

    Host work per step is one pointer-table row per tensor; the program table comes from `program_table`'s
    cache. Returns the number of launches (one per dtype group).
    """
    if not params:
        return 0
    device = params[0].device
    if not runtime.triton_can_run(params[0]):
        raise RuntimeError("the fused int8 momentum step runs Triton: CUDA tensors, or TRITON_INTERPRET=1 on a CPU")
    config = launch_config(runtime.interpreting())
    if blocks_per_program:
        config["BLOCKS_PER_PROGRAM"] = blocks_per_program
    launches = 0
    groups: dict = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    for dtype, members in groups.items():
        if dtype not in _TORCH_TO_TL:
            raise TypeError(f"parameter dtype {dtype} is not supported (fp32, bf16, fp16)")
        rows = []
        for i in members:
            p, g = params[i], grads[i]
            if g is not None and g.shape != p.shape:
                raise ValueError(f"gradient {i} has shape {tuple(g.shape)}, its parameter {tuple(p.shape)}")
            if g is not None and (g.dtype != p.dtype or not g.is_contiguous()):
                g = g.to(p.dtype).contiguous()
                grads[i] = g
            if not p.is_contiguous():
                raise ValueError("parameters must be contiguous")
            rows.append([p.data_ptr(), (g if g is not None else p).data_ptr(), exp_avgs[i].data_ptr(),
                         exp_avg_sqs[i].data_ptr(), codes[i].data_ptr(), scales[i].data_ptr(), p.numel(),
                         int(g is not None)])
        program_tensor, program_block = program_table(tuple(params[i].numel() for i in members),
                                                      config["BLOCKS_PER_PROGRAM"], device)
        if program_tensor.numel() == 0:   # only empty tensors
            continue
        table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        _adamw_int8_momentum_kernel[(program_tensor.numel(),)](
            table, program_tensor, program_block,
            lr, beta1, beta2, eps, weight_decay, 1.0 - beta1 ** step, 1.0 / math.sqrt(1.0 - beta2 ** step),
            momentum, seed,
            PARAM_DTYPE=_TORCH_TO_TL[dtype], QBLOCK=QUANT_BLOCK, **config,
        )
        launches += 1
    return launches


# ---------------------------------------------------------------------------------------------------------
# Optimizer

class FusedAdamWInt8Momentum(torch.optim.Optimizer):
    """AdamW whose step also updates an 8-bit momentum model (EMA of the parameters), in one fused kernel.

    The momentum state per parameter is `codes` (int8, numel) and `scales` (fp32, ceil(numel/256)) of the
    delta d = theta_k - theta_q; `momentum_weights(dtype)` streams theta_k = theta_q + dequant(d).
    """

    per_rank_state = True
    """Its state is blocks of the local shards it was given: a checkpoint keeps it per rank."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum=0.99, seed=0):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults)
        self.seed = seed
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p):
        state = self.state[p]
        if "codes" not in state:
            local = local_tensor(p.detach())
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(local, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(local, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["codes"], state["scales"] = new_delta_state(local)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            states = [self.state[p] for p in params]
            for s in states:
                s["step"] += 1
            step = int(states[0]["step"].item())
            beta1, beta2 = group["betas"]
            launch_fused_step(
                [local_tensor(p.detach()) for p in params], [None if p.grad is None else local_tensor(p.grad) for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [s["codes"] for s in states], [s["scales"] for s in states],
                step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], momentum=group["momentum"],
                seed=(self.seed * 1_000_003 + step) % (2**31 - 1))
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch casts every state tensor to the parameter's dtype on load (codes included) and may share
        # storage with the given dict: restore our dtypes, in fresh storage.
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq", "scales"):
                state[key] = state[key].to(torch.float32, copy=True).contiguous()
            state["codes"] = state["codes"].to(torch.int8, copy=True).contiguous()
            state["step"] = state["step"].clone()

    def momentum_weights(self, dtype: torch.dtype):
        """theta_k for each parameter in order, one (local) tensor at a time."""
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state[p]
                yield momentum_weight(local_tensor(p.detach()), s["codes"], s["scales"], dtype)

    def momentum_state_bytes(self) -> int:
        return sum(s["codes"].numel() + 4 * s["scales"].numel() for s in self.state.values())
