"""The 8-bit momentum model: the delta to the policy in int8, updated with the optimizer's step.

d = theta_k - theta_q in int8 codes with one fp32 scale per 256 elements; after every step, with the step
dq = theta_q' - theta_q, d <- m (d - dq) (mgrpo_kernels.momentum_int8). Two ways to get dq:
- optim.name=adamw: inside our fused AdamW kernel (FusedAdamWInt8Momentum), which holds the codes and scales
  next to the Adam moments: one pass over memory, and checkpointing the optimizer checkpoints them too;
- an 8-bit AdamW (bitsandbytes): its per-parameter hook hands over each parameter before and after its
  update, and a delta-only kernel updates that parameter's codes and scales, held here.
Either way the state is blocks of this rank's local shards: per rank.
"""
from __future__ import annotations

from typing import Iterator

import torch

from mgrpo_kernels.momentum_int8 import (FusedAdamWInt8Momentum, launch_delta_ema, momentum_weight,
                                         new_delta_state)

from .config import OptimConfig
from .distributed import local_tensor
from .momentum import MomentumModel
from .optimizers import make_adamw8bit


class Int8DeltaMomentum(MomentumModel):
    per_rank_state = True

    def __init__(self, named_params: list, m: float, seed: int = 0):
        super().__init__(named_params, m)
        self.seed = seed
        self.optimizer = None
        self.fused = True           # optim.name=adamw: the codes and scales live in the fused optimizer
        self.codes: list = []       # with an 8-bit optimizer: per parameter, int8 [numel] and fp32 [blocks]
        self.scales: list = []
        self.steps = 0

    @property
    def optimizer_holds_state(self) -> bool:
        return self.fused

    def make_optimizer(self, params, cfg: OptimConfig) -> torch.optim.Optimizer:
        if len(params) != len(self.policy_params):
            raise ValueError("the int8 momentum model needs every policy parameter to be trainable")
        self.fused = cfg.name == "adamw"
        if self.fused:
            self.optimizer = FusedAdamWInt8Momentum(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                                    weight_decay=cfg.weight_decay, momentum=self.m, seed=self.seed)
        else:
            for p in params:
                codes, scales = new_delta_state(local_tensor(p.detach()))
                self.codes.append(codes)
                self.scales.append(scales)
            self.optimizer = make_adamw8bit(params, cfg, after_update=self._after_update)
        return self.optimizer

    def _after_update(self, index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        if index == 0:
            self.steps += 1
        launch_delta_ema(before, after, self.codes[index], self.scales[index], momentum=self.m,
                         seed=(self.seed * 1_000_003 + self.steps) % (2**31 - 1), tensor_id=index)

    def update(self) -> None:
        """Done with the optimizer's step (fused, or in its per-parameter hook)."""

    def local_weights(self, dtype: torch.dtype) -> Iterator:
        if self.optimizer_holds_state:
            return self.optimizer.momentum_weights(dtype)
        return (momentum_weight(local_tensor(p.detach()), c, s, dtype)
                for p, c, s in zip(self.policy_params, self.codes, self.scales))

    def state_dict(self) -> dict:
        if self.optimizer_holds_state:
            return {"kind": "int8", "note": "codes and scales are checkpointed with the optimizer state"}
        return {"kind": "int8", "codes": self.codes, "scales": self.scales, "steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "int8":
            raise ValueError(f"checkpoint holds a {state.get('kind')} momentum model; this run uses int8 "
                             "(set algorithm.momentum_dtype to match the checkpoint)")
        if not self.optimizer_holds_state:
            for mine, saved in zip(self.codes + self.scales, state["codes"] + state["scales"]):
                mine.copy_(saved)
            self.steps = int(state["steps"])

    def state_bytes(self) -> int:
        if self.optimizer_holds_state:
            return self.optimizer.momentum_state_bytes()
        return sum(c.numel() + 4 * s.numel() for c, s in zip(self.codes, self.scales))
