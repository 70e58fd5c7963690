"""Prompts: the plain text format of the paper's base-model runs, or a tokenizer's chat template, as token ids,
checked before any generation. Both the built-in task and file data use them."""
from __future__ import annotations

from collections.abc import Mapping

from ..errors import DataError


def format_prompt(problem: str, instruction: str) -> str:
    """Plain-text prompt: the instruction, then the problem, in the order of the paper's chat prompt (system
    instruction, then the problem as the user message)."""
    return f"{instruction}\n{problem}\n"


def encode_prompt(tokenizer, problem: str, instruction: str, use_chat_template: bool) -> list:
    """Token ids (a list of ints) of the prompt: the chat template (system instruction, problem as the user
    message) when asked for and the tokenizer has one, else the plain text prompt.

    transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True) by default (4.x returned the
    ids): ask for the ids (return_dict=False) and still accept a mapping, so every version gives ids."""
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the chat template was asked for (model.use_chat_template=true / --chat-template) but "
                            "this tokenizer has none: drop that setting to use the plain prompt")
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": problem}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
        if isinstance(encoded, Mapping):
            encoded = encoded["input_ids"]
        if hasattr(encoded, "tolist"):
            encoded = encoded.tolist()
        if encoded and isinstance(encoded[0], list):   # a batch of one conversation
            encoded = encoded[0]
        return list(encoded)
    return tokenizer.encode(format_prompt(problem, instruction), add_special_tokens=False)


def check_prompt_ids(ids, vocab_size: int, what: str) -> None:
    """A DataError unless `ids` is a non-empty list of ints inside the vocabulary: checked before any
    generation, so a tokenizer that returns something else fails here, clearly, and not inside the engine."""
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        shown = repr(ids)[:120]
        raise DataError(f"{what}: the tokenizer did not return a list of token ids (got {shown}); check the "
                        "tokenizer and its chat template (model.use_chat_template / --chat-template)")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise DataError(f"{what}: token id {bad[0]} is outside the model's vocabulary (vocab_size={vocab_size}): "
                        "the tokenizer does not belong to this model")
