"""The momentum model theta_k: the exponential moving average of the policy, and the seam its storage plugs into.

    optimizer = momentum.make_optimizer(policy_params, optim_cfg)   # the optimizer the trainer steps
    optimizer.step(); momentum.update()                              # theta_k <- m theta_k + (1 - m) theta_q
    engine.push_weights(momentum.named_weights(dtype))              # streamed (gathered) tensor by tensor

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
from .distributed import full_tensor, like_param, local_tensor, tensor_bytes
from .optimizers import make_optimizer


class MomentumModel(ABC):
    """theta_k for `named_params` ((Hugging Face name, parameter) pairs; FSDP2 DTensors or plain tensors).

    Under FSDP2 everything lives on this rank's local shards and updates without communication; only
    `named_weights` gathers, one full tensor at a time, to feed the engines.
    """

    optimizer_holds_state: bool = False
    """True when this storage lives in the optimizer's state (the int8 delta's codes and scales in the fused
    AdamW): it is then checkpointed with the optimizer, and counted as the momentum model's, not the optimizer's."""
    per_rank_state: bool = False
    """True when its state is blocks of each rank's shards (int8): checkpointed per rank, not as shards."""

    def __init__(self, named_params: list, m: float):
        self.m = m
        self.names = [name for name, _ in named_params]
        self.policy_params = [p for _, p in named_params]

    def make_optimizer(self, params, cfg: OptimConfig) -> torch.optim.Optimizer:
        """The optimizer of the policy (optim.name); a storage that needs the optimizer's step builds its own."""
        return make_optimizer(params, cfg)

    @abstractmethod
    def update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q; called after every optimizer step."""

    @abstractmethod
    def local_weights(self, dtype: torch.dtype) -> Iterator:
        """theta_k's local shards (whole tensors on one process) in `dtype`, one at a time, in names' order."""

    def named_weights(self, dtype: torch.dtype) -> Iterator:
        """(name, full tensor) of theta_k in `dtype`, one tensor at a time (never a second full model in
        memory); under FSDP2 a collective per tensor, cast before the gather."""
        for name, p, local in zip(self.names, self.policy_params, self.local_weights(dtype)):
            yield name, full_tensor(like_param(local, p))

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abstractmethod
    def state_bytes(self) -> int:
        """Bytes of momentum state this rank holds."""

    def bytes_per_parameter(self) -> float:
        return self.state_bytes() / max(sum(local_tensor(p).numel() for p in self.policy_params), 1)


class FP32Momentum(MomentumModel):
    """theta_k as an fp32 copy of every (local shard of every) parameter; the reference the 8-bit storage is
    measured against."""

    def __init__(self, named_params: list, m: float):
        super().__init__(named_params, m)
        self.weights = [local_tensor(p.detach()).float().clone() for p in self.policy_params]

    def update(self) -> None:
        momentum_update_(self.weights, [local_tensor(p.detach()) for p in self.policy_params], self.m)

    def local_weights(self, dtype: torch.dtype) -> Iterator:
        for w in self.weights:
            yield w.to(dtype)

    def state_dict(self) -> dict:
        # laid out like the parameters (DTensors under FSDP2), so the checkpoint is sharded like them
        return {"kind": "fp32", "weights": {n: like_param(w, p) for n, w, p in zip(self.names, self.weights,
                                                                                 self.policy_params)}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "fp32":
            raise ValueError(f"checkpoint holds a {state.get('kind')} momentum model; this run uses fp32 "
                             "(set algorithm.momentum_dtype to match the checkpoint)")
        for name, w in zip(self.names, self.weights):
            w.copy_(local_tensor(state["weights"][name]))

    def state_bytes(self) -> int:
        return tensor_bytes(self.weights)


def make_momentum(kind: str, named_params: list, m: float, seed: int = 0) -> MomentumModel:
    """named_params: the policy's (Hugging Face name, parameter) pairs; seed: of the int8 storage's stochastic
    rounding (per rank, so the shards of one tensor round independently)."""
    if kind == "fp32":
        return FP32Momentum(named_params, m)
    if kind == "int8":
        from .momentum_int8 import Int8DeltaMomentum
        return Int8DeltaMomentum(named_params, m, seed=seed)
    raise ValueError(f"algorithm.momentum_dtype={kind!r}: use fp32 or int8")
