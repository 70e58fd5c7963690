"""examples/slurm/mgrpo.sbatch under a fake Slurm on localhost: no Slurm, no torch, a few seconds.

The script runs with `bash` and fake `srun`, `scontrol` and `torchrun` (Python scripts written to a tmp dir,
given through the SRUN/SCONTROL/TORCHRUN variables or, in one test, found on PATH under their real names):
- scontrol: `show hostnames LIST` prints FAKE_HOSTS one a line; `requeue JOBID` appends a line to a log.
- srun: records its options and command, runs the command once per node in parallel with SLURM_NODEID and
  SLURM_PROCID set, exits with the highest status.
- torchrun: records its arguments, SLURM_NODEID and whether SIGUSR1 is ignored, sends itself SIGUSR1 (it dies
  if the script did not ignore it), then plays FAKE_SCENARIO: finish, preempt or crash.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "slurm" / "mgrpo.sbatch"
JOB_ID = "4242"
HOSTS = ["gpu-b07", "gpu-a01"]          # not sorted: the first host is the one scontrol prints first
SCRIPT_SETTINGS = ("RUN_DIR", "CONFIG", "GPUS_PER_NODE", "MGRPO_PORT", "SRUN", "SCONTROL", "TORCHRUN")

FAKE_SCONTROL = r'''
import os, sys
from pathlib import Path
log = Path(os.environ["FAKE_LOG_DIR"])
with open(log / "scontrol.log", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
if sys.argv[1:3] == ["show", "hostnames"] and len(sys.argv) == 4:
    print("\n".join(os.environ["FAKE_HOSTS"].split()))
elif sys.argv[1] == "requeue" and len(sys.argv) == 3:
    with open(log / "requeue.log", "a") as f:
        f.write("requeue " + sys.argv[2] + "\n")
else:
    sys.exit("fake scontrol: unexpected arguments %r" % sys.argv[1:])
'''

FAKE_SRUN = r'''
import json, os, subprocess, sys
from pathlib import Path
log = Path(os.environ["FAKE_LOG_DIR"])
args = sys.argv[1:]
i = 0
while i < len(args) and args[i].startswith("-"):
    i += 1
opts, cmd = args[:i], args[i:]
with open(log / "srun.jsonl", "a") as f:
    f.write(json.dumps({"opts": opts, "cmd": cmd}) + "\n")
nodes = [o.split("=", 1)[1] for o in opts if o.startswith("--nodes=")]
nnodes = int(nodes[-1]) if nodes else int(os.environ["SLURM_JOB_NUM_NODES"])
hosts = os.environ["FAKE_HOSTS"].split()
procs = [subprocess.Popen(cmd, env=dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURM_LOCALID="0",
                                        SLURMD_NODENAME=hosts[n]))
         for n in range(nnodes)]
sys.exit(max(p.wait() for p in procs))
'''

FAKE_TORCHRUN = r'''
import json, os, signal, sys
from pathlib import Path
log = Path(os.environ["FAKE_LOG_DIR"])
argv = sys.argv[1:]
with open("/proc/self/status") as f:
    sigign = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
rank = argv[argv.index("--node_rank") + 1] if "--node_rank" in argv else "missing-%d" % os.getpid()
(log / ("torchrun.%s.json" % rank)).write_text(json.dumps({
    "argv": argv,
    "slurm_nodeid": os.environ.get("SLURM_NODEID"),
    "usr1_ignored_proc": bool(sigign >> (signal.SIGUSR1 - 1) & 1),   # SigIgn bit n-1 is signal n
    "usr1_ignored_py": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
}))
os.kill(os.getpid(), signal.SIGUSR1)          # what Slurm's --signal=USR1@300 does: must not kill torchrun
run_dir = Path([a for a in argv if a.startswith("run_dir=")][-1].split("=", 1)[1]).resolve()
if Path(os.environ["FAKE_ROOT"]).resolve() not in run_dir.parents:
    sys.exit("fake torchrun: run_dir=%s is outside the test's tmp dir: not writing there" % run_dir)
scenario = os.environ["FAKE_SCENARIO"]
if scenario in ("finish", "finish_then_fail"):
    if rank == "0":
        (run_dir / "final").mkdir(parents=True, exist_ok=True)
        (run_dir / "final" / "config.json").write_text("{}\n")
    sys.exit(1 if scenario == "finish_then_fail" and rank == "1" else 0)
if scenario == "preempt":
    (run_dir / "checkpoints" / "step_000003").mkdir(parents=True, exist_ok=True)
    if rank == "0":
        (run_dir / "preempted.json").write_text(json.dumps({"step": 3, "signal": "SIGUSR1"}) + "\n")
    sys.exit(int(os.environ.get("FAKE_PREEMPT_EXIT", "75")))
if scenario == "crash":
    sys.exit(3 if rank == "1" else 0)
sys.exit("fake torchrun: unknown FAKE_SCENARIO %r" % scenario)
'''


class FakeSlurm:
    def __init__(self, tmp_path: Path, on_path: bool = False):
        self.root = tmp_path
        self.bin = tmp_path / "bin"
        self.log = tmp_path / "log"
        self.run_dir = tmp_path / "shared" / "run"
        self.bin.mkdir()
        self.log.mkdir()
        self.on_path = on_path
        for name, source in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("torchrun", FAKE_TORCHRUN)):
            path = self.bin / (name if on_path else f"fake-{name}")
            path.write_text(f"#!{sys.executable}\n{source}")
            path.chmod(0o755)
            if not on_path:     # the real command (torchrun is in the venv) must not be reached by its name
                poison = self.bin / name
                poison.write_text(f"#!/bin/sh\necho 'the real {name} was called, not $SRUN/$SCONTROL/$TORCHRUN' >&2\n"
                                  "exit 97\n")
                poison.chmod(0o755)

    def env(self, scenario: str, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "SRUN_")) and k not in SCRIPT_SETTINGS}
        env.update(SLURM_JOB_ID=JOB_ID, SLURM_JOB_NODELIST="gpu-b07,gpu-a01", SLURM_JOB_NUM_NODES=str(len(HOSTS)),
                   SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16", RUN_DIR=str(self.run_dir),
                   FAKE_HOSTS=" ".join(HOSTS), FAKE_LOG_DIR=str(self.log), FAKE_ROOT=str(self.root),
                   FAKE_SCENARIO=scenario)
        env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}"
        if not self.on_path:
            env.update(SRUN=str(self.bin / "fake-srun"), SCONTROL=str(self.bin / "fake-scontrol"),
                       TORCHRUN=str(self.bin / "fake-torchrun"))
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(self, scenario: str, *args: str, **extra) -> subprocess.CompletedProcess:
        for stale in self.log.iterdir():        # each run's records only (the run dir persists across runs)
            stale.unlink()
        # its own session, so a hang is cleaned up whole: bash, the fake srun and the torchruns it started
        proc = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=REPO, env=self.env(scenario, **extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail("the script did not finish in 30 s")
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def torchruns(self) -> dict:
        """node rank (as torchrun got it) -> record."""
        return {p.name.split(".")[1]: json.loads(p.read_text()) for p in sorted(self.log.glob("torchrun.*.json"))}

    def sruns(self) -> list:
        path = self.log / "srun.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def requeues(self) -> list:
        path = self.log / "requeue.log"
        return path.read_text().splitlines() if path.exists() else []


def option(argv: list, name: str) -> str:
    assert argv.count(name) == 1, f"{name} given {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def launcher_args(argv: list) -> list:
    return argv[:argv.index("-m")]


def train_args(argv: list) -> list:
    return argv[argv.index("-m") + 1:]


@pytest.fixture
def slurm(tmp_path):
    return FakeSlurm(tmp_path)


def test_each_node_gets_its_rank_the_rendezvous_and_the_run(slurm):
    overrides = ["steps=7", "model.path=/shared/models/with space/Qwen3-4B-Base", "rollout.temperature=1.0"]
    result = slurm.run("finish", *overrides, MGRPO_PORT="29555", CONFIG="configs/qwen3_4b_1gpu.yaml")
    assert result.returncode == 0, result.stderr

    [srun] = slurm.sruns()
    assert "--nodes=2" in srun["opts"] and "--ntasks-per-node=1" in srun["opts"]
    assert "--cpus-per-task=16" in srun["opts"]          # srun >= 22.05 does not inherit it from sbatch

    runs = slurm.torchruns()
    assert sorted(runs) == ["0", "1"], f"node ranks {sorted(runs)}: each node needs its own"
    for rank, run in runs.items():
        argv = run["argv"]
        assert run["slurm_nodeid"] == rank               # the rank is the task's own SLURM_NODEID
        assert option(argv, "--nnodes") == "2"
        assert option(argv, "--nproc_per_node") == "4"   # from SLURM_GPUS_ON_NODE
        assert option(argv, "--rdzv_backend") == "c10d"
        assert option(argv, "--rdzv_endpoint") == f"{HOSTS[0]}:29555"
        assert option(argv, "--rdzv_id") == JOB_ID
        assert train_args(argv) == ["mgrpo", "train", "--config", "configs/qwen3_4b_1gpu.yaml",
                                    f"run_dir={slurm.run_dir}", *overrides]
        assert run["usr1_ignored_proc"] and run["usr1_ignored_py"], "torchrun would die of SIGUSR1"
    assert slurm.requeues() == []


def test_defaults_and_real_command_names_on_path(tmp_path):
    slurm = FakeSlurm(tmp_path, on_path=True)
    result = slurm.run("finish", SLURM_GPUS_ON_NODE=None, SLURM_JOB_NUM_NODES=None, SLURM_NNODES="2",
                       SLURM_CPUS_PER_TASK=None)
    assert result.returncode == 0, result.stderr
    [srun] = slurm.sruns()
    assert not any(o.startswith("--cpus-per-task") for o in srun["opts"])
    runs = slurm.torchruns()
    assert sorted(runs) == ["0", "1"]
    for run in runs.values():
        argv = run["argv"]
        assert option(argv, "--nnodes") == "2"            # from SLURM_NNODES
        assert option(argv, "--nproc_per_node") == "8"
        assert option(argv, "--rdzv_endpoint") == f"{HOSTS[0]}:29500"
        assert train_args(argv)[:4] == ["mgrpo", "train", "--config", "configs/qwen3_4b.yaml"]


def test_relative_run_dir_is_made_absolute(slurm):
    relative = os.path.relpath(slurm.run_dir, REPO)
    result = slurm.run("finish", RUN_DIR=relative)
    assert result.returncode == 0, result.stderr
    runs = slurm.torchruns()
    assert sorted(runs) == ["0", "1"]
    for run in runs.values():
        [value] = [a.split("=", 1)[1] for a in train_args(run["argv"]) if a.startswith("run_dir=")]
        assert value.startswith("/") and Path(value).resolve() == slurm.run_dir.resolve()


def test_resume_true_only_when_a_checkpoint_exists(slurm):
    (slurm.run_dir / "checkpoints").mkdir(parents=True)
    (slurm.run_dir / "checkpoints" / "latest.txt").write_text("not a checkpoint\n")
    (slurm.run_dir / "checkpoints" / "step_000001.tmp").write_text("a file, not a step_* dir\n")
    assert slurm.run("crash", "steps=9").returncode != 0
    for run in slurm.torchruns().values():
        assert not any(a.startswith("resume=") for a in run["argv"]), run["argv"]

    (slurm.run_dir / "checkpoints" / "step_000003").mkdir()
    assert slurm.run("crash", "steps=9").returncode != 0
    runs = slurm.torchruns()
    assert sorted(runs) == ["0", "1"]
    for run in runs.values():
        assert train_args(run["argv"])[4:] == [f"run_dir={slurm.run_dir}", "resume=true", "steps=9"]


@pytest.mark.parametrize("exit_code", [75, 1], ids=["trainer-code", "torchrun-reports-1"])
def test_preempted_run_is_requeued_and_resumes(slurm, exit_code):
    result = slurm.run("preempt", "steps=9", FAKE_PREEMPT_EXIT=str(exit_code))
    assert result.returncode == 0, result.stderr
    assert slurm.requeues() == [f"requeue {JOB_ID}"]
    for run in slurm.torchruns().values():
        assert "resume=true" not in run["argv"]

    # the requeued attempt: same job id and run dir, now with a checkpoint
    result = slurm.run("finish", "steps=9")
    assert result.returncode == 0, result.stderr
    assert slurm.requeues() == []
    runs = slurm.torchruns()
    assert sorted(runs) == ["0", "1"]
    for run in runs.values():
        assert "resume=true" in run["argv"]
    assert not (slurm.run_dir / "preempted.json").exists()
    assert (slurm.run_dir / "preempted.prev.json").exists()


@pytest.mark.parametrize("scenario", ["finish", "finish_then_fail"])
def test_finished_run_is_not_requeued(slurm, scenario):
    # finish_then_fail: the export is written, then a rank fails in its teardown: the run is still done
    slurm.run_dir.mkdir(parents=True)
    (slurm.run_dir / "preempted.json").write_text('{"step": 2, "signal": "SIGUSR1"}\n')   # an earlier attempt's
    result = slurm.run(scenario)
    assert result.returncode == 0, result.stderr
    assert (slurm.run_dir / "final" / "config.json").is_file()
    assert slurm.requeues() == []


def test_crash_fails_with_the_srun_status_and_is_not_requeued(slurm):
    result = slurm.run("crash")
    assert result.returncode == 3, result.stderr
    assert slurm.requeues() == []
    assert "not requeued" in result.stderr


def test_a_preempted_json_from_an_earlier_attempt_does_not_requeue_a_crash(slurm):
    slurm.run_dir.mkdir(parents=True)
    (slurm.run_dir / "preempted.json").write_text('{"step": 2, "signal": "SIGUSR1"}\n')
    result = slurm.run("crash")
    assert result.returncode == 3, result.stderr
    assert slurm.requeues() == []
    assert (slurm.run_dir / "preempted.prev.json").is_file()


@pytest.mark.parametrize("run_dir", [None, ""], ids=["unset", "empty"])
def test_refuses_to_start_without_run_dir(slurm, run_dir):
    result = slurm.run("finish", RUN_DIR=run_dir)
    assert result.returncode != 0
    assert "RUN_DIR is not set" in result.stderr and "shared" in result.stderr
    assert slurm.sruns() == [] and not (slurm.log / "scontrol.log").exists()


def test_refuses_to_start_outside_slurm(slurm):
    result = slurm.run("finish", SLURM_JOB_ID=None)
    assert result.returncode != 0
    assert "SLURM_JOB_ID is not set: submit this script with sbatch" in result.stderr
    assert slurm.sruns() == [] and not (slurm.log / "scontrol.log").exists()


def test_refuses_a_missing_config(slurm):
    result = slurm.run("finish", CONFIG="configs/no_such.yaml")
    assert result.returncode != 0
    assert "configs/no_such.yaml" in result.stderr
    assert slurm.sruns() == []


def test_sbatch_header():
    lines = SCRIPT.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [(i, line) for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    # sbatch stops reading #SBATCH lines at the first command
    assert all(i < first_command for i, _ in directives)
    options = {line.split()[1].split("=")[0]: line.split()[1] for _, line in directives}
    for name in ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--signal",
                 "--requeue", "--open-mode", "--output"):
        assert name in options, f"no #SBATCH {name}"
    assert options["--ntasks-per-node"] == "--ntasks-per-node=1"
    assert options["--gpus-per-node"] == "--gpus-per-node=8"
    assert options["--signal"] == "--signal=USR1@300"     # no B:, which would signal only the batch shell
    assert options["--open-mode"] == "--open-mode=append"
    for i, line in directives:                             # each one says why, on the line above
        above = lines[i - 1]
        assert above.startswith("# ") and len(above) > 10, f"{line}: no comment above it saying why"


def test_bash_syntax_and_shellcheck(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    # the program each srun task runs is a string in the script: check it on its own too
    program = re.search(r"^NODE_PROGRAM='(.*?)'$", SCRIPT.read_text(), re.S | re.M).group(1)
    node_program = tmp_path / "node_program.sh"
    node_program.write_text("#!/bin/bash\n" + program)
    subprocess.run(["bash", "-n", str(node_program)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    for path in (SCRIPT, node_program):
        result = subprocess.run([shellcheck, "--shell=bash", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout

