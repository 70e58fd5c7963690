"""End to end: a few steps of the embedded default, resume equivalence, run-directory safety, bad input."""
import json

import pytest
import torch

from mgrpo.config import load_config
from mgrpo.errors import TrainingError
from mgrpo.loop.trainer import train
from mgrpo.storage.run_dir import RunDirError

pytestmark = pytest.mark.slow


def tiny_config(tmp_path, cache, *overrides, run="run"):
    return load_config(None, [
        f"warm_start.cache_dir={cache}", f"run_dir={tmp_path / run}", "steps=4", "progress=false", "rollout.engine=hf",
        "algorithm.prompts_per_step=2", "algorithm.group_size=4",
        "rollout.max_new_tokens=64", "data.num_eval=4", "optim.lr=1e-3", "optim.warmup_steps=1",
        *overrides])


@pytest.fixture
def cache(tiny_cache):
    return tiny_cache


def test_embedded_default_few_steps(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, "steps=3", "save_every=1")
    summary = train(cfg, log=lambda *a: None)
    run = tmp_path / "run"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("reward", "reward_std", "pseudo_label_accuracy", "majority_ratio", "frac_reward_zero_std",
                "entropy", "entropy/q1", "entropy/median", "entropy/q3", "iqr/threshold", "iqr/pruned_frac",
                "kl", "grad_norm", "lr", "completions/mean_length", "tokens_per_second", "step_time",
                "peak_memory_gib"):
        assert key in steps[0], key
    assert 0.0 <= steps[-1]["majority_ratio"] <= 1.0 and steps[0]["entropy"] > 0
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    assert (run / "final" / "config.json").is_file() and (run / "config.yaml").is_file()
    assert len(list((run / "checkpoints").iterdir())) == 2          # keep_checkpoints=2
    # the momentum model moved towards the policy but is not the policy
    policy = dict(summary["models"].policy.hf_named_parameters())
    name, k = next(summary["models"].momentum.named_weights(torch.float32))
    assert not torch.equal(k, policy[name].detach())


# fp32 momentum with adamw8bit is not a case of its own: bitsandbytes' state resumes in int8-adamw8bit
@pytest.mark.parametrize("momentum_dtype,optimizer", [("fp32", "adamw"), ("int8", "adamw"), ("int8", "adamw8bit")])
def test_resume_matches_straight_run(tmp_path, cache, momentum_dtype, optimizer):
    """1 step + resume + 1 = 2 straight steps, bit for bit: policy, momentum model and (through them) the
    optimizer's state and the data stream, with torch's AdamW (fused with the int8 momentum) and bitsandbytes'
    8-bit AdamW."""
    dtype = (f"algorithm.momentum_dtype={momentum_dtype}", f"optim.name={optimizer}", "steps=2", "data.num_eval=0")
    straight = train(tiny_config(tmp_path, cache, *dtype, run="straight"), log=lambda *a: None)
    train(tiny_config(tmp_path, cache, *dtype, run="split"), log=lambda *a: None, stop_after_steps=1)
    resumed = train(tiny_config(tmp_path, cache, *dtype, "resume=true", run="split"), log=lambda *a: None)
    for (name, a), (_, b) in zip(straight["models"].policy.hf_named_parameters(),
                                 resumed["models"].policy.hf_named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ka = dict(straight["models"].momentum.named_weights(torch.float32))
    kb = dict(resumed["models"].momentum.named_weights(torch.float32))
    for name in ka:
        torch.testing.assert_close(ka[name], kb[name], rtol=0, atol=0, msg=name)


def test_run_dir_is_never_overwritten(tmp_path, cache):
    train(tiny_config(tmp_path, cache, "steps=1", "data.num_eval=0"), log=lambda *a: None)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match="overwrite=true"):
        train(tiny_config(tmp_path, cache, "steps=1", "data.num_eval=0"), log=lambda *a: None)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    with pytest.raises(RunDirError, match="holds no checkpoint"):
        train(tiny_config(tmp_path, cache, "resume=true", run="empty"), log=lambda *a: None)


def test_srt_baseline_runs(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, "algorithm.mode=srt", "steps=1", "data.num_eval=0")
    summary = train(cfg, log=lambda *a: None)
    assert summary["models"].momentum is None


def test_bad_inputs_fail_before_training(tmp_path, cache):
    with pytest.raises(Exception, match="does not exist"):
        train(tiny_config(tmp_path, cache, f"data.source={tmp_path / 'nope.jsonl'}"), log=lambda *a: None)
    with pytest.raises(TrainingError, match="is a directory without config.json, not a model"):
        train(tiny_config(tmp_path, cache, f"model.path={tmp_path}", run="r2"), log=lambda *a: None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TrainingError, match="does not load"):
        train(tiny_config(tmp_path, cache, f"model.path={tmp_path}", run="r3"), log=lambda *a: None)


def test_nonfinite_loss_skips_then_stops(tmp_path, cache, monkeypatch):
    import mgrpo.algorithm as alg
    monkeypatch.setattr(alg, "kl_k3", lambda logp, ref: logp * float("nan"))
    with pytest.raises(TrainingError, match="not finite in 2 steps in a row"):
        train(tiny_config(tmp_path, cache, "algorithm.max_nonfinite_in_a_row=2", "data.num_eval=0"),
              log=lambda *a: None)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in records] == [1]


def test_int8_momentum_trains_the_embedded_default(tmp_path, cache):
    """momentum_dtype=int8: the fused AdamW + 8-bit delta kernel (interpreter on a CPU) drives training."""
    summary = train(tiny_config(tmp_path, cache, "algorithm.momentum_dtype=int8", "steps=2", "data.num_eval=0"),
                    log=lambda *a: None)
    momentum, policy = summary["models"].momentum, dict(summary["models"].policy.hf_named_parameters())
    assert momentum.bytes_per_parameter() <= 1.05
    differs = [not torch.equal(k, policy[n].detach()) for n, k in momentum.named_weights(torch.float32)]
    assert any(differs)


