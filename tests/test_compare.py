"""`mgrpo compare`: the summary statistics by hand, and the short preset end to end (CSV, PNG, skip, refusal)."""
import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from mgrpo.commands import main
from mgrpo.comparison import markdown_tables, moving_average, run_report, summarize, warnings_only


def test_summarize_by_hand():
    rows = [{"method": "srt", "seed": 0, "step": 0, "eval/greedy": 0.5},
            {"method": "srt", "seed": 1, "step": 0, "eval/greedy": 0.5},
            {"method": "srt", "seed": 0, "step": 1, "reward": 0.2},
            {"method": "srt", "seed": 1, "step": 1, "reward": 0.6},
            {"method": "mgrpo", "seed": 0, "step": 1, "reward": 0.9}]
    out = {(r["method"], r["step"]): r for r in summarize(rows, keys=("eval/greedy", "reward"))}
    assert out[("srt", 0)]["eval/greedy/mean"] == 0.5 and out[("srt", 0)]["eval/greedy/std"] == 0.0
    srt1 = out[("srt", 1)]
    assert srt1["seeds"] == 2 and "eval/greedy/mean" not in srt1
    assert srt1["reward/mean"] == pytest.approx(0.4)
    assert srt1["reward/std"] == pytest.approx(math.sqrt(0.08))          # sample std of 0.2 and 0.6
    assert (srt1["reward/min"], srt1["reward/max"]) == (0.2, 0.6)
    assert out[("mgrpo", 1)]["reward/std"] == 0.0 and out[("mgrpo", 1)]["seeds"] == 1


def test_moving_average_is_trailing():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([1.0, 3.0], 1) == [1.0, 3.0]


def test_compare_shows_only_warnings_of_each_run():
    shown = []
    log = warnings_only(shown.append, "srt seed 1")
    log("step 3/30 reward 0.600 pl_acc 0.562")
    log("[eval] held-out (256 problems): greedy 50.8% -> 56.2%")
    log("[warning] step 57: collapse/entropy_ratio = 0.74 over the last 10 steps, below 0.75: a sign of collapse.")
    assert shown == ["[compare]   srt seed 1: [warning] step 57: collapse/entropy_ratio = 0.74 over the last 10 "
                     "steps, below 0.75: a sign of collapse."]


def synthetic_run(method, seed, greedy_by_step, entropy_by_step):
    """Logged rows as collect() gives them: training metrics every step, held-out figures where evaluated."""
    rows = []
    for step in range(0, max(entropy_by_step) + 1):
        row = {"method": method, "seed": seed, "step": step}
        if step in entropy_by_step:
            row.update({"entropy": entropy_by_step[step], "collapse/unanimous_frac": 0.1,
                        "collapse/entropy_ratio": entropy_by_step[step] / entropy_by_step[min(entropy_by_step)],
                        "kl": 0.01 if entropy_by_step[step] == 1.0 else 0.15})    # the policy runs away as it sharpens
            if method != "srt":      # the policy's majority answer is the momentum model's in 0.9, then 0.4
                row["collapse/momentum_agreement"] = 0.9 if step <= 55 else 0.4
        if step in greedy_by_step:
            row.update({"eval/greedy": greedy_by_step[step], "eval/maj@k": greedy_by_step[step] + 0.05})
        rows.append(row)
    return rows


