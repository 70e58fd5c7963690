"""Token log-probs and entropies from hidden states and the lm_head weight, without [tokens, vocab] logits.

With z = h W^T / tau and p = softmax(z), per token:
    logprob = z[target] - lse(z)          entropy = lse(z) - sum_j p_j z_j = lse - mu
    d logprob / dz = onehot(target) - p   d entropy / dz = -p (z - mu)
    dh = (dz / tau) W                     dW = (dz / tau)^T h

Forward: a Triton kernel over (token block, vocab split) tiles. Each program computes its logit tiles with
tl.dot, in registers, and keeps online-softmax statistics per token (running max m, sum of exp s, sum of
exp * z a, and the target logit): the logits never reach memory. The splits (needed for parallelism at small
T) are merged in O(splits * T). Forward saves only lse and mu per token.

Backward: chunks of tokens. Per chunk the logits are recomputed by one matmul into a bounded [chunk, V]
workspace, a Triton row kernel overwrites them in place with dz / tau, and two matmuls give dh and the chunk's
dW, which is added to an fp32 accumulator: gradients are never accumulated across chunks in bf16 (the
divergence Liger issues 512/827 traced to that). Extra memory: O(T) statistics plus the chunk workspace.

Numerics: fp32 accumulation everywhere; columns past V (vocabulary padding of the last tile) enter as -inf,
and the running max starts at -inf, never 0 (the bug of verl PR 7439), so small or negative logits are exact.
Masked tokens are dropped before the kernels: they cost nothing and get zero gradient.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["fused_logprob_entropy", "reference_logprob_entropy", "logprob_entropy", "triton_can_run"]


# ---------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, materializes the logits)

def reference_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              temperature: float = 1.0) -> tuple:
    """hidden [T, H], weight [V, H], targets [T] -> logprob [T], entropy [T] in fp32 (fp64 for fp64 inputs).

    Computes the logits in the inputs' precision, then log_softmax in fp32: what eager training code does.
    """
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.to(hidden.dtype).T).to(out_dtype) / temperature      # [T, V]
    log_probs = torch.log_softmax(logits, dim=-1)                                   # [T, V]
    logprob = log_probs.gather(-1, targets[:, None].long()).squeeze(-1)             # [T]
    entropy = -(log_probs.exp() * log_probs).sum(-1)                                # [T]
    return logprob, entropy


# ---------------------------------------------------------------------------------------------------------
# Triton kernels

def triton_can_run(tensor: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, target_ptr,                              # inputs: hidden [T, H], weight [V, H], targets [T]
    max_ptr, sumexp_ptr, sumexpz_ptr, target_logit_ptr,    # outputs: per (split, token) partials [S, T]
    T, V, H, V_PER_SPLIT,                                  # shapes
    stride_ht, stride_hh, stride_wv, stride_wh,            # strides
    inv_temperature,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    targets = tl.load(target_ptr + offs_t, mask=mask_t, other=-1)

    running_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_T], tl.float32)
    sum_exp_z = tl.zeros([BLOCK_T], tl.float32)
    target_logit = tl.zeros([BLOCK_T], tl.float32)

    v_begin = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            h = tl.load(h_ptr + offs_t[:, None] * stride_ht + offs_h[None, :] * stride_hh,
                        mask=mask_t[:, None] & mask_h[None, :], other=0.0)
            w = tl.load(w_ptr + offs_v[None, :] * stride_wv + offs_h[:, None] * stride_wh,
                        mask=mask_v[None, :] & mask_h[:, None], other=0.0)             # [BLOCK_H, BLOCK_V]
            if DOT_IN_FP32:  # the interpreter computes bf16 dots wrongly: cast first (kernels.md section 3)
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc)
        z = tl.where(mask_v[None, :], acc * inv_temperature, float("-inf"))            # padding: -inf
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)                                        # exp(-inf) = 0 at start
        p = tl.exp(z - new_max[:, None])                                               # 0 on padding
        sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
        sum_exp_z = sum_exp_z * rescale + tl.sum(p * tl.where(mask_v[None, :], z, 0.0), axis=1)
        running_max = new_max
        is_target = offs_v[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target & mask_v[None, :], z, 0.0), axis=1)

    out = pid_s * T + offs_t
    tl.store(max_ptr + out, running_max, mask=mask_t)
    tl.store(sumexp_ptr + out, sum_exp, mask=mask_t)
    tl.store(sumexpz_ptr + out, sum_exp_z, mask=mask_t)
    tl.store(target_logit_ptr + out, target_logit, mask=mask_t)


@triton.jit
def _logits_to_grad_kernel(
    logits_ptr, target_ptr, lse_ptr, mu_ptr, grad_logprob_ptr, grad_entropy_ptr,   # pointers
    V, stride_row,                                                                 # shapes, strides
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    """In place, one row per program: raw logits h.W^T  ->  dz / tau = (g_lp (onehot - p) - g_ent p (z - mu)) / tau."""
    row = tl.program_id(0)
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    mu = tl.load(mu_ptr + row)
    g_logprob = tl.load(grad_logprob_ptr + row)
    g_entropy = tl.load(grad_entropy_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_row
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = tl.load(base + offs_v, mask=mask_v, other=0.0).to(tl.float32) * inv_temperature
        p = tl.exp(z - lse)
        dz = g_logprob * (tl.where(offs_v == target, 1.0, 0.0) - p) - g_entropy * p * (z - mu)
        tl.store(base + offs_v, (dz * inv_temperature).to(logits_ptr.dtype.element_ty), mask=mask_v)


# ---------------------------------------------------------------------------------------------------------
# Launchers

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _forward(hidden, weight, targets, temperature):
    T, H = hidden.shape
    V = weight.shape[0]
    if _interpreting():
        block_t, block_v, block_h, warps, stages = 16, 32, 16, 1, 1
    else:
        block_t, block_v, block_h, warps, stages = 64, 128, 64, 8, 3
    dot_in_fp32 = _interpreting() or hidden.dtype == torch.float32
    token_blocks = triton.cdiv(T, block_t)
    # Enough programs to fill the GPU at small T: split the vocabulary, then merge the partial statistics.
    target_programs = 1 if _interpreting() else 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
    splits = max(1, min(triton.cdiv(V, block_v), triton.cdiv(target_programs, token_blocks)))
    v_per_split = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
    splits = triton.cdiv(V, v_per_split)                        # every split holds at least one column
    partial = torch.empty((4, splits, T), device=hidden.device, dtype=torch.float32)
    _forward_kernel[(token_blocks, splits)](
        hidden, weight, targets,
        partial[0], partial[1], partial[2], partial[3],
        T, V, H, v_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature,
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=block_h, DOT_IN_FP32=dot_in_fp32,
        num_warps=warps, num_stages=stages,
    )
    split_max, split_sumexp, split_sumexpz, split_target = partial                # each [S, T]
    global_max = split_max.max(dim=0).values                                       # [T]
    weight_s = torch.exp(split_max - global_max)                                   # [S, T]
    sum_exp = (weight_s * split_sumexp).sum(0)
    lse = global_max + torch.log(sum_exp)                                          # [T]
    mu = (weight_s * split_sumexpz).sum(0) / sum_exp                               # [T]  E_p[z]
    logprob = split_target.sum(0) - lse
    entropy = lse - mu
    return logprob, entropy, lse, mu


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result; on CUDA the half-precision product is never rounded to bf16 first."""
    if a.is_cuda and a.dtype != torch.float32:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return (a @ b).float()


