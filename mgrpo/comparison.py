"""SRT, M-GRPO and M-GRPO without the IQR filter from the same base, over seeds: what `mgrpo compare` runs
(mgrpo/commands/compare.py: its flags).

    mgrpo compare                        # preset "default": the embedded default as `mgrpo train` runs it (300 steps), 3 seeds
    mgrpo compare --preset quick         # 60 steps: greedy rises, the vote does not yet (3 minutes a run on 2 cores)
    mgrpo compare --preset long          # 900 steps (3x the default): does SRT collapse here, does M-GRPO hold?
    mgrpo compare --preset collapse      # a task where the vote is confidently wrong on one family of problems
    mgrpo compare --preset short         # a minute-long smoke version (what the tests run)
    mgrpo compare --seeds 5 optim.lr=5e-5 ...      # a train override applies to every run (not those compare
                                                   # sets itself: seed, run_dir, resume, a method's algorithm.mode)
    mgrpo compare --preset long --out DIR --report  # tables and plot of the runs finished so far; trains nothing
    mgrpo compare --methods mgrpo --sweep algorithm.momentum=0.9,0.999   # one method per value of a setting
    mgrpo compare --methods srt,mgrpo,mgrpo+algorithm.momentum=0.9 ...   # methods and sweep variants together
    mgrpo compare ... --report --methods mgrpo,mgrpo+algorithm.momentum=0.9 --name compare_momentum  # a 2nd report

Every run is an ordinary `mgrpo train` run (its own run directory under --out, with metrics.jsonl,
checkpoints and final model), validated on the held-out set every `data.eval_every` steps by the trainer's
own evaluation. One rollout engine is built once and shared by the runs (weights are pushed from memory
each step, so nothing carries over). Finished runs are skipped when the command is run again on the same
--out, so an interrupted comparison continues where it stopped (an --out that holds anything else, a training
run's directory say, is refused: nothing of it is written over). A run counts as finished by its final model or
by its metrics.jsonl alone (the end-of-run evaluation is logged there), so a comparison spread over several
machines or days needs only the runs' metrics.jsonl to go on from them.

Output in --out: compare.csv (every run's every logged step), compare_summary.csv (per method and step:
mean, std, min and max over seeds), compare_runs.csv (per run: final and best held-out accuracy, the best's
step, where held-out greedy first declined and when the collapse monitor first warned), compare.md (the two as
markdown tables, mean ± std over seeds), compare.png (held-out accuracy, training reward, pseudo-label accuracy,
majority ratio, entropy, entropy ratio and momentum agreement versus step; one line per method, the band is min-max
over seeds).
"""
from __future__ import annotations

import json
import re
import shlex
import statistics
from datetime import datetime
from pathlib import Path
from typing import Optional

from .build import build_engine
from .config import load_config
from .distributed import init_distributed
from .errors import MgrpoError
from .loop.trainer import train
from .metrics import CollapseMonitor, read_metrics, write_csv
from .storage.checkpoint import latest_checkpoint
from .storage.run_dir import holds_a_run

# name -> overrides of the method (applied after the preset, before the user's)
METHODS = {
    "srt": ["algorithm.mode=srt"],
    "mgrpo": ["algorithm.mode=mgrpo"],
    "mgrpo_no_iqr": ["algorithm.mode=mgrpo", "algorithm.iqr_filter=false"],
}

# name -> (seeds, train overrides). "default" is the embedded default as `mgrpo train` runs it (validated every 30
# steps too: the evaluation draws from its own generator, so the training is the same step for step).
PRESETS = {
    "short": (2, ["steps=3", "data.num_eval=16", "data.eval_every=2", "eval.k=2", "algorithm.prompts_per_step=2",
                  "algorithm.group_size=4", "rollout.max_new_tokens=48"]),
    "quick": (3, ["steps=60", "data.eval_every=10"]),
    "default": (3, ["data.eval_every=30"]),
    "long": (3, ["steps=900", "data.eval_every=90", "save_every=90", "snapshot_every=90"]),
    # Where the vote is confidently wrong on part of the data (README, "Collapse"): the built-in task with 5-term
    # problems added, on which the shipped base's majority is wrong 95% of the time; twice the default's lr, so that
    # SRT's rise and fall fit in 120 steps (~7 minutes a run on 2 cores); held-out figures per family.
    "collapse": (3, ["data.source=builtin:arithmetic-long", "rollout.max_new_tokens=96", "optim.lr=1e-4", "steps=120",
                     "data.eval_every=10"]),
}

