"""Run directories that survive people and disks: checkpoints are data (a malicious one runs nothing), one writer
per run directory (a second is refused while the first lives, accepted once it is dead, kill -9 included), a full
disk gives a clean error and a resumable run, and a damaged newest checkpoint falls back to the previous one."""
import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mgrpo.commands import main as cli
from mgrpo.config import load_config
from mgrpo.loop.trainer import train
from mgrpo.storage import checkpoint as ckpt
from mgrpo.storage.checkpoint import (
    META_FILE,
    UnsafeCheckpointError,
    checkpoint_dirs,
    file_sha256,
    load_tensors,
    verify_checkpoint,
)
from mgrpo.storage.run_dir import DiskFullError, RunDirError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def overrides(cache, run_dir, *extra):
    return [f"warm_start.cache_dir={cache}", f"run_dir={run_dir}",
            "progress=false", "log_every=0", "rollout.engine=hf", "algorithm.prompts_per_step=2",
            "algorithm.group_size=4", "rollout.max_new_tokens=32", "data.num_eval=0", *extra]


def tiny(cache, run_dir, *extra):
    return load_config(None, overrides(cache, run_dir, *extra))


@pytest.fixture(scope="module")
def two_checkpoints(tiny_cache, tmp_path_factory):
    """A run of 2 steps with a checkpoint after each: copied by the tests that damage one."""
    run = tmp_path_factory.mktemp("saved") / "run"
    train(tiny(tiny_cache, run, "steps=2", "save_every=1"), log=lambda *a: None)
    return run


def copy_run(source: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(source, run)
    return run


# ---------------------------------------------------------------------------------------------------------
# Checkpoints are data

class Touch:
    """A pickle that runs a command when loaded (what a shared checkpoint could carry)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def rehash(step_dir: Path) -> None:
    """What an attacker does after editing a checkpoint: recompute checkpoint.json's file list."""
    meta = json.loads((step_dir / META_FILE).read_text())
    meta["files"] = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                     for p in step_dir.iterdir() if p.name != META_FILE}
    (step_dir / META_FILE).write_text(json.dumps(meta))


