"""Evaluation: the metrics against hand-computed values, the command end to end, the checkpoint sweep, and
the trainer's in-training validation."""
import json
import math

import pytest
import torch

from mgrpo.commands import main as cli
from mgrpo.config import EvalConfig
from mgrpo.data.problems import Problem
from mgrpo.engines.base import Completion, RolloutEngine
from mgrpo.evaluation.harness import (
    EvalError,
    agreement_with_votes,
    avg_at_k,
    evaluate,
    held_out_votes,
    maj_at_k,
    pass_at_k,
)

# ---------------------------------------------------------------------------------------------------------
# Metrics

def test_pass_at_k_hand_values_and_closed_form():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)          # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)                 # pass@1 = c / n
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(6, 5, 2) == 1.0                                 # fewer than k wrong: always a hit
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_avg_and_maj_with_ties_and_abstentions():
    assert avg_at_k([True, False, True, True], 4) == 0.75
    assert avg_at_k([True, False, True, True], 2) == 0.5               # only the first k count
    assert maj_at_k(["3", "4", None, "4"], "4", 4)                     # 2 votes to 1; None abstains
    assert not maj_at_k(["3", "4", None, None], "4", 4)                # tie: the earliest answer (3) wins
    assert maj_at_k(["4", "3", None, None], "4", 4)
    assert not maj_at_k([None, None], "4", 2)                          # nobody voted: no majority answer
    assert maj_at_k(["\\frac{1}{2}", "0.5", "1/3"], "1/2", 3)          # votes by math-verify equivalence
    assert not maj_at_k(["3", "4", "4"], "4", 1)                       # only the first k vote


class FixedEngine(RolloutEngine):
    """Greedy answers and samples fixed per prompt text."""

    def __init__(self, tokenizer, greedy: dict, samples: dict):
        self.tok, self.greedy, self.samples, self.calls = tokenizer, greedy, samples, 0

    def push_weights(self, named_tensors):
        pass

    def generate(self, prompts, params):
        self.calls += 1
        out = []
        for p in prompts:
            key = self.tok.decode(p)
            texts = [self.greedy[key]] if params.temperature == 0 else self.samples[key][:params.n]
            out.append([Completion(self.tok.encode(t) + [0], t) for t in texts])
        return out