# The anchor that held on every seed of the collapse preset (README, "Collapse"): half of each group from a momentum
# model ten times slower than the paper's (N = 8 of G = 16, m = 0.999).
ANCHORED = "mgrpo+algorithm.momentum_samples=8+algorithm.momentum=0.999"
# preset -> its methods when --methods is not given (otherwise every method of METHODS)
PRESET_METHODS = {"collapse": [*METHODS, ANCHORED]}

PLOT_PANELS = (("eval/greedy", "held-out greedy accuracy"), ("eval/maj@k", "held-out maj@k accuracy"),
               ("reward", "training reward"), ("pseudo_label_accuracy", "pseudo-label accuracy"),
               ("majority_ratio", "majority ratio"), ("entropy", "entropy"),
               ("collapse/entropy_ratio", "entropy / its step-1 value"),
               ("collapse/momentum_agreement", "momentum agreement (M-GRPO)"))
# The trailing window of training steps whose mean is a run's final entropy ratio and momentum agreement in
# compare_runs.csv (one step is a handful of groups: noisy); the collapse monitor's window.
FINAL_WINDOW = 10


class CompareError(MgrpoError, ValueError):
    pass


SETTING_SPLIT = re.compile(r"\+(?=[A-Za-z_][\w.]*=)")    # the "+" before each "key=" of a method's name


def method_overrides(method: str) -> list:
    """A method's train overrides: a named method, or "NAME+key=value" (a --sweep variant of NAME), or with several
    settings "NAME+key=value+key=value" (a "+" splits only before the next "key=", so a value may hold one)."""
    name, *settings = SETTING_SPLIT.split(method)
    return [*METHODS[name], *settings]


def sweep_methods(methods: list, sweep: str) -> list:
    """--sweep key=v1,v2,...: every method once per value, named "method+key=value"."""
    key, sep, values = sweep.partition("=")
    if not sep or not key or not values:
        raise CompareError(f"--sweep {sweep!r}: give one setting and its values, e.g. algorithm.momentum=0.9,0.99,0.999")
    return [f"{m}+{key}={v}" for m in methods for v in values.split(",") if v]


# Keys compare sets on every run itself (why, how to get what was meant): an override of one would make the
# comparison lie (every "seed" the same seed, every run in one directory, each resuming the last) or undo how it
# skips finished runs and resumes interrupted ones.
OWN_KEYS = {
    "seed": ("compare sets seed per run from --seeds", "choose them with --seeds, that one alone: --seeds {0}-{0}"),
    "run_dir": ("compare gives every run its own run_dir under --out", "choose where with --out"),
    "resume": ("compare resumes each unfinished run of --out itself", "for a fresh comparison give a new --out"),
    "resume_from": ("compare resumes each run of --out from its own checkpoints", "for a fresh one give a new --out"),
    "overwrite": ("compare never overwrites a run of --out (finished runs are skipped)",
                  "for a fresh comparison give a new --out"),
}


def set_key(override: str, keys) -> Optional[str]:
    """The key of `keys` that a "key=value" override sets: the key itself, or a section holding it
    ("algorithm={...}" replaces algorithm.mode too)."""
    key = override.partition("=")[0].strip()
    return next((k for k in keys if k == key or k.startswith(key + ".")), None) if key else None


