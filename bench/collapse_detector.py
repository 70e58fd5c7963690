"""The collapse monitor measured as a detector: tune its signals' thresholds on some runs, score them on others.

    python bench/collapse_detector.py --tune RUN_DIR ... --test RUN_DIR ... [--out bench/results/collapse_detector]

Every run is a `mgrpo train` run directory with held-out evaluations in its metrics.jsonl (data.eval_every). A
run *collapsed* when its final held-out greedy accuracy is more than mgrpo.comparison.DECLINE (the evaluation's
noise: two standard errors) below its best; its decline is where its accuracy first fell that far below its best
so far. Every other run is healthy, a dip it recovered from included. Each candidate is
one label-free signal of the training log (the trailing mean over the monitor's window of 10 steps) against a
threshold: the monitor's own replay (mgrpo.metrics.CollapseMonitor with those thresholds), nothing re-implemented.

Every report has two sections: the above, and the issue's looser definition, where a run *declined* at its first
drop of more than DECLINE below its best so far whether it recovered or not (a warning before it leads; a warning
in a run with no such drop is a false alarm). A signal is scored only on the runs that log it (family lengths
are logged since 2026-12-07).

`--runs FILE` takes the runs from the signals file a previous call wrote (runs.jsonl.gz in --out: every run's
label-free signals and held-out greedy accuracy, and whether it was tuned or tested on), so the report is remade
from the repository without the run directories; --tune and --test directories given with it are added to them.

Each section ends with a bound on every detector of this kind: per signal, its trend (the change of its trailing
mean over the window) and its gain (since its first window), the declining runs that a fixed threshold chosen with
hindsight on all the runs (an oracle: beyond every healthy run's extreme) would have warned on before their
decline, against all healthy runs and against each run's healthy peers (same base, held-out set and horizon).

Tuning picks, per signal, the threshold that warns before the decline in the most collapsed --tune runs with no
false alarm in the healthy --tune runs (ties: the earliest warnings). Scoring replays the chosen thresholds on the
--test runs, which tuning never saw: for each collapsed run the steps of warning before the decline was first
seen (negative: late; none: missed), for each healthy run whether it warned (a false alarm). Writes
collapse_detector.md and .json to --out.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path
from typing import Optional

from mgrpo.comparison import DECLINE
from mgrpo.metrics import CollapseMonitor, read_metrics

# signal -> (side, candidate thresholds), the label-free ones the trainer logs every step
CANDIDATES = {
    "kl": ("above", [0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3]),
    "collapse/entropy_ratio": ("below", [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85]),
    "majority_ratio": ("above", [0.65, 0.7, 0.75, 0.8, 0.85, 0.9]),
    "reward": ("above", [0.65, 0.7, 0.75, 0.8, 0.85, 0.9]),
    "collapse/unanimous_frac": ("above", [0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6]),
    "collapse/momentum_agreement": ("below", [0.3, 0.4, 0.5, 0.55, 0.6]),
    # from family/<family>/mean_length, on data with problem families (runs logged since 2026-12-07)
    "collapse/family_length_ratio": ("below", [0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]),
}


KEPT = ("step", "entropy", "eval/greedy", *CANDIDATES)   # what runs.jsonl.gz keeps of each record, and:


def kept(key: str) -> bool:
    """A key runs.jsonl.gz keeps: KEPT, and each family's response length (the monitor's family_length_ratio)."""
    return key in KEPT or (key.startswith("family/") and key.endswith("/mean_length"))


def load_run(path: Path, records: Optional[list] = None, first_drop: bool = False) -> dict:
    """A run's per-step records (eval lines merged into their step) and its decline step (None: healthy).
    first_drop: the issue's looser definition, where any drop is a decline, recovered or not."""
    if records is None:
        by_step: dict = {}
        for record in read_metrics(path):
            by_step.setdefault(record["step"], {}).update({k: v for k, v in record.items() if kept(k)})
        records = [by_step[s] for s in sorted(by_step)]
    evals = [r for r in records if r.get("eval/greedy") is not None]
    decline, best = None, float("-inf")
    for r in evals:
        if r["eval/greedy"] < best - DECLINE:
            decline = r["step"]
            break
        best = max(best, r["eval/greedy"])
    if not first_drop and evals[-1]["eval/greedy"] >= max(r["eval/greedy"] for r in evals) - DECLINE:
        decline = None                       # ended within the noise of its best: not a collapse
    return {"path": str(path), "records": records, "decline": decline, "steps": records[-1]["step"]}


