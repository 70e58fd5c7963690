"""A rollout engine without a model, for measuring the trainer's own stages at any model shape."""
from __future__ import annotations

import random
from typing import Iterable

from .base import Completion, RolloutEngine, SamplingParams


class SyntheticEngine(RolloutEngine):
    """Rollouts without a model: every response exactly max_new_tokens long, filler then a boxed answer drawn
    from a few values, so votes split and advantages are non-zero. It holds no weights (pushes are consumed, so
    the trainer's gathers and casts happen as they would) and costs no generation time: what `mgrpo plan
    --measure` and the benchmarks run the trainer's own stages with, at any model shape."""

    def __init__(self, tokenizer, answers=("1", "2", "3"), seed: int = 0):
        self.tokenizer, self.answers, self.seed = tokenizer, answers, seed
        self.filler = tokenizer.encode(" 1 + 1 = 2.", add_special_tokens=False)
        self.eos = tokenizer.eos_token_id

    def push_weights(self, named_tensors: Iterable) -> None:
        for _ in named_tensors:         # each tensor made (gathered, cast, dequantized) and dropped, as a push does
            pass

    def generate(self, prompts: list, params: SamplingParams) -> list:
        rng = random.Random(f"{self.seed}-{params.seed}-{params.n}")
        out = []
        for _ in prompts:
            group = []
            for _ in range(params.n):
                answer = self.tokenizer.encode(f" \\boxed{{{rng.choice(self.answers)}}}", add_special_tokens=False)
                length = max(params.max_new_tokens - len(answer) - 1, 0)
                body = (self.filler * (length // max(len(self.filler), 1) + 1))[:length]
                ids = (body + answer)[:max(params.max_new_tokens - 1, 0)] + [self.eos]
                group.append(Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), None, True))
            out.append(group)
        return out