def check_overrides(methods: list, overrides: list) -> None:
    """Refuse what would make the comparison lie, before any run: a trailing override of a key compare sets per run,
    or of a setting that tells the methods apart (every method the same); a method's "+key=value" of compare's keys,
    or of the setting that defines the method it names (its other settings, e.g. mgrpo+algorithm.momentum=0.99,
    are what a sweep varies)."""
    defining = {}                        # key -> the methods' values of it, e.g. algorithm.mode -> srt: ..., mgrpo: ...
    for name, sets in METHODS.items():
        for setting in sets:
            defining.setdefault(setting.partition("=")[0], []).append(f"{name} sets {setting}")
    for item in overrides:
        key = set_key(item, [*OWN_KEYS, *defining])
        if key in OWN_KEYS:
            why, how = OWN_KEYS[key]
            raise CompareError(f"{why}: remove {item} ({how.format(item.partition('=')[2].strip())})")
        if key is not None:
            raise CompareError(f"{key} tells the methods apart ({', '.join(defining[key])}) and {item} would set it "
                               "for every one: remove it, and choose the methods with --methods")
    for method in methods:
        name, *settings = SETTING_SPLIT.split(method)
        for item in settings:
            key = set_key(item, [*OWN_KEYS, *(s.partition("=")[0] for s in METHODS[name])])
            if key in OWN_KEYS:
                raise CompareError(f"--methods/--sweep {method}: {OWN_KEYS[key][0]}, not per method: remove +{item}")
            if key is not None:
                raise CompareError(f"--methods/--sweep {method}: {name} is {' '.join(METHODS[name])}, and +{item} "
                                   f"would change that under its name: name the method meant ({', '.join(METHODS)})")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:                  # one run directory per (method, seed): the two would share theirs
        raise CompareError(f"--methods: {', '.join(twice)} given twice: name each method once")


def run_overrides(preset: str, method: str, seed: int, out: Path, user: list) -> list:
    return [*PRESETS[preset][1], *method_overrides(method), f"seed={seed}", f"run_dir={out / f'{method}_seed{seed}'}",
            "progress=false", "log_every=0", *user]


def warnings_only(log, run: str):
    """A run's log for the comparison's terminal: its step lines are in metrics.jsonl; its warnings (the
    collapse monitor's) are shown, naming the run."""
    def filtered(*args, **kwargs):
        text = " ".join(str(a) for a in args)
        if text.startswith("[warning]"):
            log(f"[compare]   {run}: {text}")
    return filtered


def finished(cfg) -> bool:
    """A run is done when its final model is there, or when its metrics.jsonl holds the end-of-run evaluation
    (logged at step `steps` after the last update; its checkpoints and models need not be kept)."""
    run_dir = Path(cfg.run_dir)
    if (run_dir / "final" / "config.json").is_file():
        return True
    if not (run_dir / "metrics.jsonl").is_file() or not cfg.data.num_eval:
        return False
    return any(r["step"] == cfg.steps and r.get("eval/greedy") is not None for r in read_metrics(run_dir))


MAX_SEED_COUNT = 10     # a larger bare count is refused (a range or a list says it is meant)
MAX_SEEDS = 1000        # runs per method in any form: more is a slip of the keyboard, not an experiment


def parse_seeds(text: str) -> list:
    """--seeds: N (seeds 0..N-1), A-B (A..B inclusive) or A,B,C: tune on some seeds, claim on others."""
    seeds = None            # a count or a range: (first, last), its list made once its size is known
    try:
        if "," in text:
            seeds = [int(v) for v in text.split(",") if v.strip()]
            first, last = 0, len(seeds) - 1
        elif "-" in text.strip()[1:]:
            first, last = text.split("-", 1) if not text.startswith("-") else (text, "")
            first, last = int(first), int(last)
        else:
            first, last = 0, int(text) - 1
    except ValueError:
        raise CompareError(f"--seeds {text}: give a count (3), a range (100-102) or a list (0,7,9)") from None
    count = last - first + 1
    if seeds is None and "-" in text.strip()[1:] and last < first:
        if last < 0:
            raise CompareError(f"--seeds {text}: seeds must be distinct and >= 0")
        raise CompareError(f"--seeds {text}: the range is reversed ({first} down to {last}): write the lower seed "
                           f"first, --seeds {last}-{first}")
    if text.strip().isdigit() and count > MAX_SEED_COUNT:   # "--seeds 100", meant as the seed 100: 100 runs
        raise CompareError(f"--seeds {text} is a count: {count} runs per method (seeds 0-{count - 1}). "
                           f"For the seed {text} alone write --seeds {text}-{text}; for that many seeds, "
                           + (f"the range --seeds 0-{count - 1}" if count <= MAX_SEEDS else f"at most {MAX_SEEDS}"))
    if count > MAX_SEEDS:       # checked before the list is made: a range's list alone could fill the memory
        raise CompareError(f"--seeds {text}: {count} runs per method, more than {MAX_SEEDS}: give fewer seeds")
    if count < 1:
        raise CompareError(f"--seeds {text}: must be >= 1")
    seeds = seeds if seeds is not None else list(range(first, last + 1))
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds {text}: seeds must be distinct and >= 0")
    return seeds


