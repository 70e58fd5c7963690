"""The policy's optimizer (optim.name): torch's AdamW, or bitsandbytes' 8-bit AdamW for one-GPU memory.

    adamw            torch.optim.AdamW (fused on CUDA), fp32 moments: 8 bytes per parameter
    adamw8bit        bitsandbytes.optim.AdamW8bit: blockwise 8-bit moments, ~2 bytes per parameter (tensors
                     under 4096 elements keep fp32 moments, as bitsandbytes does)
    paged_adamw8bit  the same in CUDA managed memory that pages to the host under pressure (vLLM's
                     free-memory accounting does not see it: leave headroom)

The master weights stay fp32 whichever is chosen (at lr 1e-6 a bf16 weight would not move). bitsandbytes takes
plain tensors only (its issue 1633: FSDP2's DTensors are not supported), so the 8-bit optimizer runs on each
rank's local shards: plain parameters that share the shards' storage, their gradients taken from the sharded
gradients at every step (after the trainer's clipping). Its state is per rank, checkpointed per rank.

A hook after each parameter's update (`after_update(index, before, after)`) lets the int8 momentum model,
which needs the optimizer's step dq = after - before, run its delta EMA with an optimizer that is not our
fused one (mgrpo/models/momentum_int8.py): one parameter is copied at a time, never the whole model.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch

from ..config import OptimConfig
from ..distributed import local_tensor
from ..errors import MgrpoError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


class OptimizerError(MgrpoError, ValueError):
    """The optimizer cannot be built as configured; the message names the setting."""


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def make_optimizer(params, cfg: OptimConfig, after_update: Optional[Callable] = None) -> torch.optim.Optimizer:
    """The optimizer optim.name names, over `params` (FSDP2 DTensors or plain tensors)."""
    if cfg.name == "adamw":
        if after_update is not None:
            raise OptimizerError("torch's AdamW has no per-parameter hook: the int8 momentum model fuses its "
                                 "update into its own AdamW kernel instead")
        return make_adamw(params, cfg)
    return make_adamw8bit(params, cfg, after_update)


def make_adamw(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def make_adamw8bit(params, cfg: OptimConfig, after_update: Optional[Callable] = None) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (optim.name adamw8bit or paged_adamw8bit) on the local shards of `params`."""
    if not bitsandbytes_available():
        raise OptimizerError(f"optim.name={cfg.name} needs bitsandbytes: pip install bitsandbytes "
                             "(or use optim.name=adamw)")
    import bitsandbytes as bnb
    base = bnb.optim.PagedAdamW8bit if cfg.name == "paged_adamw8bit" else bnb.optim.AdamW8bit

    class LocalShardAdamW8bit(base):
        """`base` on plain parameters that are the local shards of the trained ones (module docstring)."""
        per_rank_state = True

        def __init__(self, sources: list):
            self.sources = list(sources)
            self.locals = [torch.nn.Parameter(local_tensor(p.detach()), requires_grad=False) for p in self.sources]
            self.index_of = {id(p): i for i, p in enumerate(self.locals)}
            self.after_update = after_update
            super().__init__(self.locals, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
            # bitsandbytes allocates its state at the first step: do it now, so that memory reports count it
            # from the start and a checkpoint can be restored into it before any step
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if not self.state[p]:
                        self.init_state(group, p, gindex, pindex)

        def state_dict(self):
            # torch.distributed.checkpoint flattens nested dicts by the string of each key and loads them back
            # with string keys; torch's load_state_dict would keep "0" beside 0 as a second, unmapped entry
            state = super().state_dict()
            return {**state, "state": {str(k): v for k, v in state["state"].items()}}

        def load_state_dict(self, state: dict):
            super().load_state_dict({**state, "state": {int(k): v for k, v in state["state"].items()}})

        def zero_grad(self, set_to_none: bool = True):
            for p in self.sources:
                p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)
            super().zero_grad(set_to_none=set_to_none)

        @torch.no_grad()
        def step(self, closure=None):
            for source, shard in zip(self.sources, self.locals):
                shard.grad = None if source.grad is None else local_tensor(source.grad)
            try:
                return super().step(closure)
            finally:
                if self.after_update is not None:   # no gradient, no update: dq = 0 for the hook all the same
                    for i, shard in enumerate(self.locals):
                        if shard.grad is None:
                            self.after_update(i, shard.detach(), shard.detach())
                for shard in self.locals:
                    shard.grad = None

        def update_step(self, group, p, gindex, pindex):
            if self.after_update is None:
                return super().update_step(group, p, gindex, pindex)
            before = p.detach().clone()        # one parameter at a time
            super().update_step(group, p, gindex, pindex)
            self.after_update(self.index_of[id(p)], before, p.detach())

    return LocalShardAdamW8bit(params)
