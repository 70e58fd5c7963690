"""One lent GPU session's checks, most valuable first, all inside 540 s; everything packed into $OUT after each stage.

    bash bench/run_gpu.sh [--budget SECONDS] [--only STAGE ...] [--list]   (the device tool: "bash bench/run_gpu.sh")

The device tool runs the script once with a 600 s limit, and brings back from $OUT at most 8 files at most 2 folders
deep; the rest of the machine is lost. So:

- every stage is a subprocess with its own limit, and must end by its mark: the session's start (run_gpu.sh's,
  wheel install included) + SETUP_S + the limits, stops and packings of the stages up to it. The marks end inside
  BUDGET_S (540 s: 60 s for the tool's transfers), and a stage that ends early leaves its time to the next ones,
  so every stage has at least its own limit. A stage cut at its mark gets SIGINT (Python prints its traceback and
  pytest its summary), SIGABRT STOP_S[0] s later (faulthandler prints every thread's stack even inside C code: a
  hung NCCL or CUDA call), SIGKILL STOP_S[1] s after that; its log keeps all of it.
- each stage writes its log as it goes (PYTHONUNBUFFERED) and its CSV rows as it measures them (bench/common.py
  append_rows, into a fresh folder named by MGRPO_BENCH_RESULTS: never the committed bench/results/ CSVs).
- before and after every stage $OUT gets two files, each written to a temporary name and renamed: summary.md (one
  page: date, GPU, versions; one line per stage: ok / exit code / cut at N s / skipped and why; the last lines of
  a failed stage's log) and results.tar.gz (the CSVs, plots, every stage's whole log, the summary), plus
  session.log, this script's own output (run_gpu.sh). Whatever stops the session, $OUT holds the last packing.

The stages, in this order because a session cut short should have spent its time on what matters most:

    1. kernels            the kernel tests marked gpu, on the GPU itself (no interpreter): Qwen3-4B's head in bf16
                          with peaked logits against float64, the head's memory bound, the int8 momentum bar at
                          millions of parameters, Liger's RMSNorm/RoPE/SwiGLU against the unpatched model. Wrong
                          kernels make every number below meaningless. (tests/test_kernels_compile.py is a CPU check.)
    2. train_step         `mgrpo plan --measure`: setup and two M-GRPO steps of the one-GPU Qwen3-4B config with random
                          weights and synthetic rollouts (short: 2 prompts x G 16 x 1024 tokens, full micro-batches of
                          16384 tokens); every phase's torch.cuda peak against the memory plan. Whether the one-GPU
                          config really fits is the question the project cannot answer on a CPU.
    3. head_bench         the fused log-prob/entropy head against Liger's fused linear cross entropy, eager PyTorch
                          and the GEMM floor: forward+backward time and peak memory at 4096 and 16384 tokens,
                          H 2560, V 151936 (the README's head claims).
    4. momentum_bench     the int8 momentum kernel's tracking error, its bandwidth against a copy floor and torch's
                          AdamW, bitsandbytes' 8-bit AdamW with and without the int8 delta hook (Qwen3-4B's 4.02e8
                          parameters in one tensor, ~32 GiB).
    5. grouped_attention  one prompt's group, blockwise vs dense mask vs padded (low value, short).
    6. hf_generate        transformers' generate at Qwen3-4B's shape, random bf16 weights, 8 prompts x 4 x 128 tokens:
                          the rollout speed of a run without vLLM (optional).
    7. sleep              vLLM's sleep/wake lifecycle with weight pushes: only where vLLM is installed (the lent
                          machine has none: the summary says so).

A stage whose requirement is missing skips itself and says why: "no CUDA GPU" (so a CPU run of the script is a
dry run: tests/test_run_gpu.py), "<package> is not installed", or "budget spent".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

BUDGET_S = 540          # from run_gpu.sh's start; the device tool stops everything at 600 and then copies $OUT back
SETUP_S = 20            # before the first stage: run_gpu.sh's wheel install and the version probe
STOP_S = (4, 2)         # a cut stage: SIGINT, this many seconds later SIGABRT, this many later SIGKILL
PACK_S = 2              # packing $OUT after a stage (a few MB of CSVs and logs)
MIN_STAGE_S = 10        # less time left than this (or half its limit): skipped (budget spent), not started to be cut
TAIL_LINES = 15         # lines of a failed stage's log in the summary
MAX_FILES = 8           # what the device tool brings back from $OUT

# The one-GPU Qwen3-4B config, measured with no data file and no download: the built-in prompts, no held-out set,
# model.path stays Qwen/Qwen3-4B-Base (a built-in shape, mgrpo/plan.py); 2 prompts x G 16 (N 4) x 1024 new tokens
# is ~36k tokens a step, two full micro-batches of optim.micro_batch_tokens=16384, so the update's peak is the real one.
TRAIN_STEP_OVERRIDES = ("data.source=builtin:arithmetic", "data.num_eval=0", "algorithm.prompts_per_step=2",
                        "algorithm.group_size=16", "algorithm.momentum_samples=4", "rollout.max_new_tokens=1024",
                        "steps=2")
PYTEST = (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs")


@dataclass(frozen=True)
class Stage:
    name: str
    limit: int                       # seconds of its own (it may also use what earlier stages left)
    command: tuple                   # "{results}" in an argument is the session's results folder
    needs: tuple = ("cuda",)         # "cuda" or distribution names, checked in this order
    show: int = 0                    # log lines shown in the summary even when it passes (a result table)


STAGES = (
    Stage("kernels", 100, PYTEST + ("-m", "gpu", "--junitxml={results}/kernels.xml",
                                    "tests/test_fused_logprob_entropy.py", "tests/test_momentum_int8.py",
                                    "tests/test_liger.py"), needs=("cuda", "pytest", "hypothesis")),
    Stage("train_step", 140, (PY, "-m", "mgrpo", "plan", "--measure", "--config", "configs/qwen3_4b_1gpu.yaml",
                              "--steps", "2", "--csv", "{results}/plan_measure.csv") + TRAIN_STEP_OVERRIDES,
          show=9),
    Stage("head_bench", 70, (PY, "bench/bench_fused_logprob_entropy.py", "--tokens", "4096", "16384",
                             "--methods", "fused", "liger", "F.linear_cross_entropy", "eager", "floor_matmul")),
    Stage("momentum_bench", 60, (PY, "bench/bench_momentum_int8.py")),
    Stage("grouped_attention", 25, (PY, "bench/bench_grouped_attention.py", "--response", "512", "1024")),
    Stage("hf_generate", 40, (PY, "bench/bench_rollout.py", "--engines", "hf_generate", "--shape", "qwen3-4b",
                              "--prompts", "8", "--group-size", "4", "--max-new-tokens", "128", "--rounds", "2")),
    Stage("sleep", 20, PYTEST + ("-m", "gpu", "tests/test_sleep_lifecycle.py", "tests/test_vllm_engine.py"),
          needs=("cuda", "vllm")),
)


def worst_case_s(stages) -> float:
    """The session's longest possible time: setup, then every stage to its limit, stopped and packed."""
    return SETUP_S + sum(s.limit + sum(STOP_S) + PACK_S for s in stages)