def logs(run: dict, signal: str) -> bool:
    """Whether the run logged what `signal` is computed from (runs older than a signal are not scored on it)."""
    source = {"collapse/entropy_ratio": "entropy", "collapse/family_length_ratio": "family/"}.get(signal, signal)
    return any(k == source or (source.endswith("/") and k.startswith(source)) for r in run["records"] for k in r
               if r.get(k) is not None)


def first_warning(run: dict, thresholds: dict):
    """Step of the monitor's first warning, on any of `thresholds`' signals (None: it never warns)."""
    monitor = CollapseMonitor(log=lambda *a: None, thresholds=thresholds)
    for record in run["records"]:
        if record.get("entropy") is None:
            continue
        monitor.observe(record["step"], record)
        if monitor.warned:
            return record["step"]
    return None


def score(runs: list, signal: str, side: str, limit: float, thresholds: Optional[dict] = None) -> dict:
    """Detections (warned before the decline was seen), late or missed declines, and false alarms; of one signal's
    threshold, or with `thresholds` of the monitor with all of them (its first warning on any)."""
    out = {"signal": signal, "side": side, "limit": limit, "leads": [], "late": 0, "missed": 0, "false_alarms": 0,
           "declining": 0, "healthy": 0, "per_run": []}
    for run in runs:
        if thresholds is None and not logs(run, signal):
            continue
        warned = first_warning(run, thresholds or {signal: (side, limit)})
        out["per_run"].append({"run": run["path"], "decline": run["decline"], "warning": warned})
        if run["decline"] is None:
            out["healthy"] += 1
            out["false_alarms"] += warned is not None
        else:
            out["declining"] += 1
            if warned is None:
                out["missed"] += 1
            elif warned < run["decline"]:
                out["leads"].append(run["decline"] - warned)
            else:
                out["late"] += 1
    return out


def tune(runs: list) -> dict:
    """Per signal: the threshold with no false alarm that detects the most declines in time (then the longest
    median lead); None when every threshold false-alarms or none detects anything."""
    chosen = {}
    for signal, (side, limits) in CANDIDATES.items():
        if not any(logs(run, signal) for run in runs):
            continue
        best = None
        for limit in limits:
            s = score(runs, signal, side, limit)
            if s["false_alarms"] or not s["leads"]:
                continue
            key = (len(s["leads"]), statistics.median(s["leads"]))
            if best is None or key > best[0]:
                best = (key, s)
        chosen[signal] = best[1] if best else None
    return chosen


def table(scores: list, declined: str = "collapsed") -> str:
    lines = [f"| signal | threshold | {declined} runs warned in time | median lead (steps) | late | missed | "
             "healthy runs | false alarms |", "|---|---|---|---|---|---|---|---|"]
    for s in scores:
        lead = f"{statistics.median(s['leads']):.0f}" if s["leads"] else "-"
        threshold = f"{s['side']} {s['limit']}" if s["side"] else "-"
        lines.append(f"| {s['signal']} | {threshold} | {len(s['leads'])} / {s['declining']} | {lead} | "
                     f"{s['late']} | {s['missed']} | {s['healthy']} | {s['false_alarms']} |")
    return "\n".join(lines)


def per_run_table(scored: dict, declined: str = "collapsed") -> str:
    lines = [f"| run | decline first seen at step ({declined} runs) | first warning at step | lead (steps) |",
             "|---|---|---|---|"]
    for r in scored["per_run"]:
        lead = "-" if r["warning"] is None or r["decline"] is None else f"{r['decline'] - r['warning']}"
        verdict = (" (false alarm)" if r["decline"] is None and r["warning"] is not None
                   else " (missed)" if r["decline"] is not None and r["warning"] is None else "")
        lines.append(f"| {r['run']} | {r['decline'] or '-'} | {r['warning'] or '-'}{verdict} | {lead} |")
    return "\n".join(lines)


def short_name(path: str) -> str:
    """A run directory as its last two parts (comparison/method_seedN): what the report calls it."""
    return "/".join(Path(path).parts[-2:])


def trailing(run: dict, signal: str, window: int = 10) -> dict:
    """step -> the monitor's trailing mean of `signal` at that step, from its first full window on: what a
    threshold on the signal would be compared with (the monitor replayed with a threshold it never crosses)."""
    monitor = CollapseMonitor(log=lambda *a: None, window=window, thresholds={signal: ("above", float("inf"))})
    out = {}
    for record in run["records"]:
        if record.get("entropy") is None:
            continue
        value = monitor.observe(record["step"], record).get(signal, record.get(signal))
        recent = monitor.recent.get(signal, [])
        if value is not None and (len(recent) == window or signal in CollapseMonitor.SMOOTHED):
            out[record["step"]] = sum(recent) / len(recent)
    return out


