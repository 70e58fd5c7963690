"""Evaluation the way the field reports it: greedy, avg@k, maj@k and pass@k, graded with math-verify.

Per problem, n >= k samples are drawn in one batched request (n samples of one prompt) at the harness's
sampling settings (temperature 0.6, top_p 0.95 by default), plus optionally one greedy response:

    avg@k   mean accuracy of the first k samples                     (pass@1 averaged over k samples)
    maj@k   accuracy of the majority answer of the first k samples   (the training vote: math-verify
            equivalence, ties to the earliest answer; no answer abstains)
    pass@k  the unbiased estimator of Chen et al. 2021 from all n samples: 1 - C(n - c, k) / C(n, k)

and per benchmark the means over problems, the mean response length (tokens) and the fraction of responses
with no extractable answer. The same function serves `mgrpo eval`, the checkpoint sweep and the trainer's
in-training validation (`data.eval_every`); under torchrun the problems are split over the ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..algorithm import majority_vote
from ..answers import answers_equivalent, extract_answer
from ..config import EvalConfig
from ..data.problems import Problem
from ..distributed import Dist
from ..engines.base import RolloutEngine, SamplingParams, sampling_seed
from ..errors import MgrpoError


class EvalError(MgrpoError, ValueError):
    """The evaluation cannot run as asked; the message says what to change."""


# ---------------------------------------------------------------------------------------------------------
# Metrics (pure)

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    computed as a product to stay exact for large n."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(correct: Sequence[bool], k: int) -> float:
    """Mean accuracy of the first k samples."""
    return sum(correct[:k]) / k


def maj_at_k(answers: Sequence[Optional[str]], truth: str, k: int) -> bool:
    """Whether the majority answer of the first k samples (the training vote) is the ground truth."""
    return answers_equivalent(truth, majority_vote(list(answers[:k])).pseudo_label)


@dataclass
class ProblemResult:
    index: int
    problem: str
    answer: str
    samples: list = field(default_factory=list)
    """[n] dicts: text, answer (extracted), correct, length (tokens)."""
    greedy: Optional[dict] = None
    family: Optional[str] = None


def grade(text: str, length: int, truth: str, answer_format: str = "boxed") -> dict:
    answer = extract_answer(text, answer_format)
    return {"text": text, "answer": answer, "correct": answers_equivalent(truth, answer), "length": length}


def summarize(results: Sequence[ProblemResult], k: int, pass_ks: Sequence[int]) -> dict:
    """Benchmark figures from per-problem results (the means over problems)."""
    if not results:
        raise EvalError("no problems to summarize")
    out: dict = {"problems": len(results)}
    if results[0].greedy is not None:
        out["greedy"] = sum(r.greedy["correct"] for r in results) / len(results)
    if results[0].samples:
        n = len(results[0].samples)
        correct = [[s["correct"] for s in r.samples] for r in results]
        out[f"avg@{k}"] = sum(avg_at_k(c, k) for c in correct) / len(results)
        out[f"maj@{k}"] = sum(maj_at_k([s["answer"] for s in r.samples], r.answer, k) for r in results) / len(results)
        for pk in pass_ks:
            out[f"pass@{pk}"] = sum(pass_at_k(n, sum(c), pk) for c in correct) / len(results)
    responses = [s for r in results for s in r.samples + ([r.greedy] if r.greedy else [])]
    out["mean_length"] = sum(s["length"] for s in responses) / len(responses)
    out["no_answer_frac"] = sum(s["answer"] is None for s in responses) / len(responses)
    families = sorted({r.family for r in results if r.family is not None})
    if len(families) > 1:        # "<family>/greedy", ...: a decline on one kind of problem that the mean hides
        for family in families:
            part = summarize([r for r in results if r.family == family], k, pass_ks)
            out.update({f"{family}/{key}": value for key, value in part.items()
                        if key == "problems" or key == "greedy" or key.startswith(("avg@", "maj@", "pass@"))})
    return out


def held_out_votes(results: Sequence[ProblemResult], k: int) -> list:
    """[problems] the majority answer of each problem's first k samples (None: no sample gave one): a model's
    label-free verdict on the held-out prompts, which `agreement_with_votes` compares later models with."""
    return [majority_vote([s["answer"] for s in r.samples[:k]]).pseudo_label for r in results]


def agreement_with_votes(results: Sequence[ProblemResult], votes: Sequence[Optional[str]]) -> dict:
    """base_vote_agreement: the share of problems whose greedy answer is `votes`' answer (the base model's vote,
    taken before training), over the problems that vote answered; "<family>/base_vote_agreement" per family.

    Label-free: no ground truth is read. Sharpening on a vote that is mostly right moves greedy answers towards the
    base's vote; learning a confident error moves them away from it on problems the base's vote had right, which is
    how the collapse preset's runs lose accuracy (README, "Collapse")."""
    if len(votes) != len(results):
        raise EvalError(f"{len(votes)} base votes for {len(results)} problems: they must be of the same held-out set")
    if not results or results[0].greedy is None:
        return {}
    agree = [(r.family, answers_equivalent(vote, r.greedy["answer"]))
             for r, vote in zip(results, votes) if vote is not None]
    out = {"base_vote_agreement": sum(a for _, a in agree) / len(agree)} if agree else {}
    families = sorted({f for f, _ in agree if f is not None})
    if len(families) > 1:
        for family in families:
            part = [a for f, a in agree if f == family]
            out[f"{family}/base_vote_agreement"] = sum(part) / len(part)
    return out


