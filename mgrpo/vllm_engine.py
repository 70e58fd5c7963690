"""vLLM rollout engine (filled in by the vLLM issue)."""


def vllm_available() -> bool:
    return False
