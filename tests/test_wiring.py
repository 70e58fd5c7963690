"""How the loop wires the algorithm's parts together, checked on one process with the tiny model (2 ranks: the
"wiring" scenario in tests/test_distributed.py). Each test names the mistake it exists to catch; each was
planted once in mgrpo/loop/trainer.py and seen to fail (README, "A new test must be seen failing").

    the momentum samples come from the policy (the momentum push skipped)   -> test_each_sampler_draws_from_its_own_weights
    the momentum samples reuse the policy's sampling seed                   -> test_each_sampler_draws_from_its_own_weights
    stale weights pushed after an update                                    -> test_each_sampler_draws_from_its_own_weights
    the momentum update skipped (theta_k frozen)                            -> test_the_momentum_model_is_the_ema_of_the_policy
    gradient clipping by the global norm dropped                            -> test_the_optimizer_applies_clipped_gradients
    the advantage's sign flipped (training away from the vote)              -> test_learning_goes_towards_the_vote
    a family's response lengths over all G responses, not the policy's     -> test_training_signals_per_family_...
"""
import json

import pytest
import torch

from mgrpo.config import load_config
from mgrpo.loop.trainer import train
from tests.wiring import RecordingEngine, check_clipping, check_momentum_updates, check_samplers, spies

pytestmark = pytest.mark.slow
MAX_GRAD_NORM = 0.05            # below the tiny model's gradient norms (0.2-0.5): every step clips


def wiring_config(cache, run_dir, *extra):
    return load_config(None, [
        f"warm_start.cache_dir={cache}", f"run_dir={run_dir}",
        "steps=3", "progress=false", "log_every=0", "algorithm.prompts_per_step=4", "algorithm.group_size=4",
        "rollout.max_new_tokens=32", "data.num_eval=0", "optim.lr=1e-3", "optim.warmup_steps=0",
        f"optim.max_grad_norm={MAX_GRAD_NORM}", *extra])


def recording_engine(cache):
    from transformers import AutoModelForCausalLM

    from mgrpo.data.tiny import base_model_dir, build_tokenizer
    cfg = wiring_config(cache, "unused")
    path = base_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None)
    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(path).named_parameters()]
    return RecordingEngine(build_tokenizer(), names)


@pytest.fixture(scope="module", params=["fp32", "int8", "int8_adamw8bit"])
def wired_run(request, tiny_cache, tmp_path_factory):
    """3 steps on fixed rollouts with every spy on, per momentum storage (and optimizer)."""
    dtype, _, optimizer = request.param.partition("_")
    run_dir = tmp_path_factory.mktemp("wiring") / request.param
    engine = recording_engine(tiny_cache)
    cfg = wiring_config(tiny_cache, run_dir, f"algorithm.momentum_dtype={dtype}", f"optim.name={optimizer or 'adamw'}",
                        "rollouts_every=1")
    with spies() as obs:
        summary = train(cfg, log=lambda *a: None, engine=engine)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"obs": obs, "engine": engine, "cfg": cfg, "int8": dtype == "int8", "summary": summary, "run_dir": run_dir,
            "grad_norms": [r["grad_norm"] for r in records if "grad_norm" in r]}


def test_each_sampler_draws_from_its_own_weights(wired_run):
    cfg = wired_run["cfg"].algorithm
    assert check_samplers(wired_run["obs"], wired_run["engine"].events, cfg.policy_samples,
                          cfg.momentum_samples) == []


def test_the_momentum_model_is_the_ema_of_the_policy(wired_run):
    obs = wired_run["obs"]
    assert len(obs.updates) == 3
    assert check_momentum_updates(obs, wired_run["int8"]) == []


def test_the_optimizer_applies_clipped_gradients(wired_run):
    assert check_clipping(wired_run["obs"], MAX_GRAD_NORM, wired_run["grad_norms"]) == []


# ---------------------------------------------------------------------------------------------------------
# Learning goes the right way

def response_logprobs(model_dir, rows, tokenizer, instruction, temperature) -> torch.Tensor:
    """Each response's summed token log-prob at the sampling temperature, by a plain transformers forward
    (independent of the trainer's scorers)."""
    from transformers import AutoModelForCausalLM

    from mgrpo.data.prompts import encode_prompt
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = encode_prompt(tokenizer, row["problem"], instruction, False)
            ids = torch.tensor([prompt + row["token_ids"]])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1] / temperature
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(row["token_ids"])[:, None]).sum())
    return torch.stack(out)


