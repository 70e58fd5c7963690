"""Resuming on another world size: the per-rank parts of a checkpoint laid out for this run's shards.

What FSDP2 shards as DTensors (policy, KL reference, the fp32 momentum model, torch's AdamW moments) DCP reshards
by itself. What is kept per rank is state of each rank's local shards, flattened: the fused int8 AdamW's moments,
the int8 momentum delta's codes and per-block scales, bitsandbytes' 8-bit moments and absmaxes. Every rank
records where its shards lie in each full (flattened) parameter (`shard_layout`, saved with the checkpoint), so
a rank of the new run knows, for each parameter, which old ranks held the elements it now holds:

    per-element state (fp32 moments, step counters)   copied element by element: exact
    blockwise 8-bit state (codes + a scale per block)  a new block that is exactly an old block (same elements):
                                                       copied, codes and scale, exact; a block that now straddles
                                                       old blocks (shard boundaries moved): dequantized and
                                                       quantized again to the nearest code, an error of at most
                                                       half a code step (the int8 delta's own update rounds by up
                                                       to a whole step every step)

Only the old ranks whose shards overlap this rank's are read. The generators' states go to the rank of the same
number (a new rank beyond the old world keeps its own seeded state: sampling seeds come from (seed, step, rank)
either way, mgrpo/engines/base.py).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from mgrpo_kernels.momentum_int8 import CODE_MAX, QUANT_BLOCK

from ..distributed import is_dtensor, local_tensor

BNB_BLOCK = 256           # bitsandbytes' 8-bit optimizer state: one absmax per 256 elements


def shard_layout(params: list) -> list:
    """[[start, numel], ...]: where this rank's local shard of each parameter lies in the flattened full tensor."""
    layout = []
    for p in params:
        local = local_tensor(p.detach())
        if not is_dtensor(p):
            layout.append([0, local.numel()])
            continue
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
        layout.append([(offset[0] if offset else 0) * row, local.numel()])
    return layout


def overlapping_ranks(mine: list, old_layouts: dict) -> list:
    """The old ranks holding any element this rank now holds."""
    def overlaps(a, b):
        return a[1] > 0 and b[1] > 0 and a[0] < b[0] + b[1] and b[0] < a[0] + a[1]
    return sorted(r for r, layout in old_layouts.items() if any(overlaps(m, o) for m, o in zip(mine, layout)))


def _pieces(start: int, numel: int, old: dict, index: int):
    """(old rank, old local slice, new local slice) covering [start, start + numel) of parameter `index`."""
    for rank, layout in old.items():
        o_start, o_numel = layout[index]
        a, b = max(start, o_start), min(start + numel, o_start + o_numel)
        if a < b:
            yield rank, slice(a - o_start, b - o_start), slice(a - start, b - start)


def reshard_elements(template: torch.Tensor, index: int, mine: list, old_layouts: dict, old: dict) -> torch.Tensor:
    """A per-element state tensor (any shape, numel = the local shard's) assembled from the old ranks' pieces."""
    out = torch.empty(template.numel(), dtype=template.dtype)
    start, numel = mine[index]
    for rank, src, dst in _pieces(start, numel, old_layouts, index):
        out[dst] = old[rank].reshape(-1)[src].to(template.dtype)
    return out.view(template.shape)


def reshard_blocks(index: int, mine: list, old_layouts: dict, old_codes: dict, old_scales: dict, block: int,
                   dequantize: Callable, quantize: Callable) -> tuple:
    """Blockwise-quantized state (codes per element, one scale per `block` elements of the local shard) for this
    rank's shard: old blocks that are whole new blocks copied, the rest requantized (module docstring)."""
    start, numel = mine[index]
    values = torch.empty(numel, dtype=torch.float32)
    codes = torch.empty(numel, dtype=next(iter(old_codes.values())).dtype)
    scale_of = torch.empty(numel, dtype=torch.float32)
    block_id = torch.empty(numel, dtype=torch.int64)        # which old block (rank, block) each element was in
    block_len = torch.empty(numel, dtype=torch.int64)       # and that block's length
    for rank, src, dst in _pieces(start, numel, old_layouts, index):
        old_n = old_layouts[rank][index][1]
        values[dst] = dequantize(old_codes[rank], old_scales[rank])[src]
        codes[dst] = old_codes[rank].reshape(-1)[src]
        blocks = torch.arange(src.start, src.stop) // block
        scale_of[dst] = old_scales[rank].reshape(-1)[blocks]
        block_id[dst] = rank * (1 << 40) + blocks
        block_len[dst] = torch.clamp(old_n - blocks * block, max=block)
    new_codes, new_scales = quantize(values)
    n_blocks = math.ceil(numel / block)
    if numel:
        first = torch.arange(n_blocks) * block
        length = torch.clamp(numel - first, max=block)
        padded = torch.full((n_blocks * block,), -1, dtype=torch.int64)
        padded[:numel] = block_id
        same = (padded.view(n_blocks, block) == block_id[first][:, None]) | (padded.view(n_blocks, block) == -1)
        whole = same.all(1) & (block_len[first] == length)
        for b in torch.nonzero(whole).flatten().tolist():
            span = slice(b * block, b * block + int(length[b]))
            new_codes[span] = codes[span]
            new_scales[b] = scale_of[b * block]
    return new_codes, new_scales


# ---------------------------------------------------------------------------------------------------------
# The quantizers of each blockwise state