def test_evaluate_figures_by_hand():
    from mgrpo.data.tiny import build_tokenizer
    tok = build_tokenizer()
    problems = [Problem("A", "4"), Problem("B", "7"), Problem("C", "1")]
    greedy = {"A": "\\boxed{4}", "B": "\\boxed{6}", "C": "no box"}
    samples = {"A": ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "x"],
               "B": ["\\boxed{7}", "\\boxed{6}", "\\boxed{6}", "\\boxed{7}"],      # tie 7/6: 7 came first
               "C": ["x", "x", "\\boxed{2}", "\\boxed{1}"]}                       # tie 2/1: 2 came first
    engine = FixedEngine(tok, greedy, samples)
    settings = EvalConfig(k=4, n=0, pass_k=[1, 2], temperature=0.6, greedy=True)
    figures, results = evaluate(engine, problems, lambda text: tok.encode(text), settings, 16)
    assert figures["problems"] == 3
    assert figures["greedy"] == pytest.approx(1 / 3)
    assert figures["avg@4"] == pytest.approx((2 / 4 + 2 / 4 + 1 / 4) / 3)
    assert figures["maj@4"] == pytest.approx((1 + 1 + 0) / 3)
    assert figures["pass@1"] == pytest.approx(figures["avg@4"])           # pass@1 from n = k samples is avg@k
    expected_p2 = (pass_at_k(4, 2, 2) + pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 3
    assert figures["pass@2"] == pytest.approx(expected_p2)
    assert figures["no_answer_frac"] == pytest.approx(4 / 15)             # 3 samples + 1 greedy of 15 responses
    assert [r.index for r in results] == [0, 1, 2] and results[1].samples[0]["answer"] == "7"


def test_figures_per_family_by_hand():
    """Problems with families: each family's greedy, avg@k and maj@k over its own problems (by hand), the mean
    over all of them unchanged, and the trainer's eval/<family>/... keys."""
    from mgrpo.data.tiny import build_tokenizer
    from mgrpo.loop.records import eval_metrics
    tok = build_tokenizer()
    problems = [Problem("A", "4", "short"), Problem("B", "7", "long"), Problem("C", "1", "long")]
    greedy = {"A": "\\boxed{4}", "B": "\\boxed{7}", "C": "\\boxed{2}"}
    samples = {"A": ["\\boxed{4}", "\\boxed{4}"], "B": ["\\boxed{7}", "\\boxed{6}"], "C": ["\\boxed{2}", "\\boxed{2}"]}
    settings = EvalConfig(k=2, n=0, pass_k=[], temperature=0.6, greedy=True)
    figures, _ = evaluate(FixedEngine(tok, greedy, samples), problems, lambda text: tok.encode(text), settings, 16)
    assert figures["greedy"] == pytest.approx(2 / 3) and figures["avg@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert figures["short/problems"] == 1 and figures["long/problems"] == 2
    assert figures["short/greedy"] == 1.0 and figures["long/greedy"] == 0.5
    assert figures["short/avg@2"] == 1.0 and figures["long/avg@2"] == pytest.approx(0.25)
    assert figures["short/maj@2"] == 1.0 and figures["long/maj@2"] == pytest.approx(0.5)   # B: 7 first of a tie
    logged = eval_metrics(figures, 2)
    assert logged["eval/long/maj@k"] == figures["long/maj@2"] and logged["eval/maj@k"] == figures["maj@2"]
    one_family = [Problem("A", "4", "short"), Problem("B", "7", "short")]
    figures, _ = evaluate(FixedEngine(tok, greedy, samples), one_family, lambda text: tok.encode(text), settings, 16)
    assert not any("/" in key for key in figures)             # one family: its figures are the mean's


def test_evaluate_with_answers_in_other_forms():
    """answer_format=math_verify grades responses that never box their answer (and boxed ones too)."""
    from mgrpo.data.tiny import build_tokenizer
    tok = build_tokenizer()
    engine = FixedEngine(tok, {}, {"A": ["The answer is 4.", "It is 5.", "\\boxed{4}", "4"]})
    settings = EvalConfig(k=4, n=0, pass_k=[], temperature=0.6, greedy=False)
    boxed, _ = evaluate(engine, [Problem("A", "4")], lambda text: tok.encode(text), settings, 16)
    free, _ = evaluate(engine, [Problem("A", "4")], lambda text: tok.encode(text), settings, 16,
                       answer_format="math_verify")
    assert boxed["avg@4"] == 0.25 and boxed["no_answer_frac"] == 0.75
    assert free["avg@4"] == 0.75 and free["no_answer_frac"] == 0.0 and free["maj@4"] == 1.0


def test_grading_puts_the_ground_truth_first_where_math_verify_is_asymmetric():
    """math-verify's verify(gold, answer) is not symmetric: gold "x<2" accepts "(-\\infty,2)", gold "(-\\infty,2)"
    refuses "x<2". Held-out grading (greedy, samples, maj@k) and the base-vote agreement take the ground truth, or
    the base's vote, as the gold, as training's pseudo-label accuracy does (loop/stages.py)."""
    from mgrpo.answers import answers_equivalent
    from mgrpo.data.tiny import build_tokenizer
    interval, inequality = "(-\\infty,2)", "x<2"
    assert answers_equivalent(inequality, interval) and not answers_equivalent(interval, inequality)
    tok = build_tokenizer()
    problems = [Problem("A", inequality), Problem("B", "1/2")]
    samples = {"A": [f"\\boxed{{{interval}}}"] * 3, "B": ["\\boxed{0.5}", "\\boxed{3}", "\\boxed{0.5}"]}
    greedy = {"A": f"\\boxed{{{interval}}}", "B": "\\boxed{0.5}"}
    settings = EvalConfig(k=3, n=0, pass_k=[], temperature=0.6, greedy=True)
    figures, results = evaluate(FixedEngine(tok, greedy, samples), problems, lambda text: tok.encode(text),
                                settings, 16)
    assert figures["greedy"] == 1.0 and figures["maj@3"] == 1.0 and figures["avg@3"] == pytest.approx(5 / 6)
    assert maj_at_k([interval] * 3, inequality, 3) and not maj_at_k([inequality] * 3, interval, 3)
    # the base's vote is the gold of the agreement: a later greedy (-\infty,2) agrees with a vote of x<2
    later = {"A": f"\\boxed{{{interval}}}", "B": "\\boxed{3}"}
    _, later_results = evaluate(FixedEngine(tok, later, samples), problems, lambda text: tok.encode(text),
                                settings, 16)
    assert agreement_with_votes(later_results, [inequality, "0.5"])["base_vote_agreement"] == 0.5


def test_bad_settings_fail_before_generation():
    from mgrpo.config import ConfigError
    with pytest.raises(ConfigError, match="k >= 1"):
        EvalConfig(k=0)
    with pytest.raises(ConfigError, match="n >= k"):
        EvalConfig(k=4, n=2)
    engine = FixedEngine(None, {}, {})
    with pytest.raises(EvalError, match="no answer"):
        evaluate(engine, [Problem("A", None)], lambda t: [1], EvalConfig(k=1), 8)
    assert engine.calls == 0


# ---------------------------------------------------------------------------------------------------------
# The command

@pytest.fixture
def tiny_model_dir(tiny_cache):
    from mgrpo.config import load_config
    from mgrpo.data.tiny import base_model_dir
    cfg = load_config(None, [f"warm_start.cache_dir={tiny_cache}"])
    return base_model_dir(cfg.warm_start, cfg.data.instruction, log=lambda *a: None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_errors_are_clear_and_early(tiny_model_dir, tmp_path, capsys):
    good = write_jsonl(tmp_path / "ok.jsonl", [{"problem": "Compute 1 + 2.", "answer": "3"}])
    cases = [
        (["--data", str(write_jsonl(tmp_path / "no.jsonl", [{"problem": "Compute 1 + 2."}]))], "no answer to grade"),
        (["--data", str(write_jsonl(tmp_path / "no.jsonl", [{"problem": "Compute 1 + 2."}]))],
         "(mgrpo eval: --answer-field or --solution-field)"),                 # its flags, not only data.*'s
        (["--data", str(write_jsonl(tmp_path / "q.jsonl", [{"question": "Compute 1 + 2.", "answer": "3"}]))],
         "(mgrpo eval: --problem-field)"),
        (["--data", str(good), "--k", "0"], "k >= 1"),
        (["--data", str(good), "--k", "4", "--n", "2"], "n >= k"),
        (["--data", str(good), "--k", "2", "--pass-k", "4"], "--pass-k=[4]: each must be in [1, n=2]"),
        (["--data", f"math501={good}"], "unknown preset 'math501'"),
        (["--data", str(good), "--max-new-tokens", "5000"], "exceeds what the model can hold"),
    ]
    for extra, message in cases:
        assert cli(["eval", str(tiny_model_dir), *extra, "--engine", "hf", "--out", str(tmp_path / "o")]) == 1
        assert message in capsys.readouterr().err, extra
    assert cli(["eval", str(tmp_path), "--data", str(good)]) == 1          # not a model
    assert "neither a Hugging Face model directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert cli(["eval", str(broken), "--data", str(good), "--engine", "hf"]) == 1
    assert "does not load" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()                                  # nothing generated, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_cli_end_to_end_on_a_local_file(tiny_model_dir, tmp_path, capsys, engine):
    if engine == "vllm":
        pytest.importorskip("vllm")
    data = write_jsonl(tmp_path / "mini.jsonl", [
        {"problem": "Compute 3 + 4 - 2.", "answer": "5"},
        {"problem": "Compute 9 - 1 + 1.", "solution": "... \\boxed{9}"},
        {"problem": "Compute 2 + 2 + 2 - 1.", "answer": "5"}])
    out = tmp_path / "out"
    assert cli(["eval", str(tiny_model_dir), "--data", str(data), "--data", "arithmetic", "--limit", "6",
                "--k", "3", "--n", "4", "--pass-k", "1,4", "--greedy", "--max-new-tokens", "48", "--samples",
                "--engine", engine, "--enforce-eager", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "benchmark" in printed and "mini" in printed and "arithmetic" in printed and "maj@3" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["benchmarks"]["mini"]["k"] == 3 and report["benchmarks"]["mini"]["problems"] == 3
    assert report["benchmarks"]["arithmetic"]["problems"] == 6 and "torch" in report["versions"]
    rows = (out / "eval.csv").read_text().splitlines()
    assert rows[0].startswith("benchmark,problems,greedy,avg@3,maj@3,pass@1,pass@4")
    # the built-in task's problems have families (3 and 4 terms): a row for each after the benchmark's own
    assert [r.split(",")[0] for r in rows[1:]] == ["mini", "arithmetic", "arithmetic[3-term]", "arithmetic[4-term]"]
    parts = [r for r in report["results"] if r["benchmark"].startswith("arithmetic[")]
    assert sum(r["problems"] for r in parts) == 6
    assert sum(r["greedy"] * r["problems"] for r in parts) / 6 == pytest.approx(report["results"][1]["greedy"])
    samples = [json.loads(line) for line in (out / "samples_mini.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and len(samples[0]["samples"]) == 4 and samples[1]["answer"] == "9"
    for result in report["results"]:
        assert 0 <= result["maj@3"] <= 1 and result["pass@1"] <= result["pass@4"]


@pytest.mark.slow
def test_agreement_with_the_base_vote_by_hand():
    """base_vote_agreement: a later model's greedy answers against the base model's majority answers (by hand),
    problems without a base vote left out, per family, and under the trainer's eval/ keys; no ground truth read."""
    from mgrpo.data.tiny import build_tokenizer
    from mgrpo.loop.records import eval_metrics
    tok = build_tokenizer()
    problems = [Problem("A", "4", "short"), Problem("B", "7", "long"), Problem("C", "1", "long"),
                Problem("D", "3", "long")]
    settings = EvalConfig(k=3, n=0, pass_k=[], temperature=0.6, greedy=True)
    base_samples = {"A": ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}"],      # vote 4
                    "B": ["\\boxed{6}", "\\boxed{7}", "\\boxed{6}"],      # vote 6 (wrong: the truth is 7)
                    "C": ["\\boxed{1}", "\\boxed{2}", "\\boxed{9}"],      # three-way tie: the first, 1
                    "D": ["x", "y", "z"]}                                    # no answer: no vote
    base_greedy = {"A": "\\boxed{4}", "B": "\\boxed{7}", "C": "\\boxed{2}", "D": "\\boxed{3}"}
    encode = lambda text: tok.encode(text)       # noqa: E731
    _, base = evaluate(FixedEngine(tok, base_greedy, base_samples), problems, encode, settings, 16)
    votes = held_out_votes(base, 3)
    assert votes == ["4", "6", "1", None]
    # the base against its own vote: A agrees; B (7 vs 6) and C (2 vs 1) do not; D has no vote
    assert agreement_with_votes(base, votes) == {"base_vote_agreement": pytest.approx(1 / 3),
                                                 "short/base_vote_agreement": 1.0, "long/base_vote_agreement": 0.0}
    # a later model that learned the vote's error on B and lost A: agreement is with the vote, right or wrong
    later_greedy = {"A": "\\boxed{5}", "B": "\\boxed{6}", "C": "\\boxed{1.0}", "D": "\\boxed{3}"}
    _, later = evaluate(FixedEngine(tok, later_greedy, base_samples), problems, encode, settings, 16)
    figures = agreement_with_votes(later, votes)
    assert figures["base_vote_agreement"] == pytest.approx(2 / 3)          # B and C (1.0 is 1), not A
    assert figures["short/base_vote_agreement"] == 0.0 and figures["long/base_vote_agreement"] == 1.0
    assert eval_metrics(figures, 3)["eval/long/base_vote_agreement"] == 1.0
    with pytest.raises(EvalError, match="same held-out set"):
        agreement_with_votes(later[:2], votes)


def test_checkpoint_sweep_and_in_training_validation(tiny_cache, tmp_path, capsys):
    from mgrpo.config import load_config
    from mgrpo.loop.trainer import train
    run = tmp_path / "run"
    train(load_config(None, [
        f"warm_start.cache_dir={tiny_cache}", f"run_dir={run}",
        "steps=4", "save_every=2", "keep_checkpoints=0", "snapshot_every=3", "data.eval_every=2", "optim.lr=3e-3",
        "data.num_eval=16", "eval.k=2", "progress=false", "log_every=0", "rollout.engine=hf",
        "algorithm.prompts_per_step=2", "algorithm.group_size=4", "rollout.max_new_tokens=48"]), log=lambda *a: None)
    # in-training validation: before training (step 0), every eval_every steps, and after the last step
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/greedy" in r] == [0, 2, 4]
    assert all({"eval/avg@k", "eval/maj@k", "eval/k"} <= set(r) for r in records if "eval/greedy" in r)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step_000003"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]

    out = tmp_path / "sweep"
    assert cli(["eval", str(run), "--all-checkpoints", "--engine", "hf", "--k", "2", "--out", str(out),
                "--samples"]) == 0
    lines = (out / "accuracy_vs_step.csv").read_text().splitlines()
    assert lines[0].startswith("step,benchmark,problems,greedy,avg@2,maj@2")
    lines = [line for line in lines if "[" not in line.split(",")[1]]      # not the per-family rows
    # base, the step-2 checkpoint (weights loaded from its DCP shards), the step-3 snapshot, the final model
    assert [int(line.split(",")[0]) for line in lines[1:]] == [0, 2, 3, 4]
    assert (out / "accuracy_vs_step.png").stat().st_size > 10_000
    # the sweep's figures are the trainer's own validations (same weights, data, settings and seeds)
    results = {r["step"]: r for r in json.loads((out / "eval.json").read_text())["results"] if "[" not in r["benchmark"]}
    for step in (0, 2, 4):
        trained = next(r for r in records if r["step"] == step and "eval/greedy" in r)
        assert results[step]["greedy"] == trained["eval/greedy"], step
        assert results[step]["maj@2"] == trained["eval/maj@k"] and results[step]["avg@2"] == trained["eval/avg@k"]
    assert "checkpoints/step_000002" in results[2]["weights"]
    assert "step 4" in capsys.readouterr().out
    # base_vote_agreement at every validation is the greedy answers' agreement with the BASE model's vote (its
    # majority of k = 2 samples, ties to the first), recomputed here from the sweep's samples by plain counting
    def rows(step):
        return [json.loads(line) for line in next(out.glob(f"samples_*_step{step}.jsonl")).read_text().splitlines()]

    def vote(answers):
        counts = {}
        for a in answers:
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        return max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None

    base_votes = [vote([s["answer"] for s in r["samples"][:2]]) for r in rows(0)]
    # the trained model votes otherwise on some problems, so holding it to its own vote would give another figure
    assert [vote([s["answer"] for s in r["samples"][:2]]) for r in rows(4)] != base_votes
    for step in (0, 2, 4):
        pairs = [(r["greedy"]["answer"], v) for r, v in zip(rows(step), base_votes) if v is not None]
        expected = sum(g == v for g, v in pairs) / len(pairs)
        trained = next(r for r in records if r["step"] == step and "eval/greedy" in r)
        assert trained["eval/base_vote_agreement"] == pytest.approx(expected), step


@pytest.mark.slow
def test_vllm_eval_with_the_default_budget_fits_the_model(tiny_model_dir, tmp_path, capsys):
    """No --max-new-tokens: the preset-less default budget (3072) is capped to what the tiny model's 512
    positions hold after the longest prompt, and the vLLM engine built for it never asks for more positions
    than the model has (it asked for the budget plus a margin: 528 > 512, and failed)."""
    pytest.importorskip("vllm")
    data = write_jsonl(tmp_path / "few.jsonl", [{"problem": "Compute 3 + 4 - 2.", "answer": "5"},
                                                {"problem": "Compute 9 - 1 + 1.", "answer": "9"}])
    assert cli(["eval", str(tiny_model_dir), "--data", str(data), "--k", "2", "--engine", "vllm", "--enforce-eager",
                "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "the default budget of 3072 new tokens does not fit this model (512 positions" in printed
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    budget = report["benchmarks"]["few"]["max_new_tokens"]
    assert 400 < budget < 512 and report["results"][0]["problems"] == 2


@pytest.mark.slow
def test_an_engine_longer_than_the_model_says_so(tiny_model_dir):
    """vLLM's own refusal of a length past the model's positions is reported as the length, with the setting,
    not as memory; and a rollout.max_model_len past the model is refused before vLLM is asked."""
    pytest.importorskip("vllm")
    from mgrpo.config import RolloutConfig
    from mgrpo.distributed import Dist
    from mgrpo.engines.vllm import EngineBuildError, VLLMEngine
    with pytest.raises(EngineBuildError, match="max_model_len=600 is longer than the model holds") as raised:
        VLLMEngine(str(tiny_model_dir), [], dtype=torch.float32, max_model_len=600)
    assert "gpu_memory_utilization" not in str(raised.value).split("(")[0]
    with pytest.raises(EngineBuildError, match="rollout.max_model_len=600 is longer than .*max_position_embeddings=512"):
        VLLMEngine.from_config(RolloutConfig(max_model_len=600), 0, str(tiny_model_dir), Dist(), 100, [],
                               torch.float32)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails a test whose command got as far as loading a model."""
    from mgrpo.evaluation import benchmarks

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(benchmarks, "load_model", load_model)


@pytest.mark.parametrize("case", ["out_is_a_file", "out_under_a_file", "out_in_proc", "negative_limit", "negative_seed",
                                  "run_config_not_yaml", "run_config_unknown_key"])
def test_bad_eval_input_fails_before_the_model_loads(case, tmp_path, capsys, no_model_loads):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = str(write_jsonl(tmp_path / "ok.jsonl", [{"problem": "Compute 1 + 2.", "answer": "3"}]))
    afile = tmp_path / "afile"
    afile.write_text("")
    run = tmp_path / "run"
    run.mkdir()
    args, message = {
        "out_is_a_file": (["--out", str(afile)], f"--out {afile} is a file, not a directory"),
        "out_under_a_file": (["--out", str(afile / "x")], f"--out {afile / 'x'}: cannot write there (Not a directory)"),
        "out_in_proc": (["--out", "/proc/mgrpo-x"], "--out /proc/mgrpo-x: cannot write there"),
        "negative_limit": (["--limit", "-1"], "--limit -1: must be >= 0 (0: every problem)"),
        "negative_seed": (["--seed", "-1"], "--seed=-1: must be in [0, 2**32)"),
        "run_config_not_yaml": ([], f"{run / 'config.yaml'} is not valid YAML (line 2, column 1)"),
        "run_config_unknown_key": ([], f"{run / 'config.yaml'}: unknown config key stpes (did you mean steps?)"),
    }[case]
    (run / "config.yaml").write_text("steps: [\n" if case == "run_config_not_yaml" else "stpes: 3\n")
    target = run if case.startswith("run_config") else model
    assert cli(["eval", str(target), "--data", data, "--engine", "hf", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mgrpo eval: error: {message}") and "Traceback" not in err, err
    assert not (model / "eval").exists() and not (tmp_path / "evals").exists()


def test_max_new_tokens_0_is_the_default_budget_and_fits_the_model(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--max-new-tokens 0 means what eval.max_new_tokens=0 means (the default budget): shortened to fit the
    model like the default is, where an explicit budget that does not fit is refused."""
    from mgrpo.evaluation import benchmarks

    def stop(*args, **kwargs):
        raise EvalError("stopped before the engine")
    monkeypatch.setattr(benchmarks, "make_engine", stop)
    data = str(write_jsonl(tmp_path / "ok.jsonl", [{"problem": "Compute 1 + 2.", "answer": "3"}]))
    assert cli(["eval", str(tiny_model_dir), "--data", data, "--engine", "hf", "--max-new-tokens", "0",
                "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "the default budget of 3072 new tokens does not fit this model" in captured.out
    assert captured.err.startswith("mgrpo eval: error: stopped before the engine")
    assert not (tmp_path / "o").exists()


def run_with_checkpoints(root, base_dir, steps):
    """A run directory as `mgrpo train` leaves it, made without training: its config, its base model and a
    checkpoint (the base's weights as the policy, written and hashed by save_checkpoint) at each of `steps`."""
    from mgrpo.distributed import Dist
    from mgrpo.evaluation.benchmarks import load_model
    from mgrpo.storage.checkpoint import save_checkpoint
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"steps: {max(steps) + 1}\n")
    (run / "base_model.txt").write_text(str(base_dir))
    model, _ = load_model(base_dir, "model")
    policy = {f"causal_lm.{name}": t.detach().clone() for name, t in model.state_dict().items()}
    for step in steps:
        save_checkpoint(run, step, {"policy": policy}, {}, 0, Dist(), log=lambda *a: None)
    return run


def damage(checkpoint):
    """A checkpoint's shard cut short, as a disk that filled up or a copy that stopped leaves it."""
    shard = next(checkpoint.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(1000)
    return shard


SWEEP = ["--all-checkpoints", "--engine", "hf", "--limit", "2", "--k", "1", "--max-new-tokens", "8"]


def test_a_sweep_skips_a_damaged_checkpoint_before_any_model_work(tiny_model_dir, tmp_path, capsys):
    """A checkpoint whose files are not as written is found before any model loads (as a resume finds it: sizes
    and sha256 against its checkpoint.json), named in one line and left out; the others are evaluated, where
    the sweep used to stop at it with DCP's traceback and write nothing."""
    run = run_with_checkpoints(tmp_path, tiny_model_dir, [1, 2, 3])
    shard = damage(run / "checkpoints" / "step_000002")
    out = tmp_path / "sweep"
    assert cli(["eval", str(run), *SWEEP, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    written = json.loads((shard.parent / "checkpoint.json").read_text())["files"][shard.name]["size"]
    skip = lines.index(f"[eval] skipping checkpoint {shard.parent}: it is damaged or incomplete ({shard.name} has "
                       f"1000 bytes, {written} were written)")
    assert skip < lines.index(f"[eval] step 0: {tiny_model_dir}")                   # before the first model work
    assert "Traceback" not in captured.out + captured.err
    steps = [line.split(",")[0] for line in (out / "accuracy_vs_step.csv").read_text().splitlines()[1:]
             if "[" not in line.split(",")[1]]
    assert steps == ["0", "1", "3"]


def test_a_sweep_whose_every_checkpoint_is_damaged_says_so_before_any_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    run = run_with_checkpoints(tmp_path, tiny_model_dir, [1, 2])
    for step in (1, 2):
        damage(run / "checkpoints" / f"step_00000{step}")
    from mgrpo.evaluation import benchmarks

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(benchmarks, "load_model", load_model)
    out = tmp_path / "sweep"
    assert cli(["eval", str(run), *SWEEP, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mgrpo eval: error: no checkpoint of {run} can be evaluated, every one is damaged or "
                          "incomplete (step_000001: __0_0.distcp has 1000 bytes, "), err
    assert "restore their files" in err and err.count("\n") == 1 and not out.exists()


def test_a_sweep_that_fails_later_keeps_what_it_evaluated(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A checkpoint that verifies yet does not load (another model's) is skipped, saying why; a failure nobody
    expected (here, at step 3) stops the sweep, and the steps evaluated before it are written first."""
    from mgrpo.evaluation import benchmarks
    from mgrpo.storage.run_dir import RunDirError
    run = run_with_checkpoints(tmp_path, tiny_model_dir, [1, 2, 3, 4])
    load = benchmarks.load_policy_weights

    def failing(path, model):
        if path.name == "step_000001":
            raise RunDirError(f"checkpoint {path} does not match this run (a different model or settings?): ...\n"
                              "Traceback (most recent call last): ...")
        if path.name == "step_000003":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        load(path, model)
    monkeypatch.setattr(benchmarks, "load_policy_weights", failing)
    out = tmp_path / "sweep"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        cli(["eval", str(run), *SWEEP, "--out", str(out)])
    printed = capsys.readouterr().out
    assert (f"[eval] skipping step 1: checkpoint {run / 'checkpoints' / 'step_000001'} does not match this run "
            "(a different model or settings?): ...\n") in printed
    assert (f"[eval] stopped at step 3 (CUDA error: an illegal memory access was encountered): the results of "
            f"step(s) 0, 2 are written to {out}") in printed
    steps = [line.split(",")[0] for line in (out / "accuracy_vs_step.csv").read_text().splitlines()[1:]
             if "[" not in line.split(",")[1]]
    assert steps == ["0", "2"] and (out / "accuracy_vs_step.png").is_file()
    report = json.loads((out / "eval.json").read_text())
    assert report["stopped"] == {"step": 3, "reason": "CUDA error: an illegal memory access was encountered"}
    assert [s["step"] for s in report["skipped"]] == [1] and "Traceback" not in report["skipped"][0]["reason"]
