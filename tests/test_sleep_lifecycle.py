"""The sleep-mode lifecycle against a strict stand-in that enforces vLLM 0.33's documented semantics.

The CPU build of vLLM has no sleep mode, so these tests drive VLLMEngine (forced into sleep mode) against
StrictSleepLLM, which:
- level 1 keeps weights (offloaded), level 2 destroys them (garbage after wake, vLLM issue 29341);
- refuses to generate unless weights and KV cache are both awake; wake_up returns True only when fully awake;
- keeps prefix-cache entries computed with old weights until reset_prefix_cache (vLLM 9744);
- says whether it sleeps only through `llm_engine.is_sleeping()` (any tag asleep), as vLLM does;
- a weight load writes only through the worker model's `load_weights` and reports the names it loaded; a
  load with no tensors (what TRL issue 5312 did after a sync) re-reads the checkpoint from disk.
A "generation" is a fingerprint of the weights that served it, so tests can see which weights were used.
"""
import pytest
import torch

from mgrpo.engines.base import SamplingParams
from mgrpo.engines.vllm import VLLMEngine

NAMES = ["model.embed_tokens.weight", "model.norm.weight"]


class StrictSleepLLM:
    def __init__(self, disk_value=0.0):
        self.disk = {n: torch.full((4,), disk_value) for n in NAMES}
        self.weights = {n: t.clone() for n, t in self.disk.items()}
        self.awake = {"weights": True, "kv_cache": True}
        self.prefix_cache = {}
        self.calls = []
        self.llm_engine = _Engine(self)

    # vLLM API surface used by the engine
    def sleep(self, level=1, mode="abort"):
        self.calls.append(("sleep", level))
        if level == 2:
            self.weights = {n: torch.full((4,), float("nan")) for n in NAMES}   # dropped
        self.awake = {"weights": False, "kv_cache": False}
        self.prefix_cache.clear()

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ("weights", "kv_cache"))))
        for tag in tags or ("weights", "kv_cache"):
            self.awake[tag] = True
        return all(self.awake.values())

    def collective_rpc(self, method, args=(), kwargs=None):
        assert callable(method), "the engine loads weights through a function run in the worker"
        return [method(_Worker(self), *args, **(kwargs or {}))]

    def load_weights(self, weights):
        if not self.awake["weights"]:
            raise RuntimeError("writing into weights whose memory is not mapped")
        loaded = set()
        source = self.disk.items() if weights is None else weights
        for name, tensor in source:
            self.weights[name] = tensor.detach().clone().float()
            loaded.add(name)
        self.calls.append(("reload", weights is None))
        return loaded

    def reset_prefix_cache(self):
        self.prefix_cache.clear()
        return True

    def generate(self, prompts, sampling, use_tqdm=False):
        if not all(self.awake.values()):
            raise RuntimeError("scheduler paused: not fully awake")
        fingerprint = float(sum(w.sum() for w in self.weights.values()))
        # Like vllm.LLM.generate: one SamplingParams for all prompts, or a list with one per prompt.
        per_prompt = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        assert len(per_prompt) == len(prompts), "vLLM requires one SamplingParams per prompt"
        outputs = []
        for p, params in zip(prompts, per_prompt):
            key = tuple(p["prompt_token_ids"])
            value = self.prefix_cache.setdefault(key, fingerprint)     # stale if not reset
            outputs.append(_Request([_Out(i, value) for i in range(params.n)]))
        return outputs


class _Engine:
    def __init__(self, llm):
        self.llm = llm

    def is_sleeping(self):
        return not all(self.llm.awake.values())


class _Model:
    def __init__(self, llm):
        self.llm = llm

    def load_weights(self, weights):
        return self.llm.load_weights(weights)

    def named_parameters(self):
        return iter(self.llm.weights.items())


class _Worker:
    def __init__(self, llm):
        self.model_runner = type("Runner", (), {"get_model": lambda _self: _Model(llm)})()


class _Out:
    def __init__(self, index, value):
        self.index, self.token_ids, self.text, self.logprobs, self.finish_reason = index, [1], repr(value), None, "stop"


class _Request:
    def __init__(self, outs):
        self.outputs = outs


def make_engine(level):
    llm = StrictSleepLLM()
    engine = VLLMEngine("unused", NAMES, dtype=torch.float32, sleep_level=level, llm=llm)
    engine.on_gpu = engine.sleep_mode = True   # the GPU code path, whatever this machine is
    return engine, llm


def weights(value):
    return [(n, torch.full((4,), float(value))) for n in NAMES]


def served(engine, prompts=((5, 6, 7),)):
    out = engine.generate([list(p) for p in prompts], SamplingParams(n=1, temperature=1.0, max_new_tokens=4))
    return float(out[0][0].text)


def one_round(engine, policy_value, momentum_value):
    engine.wake_up()
    engine.push_weights(weights(policy_value))
    policy = served(engine)
    engine.push_weights(weights(momentum_value))
    momentum = served(engine)
    engine.sleep()
    return policy, momentum


@pytest.mark.parametrize("level", [1, 2])
def test_round_uses_pushed_weights_for_both_models(level):
    engine, llm = make_engine(level)
    engine.sleep()
    for step in range(3):
        policy, momentum = one_round(engine, 1.0 + step, -2.0 - step)
        assert policy == pytest.approx(8 * (1.0 + step))          # 2 tensors x 4 elements
        assert momentum == pytest.approx(8 * (-2.0 - step))       # not the policy's cached prompt state


