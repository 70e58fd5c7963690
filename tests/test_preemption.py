"""Preemption (mgrpo/loop/preemption.py): SIGTERM or SIGUSR1 during a step ends the run with a checkpoint and
exit code 75; resume=true continues, losing nothing beyond the step in flight and logging each step once. Ctrl-C
(SIGINT) does the same with exit code 130 and no requeue marker; a second Ctrl-C stops at once.

The signals are real (os.kill of this process, or of a torchrun worker in test_distributed.py), sent at a known
point of a step: during the rollout (the step is abandoned) or during the update (the step is finished)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mgrpo.loop.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, REPEAT_WINDOW_S, Preempted
from mgrpo.loop.trainer import train
from tests.scripted_engine import ScriptedEngine
from tests.signals import signal_during_update
from tests.test_train_e2e import tiny_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STEPS = 3


def engine_for(cache):
    from transformers import AutoModelForCausalLM

    from mgrpo.data.tiny import base_model_dir, build_tokenizer
    cfg = tiny_config(Path("unused"), cache)
    path = base_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None)
    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(path).named_parameters()]
    return ScriptedEngine(build_tokenizer(), names, record_pushes=False)


class SignalSequenceDuringRollout(ScriptedEngine):
    """Sends each of `signals` to this process, `apart` seconds apart, from inside the rollout of step `at_step`."""

    def __init__(self, base: ScriptedEngine, signals: list, at_step: int, apart: float):
        super().__init__(base.tokenizer, base.expected, record_pushes=False)
        self.signals, self.at_step, self.apart, self.training_calls = signals, at_step, apart, 0

    def generate(self, prompts, params):
        self.training_calls += 1
        if self.training_calls == 2 * self.at_step - 1:
            for i, sig in enumerate(self.signals):
                if i:
                    time.sleep(self.apart)
                os.kill(os.getpid(), sig)
        return super().generate(prompts, params)


def SignalDuringRollout(base: ScriptedEngine, sig, at_step: int, times: int = 1, apart: float = 0.0):
    """`sig` sent `times` times, `apart` seconds apart, from inside the rollout of step `at_step` (1-based)."""
    return SignalSequenceDuringRollout(base, [sig] * times, at_step, apart)


def config(tmp_path, cache, run, *overrides):
    return tiny_config(tmp_path, cache, f"steps={STEPS}", "data.num_eval=0", *overrides, run=run)


def final_weights(summary) -> dict:
    return {n: p.detach().clone() for n, p in summary["models"].policy.hf_named_parameters()}


def logged_steps(run_dir: Path) -> list:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    return final_weights(train(config(tmp, tiny_cache, "run"), log=lambda *a: None, engine=engine_for(tiny_cache)))


# SIGTERM: test_mgrpo_train_exits_75_on_sigterm_and_resumes; SIGINT twice at once: one Ctrl-C that torchrun passed on
@pytest.mark.parametrize("sig, times", [(signal.SIGUSR1, 1), (signal.SIGINT, 2)],
                         ids=["SIGUSR1", "SIGINT-delivered-twice"])
def test_a_signal_during_the_rollout_abandons_the_step_and_resume_redoes_it(tmp_path, tiny_cache, straight, sig,
                                                                            times):
    engine = SignalDuringRollout(engine_for(tiny_cache), sig, at_step=2, times=times)
    before = signal.getsignal(sig)
    with pytest.raises(Preempted) as stopped:
        train(config(tmp_path, tiny_cache, "run"), log=lambda *a: None, engine=engine)
    run_dir = tmp_path / "run"
    name = "Ctrl-C (SIGINT)" if sig == signal.SIGINT else sig.name
    assert stopped.value.step == 1 and stopped.value.signal_name == name          # step 2 abandoned, step 1 kept
    assert signal.getsignal(sig) is before                                          # the handler is put back
    if sig == signal.SIGINT:               # a person stopped it: exit 130, nothing for a batch script to requeue
        assert stopped.value.exit_code == INTERRUPTED_EXIT_CODE and not (run_dir / "preempted.json").exists()
    else:
        assert stopped.value.exit_code == PREEMPTED_EXIT_CODE
        marker = json.loads((run_dir / "preempted.json").read_text())
        assert marker["step"] == 1 and marker["signal"] == sig.name
    assert (run_dir / "checkpoints" / "step_000001" / "checkpoint.json").is_file()
    assert logged_steps(run_dir) == [1]
    resumed = train(config(tmp_path, tiny_cache, "run", "resume=true"), log=lambda *a: None,
                    engine=engine_for(tiny_cache))
    assert logged_steps(run_dir) == [1, 2, 3]
    assert not (run_dir / "preempted.json").exists()
    for name, w in final_weights(resumed).items():       # the abandoned step was redone exactly (data, RNG)
        assert torch.equal(w, straight[name]), name


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM-from-torchrun"])
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, tiny_cache, second):
    """Two Ctrl-C presses (further apart than one press delivered twice) during step 2's rollout: the second raises
    KeyboardInterrupt there; no checkpoint is written, step 1 stays logged, and the handler is put back. Under
    torchrun a rank gets the second press as SIGTERM (torchrun's shutdown after its own second SIGINT): after a
    Ctrl-C that is the second press, not a preemption (no marker, no exit 75)."""
    engine = SignalSequenceDuringRollout(engine_for(tiny_cache), [signal.SIGINT, second], at_step=2,
                                         apart=REPEAT_WINDOW_S + 0.3)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, tiny_cache, "run"), log=lambda *a: None, engine=engine)
    run_dir = tmp_path / "run"
    assert signal.getsignal(signal.SIGINT) is before
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "preempted.json").exists()
    assert logged_steps(run_dir) == [1]


def test_a_resumed_run_stopped_in_its_first_step_keeps_its_checkpoint_as_it_was(tmp_path, tiny_cache):
    """Resumed from step 1 and stopped by Ctrl-C in the rollout of step 2: the state is step 1's, the checkpoint it
    resumed from; it is named, not written again over itself (a second Ctrl-C during that write would have had
    nothing to fall back on)."""
    train(config(tmp_path, tiny_cache, "run", "steps=1"), log=lambda *a: None, engine=engine_for(tiny_cache))
    saved = tmp_path / "run" / "checkpoints" / "step_000001"
    stamp = (saved.stat().st_ino, (saved / "checkpoint.json").stat().st_mtime_ns)
    engine = SignalDuringRollout(engine_for(tiny_cache), signal.SIGINT, at_step=1)    # the resumed run's 1st step
    with pytest.raises(Preempted) as stopped:
        train(config(tmp_path, tiny_cache, "run", "resume=true"), log=lambda *a: None, engine=engine)
    assert stopped.value.step == 1 and stopped.value.checkpoint == saved
    assert (saved.stat().st_ino, (saved / "checkpoint.json").stat().st_mtime_ns) == stamp


def test_a_ctrl_c_while_a_step_is_saved_again_puts_the_earlier_copy_back(tmp_path, tiny_cache, monkeypatch):
    """A run resumed from its step 1 re-reaches step 2, which it had saved: the new copy replaces the old one by a
    swap; a KeyboardInterrupt in the middle of the swap puts the old copy back (never no step_2)."""
    from pathlib import Path as RealPath

    from mgrpo.storage.checkpoint import verify_checkpoint
    run_dir = tmp_path / "run"
    train(config(tmp_path, tiny_cache, "run", "steps=2", "save_every=1"), log=lambda *a: None,
          engine=engine_for(tiny_cache))
    old = (run_dir / "checkpoints" / "step_000002" / "checkpoint.json").read_text()
    real_rename = RealPath.rename

    def rename(self, target):
        if self.name == ".tmp_step_000002":
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(RealPath, "rename", rename)
    # Rewinding a run onto its own older checkpoint is refused from the command line (test_run_dir.py); what
    # re-saves a step by itself is resume=true going back past a damaged newest checkpoint. This swap is the same
    # one, reached here with a step 2 that verifies, so that the copy put back can be checked.
    import mgrpo.storage.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "refuse_rewinding", lambda run_dir, chosen: None)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, tiny_cache, "run", "steps=2", "save_every=1",
                     f"resume_from={run_dir / 'checkpoints' / 'step_000001'}"), log=lambda *a: None,
              engine=engine_for(tiny_cache))
    monkeypatch.undo()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert (run_dir / "checkpoints" / "step_000002" / "checkpoint.json").read_text() == old
    assert verify_checkpoint(run_dir / "checkpoints" / "step_000002") is None


def test_a_signal_during_the_update_finishes_the_step(tmp_path, tiny_cache, straight, monkeypatch):
    signal_during_update(monkeypatch, signal.SIGUSR1)
    with pytest.raises(Preempted) as stopped:
        train(config(tmp_path, tiny_cache, "run"), log=lambda *a: None, engine=engine_for(tiny_cache))
    assert stopped.value.step == 2                      # the step in flight was finished and checkpointed
    assert logged_steps(tmp_path / "run") == [1, 2]
    monkeypatch.undo()
    resumed = train(config(tmp_path, tiny_cache, "run", "resume=true"), log=lambda *a: None,
                    engine=engine_for(tiny_cache))
    assert logged_steps(tmp_path / "run") == [1, 2, 3]
    for name, w in final_weights(resumed).items():
        assert torch.equal(w, straight[name]), name


def start_train_command(run_dir: Path, cache) -> tuple:
    """`mgrpo train` (40 small steps on the HF engine) as a child process, returned with its arguments once it has
    printed its first step line: it is training."""
    args = [sys.executable, "-m", "mgrpo", "train", f"warm_start.cache_dir={cache}", f"run_dir={run_dir}",
            "steps=40", "rollout.engine=hf", "progress=false", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
            "rollout.max_new_tokens=32", "data.num_eval=0"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step "):
            break
    return proc, args


def test_mgrpo_train_exits_75_on_sigterm_and_resumes(tmp_path, tiny_cache):
    """The command itself: SIGTERM from outside while it trains; exit status 75, then resume=true finishes."""
    run_dir = tmp_path / "cli"
    proc, args = start_train_command(run_dir, tiny_cache)
    metrics = run_dir / "metrics.jsonl"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["signal"] == "SIGTERM" and 1 <= marker["step"] < 40
    assert "resume=true" in err
    assert logged_steps(run_dir) == list(range(1, marker["step"] + 1))
    done = subprocess.run([*args, "steps=" + str(marker["step"] + 1), "resume=true"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_steps(run_dir) == list(range(1, marker["step"] + 2))
    assert metrics.is_file()


def test_mgrpo_train_exits_130_on_ctrl_c_with_a_checkpoint(tmp_path, tiny_cache):
    """Ctrl-C (SIGINT) while the command trains: it says it stops, finishes or abandons the step, writes a
    checkpoint, and exits 130 without a traceback and without the requeue marker."""
    run_dir = tmp_path / "cli"
    proc, _ = start_train_command(run_dir, tiny_cache)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err[-3000:]
    assert "[stopping] Ctrl-C" in err and "resume=true" in err and "Traceback" not in err, err[-3000:]
    assert not (run_dir / "preempted.json").exists()
    steps = logged_steps(run_dir)
    assert steps and (run_dir / "checkpoints" / f"step_{steps[-1]:06d}" / "checkpoint.json").is_file()


@pytest.mark.parametrize("raised_by", ["the command", "the second press's handler"])
def test_an_interrupt_is_one_line_naming_where_it_stopped(monkeypatch, capsys, raised_by):
    """Ctrl-C where no checkpoint can be made (loading, evaluating), or a second press: exit 130 and one line
    saying where it stopped (the command's own line, not the signal handler's), no traceback."""
    import mgrpo.commands as commands
    from mgrpo.loop.preemption import PreemptionWatch

    class Interrupted:                      # `mgrpo plot`'s arguments, interrupted while it runs
        HELP, add_arguments = commands.plot.HELP, staticmethod(commands.plot.add_arguments)

        @staticmethod
        def run(args):
            if raised_by == "the command":
                raise KeyboardInterrupt
            watch = PreemptionWatch(dist=None)
            watch.interrupted_at = time.monotonic() - 2 * REPEAT_WINDOW_S      # a first press, 2 windows ago
            watch._catch(signal.SIGINT, None)

    monkeypatch.setitem(commands.COMMANDS, "plot", Interrupted)
    codes = []
    monkeypatch.setattr(commands, "exit_process", codes.append)
    commands.run_and_exit(["plot", "somewhere"])
    err = capsys.readouterr().err
    assert codes == [INTERRUPTED_EXIT_CODE]
    assert "mgrpo: interrupted (Ctrl-C) in " in err and "test_preemption.py" in err and "(run)" in err, err
    assert "Traceback" not in err and "_catch" not in err, err


def children(pid: int) -> list:
    """Processes whose parent is `pid` (torchrun's workers), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def test_torchrun_ranks_stop_together_and_resume(tmp_path, tiny_cache):
    """2 torchrun ranks; SIGUSR1 to one of them (the other learns it at the next check), then, in the resumed run,
    to both: each time every rank writes its shards of one checkpoint, rank 0 the marker, all exit 75 (torchrun
    reports a failed worker: exit 1); resume=true on 2 ranks continues and every step is logged once. Nothing hangs
    (timeouts). One run directory for both signals: three launches, not four."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mgrpo", "train",
            f"warm_start.cache_dir={tiny_cache}", f"run_dir={run_dir}", "rollout.engine=hf", "progress=false",
            "algorithm.prompts_per_step=4", "algorithm.group_size=4", "rollout.max_new_tokens=32", "data.num_eval=0",
            "steps=40"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    stopped_at = 0
    for ranks_signalled in ("one", "all"):
        resume = ["resume=true"] if stopped_at else []
        proc = subprocess.Popen([*args, *resume], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"step {stopped_at + 1}/"):
                break
        workers = children(proc.pid)
        assert len(workers) == 2, "".join(seen)[-3000:]
        for pid in workers[-1:] if ranks_signalled == "one" else workers:
            os.kill(pid, signal.SIGUSR1)
        out = "".join(seen) + proc.communicate(timeout=300)[0]
        assert proc.returncode != 0 and "exitcode" in out and ": 75" in out, (ranks_signalled, out[-3000:])
        marker = json.loads((run_dir / "preempted.json").read_text())
        assert marker["signal"] in ("SIGUSR1", "a signal on another rank"), ranks_signalled
        assert stopped_at < marker["step"] < 40, (ranks_signalled, stopped_at, marker)
        assert (run_dir / "checkpoints" / f"step_{marker['step']:06d}" / "checkpoint.json").is_file()
        assert logged_steps(run_dir) == list(range(1, marker["step"] + 1)), ranks_signalled
        stopped_at = marker["step"]
    done = subprocess.run([*args[:-1], f"steps={stopped_at + 1}", "resume=true"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_steps(run_dir) == list(range(1, stopped_at + 2))


def test_ctrl_c_under_torchrun_checkpoints_on_every_rank(tmp_path, tiny_cache):
    """A terminal's Ctrl-C under torchrun: SIGINT to the terminal's process group, which holds torchrun only (its
    ranks run in sessions of their own); torchrun passes SIGINT on to both ranks, which finish or abandon the step
    and write one checkpoint; no requeue marker; every finished step logged once. torchrun itself reports the signal
    (exit 1), not the ranks' 130."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mgrpo", "train",
            f"warm_start.cache_dir={tiny_cache}", f"run_dir={run_dir}", "rollout.engine=hf", "progress=false",
            "algorithm.prompts_per_step=4", "algorithm.group_size=4", "rollout.max_new_tokens=32", "data.num_eval=0",
            "steps=40"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 1/"):
            break
    os.killpg(proc.pid, signal.SIGINT)                   # what the terminal does: its foreground process group
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 1 and "SignalException" in out, out[-3000:]
    assert "[stopped] Ctrl-C (SIGINT): checkpoint" in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert not (run_dir / "preempted.json").exists()
    steps = logged_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 40
    assert (run_dir / "checkpoints" / f"step_{steps[-1]:06d}" / "checkpoint.json").is_file()


@pytest.mark.parametrize("where", ["_HashingStream.write", "space_warning"])
def test_a_second_ctrl_c_during_the_checkpoint_leaves_no_partial_one(tmp_path, tiny_cache, monkeypatch, where):
    """The first Ctrl-C during step 2's rollout starts the checkpoint of step 1; the second comes while its files
    are written (inside DCP, which wraps it as a failed write) or before them (its directory made): the run stops
    at once (KeyboardInterrupt), and neither a checkpoint nor its temporary directory is left."""
    import mgrpo.storage.checkpoint as ckpt
    owner, name = (ckpt._HashingStream, "write") if where == "_HashingStream.write" else (ckpt, "space_warning")
    real, calls = getattr(owner, name), []

    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(REPEAT_WINDOW_S + 0.3)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, slow)
    engine = SignalDuringRollout(engine_for(tiny_cache), signal.SIGINT, at_step=2)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, tiny_cache, "run"), log=lambda *a: None, engine=engine)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert calls and not (checkpoints.exists() and list(checkpoints.iterdir())), list(checkpoints.iterdir())


