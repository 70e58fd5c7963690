"""The momentum model theta_k: the exponential moving average of the policy, and the seam its storage plugs into.

    optimizer.step()
    if not momentum.updated_by_optimizer:
        momentum.update()                                            # theta_k <- m theta_k + (1 - m) theta_q
    engine.push_weights(momentum.named_weights(dtype))              # streamed (gathered) tensor by tensor

Two storages, chosen by mgrpo/build.py from algorithm.momentum_dtype:
- fp32 (here): a full-precision copy updated by torch._foreach_lerp_ after the step (the reference; 4 bytes
  per parameter).
- int8 (momentum_int8.py): the delta d = theta_k - theta_q in 8 bits with per-block scales and stochastic
  rounding, d <- m (d - dq) (1.016 bytes per parameter). It needs the step dq = theta_q' - theta_q, which only
  the optimizer's step has without a copy of the policy, so it is updated inside that step:
  updated_by_optimizer is then True and the loop's momentum stage is the optimizer step itself.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import torch

from ..algorithm import momentum_update_
from ..distributed import full_tensor, like_param, local_tensor, tensor_bytes


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
    updated_by_optimizer: bool = False
    """True when the optimizer's step itself moves theta_k (the int8 delta, which needs that step's dq): the loop
    then calls no `update`."""

    def __init__(self, named_params: list, m: float):
        self.m = m
        self.names = [name for name, _ in named_params]
        self.policy_params = [p for _, p in named_params]

    def update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q; called after every optimizer step (unless updated_by_optimizer)."""
        raise NotImplementedError(f"{type(self).__name__} is updated by the optimizer's step")

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
    def tensors(self) -> list:
        """The tensors this storage holds itself (none when they live in the optimizer's state)."""

    def state_bytes(self) -> int:
        """Bytes of momentum state this rank holds."""
        return tensor_bytes(self.tensors())

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

    def tensors(self) -> list:
        return list(self.weights)
