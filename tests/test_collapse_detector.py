"""bench/collapse_detector.py: the monitor scored as a detector, on run directories whose declines and warnings
are known by construction (lead times and false alarms counted by hand)."""
import importlib.util
import json
from pathlib import Path

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
