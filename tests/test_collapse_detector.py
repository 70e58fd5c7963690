"""bench/collapse_detector.py: the monitor scored as a detector, on run directories whose declines and warnings
are known by construction (lead times and false alarms counted by hand)."""
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def detector():
    spec = importlib.util.spec_from_file_location("collapse_detector", ROOT / "bench" / "collapse_detector.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(path: Path, kl: list, greedy: dict) -> Path:
    """A run directory: one training record per step with this KL (entropy flat), evaluations at `greedy`'s steps."""
    path.mkdir(parents=True)
    lines = [{"step": 0, "eval/greedy": greedy[0]}]
    for step, value in enumerate(kl, 1):
        lines.append({"step": step, "entropy": 0.1, "kl": value, "reward": 0.5, "majority_ratio": 0.5})
        if step in greedy:
            lines.append({"step": step, "eval/greedy": greedy[step]})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_tuned_threshold_lead_time_and_false_alarms(tmp_path):
    cd = detector()
    # declines at the step-30 evaluation (0.60 -> 0.50: more than DECLINE below the best so far); its KL is 0.2
    # from step 16 on, so its trailing 10-step mean is (7 * 0.02 + 3 * 0.2) / 10 = 0.074 at step 18, 0.092 at 19
    collapsing = write_run(tmp_path / "collapse", [0.02] * 15 + [0.2] * 25, {0: 0.58, 10: 0.60, 20: 0.59, 30: 0.50})
    healthy = write_run(tmp_path / "healthy", [0.07] * 40, {0: 0.58, 10: 0.60, 20: 0.61, 30: 0.62})
    runs = [cd.load_run(collapsing), cd.load_run(healthy)]
    assert [r["decline"] for r in runs] == [30, None]
    # a dip it recovers from (0.60 -> 0.50 -> 0.60) is not a collapse: the run ends within the noise of its best
    dip = write_run(tmp_path / "dip", [0.07] * 40, {0: 0.58, 10: 0.60, 20: 0.50, 30: 0.59})
    assert cd.load_run(dip)["decline"] is None
    chosen = cd.tune(runs)["kl"]
    # the lowest thresholds (0.03 ... 0.06) false-alarm on the healthy run's steady 0.07; 0.08 is the first quiet
    # one, and the earliest to warn in the collapsing run: at step 19
    assert chosen["limit"] == 0.08 and chosen["false_alarms"] == 0
    assert chosen["leads"] == [30 - 19]
    # scored on other runs: a decline warned after it was seen (late), and a healthy run that drifts (false alarm)
    late = write_run(tmp_path / "late", [0.02] * 35 + [0.3] * 5, {0: 0.6, 10: 0.6, 20: 0.5})
    drifting = write_run(tmp_path / "drift", [0.3] * 40, {0: 0.6, 10: 0.6, 20: 0.6})
    tested = cd.score([cd.load_run(late), cd.load_run(drifting)], "kl", "above", chosen["limit"])
    assert (tested["late"], tested["missed"], tested["false_alarms"], tested["leads"]) == (1, 0, 1, [])
    # the command: a run tuned on is refused as a test run; the report is written
    out = tmp_path / "out"
    assert cd.main(["--tune", str(collapsing), str(healthy), "--test", str(late), str(drifting), "--out", str(out)]) == 0
    text = (out / "collapse_detector.md").read_text()
    assert "| kl | above 0.08 | 1 / 1 | 11 |" in text and "| kl | above 0.08 | 0 / 1 | - | 1 | 0 | 1 | 1 |" in text
    # remade from the signals file alone (what the repository keeps), without the run directories
    again = tmp_path / "again"
    assert cd.main(["--runs", str(out / "runs.jsonl.gz"), "--out", str(again)]) == 0
    assert (again / "collapse_detector.md").read_text() == text
    per_run = text.replace(tmp_path.name, "tmp")                # the KL of "late" passes 0.08 at step 38
    assert "| tmp/late | 20 | 38 | -18 |" in per_run and "| tmp/drift | - | 10 (false alarm) | - |" in per_run


def test_any_drop_is_a_decline_in_the_looser_definition_and_unlogged_signals_are_not_scored(tmp_path):
    cd = detector()
    dip = write_run(tmp_path / "dip", [0.07] * 40, {0: 0.58, 10: 0.60, 20: 0.50, 30: 0.59})
    assert cd.load_run(dip)["decline"] is None                      # recovered: not a collapse
    assert cd.load_run(dip, first_drop=True)["decline"] == 20       # but it did drop at step 20
    # these runs log no family lengths: the family sign is not scored on them (not a silent "no false alarm")
    runs = [cd.load_run(dip), cd.load_run(write_run(tmp_path / "flat", [0.01] * 40, {0: 0.6, 10: 0.6, 20: 0.6}))]
    scored = cd.score(runs, "collapse/family_length_ratio", "below", 0.9)
    assert scored["healthy"] == 0 and scored["per_run"] == []
    assert cd.score(runs, "kl", "above", 0.05)["false_alarms"] == 1
    # a run that logs them is: its 5-term responses halve in length from step 11 on (window 10)
    lengths = tmp_path / "short"
    write_run(lengths, [0.01] * 40, {0: 0.6, 10: 0.6, 20: 0.6, 30: 0.6})
    lines = [json.loads(line) for line in (lengths / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        if "kl" in line:
            line["family/5-term/mean_length"] = 40.0 if line["step"] <= 10 else 20.0
    (lengths / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    short = cd.score([cd.load_run(lengths)], "collapse/family_length_ratio", "below", 0.9)
    # trailing means: (9 * 40 + 20) / 10 = 38 at step 11 (0.95), 36 at step 12 (0.9), 34 at step 13 (0.85)
    assert short["healthy"] == 1 and short["false_alarms"] == 1 and short["per_run"][0]["warning"] == 13
    # the report has both definitions
    out = tmp_path / "out"
    assert cd.main(["--tune", str(dip), "--test", str(lengths), "--out", str(out)]) == 0
    text = (out / "collapse_detector.md").read_text()
    assert "## Collapse:" in text and "## Any drop:" in text


def test_oracle_bound_counts_what_a_hindsight_threshold_could_catch(tmp_path):
    cd = detector()
    evals = {0: 0.58, 10: 0.60, 20: 0.59, 30: 0.50}               # a decline seen at step 30, and it stays down
    # KL 0.2 from step 16: its trailing mean passes every healthy run's at step 17, before the decline at 30
    runaway = write_run(tmp_path / "runaway", [0.04] * 15 + [0.2] * 25, evals)
    # KL 0.05 until the decline, 0.5 after it: nothing before the decline that a healthy run does not show too
    quiet = write_run(tmp_path / "quiet", [0.05] * 30 + [0.5] * 10, evals)
    healthy = [write_run(tmp_path / f"healthy{i}", [value] * 40, {0: 0.58, 10: 0.60, 20: 0.61, 30: 0.62})
               for i, value in enumerate((0.07, 0.03))]
    runs = [cd.load_run(p) for p in (runaway, quiet, *healthy)]
    assert [r["decline"] for r in runs] == [30, 30, None, None]
    bound = {(row["signal"], row["side"]): row for row in cd.oracle_bound(runs)}
    kl = bound[("kl", "above")]
    assert kl["caught"] == [str(runaway)] and kl["declining"] == 2 and kl["healthy"] == 2
    assert kl["caught_by_peers"] == [str(runaway)] and kl["with_peers"] == 2
    # the trend (change over 10 steps): 0.18 in the runaway run by step 25; 0 in the quiet one before its decline
    assert bound[("kl trend", "above")]["caught"] == [str(runaway)]
    # low KL is no sign here: the healthy 0.03 run is below both declining runs throughout
    assert bound[("kl", "below")]["caught"] == []
    # a healthy run as high as the runaway one leaves no threshold that catches it without a false alarm; from
    # another base (its step-0 accuracy differs) it is no peer, so a threshold for this base still catches it
    high = write_run(tmp_path / "high", [0.2] * 40, {0: 0.40, 10: 0.42, 20: 0.43, 30: 0.44})
    bound = {(row["signal"], row["side"]): row for row in cd.oracle_bound([*runs, cd.load_run(high)])}
    assert bound[("kl", "above")]["caught"] == [] and bound[("kl", "above")]["healthy"] == 3
    assert bound[("kl", "above")]["caught_by_peers"] == [str(runaway)]
    # the report has the bound; --runs with run directories added to them, and no run twice
    out = tmp_path / "out"
    assert cd.main(["--tune", str(runaway), str(healthy[0]), "--test", str(quiet), "--out", str(out)]) == 0
    text = (out / "collapse_detector.md").read_text()
    assert "The most any fixed threshold could do" in text
    # against one healthy run (KL 0.07) both are caught, the quiet one by its lower KL; one healthy run is no peers
    assert "Caught by at least one of them: 2 of the 2 collapsed runs against all healthy runs, 0 against" in text
    again = tmp_path / "again"
    assert cd.main(["--runs", str(out / "runs.jsonl.gz"), "--test", str(healthy[1]), "--out", str(again)]) == 0
    with gzip.open(again / "runs.jsonl.gz", "rt") as f:
        assert len(f.readlines()) == 4
    with pytest.raises(SystemExit):
        cd.main(["--runs", str(out / "runs.jsonl.gz"), "--test", str(quiet), "--out", str(tmp_path / "twice")])
