"""Token log-probs and entropies from hidden states and the lm_head weight, without [tokens, vocab] logits.

With z = h W^T / tau and p = softmax(z), per token:
    logprob = z[target] - lse(z)          entropy = lse(z) - sum_j p_j z_j = lse - mu
    d logprob / dz = onehot(target) - p   d entropy / dz = -p (z - mu)
    dh = (dz / tau) W                     dW = (dz / tau)^T h

Forward: a Triton kernel over (token block, vocab split) tiles. Each program computes its logit tiles with
tl.dot (fp32 accumulation), in registers, and keeps online-softmax statistics per token: the running max m,
s = sum exp(z - m), a = sum exp(z - m) (z - m), and the target logit. The logits never reach memory. The
splits (needed for parallelism at small T) are merged in O(splits * T).

Backward: chunks of tokens. Per chunk the logits are recomputed by one matmul with fp32 accumulation and an
fp32 result into a bounded [chunk, V] workspace; a Triton row kernel normalises each row by its *own* max
and sum (a first pass over the row) and writes dz / tau in the compute dtype; two matmuls give dh and the
chunk's dW, which is accumulated in fp32 in place (no [V, H] temporary): gradients are never accumulated
across chunks in bf16 (the divergence Liger issues 512/827 traced to that).

Numerics, and why: a trained model's logits spread over tens of units and RL trains on its confident tokens,
where d logprob / dz = onehot - p is a difference of nearly equal numbers. Three rules keep it exact to fp32:
- the logits are fp32-accumulated in both passes, never rounded to bf16 (a bf16 logit of 30 is off by 0.06:
  p no longer sums to 1 and 1 - p can change sign: 55% gradient error at logit std 23, measured);
- the backward's p is normalised by the statistics of the very logits it uses, so it sums to 1 whatever
  rounding the forward's different summation order made;
- statistics are kept shifted by the max (s, a above, and lse - m, mu - m): logprob = (z_t - m) - log s and
  entropy = log s - a / s are small differences of small numbers, never lse (~30) minus z_t (~30).
Columns past V (vocabulary padding of the last tile) enter as -inf, and the running max starts at -inf,
never 0 (the bug of verl PR 7439), so small or negative logits are exact. Masked tokens are dropped before
the kernels: they cost nothing and get zero gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from mgrpo_kernels import runtime
from mgrpo_kernels.runtime import triton_can_run  # noqa: F401  (part of this module's API)

__all__ = ["fused_logprob_entropy", "reference_logprob_entropy", "logprob_entropy", "triton_can_run",
           "default_chunk_tokens", "WORKSPACE_BYTES", "chunked_reference_logprob_entropy", "reference_chunk_tokens"]


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

@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, target_ptr,                              # inputs: hidden [T, H], weight [V, H], targets [T]
    max_ptr, sumexp_ptr, sumexpz_ptr, target_logit_ptr,    # outputs: per (split, token) partials [S, T]
    T, V, H, V_PER_SPLIT,                                  # shapes
    stride_ht, stride_hh, stride_wv, stride_wh,            # strides
    inv_temperature,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """Per (token block, vocab split): m = max z, s = sum exp(z - m), a = sum exp(z - m) (z - m), z[target]."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    targets = tl.load(target_ptr + offs_t, mask=mask_t, other=-1)

    running_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    sum_exp = tl.zeros([BLOCK_T], tl.float32)
    sum_exp_shifted = tl.zeros([BLOCK_T], tl.float32)      # sum exp(z - m) (z - m), kept relative to the max
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
            if DOT_IN_FP32:
                # fp32 inputs: true fp32 products ("ieee"; the default would be TF32 on GPUs). The interpreter
                # also computes bf16 dots wrongly, so it takes this branch for every dtype (kernels.md 3).
                acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)                                                # bf16/fp16 in, fp32 acc
        z = tl.where(mask_v[None, :], acc * inv_temperature, float("-inf"))            # padding: -inf
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)                                        # exp(-inf) = 0 at start
        shift = tl.where(sum_exp > 0, running_max - new_max, 0.0)                      # -inf * 0 never formed
        p = tl.exp(z - new_max[:, None])                                               # 0 on padding
        z_shifted = tl.where(mask_v[None, :], z - new_max[:, None], 0.0)
        # a' = rescale * (a + (m_old - m_new) s) + sum exp(z - m_new) (z - m_new)
        sum_exp_shifted = rescale * (sum_exp_shifted + shift * sum_exp) + tl.sum(p * z_shifted, axis=1)
        sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
        running_max = new_max
        is_target = offs_v[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target & mask_v[None, :], z, 0.0), axis=1)

    out = pid_s * T + offs_t
    tl.store(max_ptr + out, running_max, mask=mask_t)
    tl.store(sumexp_ptr + out, sum_exp, mask=mask_t)
    tl.store(sumexpz_ptr + out, sum_exp_shifted, mask=mask_t)
    tl.store(target_logit_ptr + out, target_logit, mask=mask_t)