def seed_label(seeds: list) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ",".join(map(str, seeds))


def run_all(preset: str, seeds: list, methods: list, out: Path, user: list, log=print) -> list:
    """Train every (method, seed) not finished yet; returns their run directories."""

    configs = [(m, s, load_config(None, run_overrides(preset, m, s, out, user))) for m in methods for s in seeds]
    base = configs[0][2]
    for _, _, cfg in configs:   # every run must start from the same base model and data
        if (cfg.model.path, cfg.data.source, cfg.warm_start) != (base.model.path, base.data.source, base.warm_start):
            raise CompareError("the runs of a comparison must share model.path, data.source and warm_start")
    todo = [(m, s, cfg) for m, s, cfg in configs if not finished(cfg)]
    engine = None
    for i, (method, seed, cfg) in enumerate(todo):
        if engine is None:   # built as train() would build it, once for every run
            engine = build_engine(base, init_distributed(base.device, base.model.precision), log)
        cfg.resume = latest_checkpoint(Path(cfg.run_dir)) is not None
        cfg.overwrite = not cfg.resume
        log(f"[compare] {i + 1}/{len(todo)}: {method} seed {seed} -> {cfg.run_dir}"
            + (" (resuming)" if cfg.resume else ""))
        summary = train(cfg, log=warnings_only(log, f"{method} seed {seed}"), engine=engine)
        before, after = summary["before"] or {}, summary.get("after") or {}
        del summary                # the run's models and optimizer: freed before the next run starts
        log(f"[compare]   held-out greedy {before.get('greedy', float('nan')):.1%} -> "
            f"{after.get('greedy', float('nan')):.1%}, maj@k {before.get(f'maj@{cfg.eval.k}', float('nan')):.1%} -> "
            f"{after.get(f'maj@{cfg.eval.k}', float('nan')):.1%}")
    return [Path(cfg.run_dir) for _, _, cfg in configs]


def collect(out: Path, methods: list, seeds: list, runs=None) -> list:
    """One row per (method, seed, step) with every metric logged at that step (eval lines merged in); `runs`:
    only these (method, seed) pairs."""
    rows = []
    for method in methods:
        for seed in seeds:
            if runs is not None and (method, seed) not in runs:
                continue
            by_step: dict = {}
            for record in read_metrics(out / f"{method}_seed{seed}"):
                by_step.setdefault(record["step"], {}).update(record)
            rows += [{"method": method, "seed": seed, **r} for _, r in sorted(by_step.items())]
    return rows


def families(rows: list) -> list:
    """The held-out problems' families logged in `rows` (eval/<family>/greedy), in order."""
    return sorted({key.split("/")[1] for r in rows for key in r
                   if key.startswith("eval/") and key.count("/") == 2 and key.endswith("/greedy")})


def family_keys(rows: list) -> tuple:
    return tuple(f"eval/{family}/{name}" for family in families(rows) for name in ("greedy", "maj@k"))


