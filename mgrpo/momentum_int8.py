"""The 8-bit momentum model: the delta to the policy in int8, updated inside a fused AdamW kernel.

The optimizer (mgrpo_kernels.momentum_int8.FusedAdamWInt8Momentum) owns the codes and scales next to the
Adam moments, because the delta's update d <- m (d - dq) needs the optimizer's step dq: so checkpointing the
optimizer checkpoints the momentum model too, and `update()` has nothing left to do.
"""
from __future__ import annotations

from typing import Iterator

import torch

from mgrpo_kernels.momentum_int8 import FusedAdamWInt8Momentum

from .config import OptimConfig
from .momentum import MomentumModel


class Int8DeltaMomentum(MomentumModel):
    optimizer_holds_state = True

    def __init__(self, named_params: list, m: float, seed: int = 0):
        super().__init__(named_params, m)
        self.seed = seed
        self.optimizer = None

    def make_optimizer(self, params, cfg: OptimConfig) -> torch.optim.Optimizer:
        if len(params) != len(self.policy_params):
            raise ValueError("the int8 momentum model needs every policy parameter to be trainable")
        self.optimizer = FusedAdamWInt8Momentum(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                                weight_decay=cfg.weight_decay, momentum=self.m, seed=self.seed)
        return self.optimizer

    def update(self) -> None:
        """Done inside the optimizer's fused step."""

    def local_weights(self, dtype: torch.dtype) -> Iterator:
        return self.optimizer.momentum_weights(dtype)

    def state_dict(self) -> dict:
        return {"kind": "int8", "note": "codes and scales are checkpointed with the optimizer state"}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "int8":
            raise ValueError(f"checkpoint holds a {state.get('kind')} momentum model; this run uses int8 "
                             "(set algorithm.momentum_dtype to match the checkpoint)")

    def state_bytes(self) -> int:
        return self.optimizer.momentum_state_bytes()