@triton.jit
def _logits_to_grad_kernel(
    logits_ptr, grad_ptr, target_ptr, grad_logprob_ptr, grad_entropy_ptr,   # pointers
    V, stride_logits, stride_grad,                                          # shapes, strides
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    """One row per program: fp32 raw logits h.W^T -> dz / tau = (g_lp (onehot - p) - g_ent p (z - mu)) / tau in
    grad's dtype. Pass 1 computes the row's own max, sum of exp and mean logit (online, shifted by the max),
    so p is normalised by exactly the logits it is computed from; pass 2 writes the gradient."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    g_logprob = tl.load(grad_logprob_ptr + row)
    g_entropy = tl.load(grad_entropy_ptr + row)
    base = logits_ptr + row * stride_logits
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)     # per lane: max, sum exp(z - m), sum exp(z - m)(z - m)
    s = tl.zeros([BLOCK_V], tl.float32)
    a = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = tl.load(base + offs_v, mask=mask_v, other=float("-inf")) * inv_temperature
        new_m = tl.maximum(m, z)
        finite = new_m > float("-inf")                      # lanes that have seen a column
        rescale = tl.where(finite, tl.exp(m - new_m), 0.0)
        shift = tl.where(s > 0, m - new_m, 0.0)
        e = tl.where(finite, tl.exp(z - new_m), 0.0)
        a = rescale * (a + shift * s) + e * tl.where(mask_v & finite, z - new_m, 0.0)
        s = s * rescale + e
        m = new_m
    row_max = tl.max(m, axis=0)
    lane = tl.where(s > 0, tl.exp(m - row_max), 0.0)
    total = tl.sum(lane * s, axis=0)
    log_total = tl.log(total)                                                # lse - max
    mu_shifted = tl.sum(lane * (a + tl.where(s > 0, m - row_max, 0.0) * s), axis=0) / total   # mu - max
    out = grad_ptr + row * stride_grad
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z_shifted = tl.load(base + offs_v, mask=mask_v, other=0.0) * inv_temperature - row_max
        p = tl.exp(z_shifted - log_total)
        dz = g_logprob * (tl.where(offs_v == target, 1.0, 0.0) - p) - g_entropy * p * (z_shifted - mu_shifted)
        tl.store(out + offs_v, (dz * inv_temperature).to(grad_ptr.dtype.element_ty), mask=mask_v)


# ---------------------------------------------------------------------------------------------------------
# Launch configurations (the compile tests in tests/test_kernels_compile.py build exactly these)

def forward_launch_config(dtype: torch.dtype, interpreting: bool = False) -> dict:
    """Tile sizes, warps and stages of the forward kernel for inputs of `dtype`."""
    if interpreting:
        return dict(BLOCK_T=16, BLOCK_V=32, BLOCK_H=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:   # fp32 tiles take twice the shared memory: two stages fit A100's 163 KiB
        return dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=2)
    return dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)


def grad_launch_config(interpreting: bool = False) -> dict:
    """Columns per iteration and warps of the row kernel (one row per program)."""
    return dict(BLOCK_V=64, num_warps=1) if interpreting else dict(BLOCK_V=2048, num_warps=8)


# ---------------------------------------------------------------------------------------------------------
# Launchers

def _forward(hidden, weight, targets, temperature):
    T, H = hidden.shape
    V = weight.shape[0]
    config = forward_launch_config(hidden.dtype, runtime.interpreting())
    block_t, block_v = config["BLOCK_T"], config["BLOCK_V"]
    token_blocks = triton.cdiv(T, block_t)
    # Enough programs to fill the GPU at small T: split the vocabulary, then merge the partial statistics.
    target_programs = 1 if runtime.interpreting() else 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
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
        DOT_IN_FP32=runtime.interpreting() or hidden.dtype == torch.float32, **config,
    )
    split_max, split_sumexp, split_shifted, split_target = partial                 # each [S, T]
    row_max = split_max.max(dim=0).values                                          # [T]
    offset = split_max - row_max                                                   # [S, T] <= 0, finite
    weight_s = torch.exp(offset)
    sum_exp = (weight_s * split_sumexp).sum(0)                                     # [T] sum exp(z - max)
    log_sum_exp = torch.log(sum_exp)                                               # lse - max
    mu_shifted = (weight_s * (split_shifted + offset * split_sumexp)).sum(0) / sum_exp   # E_p[z] - max
    logprob = (split_target.sum(0) - row_max) - log_sum_exp
    entropy = log_sum_exp - mu_shifted
    return logprob, entropy


def _mm_fp32_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b with fp32 accumulation into the fp32 `out`, never rounded to a's dtype on the way: cuBLAS
    with out_dtype on CUDA; on a CPU (no bf16 -> fp32 matmul kernel; the tests' path) the upcast inputs, the
    same exact products."""
    if a.dtype == torch.float32 or not a.is_cuda:
        torch.mm(a.float(), b.float(), out=out)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc fp32, a and b in the compute dtype: no [V, H] temporary on top of acc."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError) as e:   # a torch whose addmm has no out_dtype with an fp32 `self`
            _warn_once(f"torch.addmm(out_dtype=float32, out=acc) is unavailable ({e}): the head's weight gradient "
                       "takes a fresh fp32 [V, H] product per chunk (1.45 GiB at Qwen3-4B's head)")
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        import warnings
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _backward(hidden, weight, targets, grad_logprob, grad_entropy, temperature,
              need_grad_hidden, need_grad_weight, chunk_tokens):
    T, H = hidden.shape
    V = weight.shape[0]
    compute_dtype = hidden.dtype
    w = weight.to(compute_dtype)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_grad_weight else None
    chunk = min(chunk_tokens, T)
    # the bounded workspace, allocated once: fp32 logits and their gradient in the compute dtype (in place in fp32)
    logits_buffer = torch.empty((chunk, V), device=hidden.device, dtype=torch.float32)
    grad_buffer = logits_buffer if compute_dtype == torch.float32 else torch.empty((chunk, V), device=hidden.device,
                                                                                    dtype=compute_dtype)
    w_t = w.T if w.is_cuda else w.T.float()      # CPU (tests): upcast once, not per chunk
    config = grad_launch_config(runtime.interpreting())
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        h_chunk = hidden[start:end]
        logits = logits_buffer[:end - start]
        dz = grad_buffer[:end - start]
        _mm_fp32_into(logits, h_chunk, w_t)                                        # [chunk, V] fp32
        _logits_to_grad_kernel[(end - start,)](
            logits, dz, targets[start:end], grad_logprob[start:end], grad_entropy[start:end],
            V, logits.stride(0), dz.stride(0), 1.0 / temperature, **config,
        )
        if need_grad_hidden:
            torch.mm(dz, w, out=grad_hidden[start:end])                            # [chunk, H]
        if need_grad_weight:
            _addmm_fp32_(grad_weight, dz.T, h_chunk)                               # [V, H] fp32, in place
    if need_grad_weight:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


WORKSPACE_BYTES = 1 << 30
"""The backward's bounded workspace per chunk of tokens: fp32 logits [chunk, V] and their gradient in the compute
dtype. Its size sets the chunk, and the chunk sets the weight gradient's memory traffic: every chunk reads and
writes the whole fp32 dW accumulator (2 x 1.45 GiB at Qwen3-4B's head), so a 16k-token backward in chunks of
256 moved 186 GiB through it, in chunks of 1024 (this budget: 0.87 GiB of workspace at V = 151936 in bf16) 46 GiB,
and the dW matmul's arithmetic intensity (chunk / 4 FLOPs per byte of accumulator) reaches 256, where an H100's
tensor cores, not its memory, bound it."""


def default_chunk_tokens(vocab: int, dtype: torch.dtype) -> int:
    """Tokens per backward chunk: the largest power of two whose workspace fits WORKSPACE_BYTES (16 to 4096).
    mgrpo plan counts the head's memory with this same function."""
    per_token = vocab * (4 + (0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8))
    return max(16, min(4096, 2 ** int(math.log2(max(WORKSPACE_BYTES / per_token, 1)))))


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_tokens):
        logprob, entropy = _forward(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, targets = ctx.saved_tensors
        T = hidden.shape[0]
        zeros = None
        if grad_logprob is None or grad_entropy is None:
            zeros = torch.zeros(T, device=hidden.device, dtype=torch.float32)
        grad_logprob = zeros if grad_logprob is None else grad_logprob.float().contiguous()
        grad_entropy = zeros if grad_entropy is None else grad_entropy.float().contiguous()
        grad_hidden, grad_weight = _backward(
            hidden, weight, targets, grad_logprob, grad_entropy, ctx.temperature,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.chunk_tokens)
        return grad_hidden, grad_weight, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Functional API

def fused_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, mask: Optional[torch.Tensor] = None,
                          chunk_tokens: Optional[int] = None) -> tuple:
    """Log-prob of each target and entropy of softmax(hidden @ weight.T / temperature), never forming the logits.

    hidden  [T, H] fp32 | fp16 | bf16 (any leading dims are flattened), weight [V, H] (tied or not; cast to
    hidden's dtype here when it differs: a [V, H] copy, which the trainer avoids by handing both in its compute
    dtype), targets [T] int, mask [T] bool (False: skipped, outputs 0, zero gradient).
    Returns logprob [T], entropy [T] in fp32, differentiable w.r.t. hidden and weight (its gradient in weight's
    own dtype, through the cast).
    """
    if not runtime.triton_can_run(hidden):
        raise RuntimeError("fused_logprob_entropy runs Triton: give CUDA tensors, or set TRITON_INTERPRET=1 "
                           "before importing it to run on the CPU (slow; tests only), or use logprob_impl=torch")
    lead = hidden.shape[:-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[1]}], got {tuple(weight.shape)}")
    weight = weight.to(hidden.dtype)          # the kernels read both in one dtype (a no-op when they agree)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets [{targets.shape[0]}] must match hidden's {hidden.shape[0]} tokens")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mask is not None:
        index = mask.reshape(-1).nonzero().squeeze(-1)
        hidden, targets = hidden.index_select(0, index), targets.index_select(0, index)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}) (masked positions may hold anything)")
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0], hidden.dtype)
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