def test_checkpoint_json_holds_the_non_tensor_state_and_nothing_is_pickled(two_checkpoints):
    step = checkpoint_dirs(two_checkpoints)[-1]
    meta = json.loads((step / META_FILE).read_text())
    assert meta["format"] == ckpt.FORMAT and meta["trainer"]["step"] == 2 and meta["trainer"]["data_position"] == 4
    assert meta["objects"]["scheduler"]["last_epoch"] == 2
    assert meta["objects"]["optimizer/param_groups"][0]["lr"] > 0                  # JSON, not a pickle
    assert sorted(meta["files"]) == sorted(p.name for p in step.iterdir() if p.name != META_FILE)
    assert verify_checkpoint(step) is None
    # DCP's index names only its own metadata classes: no BYTE_IO items (pickled objects) in any file
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    with open(step / ".metadata", "rb") as f:
        index = ckpt._MetadataUnpickler(f).load()
    assert not [k for k, v in index.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    assert any(k.startswith("rank.rank0.rng.") for k in index.state_dict_metadata)   # RNG states are tensors


def test_a_malicious_index_runs_nothing(two_checkpoints, tiny_cache, tmp_path, capsys):
    run = copy_run(two_checkpoints, tmp_path)
    marker = tmp_path / "pwned"
    step = checkpoint_dirs(run)[-1]
    (step / ".metadata").write_bytes(pickle.dumps(Touch(marker)))
    rehash(step)
    assert cli(["train", *overrides(tiny_cache, run, "steps=3", "resume=true")]) == 1
    err = capsys.readouterr().err
    assert "refused, nothing in it was run" in err and "names posix.system" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_pickled_object_where_a_tensor_belongs_runs_nothing(two_checkpoints, tiny_cache, tmp_path):
    """The checkpoint rebuilt with DCP itself: every tensor as saved, one replaced by a pickled payload."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    run = copy_run(two_checkpoints, tmp_path)
    marker = tmp_path / "pwned"
    step = checkpoint_dirs(run)[-1]
    dcp_to_torch_save(step, tmp_path / "flat.pt")             # torch's own format utilities
    state = torch.load(tmp_path / "flat.pt", weights_only=True)      # the checkpoint's tensors, nested
    weight = next(iter(state["policy"]))
    state["policy"][weight] = io.BytesIO(pickle.dumps(Touch(marker)))
    name = f"policy.{weight}"
    for p in step.iterdir():
        if p.name != META_FILE:
            p.unlink()
    dcp.save(state, checkpoint_id=str(step))
    rehash(step)
    with pytest.raises(UnsafeCheckpointError, match=f"pickled object at {name} .*nothing in it was run"):
        train(tiny(tiny_cache, run, "steps=3", "resume=true"), log=lambda *a: None)
    assert not marker.exists()


def test_a_checkpoint_of_the_pickled_format_is_refused(two_checkpoints, tmp_path):
    run = copy_run(two_checkpoints, tmp_path)
    step = checkpoint_dirs(run)[-1]
    meta = json.loads((step / META_FILE).read_text())
    del meta["format"]
    (step / META_FILE).write_text(json.dumps(meta))
    assert "older mgrpo" in verify_checkpoint(step)
    with pytest.raises(UnsafeCheckpointError, match="older mgrpo"):
        ckpt.load_checkpoint(step, {}, None)


# ---------------------------------------------------------------------------------------------------------
# One writer

HOLDER = """
import sys, time
from mgrpo.storage.run_dir import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_while_the_first_lives_and_accepted_after_kill_9(tiny_cache, tmp_path, capsys):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        for extra in ([], ["resume=true"]):
            assert cli(["train", *overrides(tiny_cache, run, "steps=1", *extra)]) == 1
            err = capsys.readouterr().err
            assert f"{run} is in use by a running job (host " in err and f"pid {holder.pid}, started " in err, extra
        assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()   # before any work
        # under torchrun: every rank stops, none hangs
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "mgrpo", "train", *overrides(tiny_cache, run, "steps=1")], cwd=ROOT,
                              capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode != 0 and "is in use by a running job" in proc.stdout + proc.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli(["train", *overrides(tiny_cache, run, "steps=1")]) == 0      # the kernel dropped the dead lock
    assert (run / "final" / "config.json").is_file()


def test_a_live_run_holds_its_directory(tiny_cache, tmp_path):
    """A real `mgrpo train` owns its directory while it lives; after kill -9 the run resumes."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mgrpo", "train",
                              *overrides(tiny_cache, run, "steps=500", "save_every=1")], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not checkpoint_dirs(run) and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert checkpoint_dirs(run), "the first run wrote no checkpoint"
        with pytest.raises(RunDirError, match=f"in use by a running job .*pid {first.pid}"):
            train(tiny(tiny_cache, run, "steps=500", "resume=true"), log=lambda *a: None, stop_after_steps=1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    summary = train(tiny(tiny_cache, run, "steps=500", "resume=true"), log=lambda *a: None, stop_after_steps=1)
    assert summary["steps_done"] == step_of_newest(run) and summary["steps_done"] >= 2


def step_of_newest(run):
    return ckpt.step_of(checkpoint_dirs(run)[-1])


@pytest.mark.parametrize("where, said", [
    ("afile", "run_dir={tmp}/afile is a file, not a directory: choose another run_dir"),
    ("afile/sub", "run_dir={tmp}/afile/sub is under {tmp}/afile, a file, not a directory: choose another run_dir"),
    ("/proc/mgrpo_run", "run_dir=/proc/mgrpo_run cannot be created or written (No such file or directory): choose a "
                        "run_dir you can write to"),
    ("lockdir", "run_dir={tmp}/lockdir cannot be created or written (Is a directory: {tmp}/lockdir/.lock)"),
])
def test_a_run_dir_that_cannot_be_a_directory_is_refused_before_any_work(where, said, tiny_cache, tmp_path, capsys):
    """A file where the run directory or one above it belongs, or a place it cannot be made: one line naming it
    (the lock is the run directory's first use), and the file is left as it was."""
    if where.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "lockdir" / ".lock").mkdir(parents=True)          # the lock file's place taken by a directory
    assert cli(["train", *overrides(tiny_cache, tmp_path / where, "steps=1")]) == 1
    err = capsys.readouterr().err
    assert f"mgrpo train: error: {said.format(tmp=tmp_path)}" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "mine\n"