def _backward(hidden, weight, targets, lse, mu, grad_logprob, grad_entropy, temperature,
              need_grad_hidden, need_grad_weight, chunk_tokens):
    T, H = hidden.shape
    V = weight.shape[0]
    compute_dtype = hidden.dtype
    w = weight.to(compute_dtype)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_grad_weight else None
    block_v = 64 if _interpreting() else 4096
    for start in range(0, T, chunk_tokens):
        end = min(start + chunk_tokens, T)
        h_chunk = hidden[start:end]
        dz = h_chunk @ w.T                                                         # [chunk, V] workspace
        _logits_to_grad_kernel[(end - start,)](
            dz, targets[start:end], lse[start:end], mu[start:end],
            grad_logprob[start:end], grad_entropy[start:end],
            V, dz.stride(0), 1.0 / temperature,
            BLOCK_V=block_v, num_warps=1 if _interpreting() else 8,
        )
        if need_grad_hidden:
            grad_hidden[start:end] = dz @ w                                        # [chunk, H]
        if need_grad_weight:
            grad_weight += _mm_fp32(dz.T, h_chunk)                                 # [V, H] fp32
    if need_grad_weight:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


def _default_chunk_tokens(vocab: int, dtype: torch.dtype) -> int:
    # Keep the [chunk, V] workspace near 256 MiB: 512 tokens at Qwen3's V = 151936 in bf16 (148 MiB).
    budget = 256 * 2**20
    per_token = vocab * torch.finfo(dtype).bits // 8
    return max(16, min(4096, 2 ** int(torch.log2(torch.tensor(budget / per_token)).item())))


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_tokens):
        logprob, entropy, lse, mu = _forward(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets, lse, mu)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, targets, lse, mu = ctx.saved_tensors
        T = hidden.shape[0]
        zeros = None
        if grad_logprob is None or grad_entropy is None:
            zeros = torch.zeros(T, device=hidden.device, dtype=torch.float32)
        grad_logprob = zeros if grad_logprob is None else grad_logprob.float().contiguous()
        grad_entropy = zeros if grad_entropy is None else grad_entropy.float().contiguous()
        grad_hidden, grad_weight = _backward(
            hidden, weight, targets, lse, mu, grad_logprob, grad_entropy, ctx.temperature,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.chunk_tokens)
        return grad_hidden, grad_weight, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Functional API