def test_fused_and_torch_logprobs_give_the_same_step(tmp_path, cache):
    """Switching logprob_impl changes nothing beyond tolerance: same rollouts, same update."""
    results = {}
    for impl in ("torch", "fused"):
        results[impl] = train(tiny_config(tmp_path, cache, f"algorithm.logprob_impl={impl}", "steps=1",
                                          "data.num_eval=0", run=impl), log=lambda *a: None)
    a = dict(results["torch"]["models"].policy.hf_named_parameters())
    for name, p in results["fused"]["models"].policy.hf_named_parameters():
        torch.testing.assert_close(p, a[name], atol=1e-5, rtol=1e-4, msg=name)
    ma = [json.loads(l) for l in (tmp_path / "torch" / "metrics.jsonl").read_text().splitlines()][0]
    mb = [json.loads(l) for l in (tmp_path / "fused" / "metrics.jsonl").read_text().splitlines()][0]
    assert ma["iqr/pruned_frac"] == mb["iqr/pruned_frac"] and ma["reward"] == mb["reward"]
    assert abs(ma["loss"] - mb["loss"]) < 1e-4 and abs(ma["entropy"] - mb["entropy"]) < 1e-4


def test_response_budget_longer_than_the_model_is_refused_early(tmp_path, cache):
    with pytest.raises(TrainingError, match=r"rollout.max_new_tokens=600 plus the longest prompt .* set "
                                            r"rollout.max_new_tokens <= \d+"):
        train(tiny_config(tmp_path, cache, "rollout.max_new_tokens=600"), log=lambda *a: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_after_a_crash_keeps_each_step_once(tmp_path, cache):
    """A run killed after logging step 3 but whose newest checkpoint is step 2 resumes at 2 and logs 3 once."""
    import shutil
    train(tiny_config(tmp_path, cache, "steps=5", "save_every=2", "keep_checkpoints=0", "data.num_eval=0"),
          log=lambda *a: None, stop_after_steps=3)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000003")     # as if killed before that checkpoint
    train(tiny_config(tmp_path, cache, "steps=5", "save_every=2", "resume=true", "data.num_eval=0"),
          log=lambda *a: None)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_a_resumed_run_still_holds_greedy_answers_to_the_base_models_vote(tmp_path, cache):
    """eval/base_vote_agreement after a resume compares with the BASE model's held-out vote (kept in the
    checkpoint), not with the resumed model's own: the same figure as the uninterrupted run's."""
    settings = ("steps=3", "data.num_eval=24", "eval.k=2", "optim.lr=3e-3")
    train(tiny_config(tmp_path, cache, *settings, run="straight"), log=lambda *a: None)
    train(tiny_config(tmp_path, cache, *settings, run="split"), log=lambda *a: None, stop_after_steps=2)
    train(tiny_config(tmp_path, cache, *settings, "resume=true", run="split"), log=lambda *a: None)

    def final_eval(run):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "eval/greedy" in r][-1]

    straight, resumed = final_eval("straight"), final_eval("split")
    assert straight["step"] == resumed["step"] == 3 and straight["eval/greedy"] == resumed["eval/greedy"]
    assert resumed["eval/base_vote_agreement"] == straight["eval/base_vote_agreement"]


def test_first_run_output_is_the_projects_own(tmp_path, cache):
    """`mgrpo train` on the real vLLM engine, as a user runs it: every step to the end, and the terminal shows
    our lines and the progress bar; vLLM's INFO lines only with verbose=true."""
    pytest.importorskip("vllm")
    import subprocess
    import sys
    args = [sys.executable, "-m", "mgrpo", "train", f"warm_start.cache_dir={cache}", f"run_dir={tmp_path / 'run'}",
            "steps=2", "rollout.engine=vllm", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
            "rollout.max_new_tokens=48", "data.num_eval=8", "eval.k=2"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in lines if " INFO " in line], "vLLM INFO lines leaked into the default output"
    assert len(lines) < 40, "\n".join(lines)
    assert any(line.startswith("[eval] held-out") for line in lines) and any("[done]" in line for line in lines)
    # the embedded default on the real vLLM engine trains every step to the end (metrics and final model)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("answers,all_skipped", [(("7",), True), (("7", "7", "5", None), False)])
def test_micro_batches_with_zero_advantage_run_no_backward(tmp_path, cache, answers, all_skipped):
    """Without a KL term, a unanimous vote gives every response advantage 0 and a loss of 0: no forward or
    backward (counted in the metrics and said in the step line); mixed answers train (only their all-zero
    micro-batches skipped). With the KL term (the default) nothing is skipped: tests/test_batching.py."""
    from transformers import AutoModelForCausalLM

    from mgrpo.data.tiny import base_model_dir, build_tokenizer
    from tests.scripted_engine import ScriptedEngine
    cfg = tiny_config(tmp_path, cache, "steps=1", "data.num_eval=0", "optim.micro_batch_tokens=160",
                      "optim.layout=padded", "log_every=1", "algorithm.kl_coef=0")
    base = base_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None)
    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(base).named_parameters()]
    lines = []
    train(cfg, log=lines.append, engine=ScriptedEngine(build_tokenizer(), names, answers=answers))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    total, skipped = row["batch/micro_batches"], row["batch/skipped_micro_batches"]
    assert total > 1
    if all_skipped:
        assert skipped == total and row["grad_norm"] == 0.0
        assert any(f"skipped {total}/{total} micro-batches" in str(line) for line in lines)
    else:
        assert skipped < total and row["grad_norm"] > 0.0
