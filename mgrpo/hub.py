"""Whether the Hugging Face hub can be reached, asked once and quickly. Where it cannot (an offline GPU node),
transformers and datasets first retry every request with back-off before they read their caches (2 min 23 s for a
tiny model's config and tokenizer, 24 s for one dataset, measured 2026-12-07 and 08): the callers open the cache at
once instead (models/loading.py for model.path, data/problems.py for a `datasets` name)."""
from __future__ import annotations

from typing import Optional

from .config import looks_like_a_path

HUB_PROBE_TIMEOUT_S = 5.0


# The answer per (endpoint, offline setting), asked once per process: a run reads its model and one or two datasets,
# `mgrpo eval` several, `mgrpo compare` many runs; a node that drops packets would cost the timeout each time.
_answers: dict = {}


def _endpoint() -> tuple:
    from huggingface_hub import constants
    return constants.ENDPOINT, constants.HF_HUB_OFFLINE


def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub (HF_ENDPOINT, huggingface.co by default) cannot be reached from here, or None: one
    HEAD request without retries, through huggingface_hub's own session (its proxy settings). HF_HUB_OFFLINE=1
    counts as unreachable; so does a server error (transformers would retry it as it retries a refused
    connection). Asked once per process and endpoint (or told, by `settle`)."""
    key = _endpoint()
    if key not in _answers:
        _answers[key] = _ask(*key)
    return _answers[key]


def settle(answer: Optional[str]) -> None:
    """Take `answer` as this process's: under torchrun rank 0 asks and every rank takes its answer (build.py), so
    that no rank reads the hub's latest data or model while another reads an older cached copy."""
    _answers[_endpoint()] = answer


def _ask(endpoint: str, offline: bool) -> Optional[str]:
    from huggingface_hub.utils import get_session
    if offline:
        return "HF_HUB_OFFLINE is set"
    try:
        response = get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - any transport failure (name, connection, timeout, proxy) is the answer
        return f"{endpoint}: {type(e).__name__}: {e}"
    return f"{endpoint} answered HTTP {response.status_code}" if response.status_code >= 500 else None


def may_name_the_hub(source: Optional[str]) -> bool:
    """Whether a model.path or data source may be read from the hub (a name such as Qwen/Qwen3-4B) rather than being
    a path or a built-in task. From the text alone, never the filesystem: every rank of a run must come to the same
    answer (`settle` is a collective), and nodes' disks differ."""
    return source is not None and not source.startswith("builtin:") and not looks_like_a_path(source)