def test_run_report_final_vs_best_and_the_monitors_lead():
    """A run whose KL to the initial model rises past 0.1 (the monitor's trailing mean over 10 steps) and whose
    held-out accuracy falls 4 points below its best later; a healthy run that never warns; a false alarm."""
    steps = range(1, 61)
    falling = {s: 1.0 if s <= 20 else 0.5 for s in steps}   # KL 0.15 from step 21: trailing mean 0.107 at step 27
    flat = {s: 1.0 for s in steps}
    rows = (synthetic_run("srt", 0, {0: 0.70, 20: 0.74, 40: 0.71, 60: 0.62}, falling)
            + synthetic_run("mgrpo", 0, {0: 0.70, 20: 0.74, 40: 0.75, 60: 0.74}, flat)
            + synthetic_run("mgrpo", 1, {0: 0.70, 20: 0.72, 40: 0.73, 60: 0.72}, falling))
    report = {(r["method"], r["seed"]): r for r in run_report(rows)}
    srt = report[("srt", 0)]
    assert srt["greedy/best"] == 0.74 and srt["greedy/best_step"] == 20 and srt["greedy/final"] == 0.62
    assert srt["greedy/final_minus_best"] == pytest.approx(-0.12)
    assert srt["maj@k/best_step"] == 20
    assert srt["decline_step"] == 60                       # 40: 3 points below the best, within the noise
    assert srt["warning_step/kl"] == 27 and srt["first_warning_step"] == 27
    assert srt["warning_lead_steps"] == 33 and not srt["false_alarm"]
    # At the end: the mean of the last 10 steps (entropy at half its start; no momentum model in SRT).
    assert srt["entropy_ratio/final"] == pytest.approx(0.5) and "momentum_agreement/final" not in srt
    healthy = report[("mgrpo", 0)]
    assert healthy["decline_step"] is None and healthy["first_warning_step"] is None
    assert not healthy["false_alarm"] and healthy["greedy/best_step"] == 40
    assert healthy["greedy/final_minus_best"] == pytest.approx(-0.01)
    assert healthy["entropy_ratio/final"] == pytest.approx(1.0)
    assert healthy["momentum_agreement/final"] == pytest.approx((5 * 0.9 + 5 * 0.4) / 10)
    assert report[("mgrpo", 1)]["false_alarm"] and report[("mgrpo", 1)]["warning_lead_steps"] is None


