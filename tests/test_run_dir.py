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