def trend(series: dict, window: int = 10) -> dict:
    """step -> the trailing mean's change over the last `window` steps: a signal's trend."""
    return {step: value - series[step - window] for step, value in series.items() if step - window in series}


def gain(series: dict) -> dict:
    """step -> the trailing mean's change since its first full window: how far a signal has moved in the run."""
    start = series[min(series)] if series else None
    return {step: value - start for step, value in series.items()}


FORMS = {"": lambda series: series, " trend": trend, " gain": gain}   # each signal as it is, its trend, its gain


def peer_group(run: dict) -> tuple:
    """Runs comparable step by step: the same base model and held-out set (their step-0 accuracy) and the same
    horizon (last step; the learning-rate schedule depends on it)."""
    return (round(run["records"][0].get("eval/greedy") or 0.0, 4), run["steps"])


def oracle_bound(runs: list) -> list:
    """The most any fixed threshold on a signal (as it is, its trend or its gain; either side) could do, chosen
    with hindsight on these very runs: it may warn in no healthy run, so it must lie beyond every healthy run's
    extreme over its whole run, and it catches the declining runs whose extreme before their decline lies beyond
    that. Counted against all healthy runs (one threshold for every task, as the monitor ships) and against each
    run's healthy peers only (a threshold for this task and horizon; runs with two or more peers). An upper bound:
    tuning on other runs can do no better on these."""
    out = []
    for signal in CANDIDATES:
        logged = [r for r in runs if logs(r, signal)]
        healthy = [r for r in logged if r["decline"] is None]
        declining = [r for r in logged if r["decline"] is not None]
        for form, derive in FORMS.items():
            series = {r["path"]: derive(trailing(r, signal)) for r in logged}
            for side, extreme in (("above", max), ("below", min)):
                whole = {r["path"]: extreme(series[r["path"]].values()) for r in healthy if series[r["path"]]}
                early = {r["path"]: extreme(v) for r in declining
                         if (v := [x for step, x in series[r["path"]].items() if step < r["decline"]])}
                if not whole or not declining:
                    continue
                limit = extreme(whole.values())
                caught = [path for path, value in early.items() if extreme(value, limit) != limit]
                with_peers, caught_by_peers = 0, []
                for r in declining:
                    peers = [whole[p["path"]] for p in healthy
                             if p["path"] in whole and peer_group(p) == peer_group(r)]
                    if len(peers) < 2:
                        continue
                    with_peers += 1
                    if r["path"] in early and extreme(early[r["path"]], extreme(peers)) != extreme(peers):
                        caught_by_peers.append(r["path"])
                out.append({"signal": signal + form, "side": side, "declining": len(declining),
                            "healthy": len(whole), "caught": caught, "with_peers": with_peers,
                            "caught_by_peers": caught_by_peers})
    return out