def reference_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of the PyTorch path: its logits, log-probs, probabilities and their product are four
    fp32 [chunk, V] tensors at once; they stay within WORKSPACE_BYTES (1024 tokens at a 49k vocabulary)."""
    return max(16, min(4096, 2 ** int(math.log2(max(WORKSPACE_BYTES / (16 * vocab), 1)))))


def chunked_reference_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                      temperature: float = 1.0, chunk_tokens: Optional[int] = None) -> tuple:
    """The reference, a chunk of tokens at a time, each chunk recomputed in the backward (activation
    checkpointing): the [tokens, vocab] logits never exist whole, on the CPU path too (a 135M model with a 49k
    vocabulary took 0.8 GB per logits-sized tensor at 4096 tokens, several at once)."""
    from torch.utils.checkpoint import checkpoint
    chunk = chunk_tokens or reference_chunk_tokens(weight.shape[0])
    if hidden.shape[0] <= chunk:
        return reference_logprob_entropy(hidden, weight, targets, temperature)
    parts = [checkpoint(reference_logprob_entropy, hidden[i:i + chunk], weight, targets[i:i + chunk], temperature,
                        use_reentrant=False) for i in range(0, hidden.shape[0], chunk)]
    return torch.cat([lp for lp, _ in parts]), torch.cat([ent for _, ent in parts])


def logprob_entropy(hidden, weight, targets, temperature=1.0, mask=None, impl: str = "fused"):
    """impl="fused" (Triton) or "torch" (the reference in chunks): the switch every test and benchmark runs both
    ways."""
    if impl == "fused":
        return fused_logprob_entropy(hidden, weight, targets, temperature, mask)
    if impl != "torch":
        raise ValueError(f"impl={impl!r}: use fused or torch")
    lead = hidden.shape[:-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if mask is None:
        logprob, entropy = chunked_reference_logprob_entropy(hidden, weight, targets, temperature)
        return logprob.reshape(lead), entropy.reshape(lead)
    index = mask.reshape(-1).nonzero().squeeze(-1)
    lp, ent = chunked_reference_logprob_entropy(hidden.index_select(0, index), weight,
                                                targets.index_select(0, index), temperature)
    out_lp = lp.new_zeros(mask.numel()).index_put((index,), lp)
    out_ent = ent.new_zeros(mask.numel()).index_put((index,), ent)
    return out_lp.reshape(lead), out_ent.reshape(lead)
