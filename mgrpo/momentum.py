"""The momentum model theta_k: the exponential moving average of the policy, and the seam its storage plugs into.

    optimizer = momentum.make_optimizer(policy_params, optim_cfg)   # the optimizer the trainer steps
    optimizer.step(); momentum.update()                              # theta_k <- m theta_k + (1 - m) theta_q
    engine.push_weights(momentum.named_weights(dtype))              # streamed, tensor by tensor

Two storages, selected by algorithm.momentum_dtype:
- fp32: a full-precision copy updated by torch._foreach_lerp_ (the reference; 4 bytes per parameter).
- int8: the delta d = theta_k - theta_q in 8 bits with per-block scales and stochastic rounding, updated
  inside a fused AdamW kernel as d <- m (d - dq) (1.016 bytes per parameter; see mgrpo_kernels.momentum_int8).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import torch

from .algorithm import momentum_update_
from .config import OptimConfig


def make_adamw(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused or None)


class MomentumModel(ABC):
    def __init__(self, policy: torch.nn.Module, m: float):
        self.m = m
        self.names = [name for name, _ in policy.named_parameters()]
        self.policy_params = [p for _, p in policy.named_parameters()]

    def make_optimizer(self, params, cfg: OptimConfig) -> torch.optim.Optimizer:
        """The optimizer of the policy; a storage that fuses its update into the optimizer returns its own."""
        return make_adamw(params, cfg)

    @abstractmethod
    def update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q; called after every optimizer step."""

    @abstractmethod
    def named_weights(self, dtype: torch.dtype) -> Iterator:
        """(name, tensor) of theta_k in `dtype`, one tensor at a time (never a second full model in memory)."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abstractmethod
    def bytes_per_parameter(self) -> float: ...


class FP32Momentum(MomentumModel):
    """theta_k as an fp32 copy of every parameter; the reference the 8-bit storage is measured against."""

    def __init__(self, policy: torch.nn.Module, m: float):
        super().__init__(policy, m)
        self.weights = [p.detach().float().clone() for p in self.policy_params]

    def update(self) -> None:
        momentum_update_(self.weights, self.policy_params, self.m)

    def named_weights(self, dtype: torch.dtype) -> Iterator:
        for name, w in zip(self.names, self.weights):
            yield name, w.to(dtype)

    def state_dict(self) -> dict:
        return {"kind": "fp32", "weights": dict(zip(self.names, self.weights))}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "fp32":
            raise ValueError(f"checkpoint holds a {state.get('kind')} momentum model; this run uses fp32 "
                             "(set algorithm.momentum_dtype to match the checkpoint)")
        for name, w in zip(self.names, self.weights):
            w.copy_(state["weights"][name])

    def bytes_per_parameter(self) -> float:
        return 4.0


def make_momentum(kind: str, policy: torch.nn.Module, m: float) -> MomentumModel:
    if kind == "fp32":
        return FP32Momentum(policy, m)
    if kind == "int8":
        from .momentum_int8 import Int8DeltaMomentum
        return Int8DeltaMomentum(policy, m)
    raise ValueError(f"algorithm.momentum_dtype={kind!r}: use fp32 or int8")
