"""bench/run_gpu.sh, the one call a lent GPU gets: a dry run on this CPU (every GPU stage skips itself and says why),
what comes back ($OUT: at most 8 files, at most 2 folders deep), the stage limits inside the budget, and a stage
that overruns its limit cut by SIGINT with its traceback kept in the packed log (fake stages: plain Python, no GPU)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_DIR = ROOT / "bench"


def load_run_gpu():
    spec = importlib.util.spec_from_file_location("run_gpu", SCRIPT_DIR / "run_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_gpu"] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run_gpu = load_run_gpu()


def files_under(out: Path) -> list:
    return [p.relative_to(out) for p in out.rglob("*") if p.is_file()]


def packed_text(out: Path, name: str) -> str:
    """A file's text from $OUT/results.tar.gz, found by the end of its name."""
    with tarfile.open(out / "results.tar.gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(name))
        return tar.extractfile(member).read().decode()


def session(stages, out, budget=run_gpu.BUDGET_S):
    """A session of fake stages, its setup already spent (so each stage has exactly its own limit), on a machine
    the probe would call CPU-only with pytest installed."""
    return run_gpu.Session(tuple(stages), out, budget, t0=time.time() - run_gpu.SETUP_S,
                           info={"cuda": False, "python": "3", "pytest": "9"})


def test_stages_in_order_of_value_and_their_limits_fit_the_budget():
    names = [s.name for s in run_gpu.STAGES]
    required = ["kernels", "train_step", "head_bench", "momentum_bench", "grouped_attention", "sleep"]
    assert [n for n in names if n in required] == required
    assert run_gpu.worst_case_s(run_gpu.STAGES) <= run_gpu.BUDGET_S <= 540
    kernels = " ".join(run_gpu.STAGES[0].command)
    assert "-m gpu" in kernels and "test_kernels_compile" not in kernels
    train = run_gpu.STAGES[1].command
    assert train[1:5] == ("-m", "mgrpo", "plan", "--measure") and "data.source=builtin:arithmetic" in train


def test_a_stage_says_why_it_cannot_run():
    sleep = next(s for s in run_gpu.STAGES if s.name == "sleep")
    assert run_gpu.missing(sleep, {"cuda": True, "vllm": None}) == "vllm is not installed"
    assert run_gpu.missing(sleep, {"cuda": False, "vllm": "0.11"}) == "no CUDA GPU"
    assert run_gpu.missing(run_gpu.STAGES[0], {"cuda": True, "pytest": "9", "hypothesis": "6"}) is None


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_on_a_cpu_packs_a_summary_of_skipped_stages(tmp_path):
    """OUT=... bash bench/run_gpu.sh, run from a copy of its two files (the script links kernels/ in the tree it runs
    in: not in the shared checkout), on a CPU: exit 0, everything skipped with its reason, inside the budget."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would really run")
    tree, out = tmp_path / "tree", tmp_path / "out"
    (tree / "bench").mkdir(parents=True)
    (tree / "kernels").mkdir()
    for name in ("run_gpu.sh", "run_gpu.py"):
        shutil.copy(SCRIPT_DIR / name, tree / "bench" / name)
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "MGRPO_GPU_T0")}
    env.update(OUT=str(out), TMPDIR=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    t = time.monotonic()
    done = subprocess.run(["bash", str(tree / "bench" / "run_gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=run_gpu.BUDGET_S, check=False)
    took = time.monotonic() - t
    assert done.returncode == 0, done.stdout + done.stderr
    files = files_under(out)
    assert 0 < len(files) <= run_gpu.MAX_FILES and all(len(f.parts) <= 3 for f in files), files
    assert {"summary.md", "results.tar.gz", "session.log"} <= {str(f) for f in files}
    summary = (out / "summary.md").read_text()
    for stage in run_gpu.STAGES:
        assert f"| {stage.name} | {stage.limit} s | skipped: no CUDA GPU |" in summary
    assert took < run_gpu.BUDGET_S and "of the 540 s budget" in summary
    assert packed_text(out, "summary.md") == summary
    assert not (tree / "mgrpo_kernels").exists(), "the link made for the run is removed"


@pytest.fixture
def results_in_tmp(tmp_path, monkeypatch):
    """The session's results folder (tempfile.mkdtemp) inside tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def script(tmp_path, name: str, text: str) -> tuple:
    (tmp_path / name).write_text(text)
    return (sys.executable, str(tmp_path / name))


def test_an_overrunning_stage_is_cut_with_sigint_and_its_traceback_is_packed(tmp_path, results_in_tmp):
    """A stage sleeping past its 2 s limit gets SIGINT: Python's KeyboardInterrupt traceback stays in its log; the
    next stage still runs, its CSV row packed; a stage needing a GPU skips itself; $OUT holds two files."""
    S = run_gpu.Stage
    overrun = script(tmp_path, "overrun.py", "import time\n\n\ndef wait():\n    time.sleep(100)\n\n\nwait()\n")
    stages = [S("overrun", 2, overrun, needs=()),
              S("measures", 20, script(tmp_path, "row.py", "import os, pathlib\n"
                                       "p = pathlib.Path(os.environ['MGRPO_BENCH_RESULTS']) / 'fake.csv'\n"
                                       "p.write_text('a,b\\n1,2\\n')\nprint('measured one row')\n"), needs=()),
              S("on_gpu", 20, (sys.executable, "-c", "pass"))]
    out = tmp_path / "out"
    t = time.monotonic()
    outcomes = session(stages, out).run()
    assert time.monotonic() - t < 2 + run_gpu.STOP_S[0] + 5
    assert outcomes["overrun"].status == "cut at 2 s (SIGINT)"
    assert outcomes["measures"].status == "ok"
    assert outcomes["on_gpu"].status == "skipped: no CUDA GPU"
    assert sorted(str(f) for f in files_under(out)) == ["results.tar.gz", "summary.md"]
    log = packed_text(out, "01_overrun.log")
    assert "[run_gpu] SIGINT" in log and "Traceback (most recent call last)" in log and "KeyboardInterrupt" in log
    assert "time.sleep(100)" in log
    assert packed_text(out, "fake.csv") == "a,b\n1,2\n"
    summary = (out / "summary.md").read_text()
    assert "| overrun | 2 s | cut at 2 s (SIGINT) |" in summary and "| measures | 20 s | ok | " in summary
    assert "KeyboardInterrupt" in summary.split("## overrun (cut at 2 s (SIGINT))")[1]


def test_a_stage_deaf_to_sigint_is_stopped_with_its_stack_printed(tmp_path, results_in_tmp):
    """SIGINT ignored (or a call stuck in C code): SIGABRT STOP_S[0] s later, and faulthandler prints the stack."""
    deaf = script(tmp_path, "deaf.py", "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                                       "print('deaf', flush=True)\ntime.sleep(100)\n")
    out = tmp_path / "out"
    outcomes = session([run_gpu.Stage("deaf", 2, deaf, needs=())], out).run()
    assert outcomes["deaf"].status == "cut at 2 s (SIGABRT)"
    assert outcomes["deaf"].seconds < 2 + sum(run_gpu.STOP_S) + 2
    log = packed_text(out, "01_deaf.log")
    assert "Fatal Python error: Aborted" in log and "deaf.py\", line 4" in log


def test_a_stage_without_time_left_is_skipped(tmp_path, results_in_tmp):
    stage = run_gpu.Stage("late", 20, (sys.executable, "-c", "pass"), needs=())
    outcomes = session([stage], tmp_path / "out", budget=run_gpu.SETUP_S + 5).run()
    assert outcomes["late"].status.startswith("skipped: budget spent")