# ---------------------------------------------------------------------------------------------------------
# Full disks

def fail_writes_after(monkeypatch, limit: int):
    """Every checkpoint file write raises ENOSPC once `limit` bytes have gone to disk (a filling disk)."""
    real = ckpt._HashingStream.write
    written = [0]

    def write(self, data):
        size = memoryview(data).nbytes
        if written[0] + size > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += size
        return real(self, data)
    monkeypatch.setattr(ckpt._HashingStream, "write", write)


def test_a_full_disk_during_a_checkpoint_leaves_a_clean_error_and_a_resumable_run(tiny_cache, tmp_path, monkeypatch,
                                                                                  capsys):
    run = tmp_path / "run"
    train(tiny(tiny_cache, run, "steps=2", "save_every=1"), log=lambda *a: None)
    intact = {p.name: verify_checkpoint(p) for p in checkpoint_dirs(run)}
    fail_writes_after(monkeypatch, 100_000)
    assert cli(["train", *overrides(tiny_cache, run, "steps=3", "save_every=1", "resume=true")]) == 1
    err = capsys.readouterr().err
    assert "error: no space left on /" in err and "writing checkpoint step_000003 (about " in err
    assert "MB needed, " in err and "free space, lower keep_checkpoints, or set run_dir elsewhere" in err
    assert "Traceback" not in err
    assert not list((run / "checkpoints").glob(".tmp*"))                  # the partial checkpoint is gone
    assert {p.name: verify_checkpoint(p) for p in checkpoint_dirs(run)} == intact == {
        "step_000001": None, "step_000002": None}
    monkeypatch.undo()                                                    # space freed: resume goes on
    summary = train(tiny(tiny_cache, run, "steps=3", "save_every=1", "resume=true"), log=lambda *a: None)
    assert summary["steps_done"] == 3 and (run / "final" / "config.json").is_file()


def test_a_full_disk_during_the_final_export(tiny_cache, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils
    real = modeling_utils.safe_save_file

    def partial_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(modeling_utils, "safe_save_file", partial_write)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"no space left on .* writing run/final \(about 3\.\d MB needed"):
        train(tiny(tiny_cache, run, "steps=1"), log=lambda *a: None)
    assert not (run / "final").exists() and not (run / ".tmp_final").exists()
    assert verify_checkpoint(checkpoint_dirs(run)[-1]) is None          # the end-of-run checkpoint came first
    monkeypatch.setattr(modeling_utils, "safe_save_file", real)
    assert train(tiny(tiny_cache, run, "steps=1", "resume=true"), log=lambda *a: None)["steps_done"] == 1
    assert (run / "final" / "config.json").is_file()                      # resuming a finished run exports it


def test_low_space_is_warned_before_the_save(tiny_cache, tmp_path, monkeypatch):
    from mgrpo.storage import run_dir
    lines = []
    monkeypatch.setattr(run_dir, "free_bytes", lambda path: 1_000_000)
    train(tiny(tiny_cache, tmp_path / "run", "steps=2", "save_every=1"), log=lines.append)
    warnings = [line for line in lines if line.startswith("[warning] only 1.0 MB free on /")]
    assert len(warnings) == 2 and "the next save may not fit" in warnings[1] and "the last checkpoint took" in warnings[1]


# ---------------------------------------------------------------------------------------------------------
# Damaged checkpoints