def test_order_of_events_in_a_round():
    engine, llm = make_engine(1)
    engine.sleep()
    llm.calls.clear()
    one_round(engine, 1.0, 2.0)
    assert llm.calls == [("wake_up", ("weights",)), ("reload", False), ("wake_up", ("kv_cache",)),
                         ("reload", False), ("sleep", 1)]


def test_never_reloads_from_disk_after_a_push():
    """TRL issue 5312: after syncing, reload_weights was called without weights and re-read the base model."""
    engine, llm = make_engine(1)
    engine.sleep()
    one_round(engine, 3.0, 4.0)
    assert ("reload", True) not in llm.calls
    assert served_value_after_wake(engine) != pytest.approx(0.0)   # disk weights are 0


def served_value_after_wake(engine):
    engine.wake_up()
    engine.push_weights(weights(5.0))
    return served(engine)


def test_level2_refuses_to_generate_on_garbage_weights():
    """vLLM issue 29341: after level 2 and wake_up(["weights"]) the weights are garbage until written."""
    engine, llm = make_engine(2)
    engine.sleep()
    engine.wake_up()
    with pytest.raises(RuntimeError, match="sleep level 2"):
        served(engine)
    engine.push_weights(weights(1.5))
    assert served(engine) == pytest.approx(12.0)


def test_not_fully_awake_is_an_error():
    engine, llm = make_engine(1)
    engine.sleep()
    engine.wake_up()
    llm.wake_up = lambda tags=None: False          # the engine reports it is not fully awake
    engine.push_weights(weights(1.0))
    with pytest.raises(RuntimeError, match="fully awake"):
        served(engine)


def test_a_fresh_engine_is_awake_and_wakes_nothing():
    """vLLM builds its engine awake: the first round must neither wake it (wake_up on an awake engine only
    warns in vLLM, but a state assumed asleep would later skip a needed wake) nor refuse to generate."""
    engine, llm = make_engine(1)
    assert not engine.is_sleeping()
    engine.wake_up()
    engine.push_weights(weights(2.0))
    assert served(engine) == pytest.approx(16.0)
    assert [c for c in llm.calls if c[0] == "wake_up"] == []
    engine.sleep()
    assert engine.is_sleeping() and llm.calls[-1] == ("sleep", 1)


def test_state_is_vllms_not_assumed():
    """If vLLM reports itself awake (woken by someone else), generate wakes nothing; sleep() on a sleeping
    engine does not sleep it twice."""
    engine, llm = make_engine(1)
    engine.sleep()
    engine.sleep()
    assert [c for c in llm.calls if c[0] == "sleep"] == [("sleep", 1)]
    llm.wake_up()                                  # fully awake behind the wrapper's back
    llm.calls.clear()
    engine.push_weights(weights(1.0))
    served(engine)
    assert ("wake_up", ("kv_cache",)) not in llm.calls


def test_push_into_sleeping_weights_is_refused():
    engine, llm = make_engine(1)
    engine.sleep()
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.push_weights(weights(1.0))


def test_stand_in_catches_a_missing_prefix_reset(monkeypatch):
    """The stand-in is strict enough: an engine that skipped the reset would serve the policy's states."""
    engine, llm = make_engine(1)
    monkeypatch.setattr(llm, "reset_prefix_cache", lambda: True)
    engine.sleep()
    policy, momentum = one_round(engine, 1.0, 9.0)
    assert momentum == policy    # stale: what test_round_uses_pushed_weights_for_both_models rules out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and vLLM")
def test_real_vllm_sleep_lifecycle_on_gpu(tmp_path):
    """One sleep-mode engine per process (vLLM's CuMemAllocator is a singleton): both levels on one engine."""
    pytest.importorskip("vllm")
    from mgrpo.data.tiny import build_tiny_model, build_tokenizer
    from mgrpo.engines.hf import HFGenerateEngine
    tokenizer = build_tokenizer()
    disk = build_tiny_model(tokenizer, 0)
    disk.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    policy, momentum = build_tiny_model(tokenizer, 1).cuda(), build_tiny_model(tokenizer, 2).cuda()
    engine = VLLMEngine(str(tmp_path), [n for n, _ in disk.named_parameters()], dtype=torch.float32,
                        max_model_len=256, gpu_memory_utilization=0.2, sleep_level=1)
    assert not engine.is_sleeping()                       # built awake
    prompt = [tokenizer.encode("Compute 12 + 7.\n") * 4]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=16)
    expected = [HFGenerateEngine(m, tokenizer).generate(prompt, greedy)[0][0].token_ids for m in (policy, momentum)]
    for level in (1, 2):
        engine.sleep_level = level
        engine.sleep()
        assert engine.is_sleeping()
        engine.wake_up()
        engine.push_weights(policy.named_parameters())
        a = engine.generate(prompt, greedy)[0][0].token_ids
        engine.push_weights(momentum.named_parameters())
        b = engine.generate(prompt, greedy)[0][0].token_ids
        assert not engine.is_sleeping()
        assert [a, b] == expected, f"level {level}"
