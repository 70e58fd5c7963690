"""Attention over grouped rows (mgrpo/models/batching.py's grouped layout), block by block.

A grouped row holds one prompt and then its G responses. Every response attends to the prompt and to itself
(causally), nothing else: so instead of one attention over the whole row (T^2 scores, almost all masked), the
prompt attends to itself (P^2) and each response to the prompt and itself (R (P + R)). For the embedded
default (P ~ 90, G = 16 responses of R ~ 40) that is 6x fewer scores than the dense masked row.

It plugs into transformers as an attention implementation ("mgrpo_grouped", registered by `register` when a
model that uses it is built). The rows'
index tensors arrive as the keyword `grouped_rows`, which transformers passes from the model's forward down to
every attention call; without it (padded or packed micro-batches) the call is plain sdpa.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "mgrpo_grouped"


@dataclass
class GroupedRows:
    """Where each block lives in the rows (R rows of T positions, S responses in all), as flat positions
    (row * T + position) so that the blocks are gathered with index_select (whose backward is index_add)."""
    prompt_flat: torch.Tensor      # [R * P] each row's prompt tokens (padded past a prompt's end)
    prompt_valid: torch.Tensor     # [R, P] bool
    response_row: torch.Tensor     # [S] the row of each response
    response_flat: torch.Tensor    # [S * L] each response's tokens (padded past its end)
    response_valid: torch.Tensor   # [S, L] bool
    inverse: torch.Tensor          # [R * T] where each row position's output is in cat(prompts, responses, zero)

    def to(self, device) -> "GroupedRows":
        return GroupedRows(*(t.to(device) for t in (self.prompt_flat, self.prompt_valid, self.response_row,
                                                     self.response_flat, self.response_valid, self.inverse)))


def _block_mask(key_valid: torch.Tensor, query_len: int, causal_from: int) -> torch.Tensor:
    """[n, 1, L, K] bool: key j visible from query i if the key is valid and j <= causal_from + i; every query
    sees at least its own position, so no row of scores is empty (an all-masked row would give NaN)."""
    n, K = key_valid.shape
    i = torch.arange(query_len, device=key_valid.device)[:, None]
    j = torch.arange(K, device=key_valid.device)[None, :]
    visible = key_valid[:, None, :] & (j <= causal_from + i)[None]
    visible |= (j == causal_from + i)[None]
    return visible[:, None]


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      grouped_rows: GroupedRows = None, **kwargs):
    """query [R, H, T, d], key/value [R, KV, T, d] -> ([R, T, H, d], None), as transformers' attention functions."""
    if grouped_rows is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    g = grouped_rows
    R, H, T, d = query.shape
    KV = key.shape[1]
    P, L = g.prompt_valid.shape[1], g.response_valid.shape[1]
    S = g.response_row.shape[0]

    def blocks(x, flat, n, length):   # x [R, h, T, d] -> [n, h, length, d], gathered by flat position
        h = x.shape[1]
        tokens = x.transpose(1, 2).reshape(R * T, h, d)
        return tokens.index_select(0, flat).view(n, length, h, d).transpose(1, 2)

    q_p, k_p, v_p = blocks(query, g.prompt_flat, R, P), blocks(key, g.prompt_flat, R, P), blocks(value, g.prompt_flat, R, P)
    q_r, k_r, v_r = (blocks(query, g.response_flat, S, L), blocks(key, g.response_flat, S, L),
                     blocks(value, g.response_flat, S, L))
    keys = torch.cat([k_p.index_select(0, g.response_row), k_r], dim=2)                        # [S, KV, P + L, d]
    values = torch.cat([v_p.index_select(0, g.response_row), v_r], dim=2)
    gqa = {"enable_gqa": True} if KV != H else {}
    out_p = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=_block_mask(g.prompt_valid, P, 0), scale=scaling,
                                           **gqa)                                               # [R, H, P, d]
    valid = torch.cat([g.prompt_valid.index_select(0, g.response_row), g.response_valid], dim=1)   # [S, P + L]
    out_r = F.scaled_dot_product_attention(q_r, keys, values, attn_mask=_block_mask(valid, L, P), scale=scaling,
                                           **gqa)                                               # [S, H, L, d]
    # back to the rows' positions: every position takes its block's output, padding the trailing zero
    flat = torch.cat([out_p.transpose(1, 2).reshape(R * P, H, d), out_r.transpose(1, 2).reshape(S * L, H, d),
                      query.new_zeros((1, H, d))])
    return flat.index_select(0, g.inverse).view(R, T, H, d), None


def register() -> str:
    """Make "mgrpo_grouped" a transformers attention implementation (masks built as for sdpa), once per process,
    when a model that uses it is built (not at import: registering is a process-wide effect); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