def fused_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, mask: Optional[torch.Tensor] = None,
                          chunk_tokens: Optional[int] = None) -> tuple:
    """Log-prob of each target and entropy of softmax(hidden @ weight.T / temperature), never forming the logits.

    hidden  [T, H] fp32 | fp16 | bf16 (any leading dims are flattened), weight [V, H] (tied or not; cast to
    hidden's dtype for the matmuls), targets [T] int, mask [T] bool (False: skipped, outputs 0, zero gradient).
    Returns logprob [T], entropy [T] in fp32, differentiable w.r.t. hidden and weight.
    """
    if not triton_can_run(hidden):
        raise RuntimeError("fused_logprob_entropy runs Triton: give CUDA tensors, or set TRITON_INTERPRET=1 "
                           "before importing it to run on the CPU (slow; tests only), or use logprob_impl=torch")
    lead = hidden.shape[:-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[1]}], got {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets [{targets.shape[0]}] must match hidden's {hidden.shape[0]} tokens")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mask is not None:
        index = mask.reshape(-1).nonzero().squeeze(-1)
        hidden, targets = hidden.index_select(0, index), targets.index_select(0, index)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}) (masked positions may hold anything)")
    chunk = chunk_tokens or _default_chunk_tokens(weight.shape[0], hidden.dtype)
    if hidden.shape[0] == 0:
        logprob = entropy = hidden.new_zeros(0, dtype=torch.float32) + 0 * weight.sum() + 0 * hidden.sum()
    else:
        logprob, entropy = _FusedLogprobEntropy.apply(hidden.contiguous(), weight, targets.contiguous(),
                                                      float(temperature), chunk)
    if mask is not None:
        full_lp = logprob.new_zeros(mask.numel()).index_put((index,), logprob)
        full_ent = entropy.new_zeros(mask.numel()).index_put((index,), entropy)
        logprob, entropy = full_lp, full_ent
    return logprob.reshape(lead), entropy.reshape(lead)


def logprob_entropy(hidden, weight, targets, temperature=1.0, mask=None, impl: str = "fused"):
    """impl="fused" (Triton) or "torch" (reference): the switch every test and benchmark runs both ways."""
    if impl == "fused":
        return fused_logprob_entropy(hidden, weight, targets, temperature, mask)
    if impl != "torch":
        raise ValueError(f"impl={impl!r}: use fused or torch")
    lead = hidden.shape[:-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if mask is None:
        logprob, entropy = reference_logprob_entropy(hidden, weight, targets, temperature)
        return logprob.reshape(lead), entropy.reshape(lead)
    index = mask.reshape(-1).nonzero().squeeze(-1)
    lp, ent = reference_logprob_entropy(hidden.index_select(0, index), weight, targets.index_select(0, index),
                                        temperature)
    out_lp = lp.new_zeros(mask.numel()).index_put((index,), lp)
    out_ent = ent.new_zeros(mask.numel()).index_put((index,), ent)
    return out_lp.reshape(lead), out_ent.reshape(lead)