def int8_delta_nearest(values: torch.Tensor) -> tuple:
    """The int8 momentum delta's format (mgrpo_kernels.momentum_int8: symmetric codes, scale = absmax / 127 per
    QUANT_BLOCK), rounded to the nearest code (requantizing is not an update: no stochastic rounding)."""
    n = values.numel()
    blocks = math.ceil(n / QUANT_BLOCK)
    padded = torch.zeros(blocks * QUANT_BLOCK, dtype=torch.float32)
    padded[:n] = values
    padded = padded.view(blocks, QUANT_BLOCK)
    scales = padded.abs().amax(1) / CODE_MAX
    inv = torch.where(scales > 0, 1.0 / scales.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(scales))
    codes = torch.round(padded * inv[:, None]).clamp(-CODE_MAX, CODE_MAX)
    return codes.reshape(-1)[:n].to(torch.int8), scales


def int8_delta_values(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    from mgrpo_kernels.momentum_int8 import dequantize_delta
    return dequantize_delta(codes.reshape(-1), scales.reshape(-1))


def bnb_codec(qmap: torch.Tensor):
    """bitsandbytes' blockwise dynamic 8-bit format with this code map: its own (de)quantization."""
    import bitsandbytes.functional as F

    def values(codes, absmax):
        return qmap[codes.reshape(-1).long()] * absmax.reshape(-1).repeat_interleave(BNB_BLOCK)[:codes.numel()]

    def quantize(x):
        codes, state = F.quantize_blockwise(x, code=qmap, blocksize=BNB_BLOCK)
        return codes, state.absmax.float()
    return values, quantize


# ---------------------------------------------------------------------------------------------------------
# A rank's state from a checkpoint of another world size

def flatten(tree, prefix: str = "") -> dict:
    """{dotted path: tensor} of a nested dict of tensors (DCP's own key scheme)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def reshard_rank_state(mine_tensors: dict, layout: list, old_layouts: dict, old: dict, src) -> dict:
    """This rank's per-rank tensors ({dotted path: template tensor}) from the old ranks' ({rank: {path: tensor}})."""
    out = {}
    any_rank = next(iter(old))
    for path, template in mine_tensors.items():
        parts = path.split(".")
        if parts[0] == "rng":
            if src is not None and path in old[src]:
                out[path] = old[src][path]
            continue
        if path.endswith(("scales", "absmax1", "absmax2", "qmap1", "qmap2")) or ".scales." in path:
            continue                                            # made with their codes below
        if parts[:2] == ["momentum", "codes"]:                  # the int8 delta held by the momentum model
            i = int(parts[2])
            out[path], out[f"momentum.scales.{i}"] = reshard_blocks(
                i, layout, old_layouts, {r: old[r][path] for r in old},
                {r: old[r][f"momentum.scales.{i}"] for r in old}, QUANT_BLOCK, int8_delta_values, int8_delta_nearest)
            continue
        if parts[0] != "optimizer" or len(parts) < 4 or parts[1] != "state":
            out[path] = old[any_rank][path]                     # scalars and maps, the same on every rank
            continue
        # optimizer.state.<i>.<name>, or bitsandbytes' optimizer.state.<i>.__bnb_optimizer_quant_state__.<name>
        i, name, base = int(parts[2]), parts[-1], ".".join(parts[:-1])
        if name == "codes":                                     # the fused AdamW's int8 delta
            out[path], out[f"{base}.scales"] = reshard_blocks(
                i, layout, old_layouts, {r: old[r][path] for r in old}, {r: old[r][f"{base}.scales"] for r in old},
                QUANT_BLOCK, int8_delta_values, int8_delta_nearest)
        elif name in ("state1", "state2"):                      # bitsandbytes' moments: 8-bit, or fp32 when small
            out.update(_bnb_moment(template, path, base, name[-1], i, layout, old_layouts, old, mine_tensors))
        elif template.numel() == layout[i][1] and template.dim() > 0:
            out[path] = reshard_elements(template, i, layout, old_layouts, {r: old[r][path] for r in old})
        else:
            out[path] = old[any_rank][path]
    for path, tensor in out.items():      # a state that was not resharded would load into the wrong elements
        want = mine_tensors.get(path)
        if want is not None and tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"{path}: {tuple(tensor.shape)} from the checkpoint, {tuple(want.shape)} on this rank")
    return out


def _bnb_moment(template, path, base, k, i, layout, old_layouts, old, mine_tensors) -> dict:
    """bitsandbytes keeps a shard's moment in 8 bits (with absmax{k}, qmap{k}) or, under 4096 elements, in fp32:
    a shard that crossed that size on the new world size changes format."""
    absmax, qmap = f"{base}.absmax{k}", f"{base}.qmap{k}"
    code_map = next((old[r][qmap] for r in old if qmap in old[r]), mine_tensors.get(qmap))
    if code_map is None:             # fp32 before and fp32 now (the format follows the shard's size)
        return {path: reshard_elements(template, i, layout, old_layouts, {r: old[r][path] for r in old})}
    values, quantize = bnb_codec(code_map)
    as_values = {r: (values(old[r][path], old[r][absmax]) if qmap in old[r] else old[r][path].reshape(-1).float())
                 for r in old}
    if template.dtype != torch.uint8:                           # 8-bit before, fp32 now
        return {path: reshard_elements(template, i, layout, old_layouts, as_values)}
    if all(qmap in old[r] for r in old):
        codes, scales = reshard_blocks(i, layout, old_layouts, {r: old[r][path] for r in old},
                                       {r: old[r][absmax] for r in old}, BNB_BLOCK, values, quantize)
    else:                                                       # some old shards were fp32: quantize it all
        codes, scales = quantize(reshard_elements(torch.empty(layout[i][1]), i, layout, old_layouts, as_values))
    return {path: codes.view(template.shape), absmax: scales, qmap: code_map}