# ---------------------------------------------------------------------------------------------------------
# The machine

PROBE = r"""
import json, platform
from importlib import metadata
info = {"python": platform.python_version()}
for name in ("torch", "triton", "transformers", "accelerate", "liger-kernel", "bitsandbytes", "pytest", "hypothesis",
             "vllm"):
    try:
        info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        info[name] = None
import torch
info["cuda"] = torch.cuda.is_available()
if info["cuda"]:
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
print(json.dumps(info))
"""


def probe(env: dict) -> dict:
    """Versions and the GPU, from a child process (this one never touches CUDA: no context held during the stages)."""
    try:
        done = subprocess.run([PY, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, check=False)
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        info = {"cuda": False, "probe_error": f"{type(e).__name__}: {str(e)[:200]}"}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.strip()
        info["driver"] = smi.splitlines()[0] if smi else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def missing(stage: Stage, info: dict):
    """Why the stage cannot run here, or None."""
    for need in stage.needs:
        if need == "cuda" and not info.get("cuda"):
            return "no CUDA GPU"
        if need != "cuda" and not info.get(need):
            return f"{need} is not installed"
    return None


def stage_env(results: Path) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)           # the kernels must compile for the GPU, not run interpreted
    env.update(PYTHONUNBUFFERED="1",            # the log as it happens: a cut stage keeps its last lines
               PYTHONFAULTHANDLER="1",          # SIGABRT (a stage SIGINT could not stop) prints every thread's stack
               MGRPO_BENCH_RESULTS=str(results),    # bench/common.py: this session's folder, not bench/results/
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",   # no network there: never wait on the hub
               MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# ---------------------------------------------------------------------------------------------------------
# One stage

@dataclass
class Outcome:
    status: str = "not reached"      # ok / exit N / cut at N s / skipped: why / running / not reached
    seconds: float = None
    log: Path = None
    failed: bool = False


def stop(proc: subprocess.Popen, log) -> str:
    """SIGINT, then SIGABRT, then SIGKILL to the stage's process group, each after a grace; the signal that ended it."""
    for sig, grace in ((signal.SIGINT, STOP_S[0]), (signal.SIGABRT, STOP_S[1]), (signal.SIGKILL, None)):
        log.write(f"\n[run_gpu] {sig.name} to the stage's process group\n")
        log.flush()
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:         # it ended by itself in the meantime
            proc.wait()
            return "ended"
        try:
            proc.wait(timeout=grace)
            return sig.name
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    return "SIGKILL"


def run_stage(stage: Stage, command: list, env: dict, log_path: Path, timeout: float) -> Outcome:
    """Run one stage, its output into log_path as it comes, cut at `timeout` seconds."""
    t = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(command)}\n# allowed {timeout:.0f} s (limit {stage.limit} s), started "
                  f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n")
        log.flush()
        # its own session: the signals reach the stage's children too (pytest's, compile workers), and not us.
        # SIGINT back to its default in the stage: a script started in the background (`bash run_gpu.sh &`, nohup)
        # inherits it ignored, and Python then never raises KeyboardInterrupt, so the cut loses its traceback
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            ended_by = stop(proc, log)
            status = f"cut at {timeout:.0f} s ({ended_by})"
        except BaseException:              # this script interrupted: do not leave the stage running
            stop(proc, log)
            raise
        finally:
            try:                           # whatever it left behind (its process group is only its own)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.write(f"\n[run_gpu] {stage.name}: {status} after {time.monotonic() - t:.1f} s\n")
    return Outcome(status, time.monotonic() - t, log_path, failed=status != "ok")


