"""What a checkpoint restores, as full tensors whatever the world size: for the cross-size resume tests.

`full_state` gathers the policy, the momentum model (as weights, through the storage's own decoder in
tests/wiring.py, not the momentum model's accessors) and the optimizer's moments (as values: bitsandbytes' 8-bit
codes decoded with their code map and absmax) from every rank's local shards, placed by where each shard lies in
its full tensor (its DTensor offset), independently of mgrpo/storage/reshard.py."""
import math

import torch

from mgrpo.distributed import full_tensor, is_dtensor, local_tensor
from tests.wiring import momentum_local


def shard_start(p) -> int:
    if not is_dtensor(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0] * (math.prod(p.shape[1:]) if p.dim() > 1 else 1)


def moments(optimizer, i: int, p) -> dict:
    """Parameter i's optimizer moments as fp32 values of its local shard."""
    if hasattr(optimizer, "locals"):                         # bitsandbytes on local shards (mgrpo/models/optimizers.py)
        state = optimizer.state[optimizer.locals[i]]
        out = {}
        for k in ("1", "2"):
            s = state[f"state{k}"]
            if s.dtype == torch.uint8:
                absmax = state[f"absmax{k}"].repeat_interleave(256)[:s.numel()]
                out[f"moment{k}"] = state[f"qmap{k}"][s.reshape(-1).long()] * absmax
            else:
                out[f"moment{k}"] = s.reshape(-1).float()
        return out
    state = optimizer.state[p]
    return {"moment1": local_tensor(state["exp_avg"]).reshape(-1).float(),
            "moment2": local_tensor(state["exp_avg_sq"]).reshape(-1).float()}


def full_state(summary) -> dict:
    """{name: full tensor} of what a checkpoint restores (a collective: every rank calls it), on every rank."""
    models, dist = summary["models"], summary["dist"]
    optimizer = summary["parts"].optimization.optimizer
    out = {f"policy.{n}": full_tensor(p).detach().clone() for n, p in models.policy.hf_named_parameters()}
    params = models.params
    local = {}
    if models.momentum is not None:
        for n, p, w in zip(models.momentum.names, params, momentum_local(models.momentum)):
            local[f"momentum.{n}"] = (shard_start(p), w.reshape(-1))
    names = [n for n, _ in models.policy.hf_named_parameters()]
    for i, (n, p) in enumerate(zip(names, params)):
        for k, v in moments(optimizer, i, p).items():
            local[f"{k}.{n}"] = (shard_start(p), v)
    every = dist.all_gather_object(local)
    shapes = {n: tuple(p.shape) for n, p in zip(names, params)}
    for key in local:
        name = key.split(".", 1)[1]
        flat = torch.zeros(math.prod(shapes[name]))
        for part in every:
            start, values = part[key]
            flat[start:start + values.numel()] = values
        out[key] = flat.view(shapes[name])
    return out


def max_half_gap(signed: bool) -> float:
    """Half the widest gap between neighbouring values of bitsandbytes' dynamic 8-bit map (of absmax 1)."""
    import bitsandbytes.functional as F
    values = F.create_dynamic_map(signed=signed).sort().values
    return float((values[1:] - values[:-1]).max()) / 2


def compare(restored: dict, saved: dict, momentum_int8: bool, optimizer_8bit: bool) -> list:
    """Mismatches between two full_state dicts: exact where the state is resharded element by element; for the
    int8 delta and bitsandbytes' moments, within half a code step (requantized blocks; a bitsandbytes shard that
    crossed its 4096-element threshold changes between fp32 and 8 bits)."""
    bad = []
    assert restored.keys() == saved.keys(), set(restored) ^ set(saved)
    for key, want in saved.items():
        got = restored[key]
        kind = key.split(".", 1)[0]
        if kind == "momentum" and momentum_int8:           # symmetric int8: code steps of absmax / 127
            step = (want - saved["policy." + key.split(".", 1)[1]]).abs().max() / 127
        elif kind.startswith("moment") and optimizer_8bit:  # bitsandbytes' dynamic map: its widest gap
            step = want.abs().max() * 2 * max_half_gap(signed=kind == "moment1")
        else:
            step = None
        if step is not None:
            if not torch.allclose(got, want, rtol=0, atol=float(step) * 0.51 + 1e-12):
                bad.append(f"{key}: {float((got - want).abs().max()):.3g} > half a code step {float(step) / 2:.3g}")
        elif not torch.equal(got, want):
            bad.append(f"{key}: differs by {float((got - want).abs().max()):.3g}")
    return bad