def test_a_resume_finishes_what_a_killed_save_left(tmp_path, tiny_cache):
    """A save killed between its two renames (kill -9 mid-swap) leaves step_2 as .old_step_000002 and the new copy
    as .tmp_step_000002: a resume puts step_2 back, removes the partial copy, and continues from step 2; an .old
    copy beside its step is removed."""
    run_dir = tmp_path / "run"
    train(config(tmp_path, tiny_cache, "run", "steps=2", "save_every=1"), log=lambda *a: None,
          engine=engine_for(tiny_cache))
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step_000002").rename(checkpoints / ".old_step_000002")
    (checkpoints / ".tmp_step_000002").mkdir()
    (checkpoints / ".tmp_step_000002" / "__0_0.distcp").write_bytes(b"partial")
    shutil.copytree(checkpoints / "step_000001", checkpoints / ".old_step_000001")       # beside its step
    said = []
    summary = train(config(tmp_path, tiny_cache, "run", "steps=3", "save_every=1", "resume=true"), log=said.append,
                    engine=engine_for(tiny_cache))
    assert any("step_000002 was being replaced" in line for line in said), said
    assert any(line.startswith("[resume] from ") and "step_000002" in line for line in said), said
    assert summary["steps_done"] == 3 and logged_steps(run_dir) == [1, 2, 3]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002", "step_000003"]
