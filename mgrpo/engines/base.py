"""The rollout engine's interface: sample responses for token-id prompts from weights pushed in from memory.

    engine.push_weights(policy_named_tensors)      # never re-read from disk
    policy = engine.generate(prompts, SamplingParams(n=M, ...))
    engine.push_weights(momentum_named_tensors)
    momentum = engine.generate(prompts, SamplingParams(n=N, ...))

An engine holds one inference copy of the model; the trainer pushes the policy's and the momentum model's
weights into it in turn. `push_weights` must receive every parameter: a push that leaves one at its old value
is an error. Implementations: engines/hf.py (transformers' generate, CPU and GPU), engines/vllm.py (vLLM, sleep
mode on GPUs), engines/synthetic.py (no model: fixed-length responses, for memory and speed measurements);
mgrpo/build.py picks one from the config.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..errors import MgrpoError


@dataclass
class SamplingParams:
    n: int = 1
    """Responses per prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 64
    logprobs: bool = False
    """Also return each sampled token's log-prob (engines that can; the trainer computes its own and does
    not ask: vLLM's per-token log-prob objects cost Python time on every step)."""
    seed: Optional[int] = None
    """Same seed, same prompts, same weights: same responses. Engines that seed each request (vLLM on GPUs)
    give prompt i of a call the seed `seed + i * PROMPT_SEED_STRIDE`, and vLLM gives that request's j-th sample
    `+ j`; so two calls on the same prompts draw disjoint streams when the second's seed is offset by the
    first's n (see `sampling_seed`)."""


PROMPT_SEED_STRIDE = 1 << 16


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The first seed of a block of 2^32 for (run seed, step, rank): calls within a step offset it by less
    than PROMPT_SEED_STRIDE (the policy by 0, the momentum model by M), so no two streams overlap."""
    return (((seed * 1_000_003 + step) * 257 + rank) % (1 << 30)) << 32


@dataclass
class Completion:
    token_ids: list
    """Generated token ids, the final EOS included when generation stopped on it."""
    text: str
    """Decoded response without special tokens."""
    logprobs: Optional[list] = None
    """Log-prob of each sampled token under the sampling distribution (engines that report them)."""
    finished: bool = True
    """False when cut by max_new_tokens."""


class WeightPushError(RuntimeError):
    """A weight push did not cover the engine's parameters exactly."""


class RolloutEngine(ABC):
    weight_dtype: torch.dtype = torch.float32
    """dtype of the engine's weights: what pushes should send."""

    @abstractmethod
    def push_weights(self, named_tensors: Iterable) -> None:
        """Copy (hf_name, tensor) pairs into the engine's model, in place, from memory; all must be covered."""

    @abstractmethod
    def generate(self, prompts: list, params: SamplingParams) -> list:
        """prompts: list of token-id lists -> list (per prompt) of `params.n` Completions."""

    # Memory hand-off around rollouts (vLLM sleep mode); no-ops for engines that keep their memory.
    def wake_up(self) -> None:
        pass

    def sleep(self) -> None:
        pass


def check_push_coverage(pushed: set, expected: set, engine: str) -> None:
    missing, unknown = sorted(expected - pushed), sorted(pushed - expected)
    if missing or unknown:
        raise WeightPushError(
            f"{engine}: weight push mismatch: {len(missing)} parameter(s) not pushed {missing[:5]}, "
            f"{len(unknown)} unknown name(s) {unknown[:5]}. Every parameter must be pushed each time, "
            "or rollouts silently use stale weights.")


class EngineError(MgrpoError, RuntimeError):
    """The rollout engine cannot be built as configured; the message names the setting."""