def oracle_table(rows: list, declined: str) -> str:
    lines = [f"| signal | side | {declined} runs caught in time, no false alarm in any healthy run | "
             f"{declined} runs with 2+ healthy peers caught in time, no false alarm in a peer |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['signal']} | {row['side']} | {len(row['caught'])} of {row['declining']}"
                     f"{' (' + ', '.join(row['caught']) + ')' if row['caught'] else ''} | "
                     f"{len(row['caught_by_peers'])} of {row['with_peers']}"
                     f"{' (' + ', '.join(row['caught_by_peers']) + ')' if row['caught_by_peers'] else ''} |")
    anywhere = sorted({path for row in rows for path in row["caught"]})
    by_peers = sorted({path for row in rows for path in row["caught_by_peers"]})
    total = max((row["declining"] for row in rows), default=0)
    return "\n".join(lines) + (f"\n\nCaught by at least one of them: {len(anywhere)} of the {total} {declined} runs "
                               f"against all healthy runs, {len(by_peers)} against their peers.\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", nargs="+", default=[], help="run directories the thresholds are tuned on")
    parser.add_argument("--test", nargs="+", default=[], help="run directories they are scored on (other seeds)")
    parser.add_argument("--runs", help="runs.jsonl.gz of an earlier call: its tuning and test runs")
    parser.add_argument("--out", default="bench/results/collapse_detector")
    args = parser.parse_args(argv)
    saved = []
    if args.runs:
        with gzip.open(args.runs, "rt") as f:
            saved = [(r["role"], r["path"], r["records"]) for r in map(json.loads, f)]
    elif not (args.tune and args.test):
        parser.error("give --tune and --test run directories (or --runs FILE, and any run directories to add)")
    saved += [(role, short_name(str(p)), load_run(Path(p))["records"])
              for role, paths in (("tune", args.tune), ("test", args.test)) for p in paths]
    names = [p for _, p, _ in saved]
    repeated = sorted({p for p in names if names.count(p) > 1})
    if repeated:
        parser.error(f"a run given twice (already in --runs, or named twice): {repeated}")
    overlap = {p for role, p, _ in saved if role == "tune"} & {p for role, p, _ in saved if role == "test"}
    if overlap:
        parser.error(f"a run cannot be both tuned and tested on: {sorted(overlap)}")
    sections, results = [], {}
    for first_drop in (False, True):
        tuning = [load_run(p, records, first_drop) for role, p, records in saved if role == "tune"]
        testing = [load_run(p, records, first_drop) for role, p, records in saved if role == "test"]
        text, results["first_drop" if first_drop else "collapse"] = report(tuning, testing, first_drop)
        bound = oracle_bound(tuning + testing)
        results["oracle_first_drop" if first_drop else "oracle"] = bound
        declined = "declined" if first_drop else "collapsed"
        text += (f"\n**The most any fixed threshold could do: chosen with hindsight on all {len(tuning + testing)} "
                 "runs (tuning and test), it may warn in no healthy run; each signal as it is, its trend (change "
                 "over the last 10 steps) and its gain (change since its first 10 steps):**\n\n"
                 + oracle_table(bound, declined))
        sections.append(text)
    text = "\n".join(sections)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "collapse_detector.md").write_text(text)
    with gzip.open(out / "runs.jsonl.gz", "wt") as f:
        for role, path, records in saved:
            f.write(json.dumps({"path": path, "role": role, "records": records}) + "\n")
    (out / "collapse_detector.json").write_text(json.dumps({"decline": DECLINE, **results}, indent=1))
    print(text)
    return 0


def report(tuning: list, testing: list, first_drop: bool) -> tuple:
    """Tune on `tuning`, score on `testing`: the markdown section and its figures."""
    chosen = {k: v for k, v in tune(tuning).items() if v is not None}
    together = {k: (s["side"], s["limit"]) for k, s in chosen.items()}
    tested = [score(testing, s["signal"], s["side"], s["limit"]) for s in chosen.values()]
    if len(together) > 1:            # the monitor with every tuned sign: its first warning on any of them
        chosen["any"] = score(tuning, "any of the above", "", "", thresholds=together)
        tested.append(score(testing, "any of the above", "", "", thresholds=together))
    current = [score(testing, k, side, limit) for k, (side, limit) in CollapseMonitor.THRESHOLDS.items()]
    current.append(score(testing, "any of the above", "", "", thresholds=CollapseMonitor.THRESHOLDS))
    untuned = [k for k in CANDIDATES if k not in chosen and any(logs(r, k) for r in tuning)]
    declined = "declined" if first_drop else "collapsed"
    definition = (f"a run *declined* at the first evaluation more than {DECLINE:.2f} below its best so far, whether "
                  "it recovered or not (the issue's definition: warn before held-out accuracy first drops by more "
                  "than the evaluation's noise); a run with no such drop is healthy"
                  if first_drop else
                  f"a run collapsed when its final held-out greedy accuracy is more than {DECLINE:.2f} below its "
                  "best, and its decline is the first evaluation that far below its best so far")
    text = (f"## {'Any drop' if first_drop else 'Collapse'}: {definition}\n\n"
            f"Tuned on {len(tuning)} runs ({sum(r['decline'] is not None for r in tuning)} {declined}), scored on "
            f"{len(testing)} other runs ({sum(r['decline'] is not None for r in testing)} {declined}); a signal is "
            "scored only on the runs that log it.\n\n"
            "**Tuned thresholds, on the tuning runs:**\n\n" + table(list(chosen.values()), declined)
            + (f"\n\nNo threshold warns before a decline without a false alarm, on the tuning runs: "
               f"{', '.join(untuned)}." if untuned else "")
            + "\n\n**The same thresholds on the test runs:**\n\n" + table(tested, declined)
            + "\n\n**The monitor's shipped thresholds on the test runs:**\n\n" + table(current, declined) + "\n")
    if len(together) > 0:
        monitor = tested[-1] if len(together) > 1 else tested[0]
        text += "\n**Per test run, the tuned monitor:**\n\n" + per_run_table(monitor, declined) + "\n"
    return text, {"tune": [r["path"] for r in tuning], "test": [r["path"] for r in testing],
                  "tuned_thresholds": together, "chosen": list(chosen.values()), "tested": tested,
                  "shipped": current}


if __name__ == "__main__":
    raise SystemExit(main())
