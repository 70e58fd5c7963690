"""Whether the Hugging Face hub can be reached, asked once and quickly. Where it cannot (an offline GPU node),
transformers and datasets first retry every request with back-off before they read their caches (2 min 23 s for a
tiny model's config and tokenizer, 24 s for one dataset, measured 2026-12-07 and 08): the callers open the cache at
once instead (models/loading.py for model.path, data/problems.py for a `datasets` name)."""
from __future__ import annotations

from typing import Optional

HUB_PROBE_TIMEOUT_S = 5.0


def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub (HF_ENDPOINT, huggingface.co by default) cannot be reached from here, or None: one
    HEAD request without retries, through huggingface_hub's own session (its proxy settings). HF_HUB_OFFLINE=1
    counts as unreachable; so does a server error (transformers would retry it as it retries a refused
    connection)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        response = get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - any transport failure (name, connection, timeout, proxy) is the answer
        return f"{constants.ENDPOINT}: {type(e).__name__}: {e}"
    return f"{constants.ENDPOINT} answered HTTP {response.status_code}" if response.status_code >= 500 else None
