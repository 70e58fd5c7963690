"""Triton kernels of the M-GRPO trainer, installed as `mgrpo_kernels` (see setup.py for why not `kernels`).

- fused_logprob_entropy: token log-probs and entropies from hidden states and lm_head, no [T, V] logits.
- momentum_int8: AdamW step fused with the 8-bit momentum (EMA) update, one launch over all tensors.
"""
