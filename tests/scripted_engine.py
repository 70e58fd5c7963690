"""A rollout stand-in with fixed outputs: completions depend only on the prompt and n, never on the weights,
the rank or the call order. So one rank and two ranks train on exactly the same rollouts, and tests can
compute expected figures by hand. It records every weight push (name -> a copy of the tensor)."""
import random

from mgrpo.engines.base import Completion, RolloutEngine, check_push_coverage

# Answers a group draws from: a vote with a majority, disagreements, and responses with no answer.
ANSWERS = ("7", "7", "7", "5", "12", None)


class ScriptedEngine(RolloutEngine):
    def __init__(self, tokenizer, parameter_names, answers=ANSWERS, record_pushes: bool = True):
        self.tokenizer, self.expected, self.answers = tokenizer, set(parameter_names), answers
        self.record_pushes = record_pushes
        self.pushes = []

    def push_weights(self, named_tensors) -> None:
        pushed = {name: tensor.detach().clone() for name, tensor in named_tensors}
        check_push_coverage(set(pushed), self.expected, "ScriptedEngine")
        if self.record_pushes:
            self.pushes.append(pushed)

    def completion(self, text: str) -> Completion:
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return Completion(ids, text, None, True)

    def generate(self, prompts: list, params) -> list:
        out = []
        for prompt in prompts:
            rng = random.Random(f"{list(prompt)}-{params.n}-{params.temperature}")
            group = []
            for _ in range(params.n):
                answer = rng.choice(self.answers)
                steps = " ".join(f"{rng.randint(1, 9)} + {rng.randint(1, 9)} = {rng.randint(2, 18)}."
                                 for _ in range(rng.randint(1, 3)))
                group.append(self.completion(steps + (f" \\boxed{{{answer}}}" if answer is not None else "")))
            out.append(group)
        return out
