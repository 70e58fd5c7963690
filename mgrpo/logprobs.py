"""Token log-probs and entropies of sequences under a causal LM: the one function the trainer uses for both.

The model's backbone gives hidden states; the lm_head is applied inside `logprob_entropy`, which with
impl="fused" is the Triton kernel that never forms the [tokens, vocab] logits (mgrpo_kernels) and with
impl="torch" the plain-PyTorch reference. Only positions in `target_mask` are computed.
"""
from __future__ import annotations

import torch

from mgrpo_kernels.fused_logprob_entropy import logprob_entropy, triton_can_run


def resolve_logprob_impl(impl: str, device: torch.device) -> str:
    """auto: the fused kernel on CUDA, the reference on a CPU. fused on a CPU needs Triton's interpreter."""
    if impl == "auto":
        return "fused" if device.type == "cuda" else "torch"
    if impl == "fused" and not triton_can_run(torch.empty(0, device=device)):
        raise ValueError("algorithm.logprob_impl=fused needs a CUDA device (or TRITON_INTERPRET=1 on a CPU, "
                         "very slow): set algorithm.logprob_impl=torch to train on the CPU")
    return impl


def backbone_and_head(model):
    """(decoder without lm_head, lm_head weight [V, H]); the weight is the embedding itself when tied."""
    return getattr(model, model.base_model_prefix), model.get_output_embeddings().weight


def sequence_logprobs_and_entropy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                  target_mask: torch.Tensor, temperature: float, impl: str) -> tuple:
    """input_ids, attention_mask, target_mask [B, L] -> logprob [B, L], entropy [B, L] (fp32).

    Entry t is for predicting token t from tokens < t, at the sampling temperature; 0 where target_mask is
    False (and always at t = 0).
    """
    backbone, head_weight = backbone_and_head(model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state   # [B, L, H]
    logprob, entropy = logprob_entropy(hidden[:, :-1], head_weight, input_ids[:, 1:], temperature,
                                       mask=target_mask[:, 1:].bool(), impl=impl)          # [B, L-1]
    pad = logprob.new_zeros(input_ids.shape[0], 1)
    return torch.cat([pad, logprob], dim=1), torch.cat([pad, entropy], dim=1)
