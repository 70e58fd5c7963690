"""A multivariate label-free collapse detector, measured as bench/collapse_detector.py measures the univariate one.

    python bench/collapse_detector_multivariate.py [--quick] [--out bench/results/collapse_detector]

writes multivariate.md and multivariate.json to --out (about 3 minutes on 2 cores; --quick: a smoke test).

Runs, roles (tuning: seeds 100-102; test: held-out seeds), "collapsed", "decline step" and the looser "first drop"
definition all come from bench/collapse_detector.py (load_run on runs.jsonl.gz), and every signal's trailing
10-step mean comes from collapse_detector.trailing (the monitor's own replay).

Features at step t (only steps <= t are used): per signal, its trailing 10-step mean m(t), its trend
m(t) - m(t-10) (before m(t-10) exists, i.e. steps 10-19: m(t) - m(first), the gain so far), its gain
m(t) - m(first window). The step index is NOT a feature. Feature sets:
  common: the 5 signals every run logs (kl, entropy ratio, majority ratio, reward, unanimous share): 15 features
  all7:   those + momentum agreement + family length ratio, each missing one as 3 features filled with 0 after
          standardization (the tuning mean) + a presence indicator: 23 features
Standardization: mean/std over every feature row of the runs being fit (tuning runs only; inside leave-one-run-out,
the 40 runs of that fold). Rows start at the first full 10-step window (step 10).

Model: logistic regression (torch Linear + BCEWithLogitsLoss, class-balanced, L2 on the weights, LBFGS) or a
1-hidden-layer MLP (8 tanh units), same protocol. Positives: steps of collapsed fitting runs in the W steps before
the decline (W = 10, 30, or all steps before it); negatives: every step of healthy fitting runs. Threshold: the
lowest with no false alarm on the fitting runs' healthy runs (the largest score any of their steps reaches);
a run warns at its first step (>= 10) whose score exceeds it. Hyperparameters (W, L2) are chosen by leave-one-run-
out over the tuning runs only (for each held-out tuning run: fit + threshold on the other 40, score the held-out
one); criterion: collapsed held-out runs warned before their decline minus held-out healthy runs false-alarmed,
ties to fewer false alarms then to larger L2. The chosen model is refit on all tuning runs and scored once on
the test runs.

Hindsight bound: the same model class fit on all runs (tuning + test), threshold at no false alarm over all
healthy runs; the best count over the whole hyperparameter grid. And a per-run ceiling for any linear score on
these features: for each collapsed run, a direction searched (gradient ascent on a smoothed margin, many starts)
that puts one of its pre-decline steps above every healthy run's every step (a search, so a lower estimate of
that ceiling; the ceiling is the number of runs some direction separates individually, an upper bound on what
one linear detector could catch).
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))             # bench/collapse_detector.py, also when this file is loaded by a test
import collapse_detector as cd  # noqa: E402

RUNS = HERE / "results" / "collapse_detector" / "runs.jsonl.gz"
WINDOW = 10
OPTIONAL = ("collapse/momentum_agreement", "collapse/family_length_ratio")
COMMON = tuple(s for s in cd.CANDIDATES if s not in OPTIONAL)
SETS = {"common": (COMMON, ()), "all7": (COMMON, OPTIONAL)}
WINDOWS = (10, 30, None)                  # None: every step before the decline
L2S = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
MLP_L2S = (1e-3, 1e-2, 1e-1)
MAX_ITER = {"linear": 500, "mlp": 150}
JOINT_TOPK = 6


# ---------------------------------------------------------------------------------------------------- data

def load(first_drop: bool) -> list:
    with gzip.open(RUNS, "rt") as f:
        saved = [(r["role"], r["path"], r["records"]) for r in map(json.loads, f)]
    runs = []
    for role, path, records in saved:
        run = cd.load_run(path, records, first_drop)
        run["role"], run["name"] = role, path
        run["steps_arr"], run["feat"] = features(run)
        runs.append(run)
    return runs


def forms(series: dict, steps: list) -> np.ndarray:
    """(len(steps), 3): trailing mean, trend over 10 steps, gain since the first window; NaN where not logged."""
    out = np.full((len(steps), 3), np.nan)
    if not series:
        return out
    keys = sorted(series)
    first = series[keys[0]]
    for i, t in enumerate(steps):
        if t not in series:
            continue
        m = series[t]
        past = [k for k in keys if k <= t - WINDOW]
        ref = series[past[-1]] if past else first
        out[i] = (m, m - ref, m - first)
    return out


def features(run: dict):
    """Steps from the first full window on, and {signal: (n, 3) array} of its three forms (causal)."""
    series = {s: cd.trailing(run, s, WINDOW) for s in cd.CANDIDATES}
    steps = sorted(series["kl"])            # every run logs the common signals at every step from step 10 on
    for s in COMMON:
        assert sorted(series[s]) == steps, (run["name"], s)
    return np.array(steps), {s: forms(series[s], steps) for s in cd.CANDIDATES}


def matrix(run: dict, feature_set: str) -> np.ndarray:
    """Raw feature rows (NaN = missing) and presence indicators for the optional signals."""
    common, optional = SETS[feature_set]
    cols = [run["feat"][s] for s in common + optional]
    x = np.concatenate(cols, axis=1)
    ind = np.stack([~np.isnan(run["feat"][s][:, 0]) for s in optional], axis=1).astype(float) if optional \
        else np.zeros((len(x), 0))
    return x, ind


class Scaler:
    def __init__(self, runs: list, feature_set: str):
        self.feature_set = feature_set
        x = np.concatenate([matrix(r, feature_set)[0] for r in runs])
        self.mean = np.nanmean(x, axis=0)
        self.std = np.nanstd(x, axis=0)
        self.std[~(self.std > 1e-12)] = 1.0

    def __call__(self, run: dict) -> np.ndarray:
        x, ind = matrix(run, self.feature_set)
        z = np.nan_to_num((x - self.mean) / self.std, nan=0.0)     # missing: the fitting runs' mean
        return np.concatenate([z, ind], axis=1)


# ---------------------------------------------------------------------------------------------------- model

def labels(run: dict, window):
    """y (1 positive, 0 negative) and a mask of the rows used to fit."""
    steps = run["steps_arr"]
    if run["decline"] is None:
        return np.zeros(len(steps)), np.ones(len(steps), bool)
    d = run["decline"]
    use = steps < d
    if window is not None:
        use &= steps >= d - window
    return np.ones(len(steps)), use


def make_model(kind: str, n: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return torch.nn.Linear(n, 1).double()
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(n, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    raise ValueError(kind)


def fit_path(runs: list, feature_set: str, kind: str, window, l2s) -> dict:
    """Fit on `runs` at each L2 of `l2s`; per L2: a scorer run -> per-step scores, the threshold (no false alarm on
    their healthy runs), the model and its scaler. Linear (convex, one optimum): from the largest L2 down, each fit
    warm-started at the previous one's optimum (a continuation path: the same optima, faster). MLP: every fit
    from the same seeded initialization."""
    scaler = Scaler(runs, feature_set)
    xs, ys = [], []
    for r in runs:
        y, use = labels(r, window)
        if use.any():
            xs.append(scaler(r)[use])
            ys.append(y[use])
    x = torch.tensor(np.concatenate(xs))
    y = torch.tensor(np.concatenate(ys))
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    w = torch.where(y > 0, 0.5 * len(y) / n_pos, 0.5 * len(y) / n_neg)      # class-balanced, mean 1
    loss_fn = torch.nn.BCEWithLogitsLoss(weight=w)
    healthy = [r for r in runs if r["decline"] is None]
    feats = {id(r): torch.tensor(scaler(r)) for r in runs}
    out, state = {}, None
    for l2 in sorted(l2s, reverse=True):
        model = make_model(kind, x.shape[1])
        if state is not None and kind == "linear":
            model.load_state_dict(state)
        weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=MAX_ITER[kind], tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x).squeeze(1), y) + l2 * sum((p ** 2).sum() for p in weights)
            loss.backward()
            return loss

        opt.step(closure)
        model.eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}

        def score(run: dict, model=model) -> np.ndarray:
            with torch.no_grad():
                z = feats.get(id(run))
                z = torch.tensor(scaler(run)) if z is None else z
                return model(z).squeeze(1).numpy()

        threshold = max(score(r).max() for r in healthy)
        out[l2] = (score, threshold, model, scaler)
    return out


def fit(runs: list, feature_set: str, kind: str, window, l2: float, l2s=None):
    """One fit at `l2`, reached along the same path as in leave-one-run-out (`l2s`, the grid's L2 values)."""
    path = [v for v in (l2s or [l2]) if v >= l2]
    return fit_path(runs, feature_set, kind, window, path)[l2]


def warning(run: dict, scores: np.ndarray, threshold: float):
    above = np.nonzero(scores > threshold)[0]
    return int(run["steps_arr"][above[0]]) if len(above) else None


def tally(per_run: list) -> dict:
    out = {"leads": [], "late": 0, "missed": 0, "false_alarms": 0, "declining": 0, "healthy": 0}
    for p in per_run:
        if p["decline"] is None:
            out["healthy"] += 1
            out["false_alarms"] += p["warning"] is not None
        else:
            out["declining"] += 1
            if p["warning"] is None:
                out["missed"] += 1
            elif p["warning"] < p["decline"]:
                out["leads"].append(p["decline"] - p["warning"])
            else:
                out["late"] += 1
    return out


def evaluate(score, threshold, runs: list) -> list:
    out = []
    for r in runs:
        s = score(r)
        pre = s[r["steps_arr"] < r["decline"]] if r["decline"] is not None else s
        out.append({"run": r["name"], "decline": r["decline"], "warning": warning(r, s, threshold),
                    "margin": float(pre.max() - threshold) if len(pre) else None})
    return out


def select(tuning: list, feature_set: str, kind: str, grid: list, log) -> tuple:
    """Leave-one-run-out over the tuning runs for every (window, L2) of `grid`; the best by caught - false alarms,
    then fewer false alarms, then the larger L2."""
    per_run = {cfg: [] for cfg in grid}
    windows = sorted({w for w, _ in grid}, key=lambda w: (w is None, w))
    for i, held in enumerate(tuning):
        rest = tuning[:i] + tuning[i + 1:]
        for window in windows:
            l2s = [l2 for w, l2 in grid if w == window]
            for l2, (score, threshold, *_) in fit_path(rest, feature_set, kind, window, l2s).items():
                per_run[(window, l2)] += evaluate(score, threshold, [held])
    rows = []
    for window, l2 in grid:
        t = tally(per_run[(window, l2)])
        key = (len(t["leads"]) - t["false_alarms"], -t["false_alarms"], l2)
        rows.append(((window, l2), t, key))
        log(f"    LORO {feature_set}/{kind} W={window} L2={l2}: caught {len(t['leads'])}/{t['declining']}, "
            f"late {t['late']}, missed {t['missed']}, false alarms {t['false_alarms']}/{t['healthy']}")
    best = max(rows, key=lambda row: row[2])
    return best[0], rows


# ---------------------------------------------------------------------------------------------------- ceiling

def ascend_over_active_set(w, healthy, active: set, lr: float, schedule, objective):
    """Adam ascent of objective(u, h, tau, soft) over the unit rows u of w (100 steps per (tau, soft) of
    `schedule`), h the healthy rows in `active`; then the healthy rows each direction ranks first join `active`
    and the ascent restarts, until none is new (at most 6 rounds). Returns w."""
    for _ in range(6):
        h = healthy[sorted(active)]
        opt = torch.optim.Adam([w], lr=lr)
        for tau, soft in schedule:
            for _ in range(100):
                u = w / w.norm(dim=1, keepdim=True)
                opt.zero_grad()
                (-objective(u, h, tau, soft)).backward()
                opt.step()
        with torch.no_grad():
            u = w / w.norm(dim=1, keepdim=True)
            top = (healthy @ u.T).argmax(0).tolist()
        if set(top) <= active:
            break
        active |= set(top)
    return w


def separable_runs(runs: list, feature_set: str, inits=None) -> tuple:
    """Per collapsed run: whether some direction w puts one of its pre-decline steps above every step of every
    healthy run (searched: smoothed margin, Adam from the axes, their negatives, random and given starts; over an
    active set of healthy steps, checked exactly against all of them and grown until no direction's maximum lies
    outside it). Also the best single direction found: the most runs one direction catches with no false alarm
    (every direction above, then a smoothed count of the runs caught ascended from the most promising of them)."""
    scaler = Scaler(runs, feature_set)
    healthy = torch.tensor(np.concatenate([scaler(r) for r in runs if r["decline"] is None]))
    n = healthy.shape[1]
    gen = torch.Generator().manual_seed(0)
    starts = [torch.eye(n, dtype=torch.float64), -torch.eye(n, dtype=torch.float64),
              torch.randn(16, n, generator=gen, dtype=torch.float64)]
    if inits is not None:
        starts.append(torch.as_tensor(np.asarray(inits), dtype=torch.float64).reshape(-1, n))
    starts = torch.cat(starts)
    probe = torch.randn(2000, n, generator=gen, dtype=torch.float64)
    base = set((healthy @ probe.T).argmax(0).tolist()) | set((healthy @ starts.T).argmax(0).tolist())
    pres = {r["name"]: torch.tensor(scaler(r)[r["steps_arr"] < r["decline"]])
            for r in runs if r["decline"] is not None}
    out, directions = {}, []
    for name, pre in pres.items():
        if len(pre) == 0:
            out[name] = (False, None)
            continue
        def smoothed_margin(u, h, tau, soft, pre=pre):   # pre-decline maximum over the healthy maximum
            return (tau * torch.logsumexp(pre @ u.T / tau, 0) - tau * torch.logsumexp(h @ u.T / tau, 0)).sum()

        w = ascend_over_active_set(starts.clone().requires_grad_(True), healthy, set(base), 0.05,
                                   ((0.3, None), (0.1, None), (0.03, None)), smoothed_margin)
        with torch.no_grad():
            u = w / w.norm(dim=1, keepdim=True)
            exact = (pre @ u.T).max(0).values - (healthy @ u.T).max(0).values
        directions.append(u)
        best = int(exact.argmax())
        out[name] = (bool(exact[best] > 0), float(exact[best]))
    # one direction for all: from each run's best directions, ascend a smoothed count of the runs caught
    names = [name for name, pre in pres.items() if len(pre)]
    found = torch.cat(directions)                                  # (runs * starts, n), unit rows
    with torch.no_grad():
        limit = (healthy @ found.T).max(0).values
        margins = torch.stack([(pres[nm] @ found.T).max(0).values - limit for nm in names])   # (runs, dirs)
    seeds = set()
    for i in range(len(names)):
        seeds |= set(margins[i].topk(JOINT_TOPK).indices.tolist())
    seeds |= set((margins > 0).sum(0).topk(5).indices.tolist())
    def smoothed_count(u, h, tau, soft):                  # runs caught, each a sigmoid of its smoothed margin
        top = tau * torch.logsumexp(h @ u.T / tau, 0)
        m = torch.stack([tau * torch.logsumexp(pres[nm] @ u.T / tau, 0) for nm in names]) - top
        return torch.sigmoid(m / soft).sum()

    w = ascend_over_active_set(found[sorted(seeds)].clone().requires_grad_(True), healthy,
                               set(base) | set((healthy @ found.T).argmax(0).tolist()), 0.02,
                               ((0.1, 0.1), (0.03, 0.03), (0.01, 0.01)), smoothed_count)
    with torch.no_grad():
        u = torch.cat([found, w / w.norm(dim=1, keepdim=True)])
        limit = (healthy @ u.T).max(0).values
        caught = torch.stack([(pres[nm] @ u.T).max(0).values > limit for nm in names])
        k = int(caught.sum(0).argmax())
        best = u[k]
        margin = {nm: float((pres[nm] @ best).max() - limit[k]) for nm in names}
    joint = sorted(names[i] for i in torch.nonzero(caught[:, k]).flatten().tolist())
    return out, joint, best.numpy(), margin, scaler

# ---------------------------------------------------------------------------------------------------- report

def counts_row(label: str, t: dict) -> str:
    lead = f"{statistics.median(t['leads']):.0f}" if t["leads"] else "-"
    return (f"| {label} | {len(t['leads'])} of {t['declining']} | {lead} | {t['late']} | {t['missed']} | "
            f"{t['false_alarms']} of {t['healthy']} |")


HEAD = ("| detector | {d} runs warned before their decline | median lead (steps) | late | missed | "
        "false alarms (healthy runs) |\n|---|---|---|---|---|---|")


def per_run_table(per_run: list, threshold: float, declined: str) -> str:
    lines = [f"| test run | decline first seen at step ({declined}) | first warning at step | verdict | "
             "best pre-decline score minus threshold |", "|---|---|---|---|---|"]
    for p in per_run:
        if p["decline"] is None and p["warning"] is None:
            continue
        if p["decline"] is None:
            verdict = "false alarm"
        elif p["warning"] is None:
            verdict = "missed"
        elif p["warning"] < p["decline"]:
            verdict = f"lead {p['decline'] - p['warning']}"
        else:
            verdict = "late"
        margin = "-" if p["decline"] is None or p["margin"] is None else f"{p['margin']:+.2f}"
        if p["decline"] is not None and p["margin"] is None:
            margin = "no step before the decline"
        lines.append(f"| {p['run']} | {p['decline'] or '-'} | {p['warning'] or '-'} | {verdict} | {margin} |")
    return "\n".join(lines)


def task(run: dict) -> str:
    """The task a run trained on, from its step-0 held-out accuracy (reporting only; not a detector input)."""
    acc = run["records"][0].get("eval/greedy") or 0.0
    return "collapse task" if acc < 0.45 else "default, shipped base" if acc < 0.6 else "default, earlier base"


def by_task(per_run: list, runs: list) -> dict:
    """task -> [reachable declines warned in time, reachable declines, unreachable declines, healthy warned,
    healthy]."""
    info = {r["name"]: r for r in runs}
    out = {}
    for p in per_run:
        r = info[p["run"]]
        row = out.setdefault(task(r), [0, 0, 0, 0, 0])
        if p["decline"] is None:
            row[3] += p["warning"] is not None
            row[4] += 1
        elif (r["steps_arr"] < p["decline"]).any():
            row[1] += 1
            row[0] += p["warning"] is not None and p["warning"] < p["decline"]
        else:
            row[2] += 1
    return dict(sorted(out.items()))


def grid_of(kind: str, quick: bool) -> list:
    if quick:
        return [(30, 1e-2), (None, 1e-2)]
    return [(w, l2) for w in WINDOWS for l2 in (L2S if kind == "linear" else MLP_L2S)]


def section(first_drop: bool, quick: bool, log) -> tuple:
    t0 = time.time()
    runs = load(first_drop)
    tuning = [r for r in runs if r["role"] == "tune"]
    testing = [r for r in runs if r["role"] == "test"]
    declined = "declined" if first_drop else "collapsed"
    reachable = [r for r in testing if r["decline"] is not None and (r["steps_arr"] < r["decline"]).any()]
    text = [f"## {'Any drop (first_drop=True)' if first_drop else 'Collapse (the strict definition)'}\n",
            f"Tuning: {len(tuning)} runs ({sum(r['decline'] is not None for r in tuning)} {declined}); "
            f"test: {len(testing)} runs ({sum(r['decline'] is not None for r in testing)} {declined}). "
            f"Of the test {declined} runs, {len(reachable)} have any step with a full 10-step window before their "
            "decline (a decline first seen at step 5 or 10 cannot be warned before by any detector that waits "
            "for its first window).\n"]
    variants = [("common", "linear"), ("all7", "linear"), ("common", "mlp")]
    if first_drop:                  # the looser definition: the linear models only (time)
        variants = variants[:2]
    if quick:
        variants = variants[:1]
    results, test_rows, tune_rows = {}, [], []
    for feature_set, kind in variants:
        (window, l2), rows = select(tuning, feature_set, kind, grid_of(kind, quick), log)
        chosen = [row for row in rows if row[0] == (window, l2)][0][1]
        score, threshold, model, scaler = fit(tuning, feature_set, kind, window, l2,
                                              [v for w, v in grid_of(kind, quick) if w == window])
        tune_in = tally(evaluate(score, threshold, tuning))
        per_test = evaluate(score, threshold, testing)
        t = tally(per_test)
        name = f"{kind}, {feature_set} features, W={window or 'all'}, L2={l2}"
        tune_rows.append(counts_row(f"{name}: leave-one-run-out", chosen))
        tune_rows.append(counts_row(f"{name}: in-sample (refit on all 41)", tune_in))
        test_rows.append(counts_row(name, t))
        coef = None
        if kind == "linear":
            wts = model.weight.detach().numpy()[0]
            common, optional = SETS[feature_set]
            names = [f"{s}{form}" for s in common + optional for form in ("", " trend", " gain")]
            names += [f"has {s}" for s in optional]
            coef = sorted(zip(names, wts.tolist()), key=lambda kv: -abs(kv[1]))
        results[f"{feature_set}/{kind}"] = {"window": window, "l2": l2, "threshold": threshold,
                                            "loro": {k: v for k, v in chosen.items()}, "tune_in_sample": tune_in,
                                            "test": t, "per_test": per_test, "coef": coef,
                                            "grid": [{"window": w, "l2": l, **tt} for (w, l), tt, _ in rows]}
        log(f"  {name}: test {len(t['leads'])}/{t['declining']} in time, late {t['late']}, missed {t['missed']}, "
            f"FA {t['false_alarms']}/{t['healthy']}  ({time.time() - t0:.0f}s)")
    text.append("**Chosen by leave-one-run-out on the tuning runs (and the same model refit on all tuning runs, "
                "in-sample):**\n\n" + HEAD.format(d=declined) + "\n" + "\n".join(tune_rows) + "\n")
    text.append("**Held-out test runs (never seen in fitting, standardizing, thresholding or choosing):**\n\n"
                + HEAD.format(d=declined) + "\n"
                + ("| univariate, tuned thresholds (README / collapse_detector.md) | 0 of 8 | - | 5 | 3 | 3 of 49 |\n"
                   if not first_drop else
                   "| univariate, tuned thresholds (collapse_detector.md, any of the above) | 8 of 16 | 16 | 8 | 0 "
                   "| 31 of 41 |\n")
                + "\n".join(test_rows) + "\n"
                + counts_row("reference, no detector: warn at the first window (step 10) of every collapse-task run",
                             tally([{"run": r["name"], "decline": r["decline"],
                                     "warning": int(r["steps_arr"][0]) if task(r) == "collapse task" else None}
                                    for r in testing])) + "\n")
    text.append("**The same, by task** (task from the step-0 held-out accuracy, for this breakdown only: below 0.45 "
                "the collapse task, 0.557 the default task on the shipped base, 0.762 the earlier base; reachable: "
                "a decline with any step before it from step 10 on):\n\n| detector | task | reachable " + declined
                + " runs warned before their decline | unreachable " + declined + " runs | healthy runs that "
                "warned |\n|---|---|---|---|---|\n" + "\n".join(
                    f"| {key} | {task} | {row[0]} of {row[1]} | {row[2]} | {row[3]} of {row[4]} |"
                    for key, res in results.items() for task, row in by_task(res["per_test"], testing).items())
                + "\n")
    for key, res in results.items():
        text.append(f"**Per test run, {key} (threshold {res['threshold']:.3f}; healthy runs that did not warn are "
                    "left out):**\n\n" + per_run_table(res["per_test"], res["threshold"], declined) + "\n")
        if res["coef"]:
            text.append(f"Weights of {key} (standardized features, largest first): "
                        + ", ".join(f"{n} {w:+.2f}" for n, w in res["coef"][:8]) + "\n")

    # hindsight: fit on everything, threshold at no false alarm over all healthy runs
    hind_rows, hind = [], {}
    for feature_set, kind in variants:
        best = None
        grid = grid_of(kind, quick)
        fits = {(w, l2): f for w in dict.fromkeys(w for w, _ in grid)
                for l2, f in fit_path(runs, feature_set, kind, w, [v for ww, v in grid if ww == w]).items()}
        for window, l2 in grid:
            score, threshold, model, _ = fits[(window, l2)]
            per = evaluate(score, threshold, runs)
            t = tally(per)
            caught = sorted(p["run"] for p in per if p["decline"] is not None and p["warning"] is not None
                            and p["warning"] < p["decline"])
            if best is None or len(caught) > len(best[2]):
                best = ((window, l2), t, caught, model)
            if (window, l2) == (results[f"{feature_set}/{kind}"]["window"], results[f"{feature_set}/{kind}"]["l2"]):
                at_chosen = (t, caught)
        (window, l2), t, caught, model = best
        hind[f"{feature_set}/{kind}"] = {"best": {"window": window, "l2": l2, "caught": caught},
                                         "at_chosen": {"caught": at_chosen[1]}}
        hind_rows.append(f"| {kind}, {feature_set} | {len(caught)} of {t['declining']} (best of the grid: "
                         f"W={window or 'all'}, L2={l2}){': ' + ', '.join(caught) if caught else ''} | "
                         f"{len(at_chosen[1])} of {t['declining']}"
                         f"{': ' + ', '.join(at_chosen[1]) if at_chosen[1] else ''} |")
        if kind == "linear" and feature_set == "common":
            hind_linear_w = model.weight.detach().numpy()
    log(f"  hindsight done ({time.time() - t0:.0f}s)")
    sep = {fs: separable_runs(runs, fs, hind_linear_w if fs == "common" else None)
           for fs in (("common",) if quick or first_drop else ("common", "all7"))}
    n_declining = sum(r["decline"] is not None for r in runs)
    n_reachable = sum(r["decline"] is not None and (r["steps_arr"] < r["decline"]).any() for r in runs)
    text.append(f"**Hindsight: the model fit on all {len(runs)} runs (tuning + test), threshold at no false alarm "
                f"over all {len(runs) - n_declining} healthy runs; {declined} runs warned before their decline:**\n\n"
                "| model | best over the hyperparameter grid | at the hyperparameters chosen on tuning |\n"
                "|---|---|---|\n" + "\n".join(hind_rows) + "\n")
    sep_out = {}
    for fs, (s, joint, direction, margin, scaler) in sep.items():
        yes = sorted(k for k, (ok, _) in s.items() if ok)
        common, optional = SETS[fs]
        names = [f"{sig}{form}" for sig in common + optional for form in ("", " trend", " gain")]
        names += [f"has {sig}" for sig in optional]
        scores = {r["name"]: scaler(r) @ direction for r in runs}
        limit = max(scores[r["name"]].max() for r in runs if r["decline"] is None)
        smallest = min((margin[nm] for nm in joint), default=0.0)
        close = sum(scores[r["name"]].max() > limit - smallest for r in runs if r["decline"] is None)
        first = {r["name"]: int(r["steps_arr"][np.nonzero(scores[r["name"]] > limit)[0][0]]) for r in runs
                 if r["name"] in joint}
        decline = {r["name"]: r["decline"] for r in runs}
        text.append(
            f"Beyond the logistic fit, searched directly (hindsight, linear scores on the {fs} features, unit-norm "
            f"direction): {len(yes)} of the {n_declining} {declined} runs ({n_reachable} of them have any step before "
            "their decline at all) have a direction of their own that puts one of their pre-decline steps above every "
            "step of every healthy run; a direction is a certificate, checked exactly, so this per-run ceiling is "
            f"exact where it equals the reachable count. The best single direction found (a search: a lower bound on "
            f"the best one linear detector could do with hindsight) catches {len(joint)} with no false alarm: "
            + ", ".join(f"{nm} (warns at {first[nm]}, decline {decline[nm]}, margin {margin[nm]:.3f})" for nm in joint)
            + f". Its smallest catch margin is {smallest:.3f} (standardized units along the unit direction), and "
            f"{close} healthy runs have their maximum within that distance below its threshold. Direction: "
            + ", ".join(f"{n} {w:+.2f}" for n, w in sorted(zip(names, direction.tolist()), key=lambda kv: -abs(kv[1]))[:6])
            + ".\n")
        sep_out[fs] = {"per_run": {k: list(v) for k, v in s.items()}, "joint": joint,
                       "joint_margin": margin, "direction": dict(zip(names, direction.tolist())),
                       "healthy_within_smallest_margin": int(close)}
    log(f"  ceiling done ({time.time() - t0:.0f}s)")
    return "\n".join(text), {"results": results, "hindsight": hind, "separable": sep_out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one variant, two grid points (a smoke test)")
    parser.add_argument("--no-first-drop", action="store_true", help="skip the looser definition")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "collapse_detector")
    args = parser.parse_args()
    torch.set_num_threads(1)              # small fits: one thread is as fast, and leaves the other core free
    t0 = time.time()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    texts, data = [], {}
    for first_drop in ((False,) if args.no_first_drop else (False, True)):
        text, data["first_drop" if first_drop else "collapse"] = section(first_drop, args.quick, log)
        texts.append(text)
    body = "\n".join(texts)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multivariate.md").write_text(body)
    (args.out / "multivariate.json").write_text(json.dumps(data, indent=1, default=float))
    print(body)
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