def summarize(rows: list, keys=None) -> list:
    """Per method and step: mean, std, min, max over the seeds that logged each key there (`seeds` counts
    the runs with a line at that step). keys: the plot's, and the held-out figures per family."""
    keys = keys or tuple(k for k, _ in PLOT_PANELS) + family_keys(rows)
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        steps = sorted({r["step"] for r in rows if r["method"] == method})
        for step in steps:
            at = [r for r in rows if r["method"] == method and r["step"] == step]
            row = {"method": method, "step": step, "seeds": len(at)}
            for key in keys:
                values = [r[key] for r in at if r.get(key) is not None]
                if values:
                    row.update({f"{key}/mean": statistics.fmean(values),
                                f"{key}/std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                f"{key}/min": min(values), f"{key}/max": max(values)})
            out.append(row)
    return out


def moving_average(values: list, window: int) -> list:
    """Trailing mean over up to `window` points (the first points average what there is)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot(summary: list, path: Path, title: str, smooth: int = 5, warnings: Optional[dict] = None) -> None:
    """Held-out accuracy as measured (per family too, a third row, when the problems have families); per-step
    training metrics (a few groups each: noisy) smoothed. warnings: method -> the steps its runs' collapse
    warnings fired, marked on the held-out panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({key.split("/")[1] for r in summary for key in r
                   if key.startswith("eval/") and key.count("/") == 3 and key.endswith("/greedy/mean")})[:4]
    panels = list(PLOT_PANELS) + [(f"eval/{f}/greedy", f"held-out greedy accuracy, {f} problems") for f in fams]
    fig, axes = plt.subplots(3 if fams else 2, 4, figsize=(19, 11.25 if fams else 7.5))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    methods = list(dict.fromkeys(r["method"] for r in summary))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}   # one color per method in every panel
    for ax, (key, label) in zip(axes.flat, panels):
        for method in methods:
            pts = [r for r in summary if r["method"] == method and f"{key}/mean" in r]
            if not pts:
                continue
            steps = [r["step"] for r in pts]
            held_out = key.startswith("eval/")
            scale, window = (100, 1) if held_out else (1, smooth)
            series = [[scale * r[f"{key}/{s}"] for r in pts] for s in ("mean", "min", "max")]
            mean, low, high = (moving_average(v, window) for v in series)
            ax.plot(steps, mean, marker="o" if held_out else None, markersize=3, color=colors[method],
                    label=f"{method} (n={pts[-1]['seeds']})")
            ax.fill_between(steps, low, high, color=colors[method], alpha=0.15, linewidth=0)
            for step in (warnings or {}).get(method, []) if held_out else []:
                ax.axvline(step, color=colors[method], linestyle=":", linewidth=1.2, alpha=0.8)
        ax.set_title(label + (" (%)" if key.startswith("eval/") else f" ({smooth}-step moving average)"
                              if smooth > 1 else ""), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    # one legend for the figure, below the panels (every panel colors a method alike; a sweep's long names would
    # cover a panel's curves)
    legend = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name.rsplit(" (n=", 1)[0], (handle, name))
    fig.suptitle(title, fontsize=11)
    fig.legend([h for h, _ in legend.values()], [n for _, n in legend.values()], loc="lower center",
               ncol=min(len(legend), 2 if max(map(len, legend), default=0) > 40 else 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.025 * (1 + (len(legend) > 2 and max(map(len, legend), default=0) > 40)), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# A held-out greedy accuracy this far below the run's best so far counts as its decline: about two standard
# errors of an accuracy near 0.75 on 512 problems (sqrt(0.75 * 0.25 / 512) = 0.019 each), so sampling noise
# between two evaluations rarely crosses it.
DECLINE = 0.04


def replay_monitor(run: list) -> dict:
    """The collapse monitor's warnings of one run, replayed on its logged training metrics with the trainer's own
    CollapseMonitor (same thresholds and window): sign -> step of its warning."""
    monitor, steps = CollapseMonitor(log=lambda *a: None), {}
    for record in run:
        if record.get("entropy") is None:
            continue
        before = set(monitor.warned)
        monitor.observe(record["step"], record)
        steps.update({key: record["step"] for key in monitor.warned - before})
    return steps


def run_report(rows: list, decline: float = DECLINE) -> list:
    """Per run (method, seed): final and best held-out accuracy and the step of the best, the final checkpoint's
    distance below its best; the entropy ratio and momentum agreement at the end (mean of the last FINAL_WINDOW
    steps); the first evaluation `decline` below the best so far (None: no decline); whether the run collapsed
    (its final more than `decline` below its best); the monitor's warnings, replayed, and how many steps the first
    came before a collapsed run's first decline (negative: after it; a warning in a run that did not collapse
    is a false alarm)."""
    out = []
    for method, seed in dict.fromkeys((r["method"], r["seed"]) for r in rows):
        run = sorted((r for r in rows if r["method"] == method and r["seed"] == seed), key=lambda r: r["step"])
        evals = [r for r in run if r.get("eval/greedy") is not None]
        if not evals:
            continue
        row = {"method": method, "seed": seed}
        for key in ("eval/greedy", "eval/maj@k", *family_keys(run)):     # greedy/best, 5-term/greedy/best, ...
            if any(r.get(key) is None for r in evals):
                continue
            best = max(evals, key=lambda r: r[key])          # the first step reaching the maximum
            name = key.partition("/")[2]
            row.update({f"{name}/final": evals[-1][key], f"{name}/best": best[key], f"{name}/best_step": best["step"],
                        f"{name}/final_minus_best": evals[-1][key] - best[key]})
        best_so_far, row["decline_step"] = float("-inf"), None
        for r in evals:
            if r["eval/greedy"] < best_so_far - decline:
                row["decline_step"] = r["step"]
                break
            best_so_far = max(best_so_far, r["eval/greedy"])
        for key in ("collapse/entropy_ratio", "collapse/momentum_agreement"):
            values = [r[key] for r in run if r.get(key) is not None][-FINAL_WINDOW:]
            if values:
                row[f"{key.split('/')[1]}/final"] = statistics.fmean(values)
        warnings = replay_monitor(run)
        for key in sorted(warnings):
            row[f"warning_step/{key.rpartition('/')[2]}"] = warnings[key]
        first = min(warnings.values()) if warnings else None
        row["first_warning_step"] = first
        # collapsed: the run ends more than the noise below its best (a dip it recovers from is not a collapse);
        # a warning before a collapse's first drop leads it, a warning in a run that did not collapse is a false alarm
        row["collapsed"] = row.get("greedy/final_minus_best", 0.0) < -decline
        row["warning_lead_steps"] = (row["decline_step"] - first if first is not None and row["collapsed"]
                                     and row["decline_step"] else None)
        row["false_alarm"] = first is not None and not row["collapsed"]
        out.append(row)
    return out


def report_table(report: list) -> str:
    """One line per run: final vs best greedy (and the best's step), the decline and the first warning."""
    lines = []
    for r in report:
        def pct(key):
            return f"{100 * r[key]:.1f}" if r.get(key) is not None else "-"
        lines.append(f"{r['method']:14s} seed {r['seed']}: greedy final {pct('greedy/final')} best "
                     f"{pct('greedy/best')} (step {r.get('greedy/best_step')}), decline at step "
                     f"{r['decline_step'] if r['decline_step'] is not None else '-'}, first monitor warning at step "
                     f"{r['first_warning_step'] if r['first_warning_step'] is not None else '-'}"
                     + (" (false alarm)" if r["false_alarm"] else "")
                     + "".join(f", {label} at the end {r[key]:.2f}" for key, label in
                               (("entropy_ratio/final", "entropy ratio"), ("momentum_agreement/final", "momentum agreement"))
                               if r.get(key) is not None))
    return "\n".join(lines)


def final_table(summary: list) -> str:
    """Held-out accuracy at the first and last evaluated step per method: mean +- std over seeds."""
    lines = []
    for method in dict.fromkeys(r["method"] for r in summary):
        evals = [r for r in summary if r["method"] == method and "eval/greedy/mean" in r]
        if not evals:
            continue
        first, last = evals[0], evals[-1]
        cells = []
        for key in ("eval/greedy", "eval/maj@k"):
            if f"{key}/mean" in last:
                cells.append(f"{key.split('/')[1]} {100 * first[f'{key}/mean']:.1f} -> "
                             f"{100 * last[f'{key}/mean']:.1f} +- {100 * last[f'{key}/std']:.1f}")
        lines.append(f"{method:14s} step {first['step']} -> {last['step']}: " + ", ".join(cells))
    return "\n".join(lines)


def markdown_tables(summary: list, report: list) -> str:
    """The README's tables: held-out greedy and maj@k per method at every evaluated step (mean ± std over seeds,
    with the seeds' count), and per run the final checkpoint against its best, the decline and the first
    warning, and the entropy ratio and momentum agreement at the end."""
    methods = list(dict.fromkeys(r["method"] for r in summary))
    steps = sorted({r["step"] for r in summary if "eval/greedy/mean" in r})
    lines = ["| held-out greedy / maj@k (%), mean ± std (seeds) | " + " | ".join(str(s) for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for method in methods:
        at = {r["step"]: r for r in summary if r["method"] == method and "eval/greedy/mean" in r}
        cells = []
        for step in steps:
            r = at.get(step)
            cells.append("-" if r is None else
                         f"{100 * r['eval/greedy/mean']:.1f} ± {100 * r['eval/greedy/std']:.1f} / "
                         f"{100 * r.get('eval/maj@k/mean', float('nan')):.1f} ± {100 * r.get('eval/maj@k/std', float('nan')):.1f}"
                         f" ({r['seeds']})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    def num(value, fmt="{:.2f}"):
        return "-" if value is None else fmt.format(value)
    lines += ["", "| run | greedy best (step) | final | final - best | maj@k final - best | decline first seen | "
              "first monitor warning | entropy ratio at the end | momentum agreement at the end |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report:
        warning = r.get("first_warning_step")
        lines.append(f"| {r['method']} seed {r['seed']} | {pct(r.get('greedy/best'))} ({r.get('greedy/best_step')}) | "
                     f"{pct(r.get('greedy/final'))} | {pct(r.get('greedy/final_minus_best'))} | "
                     f"{pct(r.get('maj@k/final_minus_best'))} | {num(r.get('decline_step'), '{}')} | "
                     + ("-" if warning is None else f"{warning}" + (" (false alarm)" if r.get("false_alarm") else ""))
                     + f" | {num(r.get('entropy_ratio/final'))} | {num(r.get('momentum_agreement/final'))} |")
    fams = [f for f in families_of_report(report)]
    if fams:                 # where the mean hides it: each family's best and final
        lines += ["", "| run | " + " | ".join(f"{f} greedy best (step) / final | {f} maj@k best / final" for f in fams)
                  + " |", "|---|" + "---|---|" * len(fams)]
        for r in report:
            cells = []
            for f in fams:
                cells.append(f"{pct(r.get(f'{f}/greedy/best'))} ({r.get(f'{f}/greedy/best_step')}) / "
                             f"{pct(r.get(f'{f}/greedy/final'))}")
                cells.append(f"{pct(r.get(f'{f}/maj@k/best'))} / {pct(r.get(f'{f}/maj@k/final'))}")
            lines.append(f"| {r['method']} seed {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def families_of_report(report: list) -> list:
    return sorted({key.split("/")[0] for r in report for key in r if key.count("/") == 2 and key.endswith("/greedy/best")})


def read_settings(path: Path) -> dict:
    """An --out's compare.json: the settings its runs were trained with (never overwritten: it says what they are)."""
    try:
        settings = json.loads(path.read_text())
        if not isinstance(settings, dict):
            raise ValueError(f"a JSON {type(settings).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CompareError(f"{path} is not a comparison's settings ({e}): restore it, or move it away to continue "
                           f"{path.parent} with these settings, or give a new --out") from None
    return settings


RUN_NAME = re.compile(r"(.+)_seed\d+")                  # a run's directory in --out: <method>_seed<N>
REPORT_FILE = re.compile(r"[A-Za-z0-9_.-]+\.(csv|md|png)")   # a report's files: <name>.csv, <name>_runs.csv, ...


def check_out(out: Path) -> None:
    """An --out that exists must be empty or a comparison (to continue it): compare writes its run directories and
    report files there, which among a training run's or anyone's other files would mix with, or write over, them.
    A comparison is told by its compare.json, or, without one (moved away, or only its runs' metrics.jsonl
    kept, as bench/results keeps its reports), by holding nothing but its runs' directories and its reports, and
    at least one run or a report's <name>_runs.csv (every report writes one: a lone notes.csv is no report)."""
    if not out.is_dir() or (out / "compare.json").is_file():
        return
    entries = sorted(out.iterdir())
    runs = [p for p in entries if p.is_dir() and (m := RUN_NAME.fullmatch(p.name))
            and SETTING_SPLIT.split(m.group(1))[0] in METHODS]
    others = [p for p in entries if p not in runs and not (p.is_file() and REPORT_FILE.fullmatch(p.name))]
    if not entries or (not others and (runs or any(p.name.endswith("_runs.csv") for p in entries))):
        return
    names = [p.name + "/" * p.is_dir() for p in sorted(entries, key=lambda p: p.name.startswith("."))]  # .lock last
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    what = "a training run's directory" if holds_a_run(out) else "a directory that is not a comparison"
    raise CompareError(f"--out {out} is {what} (it holds {listed}; no compare.json): compare writes its runs and "
                       "reports into --out and would mix them with what is there. Give a new --out (or an empty "
                       "directory)")


def compare(preset: str = "default", seeds: Optional[str] = None, methods: Optional[str] = None,
            sweep: Optional[str] = None, out: Optional[str] = None, name: str = "compare", report_only: bool = False,
            overrides: tuple = ()) -> int:
    """`mgrpo compare` (mgrpo/commands/compare.py: its flags): train every (method, seed) not finished yet in
    `out`, or with report_only none, then write the tables and plot. seeds, methods, sweep: as the flags take them."""
    overrides = list(overrides)
    seeds = parse_seeds(seeds if seeds is not None else str(PRESETS[preset][0]))
    methods = methods.split(",") if methods else PRESET_METHODS.get(preset, list(METHODS))
    unknown = [m for m in methods if SETTING_SPLIT.split(m)[0] not in METHODS]
    if unknown:
        raise CompareError(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise CompareError(f"--name {name!r}: a file name's stem (letters, digits, _ . -), e.g. compare_momentum")
    if sweep:
        methods = sweep_methods(methods, sweep)
    check_overrides(methods, overrides)
    out = Path(out or f"runs/compare-{preset}-{datetime.now():%Y%m%d-%H%M%S}")
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file, not a directory: give a directory (a new one starts a "
                           "comparison, an earlier comparison's continues it)")
    check_out(out)
    for method in methods:       # every config is checked before anything trains
        load_config(None, run_overrides(preset, method, 0, out, overrides))
    settings = {"preset": preset, "seeds": seeds, "methods": methods, "overrides": overrides}
    if (out / "compare.json").is_file():      # continuing: the finished runs must be of these settings
        before = read_settings(out / "compare.json")
        if {k: before.get(k) for k in ("preset", "overrides")} != {k: settings[k] for k in ("preset", "overrides")}:
            made_with = " ".join([f"--preset {before.get('preset')}", *map(shlex.quote, before.get("overrides") or [])])
            raise CompareError(f"{out} holds a comparison with preset {before.get('preset')} and overrides "
                               f"{before.get('overrides')}: continue it with those (mgrpo compare {made_with} "
                               f"--out {out} ...), or give a new --out")
    if report_only:          # train nothing: the tables and plot of the runs finished so far
        done = {(m, s) for m in methods for s in seeds
                if finished(load_config(None, run_overrides(preset, m, s, out, overrides)))}
        if not done:
            raise CompareError(f"--report: no finished run of these methods and seeds in {out}")
        print(f"[compare] --report: {len(done)} of {len(methods) * len(seeds)} runs finished in {out}")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "compare.json").write_text(json.dumps(settings, indent=1))
        except OSError as e:
            raise CompareError(f"--out {out} cannot be created or written ({e.strerror or e}): give a directory "
                               "you can write to") from None
        run_all(preset, seeds, methods, out, overrides)
        done = None
    rows = collect(out, methods, seeds, done)
    summary = summarize(rows)
    write_csv(out / f"{name}.csv", rows)
    write_csv(out / f"{name}_summary.csv", summary)
    report = run_report(rows)
    warned = {}
    for r in report:
        if r.get("first_warning_step") is not None:
            warned.setdefault(r["method"], []).append(r["first_warning_step"])
    plot(summary, out / f"{name}.png", f"mgrpo compare --preset {preset} (seeds {seed_label(seeds)})"
         + "".join(f" {o}" for o in overrides) + ("; dotted: a run's first collapse warning" if warned else ""),
         warnings=warned)
    write_csv(out / f"{name}_runs.csv", report)
    (out / f"{name}.md").write_text(markdown_tables(summary, report))
    print(final_table(summary))
    print(report_table(report))
    print(f"[compare] written to {out}: {name}.csv, {name}_summary.csv, {name}_runs.csv, {name}.md, {name}.png")
    return 0