# ---------------------------------------------------------------------------------------------------------
# Packing

def tail(path: Path, lines: int) -> list:
    if path is None or not path.exists():
        return []
    text = path.read_text(errors="replace").splitlines()
    return [line[:200] for line in text[-lines:]]


def output_tail(path: Path, lines: int) -> list:
    """The stage's own last lines: without this script's notes and the blank lines before them."""
    own = [line for line in tail(path, lines + 8) if not line.startswith("[run_gpu]")]
    while own and not own[-1].strip():
        own.pop()
    return own[-lines:]


def last_line(path: Path) -> str:
    for line in reversed(tail(path, 40)):
        if line.strip() and not line.startswith("[run_gpu]"):
            return line.strip()[:100].replace("|", "\\|")
    return ""


def versions_line(info: dict) -> str:
    if "probe_error" in info:
        return f"the version probe failed: {info['probe_error']}"
    have = [f"{k} {info[k]}" for k in ("torch", "triton", "transformers", "accelerate") if info.get(k)]
    extra = [f"{k} {info.get(k) or 'not installed'}" for k in ("liger-kernel", "bitsandbytes", "pytest", "hypothesis",
                                                          "vllm")]
    return f"Python {info.get('python')}, " + ", ".join(have) + "; " + ", ".join(extra)


def summary(stages, outcomes: dict, info: dict, started: str, elapsed: float, budget: float) -> str:
    gpu = info.get("gpu") or "no CUDA GPU"
    lines = [f"# GPU session {started}", "",
             f"- machine: {gpu}" + (f", driver {info['driver']}" if info.get("driver") else ""),
             f"- software: {versions_line(info)}",
             (f"- time: {elapsed:.0f} s of the {budget:.0f} s budget (from run_gpu.sh's start); limits sum to "
              f"{sum(s.limit for s in stages)} s, {worst_case_s(stages):.0f} s with setup, stops and packing"),
             ("- results.tar.gz: gpu-results/ with the CSVs (rows as measured), logs/NN_stage.log (every stage's "
              "whole log) and this summary"), "",
             "| # | stage | limit | result | time | last line |", "|---|---|---|---|---|---|"]
    for i, s in enumerate(stages, 1):
        o = outcomes[s.name]
        took = "" if o.seconds is None else f"{o.seconds:.0f} s"
        lines.append(f"| {i} | {s.name} | {s.limit} s | {o.status} | {took} | {last_line(o.log)} |")
    for s in stages:
        o = outcomes[s.name]
        if o.failed and o.log is not None:          # the traceback, pytest's short summary, the signals sent
            lines += ["", f"## {s.name} ({o.status}): the last {TAIL_LINES} lines of {o.log.name}", "```",
                      *tail(o.log, TAIL_LINES), "```"]
        elif o.status == "ok" and s.show:           # a result printed, not written to a CSV
            lines += ["", f"## {s.name}: its last {s.show} lines", "```", *output_tail(o.log, s.show), "```"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, write) -> None:
    """write(tmp) then rename: the device tool never finds half a file, whenever the session stops."""
    tmp = path.with_name(f".{path.name}.part")
    write(tmp)
    os.replace(tmp, path)


