"""Token log-probs and entropies of sequences under a causal LM: the one module the trainer uses for both.

The model's backbone gives hidden states; the lm_head is applied inside `logprob_entropy`, which with
impl="fused" is the Triton kernel that never forms the [tokens, vocab] logits (mgrpo_kernels) and with
impl="torch" the plain-PyTorch reference. Only positions in `target_mask` are computed.
"""
from __future__ import annotations

from typing import Optional

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


class TokenScorer(torch.nn.Module):
    """A causal LM whose forward returns token log-probs and entropies instead of logits.

    It exists for FSDP2: the root FSDP module unshards its own parameters (the embedding, which is the tied
    lm_head, and the final norm) only inside its forward. So the whole computation, backbone and head, runs
    in this module's forward, and this module is the root that `fully_shard` wraps last: inside, the kernel
    reads the full head weight, and the head's gradient flows back through FSDP's hooks to the sharded
    parameter. Calling the inner backbone and reading `get_output_embeddings().weight` from outside a root
    forward would see a shard. Single-process training uses the same module unsharded.
    """

    def __init__(self, causal_lm: torch.nn.Module, compute_dtype: Optional[torch.dtype] = None):
        """compute_dtype: the head's dtype (bf16 in mixed precision): hidden states and the head weight are cast
        to it before the kernel (no-ops under FSDP2's bf16 parameters), so the head always runs in the dtype the
        run computes in, whatever a backbone hands over. None: as they come."""
        super().__init__()
        self.causal_lm = causal_lm
        self.compute_dtype = compute_dtype

    @property
    def decoder_layers(self):
        return getattr(self.causal_lm, self.causal_lm.base_model_prefix).layers

    def hf_named_parameters(self):
        """(Hugging Face name, parameter): the names the engines, exports and momentum model use."""
        return self.causal_lm.named_parameters()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                temperature: float, impl: str) -> tuple:
        """input_ids, attention_mask, target_mask [B, L] -> logprob [B, L], entropy [B, L] (fp32).

        Entry t is for predicting token t from tokens < t, at the sampling temperature; 0 where target_mask
        is False (and always at t = 0).
        """
        backbone = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        head_weight = self.causal_lm.get_output_embeddings().weight                           # [V, H], full here
        # use_cache=False: a scoring forward never decodes, a KV cache would only hold memory
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state                                  # [B, L, H]
        if self.compute_dtype is not None:
            hidden, head_weight = hidden.to(self.compute_dtype), head_weight.to(self.compute_dtype)
        logprob, entropy = logprob_entropy(hidden[:, :-1], head_weight, input_ids[:, 1:], temperature,
                                           mask=target_mask[:, 1:].bool(), impl=impl)      # [B, L-1]
        pad = logprob.new_zeros(input_ids.shape[0], 1)
        return torch.cat([pad, logprob], dim=1), torch.cat([pad, entropy], dim=1)
