"""Token log-probs and entropies of sequences under a causal LM: the one module the trainer uses for both.

The model's backbone gives hidden states; the lm_head is applied inside `logprob_entropy`, which with
impl="fused" is the Triton kernel that never forms the [tokens, vocab] logits (mgrpo_kernels) and with
impl="torch" the plain-PyTorch reference. Only the micro-batch's target tokens are computed.
"""
from __future__ import annotations

from typing import Optional

import torch
from mgrpo_kernels.fused_logprob_entropy import logprob_entropy, triton_can_run

from .batching import MicroBatch


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

    def forward(self, batch: MicroBatch, temperature: float, impl: str) -> tuple:
        """One micro-batch (mgrpo.batching: padded, packed or grouped rows) -> logprob [N], entropy [N] (fp32)
        of its N target tokens, each predicted from the hidden state at its `predictor` index, at the
        sampling temperature."""
        backbone = getattr(self.causal_lm, self.causal_lm.base_model_prefix)
        head_weight = self.causal_lm.get_output_embeddings().weight                           # [V, H], full here
        attention = batch.attention
        if attention is not None and attention.dim() == 4 and self.causal_lm.config._attn_implementation == "eager":
            # eager attention adds its mask to the scores: a boolean "may attend" becomes 0 / -inf-like
            dtype = self.compute_dtype or head_weight.dtype
            attention = torch.zeros(attention.shape, dtype=dtype, device=attention.device).masked_fill_(
                ~attention, torch.finfo(dtype).min)
        # use_cache=False: a scoring forward never decodes (and a cache would turn off transformers' handling of
        # packed rows by position ids)
        extra = {} if batch.grouped is None else {"grouped_rows": batch.grouped}   # read by grouped_attention
        hidden = backbone(input_ids=batch.input_ids, attention_mask=attention, position_ids=batch.position_ids,
                          use_cache=False, **extra).last_hidden_state                         # [R, T, H]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predictor)      # [N, H]
        if self.compute_dtype is not None:
            hidden, head_weight = hidden.to(self.compute_dtype), head_weight.to(self.compute_dtype)
        logprob, entropy = logprob_entropy(hidden, head_weight, batch.targets, temperature, impl=impl)   # [N]
        # fresh tensors, not views: FSDP2 hangs its pre-backward hook on a root module's outputs
        return logprob.clone(), entropy.clone()


def score_padded(scorer, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                 temperature: float, impl: str) -> tuple:
    """[B, L] tensors -> logprob [B, L], entropy [B, L] (0 off target): one padded micro-batch through
    `scorer`'s forward (tests and tools; the trainer builds its micro-batches with mgrpo.batching)."""
    rows, cols = target_mask.nonzero(as_tuple=True)
    keep = cols > 0
    rows, cols = rows[keep], cols[keep]
    width = input_ids.shape[1]
    batch = MicroBatch(input_ids, torch.arange(width, device=input_ids.device).expand_as(input_ids), attention_mask,
                       rows * width + cols - 1, input_ids[rows, cols], rows, cols)
    logprob, entropy = scorer(batch, temperature, impl)
    out_lp = torch.zeros(input_ids.shape, dtype=logprob.dtype, device=logprob.device).index_put((rows, cols), logprob)
    out_ent = torch.zeros(input_ids.shape, dtype=entropy.dtype, device=entropy.device).index_put((rows, cols), entropy)
    return out_lp, out_ent