def assert_advantages_follow_the_vote(rows: list) -> None:
    """The recorded advantages against a vote counted here from the texts (the last \\boxed{} of each unpruned
    response, policy and momentum samples pooled; a tie is skipped): a rewarded response's advantage is positive,
    the others' negative, so a mistake anywhere from the answers to the advantages shows."""
    import re
    from collections import Counter
    groups = {}
    for row in rows:
        groups.setdefault(row["problem"], []).append(row)
    checked = 0
    for group in groups.values():
        def answer(row):
            found = re.findall(r"\\boxed\{([^{}]*)\}", row["text"])
            return found[-1].strip() if found else None
        votes = Counter(a for r in group if not r["pruned"] and (a := answer(r)) is not None).most_common()
        if not votes or (len(votes) > 1 and votes[0][1] == votes[1][1]):
            continue
        kept = [r for r in group if r["sampler"] == "policy" and not r["pruned"]]
        rewarded = [answer(r) == votes[0][0] for r in kept]
        if all(rewarded) or not any(rewarded):
            continue                                      # no signal in this group: advantages 0
        for row, good in zip(kept, rewarded):
            assert (row["advantage"] > 0) == good, f"advantage {row['advantage']} for a response the vote " \
                                                   f"{'rewards' if good else 'does not reward'}: {row['text']!r}"
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_learning_goes_towards_the_vote(tiny_cache, tmp_path, impl):
    """One update on fixed rollouts, without the KL term: the policy's log-prob of the responses the vote
    rewarded (advantage > 0) rises and of the others falls, response by response on average and as the
    advantage-weighted sum the loss maximises."""
    from mgrpo.data.tiny import base_model_dir, build_tokenizer
    run_dir = tmp_path / "run"
    cfg = wiring_config(tiny_cache, run_dir, "steps=1", "algorithm.kl_coef=0", "rollouts_every=1",
                        f"algorithm.logprob_impl={impl}", "optim.max_grad_norm=0", "optim.lr=2e-4")
    train(cfg, log=lambda *a: None, engine=recording_engine(tiny_cache))
    rows = [json.loads(line) for line in (run_dir / "rollouts" / "step_000001.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["sampler"] == "policy" and not r["pruned"] and r["advantage"] != 0]
    assert_advantages_follow_the_vote(rows)
    advantages = torch.tensor([r["advantage"] for r in trained], dtype=torch.float64)
    assert (advantages > 0).any() and (advantages < 0).any(), "no learning signal in these rollouts"
    base = base_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None)
    args = (build_tokenizer(), cfg.data.instruction, cfg.rollout.temperature)
    change = response_logprobs(run_dir / "final", trained, *args) - response_logprobs(base, trained, *args)
    assert float(change[advantages > 0].mean()) > 0, "the rewarded responses became less likely"
    assert float(change[advantages < 0].mean()) < 0, "the unrewarded responses became more likely"
    assert float((advantages * change).sum()) > 0


def test_training_signals_per_family_are_that_familys_rollouts(wired_run):
    """family/<family>/{prompts,mean_length,majority_ratio} in metrics.jsonl against the step's rollouts, counted
    here: the family's prompts, the mean token length of its policy responses (not the momentum model's), and
    the mean over its groups of the vote's share (the last \\boxed{} of each unpruned response that has one)."""
    import re
    from collections import Counter
    run_dir = wired_run["run_dir"]
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "reward" in r}
    families_seen = set()
    for step in (1, 2, 3):
        rows = [json.loads(line) for line in (run_dir / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        by_family = {}
        for row in rows:
            by_family.setdefault(row["family"], {}).setdefault(row["problem"], []).append(row)
        assert {k.split("/")[1] for k in records[step] if k.startswith("family/")} == set(by_family)
        for family, groups in by_family.items():
            families_seen.add(family)
            policy = [len(r["token_ids"]) for g in groups.values() for r in g if r["sampler"] == "policy"]
            shares = []
            for group in groups.values():
                answers = [found[-1].strip() for r in group if not r["pruned"]
                           and (found := re.findall(r"\\boxed\{([^{}]*)\}", r["text"]))]
                shares.append(Counter(answers).most_common(1)[0][1] / len(answers) if answers else 0.0)
            record = records[step]
            assert record[f"family/{family}/prompts"] == len(groups)
            assert record[f"family/{family}/mean_length"] == pytest.approx(sum(policy) / len(policy))
            assert record[f"family/{family}/majority_ratio"] == pytest.approx(sum(shares) / len(shares))
    assert len(families_seen) >= 2, families_seen