# ---------------------------------------------------------------------------------------------------------
# Running a benchmark through a rollout engine

def check_settings(settings: EvalConfig) -> None:
    """Bad settings fail here, before any generation."""
    if settings.k < 1:
        raise EvalError(f"k={settings.k}: avg@k and maj@k need k >= 1 samples per problem")
    n = settings.num_samples
    if n < settings.k:
        raise EvalError(f"n={n} < k={settings.k}: draw at least k samples per problem (n >= k)")
    for pk in settings.pass_k:
        if not 1 <= pk <= n:
            raise EvalError(f"pass@{pk} needs 1 <= {pk} <= n = {n} samples per problem: raise n or drop it")


def evaluate(engine: RolloutEngine, problems: Sequence[Problem], encode: Callable[[str], list],
             settings: EvalConfig, max_new_tokens: int, dist: Optional[Dist] = None,
             answer_format: str = "boxed") -> tuple:
    """Sample and grade `problems` (each with an answer) -> (figures dict, [ProblemResult] in order).

    Under torchrun each rank generates for its share and the results are gathered on every rank.
    """
    dist = dist or Dist()
    check_settings(settings)
    missing = [i for i, p in enumerate(problems) if p.answer is None]
    if missing:
        raise EvalError(f"problem {missing[0]} has no answer to grade against ({len(missing)} such problems)")
    # Every rank takes the same number of problems (the last ranks repeat their first one, results dropped):
    # vLLM's data-parallel engines under torchrun step together, so every rank must make the same calls.
    indices = dist.split_evenly(list(range(len(problems))))
    share = -(-len(problems) // dist.world_size)
    padded = indices + [indices[0] if indices else 0] * (share - len(indices))
    prompts = [encode(problems[i].problem) for i in padded]
    results = [ProblemResult(i, problems[i].problem, problems[i].answer, family=problems[i].family) for i in padded]
    # Batches bound the transformers engine's memory (prompts x n rows at once); vLLM schedules its own.
    batch = max(1, 512 // settings.num_samples)
    for start in range(0, len(prompts), batch):
        chunk, chunk_results = prompts[start:start + batch], results[start:start + batch]
        if settings.greedy:
            outputs = engine.generate(chunk, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
            for r, (completion,) in zip(chunk_results, outputs):
                r.greedy = grade(completion.text, len(completion.token_ids), r.answer, answer_format)
        params = SamplingParams(n=settings.num_samples, temperature=settings.temperature, top_p=settings.top_p,
                                max_new_tokens=max_new_tokens, seed=sampling_seed(settings.seed, start, dist.rank))
        for r, group in zip(chunk_results, engine.generate(chunk, params)):
            r.samples = [grade(c.text, len(c.token_ids), r.answer, answer_format) for c in group]
    results = results[:len(indices)]
    gathered = sorted((r for part in dist.all_gather_object(results) for r in part), key=lambda r: r.index)
    return summarize(gathered, settings.k, settings.pass_k), gathered


def no_answer_warning(where: str, no_answer_frac: float, example: str, cut_frac: float, answer_format: str,
                      settings: dict) -> str:
    """The one warning line for a step or benchmark where most responses have no answer to vote or grade.

    settings names the knobs in the caller's terms: instruction, chat_template, max_new_tokens, answer_format
    (the trainer's config keys, or mgrpo eval's flags)."""
    rule = "last \\boxed{}" if answer_format == "boxed" else "math-verify extraction"
    shown = " ".join(example.split())
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    hints = [f"ask for the final answer in \\boxed{{}} ({settings['instruction']})",
             f"use the tokenizer's chat template for a chat/instruct model ({settings['chat_template']})",
             f"give responses room to finish ({settings['max_new_tokens']}; {cut_frac:.0%} of them were cut at the limit)"]
    if answer_format == "boxed":
        hints.append(f"or find answers in other forms ({settings['answer_format']}=math_verify)")
    return (f"[warning] {where}: {no_answer_frac:.0%} of the responses have no answer (rule: {rule}), so they "
            f"cannot vote, be rewarded or be graded. One of them: {shown!r}. To fix: " + "; ".join(hints) + ".")


def figures_line(figures: dict) -> str:
    """'greedy 45.3% | avg@8 40.1% | maj@8 52.0%' for the accuracy figures present."""
    keys = [k for k in figures if k == "greedy" or k.startswith(("avg@", "maj@", "pass@"))]
    return " | ".join(f"{k} {figures[k]:.1%}" for k in keys)