def test_markdown_tables_mean_spread_and_per_run():
    steps = range(1, 61)
    flat = {s: 1.0 for s in steps}
    rows = (synthetic_run("srt", 0, {0: 0.70, 30: 0.74, 60: 0.62}, flat)
            + synthetic_run("srt", 1, {0: 0.70, 30: 0.70, 60: 0.66}, flat)
            + synthetic_run("mgrpo", 0, {0: 0.70, 30: 0.75}, flat))           # a run with one evaluation less
    text = markdown_tables(summarize(rows), run_report(rows))
    lines = text.splitlines()
    assert lines[0].split("|")[2:5] == [" 0 ", " 30 ", " 60 "]
    srt = next(line for line in lines if line.startswith("| srt |"))
    # step 60: greedy mean 64.0, std of (62, 66) = 2.8; maj@k 5 points above each; two seeds
    assert "64.0 ± 2.8 / 69.0 ± 2.8 (2)" in srt and "72.0 ± 2.8 / 77.0 ± 2.8 (2)" in srt
    mgrpo = next(line for line in lines if line.startswith("| mgrpo |"))
    assert mgrpo.rstrip().endswith("| - |") and "75.0 ± 0.0 / 80.0 ± 0.0 (1)" in mgrpo
    run = next(line for line in lines if line.startswith("| srt seed 0 |"))
    assert "| 74.0 (30) | 62.0 | -12.0 | -12.0 | 60 |" in run and "| 1.00 | - |" in run


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_short_comparison_writes_csv_and_png(tiny_cache, tmp_path, capsys):
    out = tmp_path / "cmp"
    common = ["--preset", "short", "--seeds", "2", "--out", str(out), f"warm_start.cache_dir={tiny_cache}",
              "rollout.engine=hf", "rollouts_every=1"]
    assert main(["compare", *common]) == 0
    methods = ["srt", "mgrpo", "mgrpo_no_iqr"]

    rows = read_csv(out / "compare.csv")
    for method in methods:
        for seed in ("0", "1"):
            steps = [int(r["step"]) for r in rows if r["method"] == method and r["seed"] == seed]
            assert steps == [0, 1, 2, 3], (method, seed, steps)
            assert (out / f"{method}_seed{seed}" / "final" / "config.json").is_file()
    # Every run starts from the same base model: the step-0 held-out figures are identical across runs.
    start = {r["eval/greedy"] for r in rows if r["step"] == "0"}
    assert len(start) == 1 and start != {""}
    # Different seeds draw different rollouts: the sampled token ids of step 1, response by response (a mean
    # reward over 2 prompts x G = 4 takes a handful of values and can tie).
    for method in methods:
        sampled = [[json.loads(line)["token_ids"] for line in
                    (out / f"{method}_seed{seed}" / "rollouts" / "step_000001.jsonl").read_text().splitlines()]
                   for seed in (0, 1)]
        assert len(sampled[0]) == len(sampled[1]) == 2 * 4
        assert sampled[0] != sampled[1], method

    summary = read_csv(out / "compare_summary.csv")
    assert {r["method"] for r in summary} == set(methods)
    for method in methods:
        evals = [r for r in summary if r["method"] == method and r["eval/greedy/mean"]]
        assert [int(r["step"]) for r in evals] == [0, 2, 3]           # data.eval_every=2, and the end
        trained = [r for r in summary if r["method"] == method and r["step"] != "0"]
        for r in trained:
            assert r["seeds"] == "2"
            assert float(r["reward/min"]) <= float(r["reward/mean"]) <= float(r["reward/max"])
            assert 0.0 <= float(r["pseudo_label_accuracy/mean"]) <= 1.0
            assert float(r["entropy/mean"]) > 0
    runs = read_csv(out / "compare_runs.csv")
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in methods for s in ("0", "1"))
    for r in runs:
        assert float(r["greedy/best"]) >= float(r["greedy/final"]) and r["greedy/best_step"] in ("0", "2", "3")
    assert "| srt seed 1 |" in (out / "compare.md").read_text()
    # Held-out figures per family (the built-in task's 3- and 4-term problems): each evaluation's families add up
    # to its mean, and every run reports each family's best and final
    for r in (r for r in rows if r["eval/greedy"]):
        counts = {f: int(r[f"eval/{f}-term/problems"]) for f in (3, 4)}
        assert sum(counts.values()) == 16
        mean = sum(float(r[f"eval/{f}-term/greedy"]) * n for f, n in counts.items()) / 16
        assert mean == pytest.approx(float(r["eval/greedy"]))
    assert all(r["3-term/greedy/final"] and r["4-term/maj@k/best"] for r in runs)
    assert "| 3-term greedy best (step) / final |" in (out / "compare.md").read_text()
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    printed = capsys.readouterr().out
    assert "srt" in printed and "mgrpo_no_iqr" in printed and "compare.png" in printed

    # Run again on the same --out: every run is finished, nothing retrains, the same table comes out.
    before = (out / "compare.csv").read_text()
    assert main(["compare", *common]) == 0
    assert "[compare] 1/" not in capsys.readouterr().out
    assert (out / "compare.csv").read_text() == before
    # Only the runs' metrics.jsonl kept (as bench/results keeps a long comparison): still finished, not rerun.
    kept = tmp_path / "kept"
    again = [str(kept) if a == str(out) else a for a in common]
    for run in out.glob("*_seed*"):
        (kept / run.name).mkdir(parents=True)
        shutil.copy(run / "metrics.jsonl", kept / run.name / "metrics.jsonl")
    shutil.copy(out / "compare.json", kept / "compare.json")
    assert main(["compare", *again]) == 0
    assert "[compare] 1/" not in capsys.readouterr().out
    assert (kept / "compare.csv").read_text() == before
    # A run cut short (its end-of-run evaluation missing) is not finished: --report leaves it out, and
    # continuing trains it again.
    lines = (kept / "srt_seed0" / "metrics.jsonl").read_text().splitlines()
    (kept / "srt_seed0" / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert main(["compare", *again, "--report"]) == 0
    assert "5 of 6 runs finished" in capsys.readouterr().out
    assert {r["seed"] for r in read_csv(kept / "compare_runs.csv") if r["method"] == "srt"} == {"1"}
    assert main(["compare", *again]) == 0
    assert "[compare] 1/1: srt seed 0" in capsys.readouterr().out
    # A second report of the same --out under its own name (e.g. a sweep's): the first one is left as it was.
    first = (kept / "compare.md").read_text()
    assert main(["compare", *again, "--report", "--methods", "srt", "--name", "compare_srt"]) == 0
    assert {r["method"] for r in read_csv(kept / "compare_srt_runs.csv")} == {"srt"}
    assert "| mgrpo seed 0 |" not in (kept / "compare_srt.md").read_text() and (kept / "compare_srt.png").is_file()
    assert (kept / "compare.md").read_text() == first

    # Other overrides on the same --out would mix two experiments in one table: refused.
    assert main(["compare", *common, "optim.lr=1e-3"]) == 1
    err = capsys.readouterr().err       # ... and the settings it was made with given as a command line
    assert "holds a comparison" in err and f"(mgrpo compare --preset short warm_start.cache_dir={tiny_cache}" in err


def test_unknown_method_is_refused(capsys, tmp_path):
    assert main(["compare", "--methods", "srt,ppo", "--out", str(tmp_path / "x")]) == 1
    assert "unknown ['ppo']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_zero_seeds_is_refused_before_any_work(tmp_path, capsys):
    from mgrpo.commands import main as cli
    assert cli(["compare", "--seeds", "0", "--out", str(tmp_path / "cmp")]) == 1
    assert "--seeds 0: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_a_large_seed_count_is_refused_as_probably_meant_as_one_seed(tmp_path, capsys):
    """`--seeds 100` reads as "seed 100" but is a count: 100 runs per method. Refused, saying how to write either."""
    from mgrpo.commands import main as cli
    from mgrpo.comparison import CompareError, parse_seeds
    with pytest.raises(CompareError, match="is a count"):
        parse_seeds("100")
    assert cli(["compare", "--seeds", "100", "--out", str(tmp_path / "cmp")]) == 1
    err = capsys.readouterr().err
    assert "--seeds 100 is a count: 100 runs per method" in err and "--seeds 100-100" in err and "--seeds 0-99" in err
    assert not (tmp_path / "cmp").exists()
    assert parse_seeds("100-100") == [100] and parse_seeds("0-99") == list(range(100)) and parse_seeds("10") == list(range(10))


def no_run(*args, **kwargs):
    raise AssertionError("a run started")


@pytest.mark.parametrize("seeds, said", [
    ("2-0", "--seeds 2-0: the range is reversed (2 down to 0): write the lower seed first, --seeds 0-2"),
    ("0-1000000000", "--seeds 0-1000000000: 1000000001 runs per method, more than 1000: give fewer seeds"),
    ("1000000000000", "For the seed 1000000000000 alone write --seeds 1000000000000-1000000000000; for that many "
                      "seeds, at most 1000"),
    (",".join(map(str, range(1001))), "1001 runs per method, more than 1000: give fewer seeds"),
])
def test_a_reversed_or_huge_seed_range_is_refused_before_its_list_is_made(seeds, said, tmp_path, capsys,
                                                                          monkeypatch):
    import mgrpo.comparison as comparison

    def small_range(*args):
        assert len(range(*args)) <= 1000, f"a list of {len(range(*args))} seeds was made"
        return range(*args)
    monkeypatch.setattr(comparison, "range", small_range, raising=False)
    monkeypatch.setattr(comparison, "run_all", no_run)
    assert main(["compare", "--seeds", seeds, "--out", str(tmp_path / "cmp")]) == 1
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()
    assert comparison.parse_seeds("0-999") == list(range(1000))


@pytest.mark.parametrize("where, argument, said", [
    ("override", "run_dir={shared}", "compare gives every run its own run_dir under --out: remove run_dir="),
    ("override", "seed=7", "compare sets seed per run from --seeds: remove seed=7 (choose them with --seeds, that "
                           "one alone: --seeds 7-7)"),
    ("override", "resume=true", "compare resumes each unfinished run of --out itself: remove resume=true"),
    ("override", "resume_from={shared}", "remove resume_from="),
    ("override", "overwrite=true", "compare never overwrites a run of --out (finished runs are skipped): remove "
                                   "overwrite=true"),
    ("override", "algorithm.mode=srt", "algorithm.mode tells the methods apart (srt sets algorithm.mode=srt, mgrpo "
                                       "sets algorithm.mode=mgrpo"),
    ("override", "algorithm.iqr_filter=false", "algorithm.iqr_filter tells the methods apart (mgrpo_no_iqr sets "
                                               "algorithm.iqr_filter=false) and algorithm.iqr_filter=false would "
                                               "set it for every one"),
    ("override", "algorithm={{mode: srt}}", "algorithm.mode tells the methods apart"),   # the whole section
    ("method", "mgrpo+seed=3", "--methods/--sweep mgrpo+seed=3: compare sets seed per run from --seeds, not per "
                               "method: remove +seed=3"),
    ("method", "srt+run_dir={shared}", "compare gives every run its own run_dir under --out, not per method"),
    ("method", "mgrpo+algorithm.momentum=0.9+overwrite=true", "not per method: remove +overwrite=true"),
    ("method", "mgrpo+algorithm.mode=srt", "mgrpo is algorithm.mode=mgrpo, and +algorithm.mode=srt would change "
                                           "that under its name"),
    ("method", "mgrpo_no_iqr+algorithm.iqr_filter=true", "+algorithm.iqr_filter=true would change that"),
    ("method", "srt,mgrpo,srt", "--methods: srt given twice: name each method once"),
    ("sweep", "seed=1,2", "--methods/--sweep mgrpo+seed=1: compare sets seed per run from --seeds"),
])
def test_overrides_of_what_compare_sets_itself_are_refused_before_any_run(where, argument, said, tmp_path, capsys,
                                                                          monkeypatch):
    """Every run in one directory (each resuming the last), every "seed" the same seed, every method the same
    method: refused, naming the key, before any run starts or any directory is made."""
    import mgrpo.comparison as comparison
    monkeypatch.setattr(comparison, "run_all", no_run)
    shared, out = tmp_path / "shared", tmp_path / "cmp"
    argument = argument.format(shared=shared)
    args = {"override": ["--methods", "srt,mgrpo,mgrpo_no_iqr", argument], "method": ["--methods", argument],
            "sweep": ["--methods", "mgrpo", "--sweep", argument]}[where]
    assert main(["compare", "--preset", "short", "--seeds", "2", "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not out.exists() and not shared.exists()


def test_a_variants_own_settings_and_the_other_train_settings_are_not_refused():
    """A method's variant may set what the method does not define (the collapse preset's anchored M-GRPO, a
    sweep over the IQR filter); any other train setting applies to every run."""
    from mgrpo.comparison import ANCHORED, check_overrides
    check_overrides(["srt", "mgrpo", ANCHORED, "mgrpo+algorithm.iqr_filter=false"],
                    ["optim.lr=5e-5", "steps=10", "eval.seed=3", "data.num_eval=8"])


@pytest.mark.parametrize("out_is, report", [(out_is, False) for out_is in ("a file", "under a file", "not creatable",
                                                                          "garbage settings", "a list of settings")]
                         + [(out_is, True) for out_is in ("a file", "garbage settings", "a list of settings")])
def test_an_out_that_cannot_hold_a_comparison_is_refused(out_is, report, tmp_path, capsys, monkeypatch):
    import mgrpo.comparison as comparison
    monkeypatch.setattr(comparison, "run_all", no_run)
    (tmp_path / "afile").write_text("mine\n")
    out, said = {"a file": (tmp_path / "afile", "is a file, not a directory: give a directory"),
                 "under a file": (tmp_path / "afile" / "cmp", "cannot be created or written (Not a directory)"),
                 "not creatable": (Path("/proc/mgrpo_cmp"), "cannot be created or written"),
                 "garbage settings": (tmp_path / "old", "compare.json is not a comparison's settings (Expecting "),
                 "a list of settings": (tmp_path / "old", "compare.json is not a comparison's settings (a JSON list")
                 }[out_is]
    if out_is == "not creatable" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    if out_is.endswith("settings"):
        out.mkdir()
        (out / "compare.json").write_text("xx{" if out_is == "garbage settings" else "[1]")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["compare", "--preset", "short", "--out", str(out), *(["--report"] if report else [])]) == 1
    err = capsys.readouterr().err
    assert said in err and str(out) in err and "Traceback" not in err
    if out_is.endswith("settings"):
        assert "restore it, or move it away" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before     # nothing overwritten


def test_sweep_adds_one_method_per_value_checked_before_training(tmp_path):
    from mgrpo.comparison import CompareError, method_overrides, run_overrides, sweep_methods
    from mgrpo.config import ConfigError, load_config
    methods = sweep_methods(["mgrpo", "srt"], "algorithm.momentum=0.9,0.999")
    assert methods == ["mgrpo+algorithm.momentum=0.9", "mgrpo+algorithm.momentum=0.999",
                       "srt+algorithm.momentum=0.9", "srt+algorithm.momentum=0.999"]
    assert method_overrides(methods[1]) == ["algorithm.mode=mgrpo", "algorithm.momentum=0.999"]
    # several settings in one name (the collapse preset's anchored M-GRPO); a "+" inside a value stays in it
    assert method_overrides("mgrpo+algorithm.momentum_samples=8+algorithm.momentum=0.999+optim.lr=1e+4") == [
        "algorithm.mode=mgrpo", "algorithm.momentum_samples=8", "algorithm.momentum=0.999", "optim.lr=1e+4"]
    cfg = load_config(None, run_overrides("default", methods[1], 2, tmp_path, []))
    assert cfg.algorithm.momentum == 0.999 and cfg.seed == 2
    assert cfg.run_dir == str(tmp_path / "mgrpo+algorithm.momentum=0.999_seed2")
    with pytest.raises(CompareError, match="--sweep"):
        sweep_methods(["mgrpo"], "algorithm.momentum")
    from mgrpo.commands import main as cli
    assert cli(["compare", "--methods", "mgrpo", "--sweep", "algorithm.momentum=1.5", "--out",
                str(tmp_path / "c")]) == 1                       # an invalid value fails before any run
    with pytest.raises(ConfigError):
        load_config(None, run_overrides("default", "mgrpo+algorithm.momentum=1.5", 0, tmp_path, []))
    # a variant named in --methods is checked the same way (one --report over methods and sweeps)
    assert cli(["compare", "--methods", "srt,mgrpo+algorithm.momentum=1.5", "--out", str(tmp_path / "d")]) == 1
    assert cli(["compare", "--methods", "srt,ppo+algorithm.momentum=0.9", "--out", str(tmp_path / "e")]) == 1
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
    assert cli(["compare", "--name", "../x", "--out", str(tmp_path / "f")]) == 1   # output names stay in --out
    assert not (tmp_path / "f").exists()


def test_collapse_preset_runs_the_anchor_that_held_on_every_seed(tmp_path, capsys):
    """--preset collapse without --methods adds the anchored M-GRPO (README, "Collapse"): N = 8 of G = 16 from a
    momentum model with m = 0.999, on the preset's task."""
    from mgrpo.comparison import ANCHORED, run_overrides
    from mgrpo.config import load_config
    cfg = load_config(None, run_overrides("collapse", ANCHORED, 1, tmp_path, []))
    a = cfg.algorithm
    assert (a.mode, a.group_size, a.momentum_samples, a.momentum, a.iqr_filter) == ("mgrpo", 16, 8, 0.999, True)
    assert (cfg.data.source, cfg.steps, cfg.optim.lr) == ("builtin:arithmetic-long", 120, 1e-4)
    # finished runs of every method (their metrics.jsonl alone): the preset's report covers all four
    methods = ["srt", "mgrpo", "mgrpo_no_iqr", ANCHORED]
    for i, method in enumerate(methods):
        run = tmp_path / f"{method}_seed0"
        run.mkdir()
        records = [{"step": 0, "eval/greedy": 0.4, "eval/maj@k": 0.45},
                   *({"step": s, "reward": 0.5, "entropy": 0.1, "kl": 0.01} for s in range(1, 121)),
                   {"step": 120, "eval/greedy": 0.3 + 0.05 * i, "eval/maj@k": 0.4}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["compare", "--preset", "collapse", "--seeds", "0-0", "--out", str(tmp_path), "--report"]) == 0
    assert "4 of 4 runs finished" in capsys.readouterr().out
    assert [r["method"] for r in read_csv(tmp_path / "compare_runs.csv")] == methods


def test_the_default_preset_trains_the_embedded_default_and_quick_its_60_steps(tmp_path):
    """`mgrpo compare` (preset default) is `mgrpo train` with no arguments, validated along the way: the README's
    default comparison is the Quick start's run at seeds 0-2. --preset quick is the 60-step version."""
    from mgrpo.comparison import run_overrides
    from mgrpo.config import load_config
    embedded = load_config(None, [])
    assert embedded.steps == 300
    for preset, steps in (("default", embedded.steps), ("quick", 60), ("long", 3 * embedded.steps)):
        cfg = load_config(None, run_overrides(preset, "mgrpo", 0, tmp_path, []))
        assert cfg.steps == steps, preset
        assert (cfg.rollout, cfg.algorithm, cfg.optim, cfg.model) == (embedded.rollout, embedded.algorithm,
                                                                        embedded.optim, embedded.model), preset
        assert cfg.data.eval_every > 0 and cfg.steps % cfg.data.eval_every == 0, preset


def test_a_run_stopped_by_ctrl_c_is_checkpointed_and_the_same_command_continues(tiny_cache, tmp_path, capsys,
                                                                                 monkeypatch):
    """Ctrl-C during a run of a comparison: that run checkpoints, compare exits 130 naming the --out that continues
    it (not a traceback, nor the next run started); the same command then resumes it and logs every step once."""
    import signal

    from tests.signals import signal_during_update
    signal_during_update(monkeypatch, signal.SIGINT)      # in step 2's update: step 2 finishes, then the stop
    out = tmp_path / "cmp"
    common = ["compare", "--preset", "short", "--methods", "srt,mgrpo", "--seeds", "1", "--out", str(out),
              f"warm_start.cache_dir={tiny_cache}", "rollout.engine=hf"]
    assert main(common) == 130
    err = capsys.readouterr().err
    assert f"--out {out} continues" in err and "Traceback" not in err, err
    steps = [json.loads(line)["step"] for line in (out / "srt_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2 and (out / "srt_seed0" / "checkpoints" / "step_000002").is_dir()
    assert not (out / "mgrpo_seed0").exists()                          # the next run did not start
    monkeypatch.undo()
    assert main(common) == 0
    assert "srt seed 0 -> " in (printed := capsys.readouterr().out) and "(resuming)" in printed, printed
    steps = [json.loads(line)["step"] for line in (out / "srt_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [0, 1, 2, 3] and steps.count(1) == 1
    assert (out / "mgrpo_seed0" / "final" / "config.json").is_file()


@pytest.mark.parametrize("report", [False, True])
@pytest.mark.parametrize("out_is", ["a training run", "someone's files", "someone's table and plot"])
def test_an_out_that_holds_something_else_is_refused_before_any_run(out_is, report, tmp_path, capsys, monkeypatch):
    """--out given a training run's directory (or any other non-empty one) would get compare.json, the reports and
    a run directory per method and seed written among its files: refused, saying what is there."""
    import mgrpo.comparison as comparison
    monkeypatch.setattr(comparison, "run_all", no_run)
    out = tmp_path / "out"
    files, listed = {"a training run": (["config.yaml", "metrics.jsonl", "checkpoints/step_000002/checkpoint.json"],
                                        "checkpoints/, config.yaml, metrics.jsonl"),
                     "someone's files": (["notes.txt", "results/table.csv"], "notes.txt, results/"),
                     "someone's table and plot": (["table.csv", "plot.png"], "plot.png, table.csv")}[out_is]
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["compare", "--preset", "short", "--out", str(out), *(["--report"] if report else [])]) == 1
    err = capsys.readouterr().err
    what = "a training run's directory" if out_is == "a training run" else "a directory that is not a comparison"
    assert err.startswith(f"mgrpo compare: error: --out {out} is {what} (it holds {listed}; no compare.json)"), err
    assert "Give a new --out" in err and "Traceback" not in err and err.count("\n") == 1
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(before)        # nothing written
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("out_holds", ["nothing", "compare.json", "runs and reports only", "reports only"])
def test_an_empty_out_or_a_comparisons_is_accepted(out_holds, tmp_path, monkeypatch):
    """An existing --out that is empty, or a comparison (its compare.json; or, that moved away, nothing but its runs'
    directories and reports) is used: the comparison starts or continues."""
    import mgrpo.comparison as comparison
    monkeypatch.setattr(comparison, "run_all", no_run)
    out = tmp_path / "out"
    out.mkdir()
    if out_holds == "compare.json":
        (out / "compare.json").write_text(json.dumps({"preset": "short", "overrides": []}))
        (out / "notes.txt").write_text("what I tried\n")
    elif out_holds == "runs and reports only":
        for run in ("srt_seed0", "mgrpo+algorithm.momentum=0.9_seed1"):
            (out / run).mkdir()
            (out / run / "metrics.jsonl").write_text("")
        (out / "compare_runs.csv").write_text("")
    elif out_holds == "reports only":      # as bench/results keeps a comparison
        for name in ("compare.md", "compare.png", "compare_runs.csv", "compare_summary.csv"):
            (out / name).write_text("")
    with pytest.raises(AssertionError, match="a run started"):
        main(["compare", "--preset", "short", "--out", str(out)])
