"""The 8-bit momentum model: the delta to the policy in int8, updated with the optimizer's step.

d = theta_k - theta_q in int8 codes with one fp32 scale per 256 elements; after every step, with the step
dq = theta_q' - theta_q, d <- m (d - dq) (mgrpo_kernels.momentum_int8). dq exists only inside the optimizer's
step (knowing it afterwards would take a copy of the policy), so the update happens there
(updated_by_optimizer), in one of two ways that mgrpo/build.py picks from optim.name:
- adamw: inside our fused AdamW kernel (FusedAdamWInt8Momentum), which holds the codes and scales next to the
  Adam moments: one pass over memory, and checkpointing the optimizer checkpoints them too (`in_optimizer`);
- an 8-bit AdamW (bitsandbytes): its per-parameter hook hands over each parameter before and after its
  update, and a delta-only kernel updates that parameter's codes and scales, held here (`with_own_state`).
Either way the state is blocks of this rank's local shards: per rank.
"""
from __future__ import annotations

from typing import Iterator

import torch
from mgrpo_kernels.momentum_int8 import FusedAdamWInt8Momentum, launch_delta_ema, momentum_weight, new_delta_state

from ..distributed import local_tensor
from .momentum import MomentumModel


class Int8DeltaMomentum(MomentumModel):
    per_rank_state = True
    updated_by_optimizer = True

    def __init__(self, named_params: list, m: float, seed: int = 0, fused_optimizer: FusedAdamWInt8Momentum = None):
        super().__init__(named_params, m)
        self.seed = seed
        self.fused_optimizer = fused_optimizer     # holds the codes and scales (optim.name=adamw)
        self.codes: list = []                       # else, per parameter: int8 [numel] and fp32 [blocks]
        self.scales: list = []
        self.steps = 0
        if fused_optimizer is None:
            for p in self.policy_params:
                codes, scales = new_delta_state(local_tensor(p.detach()))
                self.codes.append(codes)
                self.scales.append(scales)

    @classmethod
    def in_optimizer(cls, named_params: list, m: float, optimizer: FusedAdamWInt8Momentum) -> "Int8DeltaMomentum":
        """The delta held and updated by our fused AdamW (built with momentum=m over the same parameters)."""
        return cls(named_params, m, fused_optimizer=optimizer)

    @classmethod
    def with_own_state(cls, named_params: list, m: float, seed: int) -> "Int8DeltaMomentum":
        """The delta held here and updated by `after_update`, the hook of an optimizer that is not ours."""
        return cls(named_params, m, seed=seed)

    @property
    def optimizer_holds_state(self) -> bool:
        return self.fused_optimizer is not None

    def after_update(self, index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """The 8-bit optimizer's hook: parameter `index` went from `before` to `after` (local shards)."""
        if index == 0:
            self.steps += 1
        launch_delta_ema(before, after, self.codes[index], self.scales[index], momentum=self.m,
                         seed=(self.seed * 1_000_003 + self.steps) % (2**31 - 1), tensor_id=index)

    def local_weights(self, dtype: torch.dtype) -> Iterator:
        if self.optimizer_holds_state:
            return self.fused_optimizer.momentum_weights(dtype)
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

    def tensors(self) -> list:
        return self.codes + self.scales

    def state_bytes(self) -> int:
        if self.optimizer_holds_state:
            return self.fused_optimizer.momentum_state_bytes()
        return super().state_bytes()