@pytest.mark.parametrize("damage", ["truncated", "no_metadata"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, tiny_cache, tmp_path, damage):
    run = copy_run(two_checkpoints, tmp_path)
    newest = checkpoint_dirs(run)[-1]
    if damage == "truncated":          # an interrupted copy
        shard = newest / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
        assert "__0_0.distcp has" in verify_checkpoint(newest) and "were written" in verify_checkpoint(newest)
    else:
        (newest / ".metadata").unlink()
        assert verify_checkpoint(newest).startswith(".metadata is missing")
    lines = []
    summary = train(tiny(tiny_cache, run, "steps=2", "resume=true"), log=lines.append, stop_after_steps=1)
    note = next(line for line in lines if line.startswith("[resume] checkpoint"))
    assert "step_000002 is damaged or incomplete" in note and "resuming from step_000001 instead" in note
    assert summary["steps_done"] == 2                                     # step 2 trained again from step 1


def test_no_checkpoint_that_verifies_or_an_explicit_one(two_checkpoints, tiny_cache, tmp_path):
    run = copy_run(two_checkpoints, tmp_path)
    first, second = checkpoint_dirs(run)
    with pytest.raises(RunDirError, match="resume_from=.*step_000002.*not a checkpoint|cannot be resumed"):
        (second / "__0_0.distcp").write_bytes(b"")
        train(tiny(tiny_cache, run, "steps=2", f"resume_from={second}"), log=lambda *a: None)
    summary = train(tiny(tiny_cache, run, "steps=3", f"resume_from={first}"), log=lambda *a: None,
                    stop_after_steps=1)
    assert summary["steps_done"] == 2
    for step in checkpoint_dirs(run):
        (step / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(RunDirError, match="no checkpoint of .* can be resumed: .*step_000002.*step_000001"):
        train(tiny(tiny_cache, run, "steps=3", "resume=true"), log=lambda *a: None)


def test_loading_only_tensors_refuses_a_bytes_item_even_without_checkpoint_json(tmp_path):
    """The reader itself (used by `mgrpo eval --all-checkpoints` too) refuses pickled items."""
    import torch.distributed.checkpoint as dcp
    marker = tmp_path / "pwned"
    dcp.save({"w": io.BytesIO(pickle.dumps(Touch(marker)))}, checkpoint_id=str(tmp_path / "c"))
    with pytest.raises(UnsafeCheckpointError, match="pickled object at w"):
        load_tensors(tmp_path / "c", {"w": torch.zeros(3)})
    assert not marker.exists()


def test_the_plan_knows_what_a_run_directory_needs_on_disk(two_checkpoints, tiny_cache):
    """`mgrpo plan`'s disk line (what the README's table quotes for real models) against the bytes really written."""
    from mgrpo.plan import make_plan
    cfg = tiny(tiny_cache, two_checkpoints, "steps=2", "save_every=1")
    plan = make_plan(cfg, 1, 80, on_gpu=False)
    newest = sorted((two_checkpoints / "checkpoints").glob("step_*"))[-1]
    written = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    assert plan.disk_per_checkpoint == pytest.approx(written, rel=0.10)
    exported = sum(p.stat().st_size for p in (two_checkpoints / "final").glob("*.safetensors"))
    assert plan.disk_final == pytest.approx(exported, rel=0.05)


# ---------------------------------------------------------------------------------------------------------
# What a command line does to a run that is already there

def test_overwrite_deletes_the_earlier_run_only_once_the_new_one_builds(two_checkpoints, tiny_cache, tmp_path,
                                                                          capsys):
    """overwrite=true with a setting that fails (a missing data file) stops before touching the earlier run; with
    settings that work, the earlier run's checkpoints are gone and the new one's written."""
    run = copy_run(two_checkpoints, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    code = cli(["train", *overrides(tiny_cache, run, "steps=1", "overwrite=true",
                                    f"data.source={tmp_path / 'missing.jsonl'}")])
    assert code == 1 and "missing.jsonl" in capsys.readouterr().err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before                                       # checkpoints, final, metrics, config.yaml: as they were
    assert cli(["train", *overrides(tiny_cache, run, "steps=1", "overwrite=true")]) == 0
    assert [p.name for p in checkpoint_dirs(run)] == ["step_000001"] and (run / "final" / "config.json").is_file()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_resume_continues_with_the_runs_own_settings(two_checkpoints, tiny_cache, tmp_path, capsys):
    """`mgrpo train run_dir=X resume=true` takes X's config.yaml (group size, engine, ... of the run), not the
    defaults; what the command line sets changes it, is printed, and the replaced config.yaml is kept."""
    run = copy_run(two_checkpoints, tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert cli(["train", f"run_dir={run}", "resume=true", "steps=3"]) == 0
    out = capsys.readouterr().out
    assert "[resume] settings changed from the run's config.yaml: steps: 2 -> 3 (the earlier config is kept as " \
           "config.until_step_000002.yaml)" in out
    now = yaml.safe_load((run / "config.yaml").read_text())
    assert now == {**saved, "steps": 3, "resume": True, "run_dir": str(run)}   # its settings, the change, how it ran
    assert yaml.safe_load((run / "config.until_step_000002.yaml").read_text()) == saved
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # resumed again with nothing changed: nothing to say, nothing kept
    assert cli(["train", f"run_dir={run}", "resume=true"]) == 0
    assert "settings changed" not in capsys.readouterr().out and len(list(run.glob("config.until_*"))) == 1


def test_a_damaged_config_of_the_run_is_named_before_any_work(two_checkpoints, tmp_path, capsys):
    run = copy_run(two_checkpoints, tmp_path)
    (run / "config.yaml").write_text("algorithm: {group_size: 4\n")
    assert cli(["train", f"run_dir={run}", "resume=true"]) == 1
    err = capsys.readouterr().err
    assert f"error: {run / 'config.yaml'}, the settings of the run being resumed, cannot be used" in err
    assert "Traceback" not in err


def test_resume_from_another_runs_checkpoint_never_writes_over_a_run(two_checkpoints, tiny_cache, tmp_path, capsys):
    """resume_from=<a checkpoint of run A> with run_dir=<run B> is refused (it would cut B's metrics to A's step
    and replace its config); into a new run_dir it branches off A's checkpoint, with A's settings."""
    a = copy_run(two_checkpoints, tmp_path / "a")
    b = copy_run(two_checkpoints, tmp_path / "b")
    metrics = (b / "metrics.jsonl").read_bytes()
    first = a / "checkpoints" / "step_000001"
    assert cli(["train", f"run_dir={b}", f"resume_from={first}"]) == 1
    assert f"{b} already holds a run, and resume_from={first} is a checkpoint of another" in capsys.readouterr().err
    assert (b / "metrics.jsonl").read_bytes() == metrics
    branch = tmp_path / "branch"
    assert cli(["train", f"run_dir={branch}", f"resume_from={first}"]) == 0
    assert yaml.safe_load((branch / "config.yaml").read_text())["algorithm"]["group_size"] == 4   # A's, not 16
    assert [json.loads(line)["step"] for line in (branch / "metrics.jsonl").read_text().splitlines()] == [2]


def test_rewinding_a_run_onto_its_own_older_checkpoint_is_refused(two_checkpoints, tmp_path, capsys):
    """resume_from=<step 1 of this run> run_dir=<this run> would write over its step-2 checkpoint, final model and
    metrics: refused before any work, the run as it was; a later checkpoint that is damaged does not count
    (going back past it is what resume=true does itself: test_no_checkpoint_that_verifies_or_an_explicit_one)."""
    run = copy_run(two_checkpoints, tmp_path)
    first = run / "checkpoints" / "step_000001"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert cli(["train", f"run_dir={run}", f"resume_from={first}", "steps=3"]) == 1
    err = capsys.readouterr().err
    assert "is an older checkpoint of" in err and "step_000002" in err and "run_dir=<new dir>" in err, err
    assert "Traceback" not in err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_a_resume_without_the_runs_config_is_refused_unless_its_settings_are_given(two_checkpoints, tiny_cache,
                                                                                   tmp_path, capsys):
    """The run's config.yaml gone: resume=true would continue it on the defaults (16 prompts x G 16, not 2 x 4);
    refused, naming the file; with the settings given again (--config) it resumes on them."""
    run = copy_run(two_checkpoints, tmp_path)
    settings = tmp_path / "settings.yaml"
    (run / "config.yaml").rename(settings)
    assert cli(["train", f"run_dir={run}", "resume=true", "steps=3"]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'config.yaml'} is missing" in err and "--config" in err and "Traceback" not in err
    assert not (run / "config.yaml").exists()
    assert cli(["train", "--config", str(settings), f"run_dir={run}", "resume=true", "steps=3"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["algorithm"]["group_size"] == 4


def test_a_resume_runs_with_the_optimizer_settings_it_announces(two_checkpoints, tiny_cache, tmp_path, capsys):
    """optim.lr (and the other optimizer settings) changed on resume: the change is printed, and the steps after it
    run at the new peak on the schedule, not at the checkpoint's (loading the optimizer and schedule brings theirs
    back). The reference: a fresh run's schedule at those steps, with the new peak."""
    run = copy_run(two_checkpoints, tmp_path)
    assert cli(["train", f"run_dir={run}", "resume=true", "steps=4", "optim.lr=1e-3"]) == 0
    assert "optim.lr: 5e-05 -> 0.001" in capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    from transformers import get_cosine_schedule_with_warmup
    reference = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1e-3), 2, 4)
    expected = [reference.get_last_lr()[0]]
    for _ in range(4):
        reference.optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])     # what a step logs: the schedule's after its update
    assert expected[3] > 0 and [lrs[3], lrs[4]] == pytest.approx(expected[3:], rel=1e-9)
    assert ckpt.read_meta(checkpoint_dirs(run)[-1])["settings"]["optim.name"] == "adamw"   # checked on resume


def test_a_resume_refused_after_loading_leaves_the_run_resumable(two_checkpoints, tiny_cache, tmp_path, capsys,
                                                                  monkeypatch):
    """A resume whose checkpoint fails to load (after the model was built) leaves config.yaml as it was: the run
    resumes as before. And optim.name, whose optimizer state is its own, is refused before any model work."""
    run = copy_run(two_checkpoints, tmp_path)
    config = (run / "config.yaml").read_bytes()
    assert cli(["train", f"run_dir={run}", "resume=true", "optim.name=adamw8bit"]) == 1
    assert "optim.name=adamw (now adamw8bit)" in capsys.readouterr().err
    import mgrpo.loop.trainer as trainer

    def fails(*args, **kwargs):
        raise RunDirError("the checkpoint could not be loaded (planted)")
    monkeypatch.setattr(trainer, "restore", fails)
    assert cli(["train", f"run_dir={run}", "resume=true", "steps=3", "optim.lr=1e-4"]) == 1
    assert "planted" in capsys.readouterr().err
    assert (run / "config.yaml").read_bytes() == config and not list(run.glob("config.until_*"))
    monkeypatch.undo()
    assert cli(["train", f"run_dir={run}", "resume=true", "steps=3"]) == 0


def test_a_run_that_stops_before_writing_anything_leaves_no_directory(tiny_cache, tmp_path, capsys):
    new, given = tmp_path / "new", tmp_path / "given"
    given.mkdir()
    for run in (new, given):
        code = cli(["train", *overrides(tiny_cache, run, "steps=1", f"data.source={tmp_path / 'missing.jsonl'}")])
        assert code == 1 and "missing.jsonl" in capsys.readouterr().err
    assert not new.exists()                                      # made by the run: removed with it
    assert given.is_dir()                                        # the user's own directory stays
