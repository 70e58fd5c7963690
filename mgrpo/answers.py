"""Final answers: extraction (the last \\boxed{...}, or math-verify's own extraction) and equivalence by math-verify.

math-verify guards parsing and verification with signal.alarm, which only works on the main thread (and
raises "signal only works in main thread" elsewhere). On the main thread we keep its timeouts; anywhere else
we turn them off and bound each comparison ourselves with a worker-thread timeout.
"""
from __future__ import annotations

import concurrent.futures
import functools
import re
import threading
from typing import Optional

from math_verify import parse, verify

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
DEFAULT_TIMEOUT_S = 3


def extract_boxed_answer(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, nested braces allowed.

    None when there is no boxed answer, when it is empty, or when its braces never close (a response cut off
    by the token limit has no final answer).
    """
    for match in reversed(list(_BOXED_RE.finditer(text))):
        depth = 0
        for j in range(match.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                content = text[match.end():j].strip()
                return content or None
        return None  # the last box is unclosed
    return None


ANSWER_FORMATS = ("boxed", "math_verify")


def extract_answer(text: str, answer_format: str = "boxed") -> Optional[str]:
    """The response's final answer, or None.

    boxed (the default, the paper's and SRT's rule): the last \\boxed{...}. math_verify: math-verify's own
    extraction from free text (LaTeX, then plain expressions: "The answer is 6." -> "6"), for models that do
    not box their answers; its first match, as a string for the vote.
    """
    if answer_format == "boxed":
        return extract_boxed_answer(text)
    if answer_format != "math_verify":
        raise ValueError(f"answer format {answer_format!r}: use one of {', '.join(ANSWER_FORMATS)}")
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    found = parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                  parsing_timeout=DEFAULT_TIMEOUT_S if _on_main_thread() else None)
    answer = found[-1].strip() if found and isinstance(found[-1], str) else None
    return answer or None


def _normalize(answer: str) -> str:
    return "".join(answer.split()).rstrip(".").replace("\\left", "").replace("\\right", "").replace("\\!", "")


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=65536)
def _parse_cached(answer: str, use_alarm: bool):
    timeout = DEFAULT_TIMEOUT_S if use_alarm else None
    return parse(f"${answer}$", parsing_timeout=timeout) or parse(answer, parsing_timeout=timeout)


def _verify_no_timeout(gold: str, answer: str) -> bool:
    return bool(verify(_parse_cached(gold, False), _parse_cached(answer, False), timeout_seconds=None))


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="math-verify")


def answers_equivalent(gold: Optional[str], answer: Optional[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True when an extracted answer is mathematically the gold one ("\\frac12", "\\frac{1}{2}", "0.5").

    The gold answer (ground truth, or the vote's label) comes first: math-verify's verify(gold, target) is not
    symmetric (gold `x<2` accepts the answer `(-\\infty,2)`, gold `(-\\infty,2)` refuses the answer `x<2`).
    None (no answer) is equivalent to nothing. Identical strings (after whitespace normalisation) short-cut
    math-verify. A comparison that times out counts as not equivalent.
    """
    if gold is None or answer is None:
        return False
    if _normalize(gold) == _normalize(answer):
        return True
    if _on_main_thread():
        return bool(verify(_parse_cached(gold, True), _parse_cached(answer, True), timeout_seconds=DEFAULT_TIMEOUT_S))
    # Off the main thread math-verify's alarms cannot fire: run without them under our own deadline.
    future = _pool.submit(_verify_no_timeout, gold, answer)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        return False


def group_equivalent_answers(answers: list) -> list:
    """Cluster id per answer (None stays None): answers in one cluster are equivalent to its first member.

    Cluster ids are numbered in order of first appearance, which the vote uses to break ties.
    """
    representatives: list = []
    cluster_of_normal: dict = {}
    ids = []
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        key = _normalize(answer)
        if key not in cluster_of_normal:
            cluster_of_normal[key] = next(
                (c for c, rep in enumerate(representatives) if answers_equivalent(rep, answer)), None)
            if cluster_of_normal[key] is None:
                cluster_of_normal[key] = len(representatives)
                representatives.append(answer)
        ids.append(cluster_of_normal[key])
    return ids
