"""Rollouts with transformers' `generate`, from a private inference copy of the model (CPU or GPU)."""
from __future__ import annotations

from copy import deepcopy
from typing import Iterable, Optional

import torch

from .base import Completion, RolloutEngine, SamplingParams, check_push_coverage


class HFGenerateEngine(RolloutEngine):
    """Rollouts with transformers' `generate` from a private inference copy of the model (CPU or GPU)."""

    def __init__(self, model, tokenizer, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 copy: bool = True):
        """copy=False: `model` becomes the engine's own (a model loaded for it); else it is deep-copied."""
        self.model = (deepcopy(model) if copy else model).eval()
        if dtype is not None or device is not None:
            self.model.to(device=device, dtype=dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weight_dtype = next(self.model.parameters()).dtype
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._params = dict(self.model.named_parameters())

    @torch.no_grad()
    def push_weights(self, named_tensors: Iterable) -> None:
        pushed = set()
        for name, tensor in named_tensors:
            if name in self._params:
                self._params[name].copy_(tensor)
            pushed.add(name)
        check_push_coverage(pushed, set(self._params), "HFGenerateEngine")

    @torch.no_grad()
    def generate(self, prompts: list, params: SamplingParams) -> list:
        if params.n == 0 or not prompts:
            return [[] for _ in prompts]
        device = next(self.model.parameters()).device
        repeated = [p for p in prompts for _ in range(params.n)]
        width = max(len(p) for p in repeated)
        # Left padding, so every row's next token is generated at the same position.
        input_ids = torch.full((len(repeated), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(repeated):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        greedy = params.temperature == 0
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=params.temperature,
                                                            top_p=params.top_p, top_k=0)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                      max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_token_id,
                                      pad_token_id=self.pad_token_id, **kwargs)
        generated = out[:, width:].tolist()
        completions = []
        for row in generated:
            if self.eos_token_id in row:
                row, finished = row[:row.index(self.eos_token_id) + 1], True
            else:
                finished = False
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            completions.append(Completion(row, text, None, finished))
        return [completions[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]