def pack(out: Path, results: Path, text: str, tarball: bool = True) -> None:
    """$OUT/summary.md and $OUT/results.tar.gz (the whole results folder as gpu-results/), each replaced whole."""
    (results / "summary.md").write_text(text)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "summary.md", lambda tmp: tmp.write_text(text))
    if tarball:
        def write_tar(tmp):
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(results, arcname="gpu-results")
        write_atomically(out / "results.tar.gz", write_tar)


# ---------------------------------------------------------------------------------------------------------
# The session

@dataclass
class Session:
    stages: tuple
    out: Path
    budget: float = BUDGET_S
    t0: float = field(default_factory=time.time)      # epoch seconds the session started (run_gpu.sh's start)
    info: dict = None                                 # the probe's answer (given by tests)

    def run(self) -> dict:
        results = Path(tempfile.mkdtemp(prefix="mgrpo-gpu-"))
        (results / "logs").mkdir()
        env = stage_env(results)
        info = self.info if self.info is not None else probe(env)
        started = datetime.datetime.fromtimestamp(self.t0, datetime.timezone.utc).isoformat(timespec="seconds")
        outcomes = {s.name: Outcome() for s in self.stages}

        def packed(tarball=True):
            text = summary(self.stages, outcomes, info, started, time.time() - self.t0, self.budget)
            pack(self.out, results, text, tarball)
            return text

        print(f"[run_gpu] {started}: {info.get('gpu') or 'no CUDA GPU'}; {versions_line(info)}; results in {results}",
              flush=True)
        mark = self.t0 + SETUP_S
        for i, stage in enumerate(self.stages, 1):
            mark += stage.limit + sum(STOP_S) + PACK_S      # every stage ends by its mark: the limits add up
            why = missing(stage, info)
            end_by = min(mark, self.t0 + self.budget) - sum(STOP_S) - PACK_S
            if why is None and end_by - time.time() < min(MIN_STAGE_S, stage.limit / 2):
                why = f"budget spent ({max(end_by - time.time(), 0):.0f} s left)"
            if why is not None:
                outcomes[stage.name] = Outcome(f"skipped: {why}")
                print(f"[run_gpu] {stage.name}: skipped: {why}", flush=True)
                continue
            timeout = end_by - time.time()
            log = results / "logs" / f"{i:02d}_{stage.name}.log"
            outcomes[stage.name] = Outcome(f"running (at most {timeout:.0f} s)", log=log)
            packed(tarball=False)                           # a session stopped now says which stage it was in
            command = [arg.replace("{results}", str(results)) for arg in stage.command]
            print(f"[run_gpu] {stage.name}: at most {timeout:.0f} s: {shlex.join(command[1:])}", flush=True)
            try:
                outcomes[stage.name] = run_stage(stage, command, env, log, timeout)
            except KeyboardInterrupt as e:                  # SIGTERM or ^C to this script: the stage was stopped
                outcomes[stage.name] = Outcome(f"stopped: this script got {e or 'SIGINT'}", log=log, failed=True)
                packed()
                raise
            print(f"[run_gpu] {stage.name}: {outcomes[stage.name].status} in {outcomes[stage.name].seconds:.0f} s",
                  flush=True)
            if outcomes[stage.name].failed:
                print("\n".join(tail(log, TAIL_LINES)), flush=True)
            packed()
        print(packed(), flush=True)
        return outcomes


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")      # the running stage is stopped, $OUT keeps the last packing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything, from the start")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STAGES], help="run only these stages")
    parser.add_argument("--list", action="store_true", help="print the stages and their limits, run nothing")
    args = parser.parse_args()
    stages = tuple(s for s in STAGES if args.only is None or s.name in args.only)
    if args.list:
        for s in stages:
            print(f"{s.name:18s} {s.limit:4d} s  needs {', '.join(s.needs):22s} {shlex.join(s.command[1:])}")
        print(f"limits: {sum(s.limit for s in stages)} s; worst case with setup, stops and packing: "
              f"{worst_case_s(stages):.0f} s of {args.budget:.0f}")
        return 0
    signal.signal(signal.SIGTERM, interrupted)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out is None:
        print("[run_gpu] OUT is not set: the results stay in the folder printed below", flush=True)
    t0 = float(os.environ.get("MGRPO_GPU_T0") or time.time())
    Session(stages, out, args.budget, t0).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
