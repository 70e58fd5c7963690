"""Resumable checkpoints (torch.distributed.checkpoint: sharded, one file set per checkpoint) that are data.

    checkpoints/step_000004/
        __0_0.distcp, __1_0.distcp ...   each rank's tensors (DCP)
        .metadata                        DCP's index of them
        checkpoint.json                  written last: the step, the settings, the trainer's counters, every
                                         non-tensor value of the state, each file's size and sha256

What a checkpoint holds (`checkpoint_state`, from a run's parts): the policy and the KL reference (sharded under
FSDP2), the optimizer (with the int8 momentum's codes and scales), the momentum model, the scheduler, each
rank's RNG states (as tensors), the data position and the step.

A checkpoint is data, never code. Runs and checkpoints are what people share to continue each other's
training, and a pickle runs whatever it names when loaded. So: no pickle is written, and none is trusted when
read. DCP itself pickles two things: non-tensor values of a state dict, which we never hand it (they go to
checkpoint.json as JSON), and its `.metadata` index, which we read with an unpickler that admits only DCP's
own metadata classes (anything else, e.g. `os.system`, is refused before it is called); an item the index
declares as pickled bytes is refused too. Tensors are read by DCP with torch.load(weights_only=True).

Every file is hashed while it is written (not re-read afterwards); resuming verifies the newest checkpoint
first and falls back to the newest one that verifies, saying what was wrong with the others. A checkpoint is
written to a temporary directory and renamed into place once complete, so a crash never leaves a torn one; a
write that fails (a full disk) removes its temporary directory and leaves every earlier checkpoint intact.
`export_policy` writes the Hugging Face directory (final model, snapshots) the same way.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..distributed import Dist
from .reshard import flatten, overlapping_ranks, reshard_rank_state, shard_layout
from .run_dir import (
    RunDirError,
    directory_bytes,
    disk_full_error,
    file_sha256,
    holds_a_run,
    is_out_of_space,
    space_warning,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")
META_FILE = "checkpoint.json"
FORMAT = 2
"""checkpoint.json "format": 2 = tensors through DCP, everything else as JSON, files hashed. Checkpoints of
older versions (pickled trainer state) are refused, never unpickled."""


class UnsafeCheckpointError(RunDirError):
    """A checkpoint holds something other than tensors and data: it is refused, nothing in it is run."""


# ---------------------------------------------------------------------------------------------------------
# Finding checkpoints

def checkpoint_dirs(run_dir: Path, folder: str = "checkpoints", marker: str = META_FILE) -> list:
    """Complete step directories under run_dir/folder, oldest first."""
    root = Path(run_dir) / folder
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / marker).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    steps = checkpoint_dirs(run_dir)
    return steps[-1] if steps else None


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META_FILE).read_text())


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if the checkpoint is complete and every file is as written; else what is wrong (which file,
    expected against found)."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f"{META_FILE} cannot be read ({e})"
    if meta.get("format") != FORMAT:
        return (f"it was written by an older mgrpo (format {meta.get('format', 1)}, with pickled state, which is never "
                "loaded): it cannot be resumed by this version")
    for name, expected in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing (expected {expected['size']} bytes)"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} were written"
        found = file_sha256(file)
        if found != expected["sha256"]:
            return f"{name} has sha256 {found[:16]}..., {expected['sha256'][:16]}... was written"
    if not meta.get("files"):
        return "it lists no files"
    return None


def choose_checkpoint(run_dir: Path, resume_from: Optional[str], log=print) -> Path:
    """The checkpoint to resume: `resume_from` if given (it must verify), else the newest one that verifies,
    saying what was wrong with each newer one."""
    if resume_from:
        path = Path(resume_from)
        if not (path / META_FILE).is_file():
            raise RunDirError(f"resume_from={resume_from} is not a checkpoint (no {META_FILE}); checkpoints are "
                              f"the step_* directories under {Path(run_dir) / 'checkpoints'}")
        problem = verify_checkpoint(path)
        if problem:
            raise RunDirError(f"resume_from={resume_from} cannot be resumed: {problem}")
        return path
    candidates = checkpoint_dirs(run_dir)
    problems = []
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            if problems:
                log(f"[resume] {'; '.join(problems)}: resuming from {path.name} instead")
            return path
        problems.append(f"checkpoint {path} is damaged or incomplete: {problem}")
    old = [p for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / "trainer_state.pt").is_file()]
    if problems:
        raise RunDirError("no checkpoint of " + str(run_dir) + " can be resumed: " + "; ".join(problems)
                          + ". Start a fresh run (overwrite=true or another run_dir), or restore the files")
    hint = (" (its checkpoints were written by an older mgrpo, before sharded checkpoints, and cannot be "
            "resumed by this one)" if old else "")
    raise RunDirError(f"resume=true but {run_dir} holds no checkpoint (checkpoints/step_*/{META_FILE}){hint}: "
                      "start a fresh run without resume=true")


def finish_interrupted_saves(run_dir: Path, log=print) -> None:
    """What a save killed before its end (kill -9, a node lost) left in run_dir/checkpoints: a step saved again
    swaps its new copy in by two renames (save_checkpoint), and between them the earlier copy is .old_step_N; it
    goes back to step_N where that is missing, else it is removed, as is every .tmp_step_N (a partial write). Run
    by the process that holds the run's lock, before a resume chooses its checkpoint."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for aside in sorted(root.glob(".old_step_*")):
        target = root / aside.name.removeprefix(".old_")
        if not target.exists() and (aside / META_FILE).is_file():
            aside.rename(target)
            log(f"[resume] {target.name} was being replaced when its run stopped: the earlier copy put back")
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for partial in root.glob(".tmp_step_*"):
        shutil.rmtree(partial, ignore_errors=True)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, dist: Optional[Dist] = None,
                    resume_from: Optional[str] = None, log=print) -> Optional[Path]:
    """Check the run directory before anything expensive; return the checkpoint to resume from (or None).
    Rank 0 decides (verifying checkpoints) and tells the others, so no rank scans a directory another one is
    changing. The caller holds the run directory's lock; overwrite=true's deletion is the trainer's, later."""
    dist = dist or Dist()
    outcome = None
    if dist.is_main:
        try:
            outcome = _prepare_run_dir(Path(run_dir), resume, overwrite, resume_from, log)
        except RunDirError as e:
            outcome = e
    outcome = dist.broadcast_object(outcome)
    dist.barrier()
    if isinstance(outcome, RunDirError):
        raise outcome
    return outcome


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, resume_from: Optional[str], log) -> Optional[Path]:
    if resume_from and holds_a_run(run_dir) and not Path(resume_from).resolve().is_relative_to(run_dir.resolve()):
        raise RunDirError(f"{run_dir} already holds a run, and resume_from={resume_from} is a checkpoint of another: "
                          "continuing from it would write over that run. Give a new run_dir (to branch off that "
                          "checkpoint), or resume the checkpoint's own run (its run_dir with resume=true).")
    if resume or resume_from:
        finish_interrupted_saves(run_dir, log)
        chosen = choose_checkpoint(run_dir, resume_from, log)
        if resume_from:
            refuse_rewinding(run_dir, chosen)
        return chosen
    if holds_a_run(run_dir) and not overwrite:
        raise RunDirError(f"{run_dir} already holds a run (checkpoints or metrics). Pass resume=true to continue "
                          "it, overwrite=true to delete it and start again, or run_dir=<new dir>.")
    # overwrite=true deletes the earlier run only once the new one's model and data are built (the trainer):
    # a setting that fails before then leaves it as it was
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def refuse_rewinding(run_dir: Path, chosen: Path) -> None:
    """resume_from=<an older checkpoint of run_dir's own run> would go on from there and write its later checkpoints,
    metrics and final model over the ones the run already has: nothing a user has is overwritten unasked. Later
    checkpoints that are damaged do not count: going back past them is what resume=true does by itself."""
    ours = [p.resolve() for p in checkpoint_dirs(run_dir)]
    if chosen.resolve() not in ours:
        return
    later = [p.name for p in ours if step_of(p) > step_of(chosen) and verify_checkpoint(p) is None]
    if later:
        raise RunDirError(f"resume_from={chosen} is an older checkpoint of {run_dir}, which has gone on to "
                          f"{', '.join(later)}: continuing from it would write over them. Branch off it into a new "
                          f"run (resume_from={chosen} run_dir=<new dir>), or move the later checkpoints away first")


def check_resumable(path: Path, dist: Dist, settings: dict) -> dict:
    """A checkpoint resumes on any world size (restore reshards it), with the settings that decide what it holds
    (`settings`: name -> value, as saved in its checkpoint.json); returns that checkpoint.json."""
    meta = read_meta(path)
    saved = meta.get("settings", {})
    changed = [f"{k}={saved[k]} (now {v})" for k, v in settings.items() if k in saved and saved[k] != v]
    if changed:
        raise RunDirError(f"checkpoint {path} was written with {', '.join(changed)}: resume with the settings "
                          "it was written with, or start a new run")
    return meta


# ---------------------------------------------------------------------------------------------------------
# State as tensors and JSON

def split_objects(tree, prefix: str = "") -> tuple:
    """(the tensors of a nested state dict as nested dicts, {path: JSON value} of everything else). Lists
    become dicts keyed by position, so every non-tensor value can leave the tree DCP sees."""
    tensors, objects = {}, {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        path = f"{prefix}{key}"
        if torch.is_tensor(value):
            tensors[str(key)] = value
        elif isinstance(value, (dict, list, tuple)) and value and _holds_tensors(value):
            sub_tensors, sub_objects = split_objects(value, path + "/")
            tensors[str(key)] = sub_tensors
            objects.update(sub_objects)
        else:
            try:
                json.dumps(value)
            except TypeError:
                raise TypeError(f"checkpoint state {path} is a {type(value).__name__}: only tensors and JSON values "
                                "are checkpointed") from None
            objects[path] = value
    return tensors, objects


def _holds_tensors(tree) -> bool:
    values = tree.values() if isinstance(tree, dict) else tree
    return any(torch.is_tensor(v) or (isinstance(v, (dict, list, tuple)) and _holds_tensors(v)) for v in values)


def merge_objects(tree, objects: dict, prefix: str = ""):
    """Put the JSON values back into `tree` (in place where it can), each as its template's type (a tuple stays
    a tuple); returns the tree."""
    items = list(tree.items()) if isinstance(tree, dict) else list(enumerate(tree))
    for key, value in items:
        path = f"{prefix}{key}"
        if path in objects:
            saved = objects[path]
            tree[key] = tuple(saved) if isinstance(value, tuple) and isinstance(saved, list) else saved
        elif isinstance(value, list) or isinstance(value, dict):
            merge_objects(value, objects, path + "/")
        elif isinstance(value, tuple):
            tree[key] = tuple(merge_objects(list(value), objects, path + "/"))
    return tree


def rng_state() -> dict:
    """This process's random, numpy, torch (and CUDA) generator states, as tensors."""
    version, python_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": torch.tensor([version, *python_state], dtype=torch.int64),
             "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
             "numpy": torch.tensor([pos, has_gauss, *keys.tolist()], dtype=torch.int64),
             "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"].tolist()
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss if has_gauss else None))
    pos, numpy_has_gauss, *keys = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, numpy_has_gauss,
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------------------------------------
# Writing: every file hashed as it is written

class _HashingStream:
    """A file being written, hashed on the way (DCP writes each file front to back)."""

    def __init__(self, raw, record: dict, name: str):
        self.raw, self.record, self.name = raw, record, name
        self.sha, self.size = hashlib.sha256(), 0

    def write(self, data) -> int:
        written = self.raw.write(data)
        view = memoryview(data).cast("B")
        self.sha.update(view[:written] if written is not None else view)
        self.size += written if written is not None else len(view)
        self.record[self.name] = {"size": self.size, "sha256": self.sha.hexdigest()}
        return written

    def seek(self, *args):        # not used by DCP's writer; a rewrite would make the running hash wrong
        self.record[self.name] = None
        return self.raw.seek(*args)

    def __getattr__(self, name):  # tell, flush, fileno, close
        return getattr(self.raw, name)


def _hashing_writer(path: Path, record: dict):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextmanager
        def create_stream(self, file, mode):
            with super().create_stream(file, mode) as raw:
                yield _HashingStream(raw, record, Path(file).name) if "w" in mode else raw

        def rename(self, old, new):
            super().rename(old, new)
            record[Path(new).name] = record.pop(Path(old).name, None)

    writer = FileSystemWriter(str(path))
    writer.fs = HashingFileSystem()
    return writer


def state_bytes(tree) -> int:
    tensors, _ = split_objects(tree)
    total = 0
    for t in _leaves(tensors):
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _leaves(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield value


def save_checkpoint(run_dir: Path, step: int, state: dict, meta: dict, keep: int, dist: Dist, log=print) -> Path:
    """Write `state` (tensors, DTensors and JSON values) as checkpoints/step_N; a collective. A write that fails
    for lack of space raises DiskFullError after removing its temporary directory; earlier checkpoints stay. So
    does one stopped by Ctrl-C (the second press of mgrpo/loop/preemption.py: stop at once)."""
    try:
        return _write_checkpoint(run_dir, step, state, meta, keep, dist, log)
    except KeyboardInterrupt:
        if dist.is_main:
            root = Path(run_dir) / "checkpoints"
            target, aside = root / f"step_{step:06d}", root / f".old_step_{step:06d}"
            if aside.is_dir() and not target.exists():       # stopped mid-swap: the earlier copy goes back
                aside.rename(target)
            for partial in (root / f".tmp_step_{step:06d}", aside):
                shutil.rmtree(partial, ignore_errors=True)
        raise


def _write_checkpoint(run_dir: Path, step: int, state: dict, meta: dict, keep: int, dist: Dist, log) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    root = Path(run_dir) / "checkpoints"
    target, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    tensors, objects = split_objects(state)
    previous = latest_checkpoint(run_dir)
    needed = directory_bytes(previous) if previous is not None else state_bytes(state) * dist.world_size
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        warning = space_warning(root, needed, "the last checkpoint" if previous is not None else "this checkpoint")
        if warning:
            log(warning)
    dist.barrier()
    files: dict = {}
    failure = None
    try:
        with warnings.catch_warnings():   # "torch.distributed ... uninitialized": one process is what we mean
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(tensors, storage_writer=_hashing_writer(tmp, files))
    except (CheckpointException, OSError, RuntimeError) as e:
        failure = e
    every_rank = dist.all_gather_object((files, objects, failure is not None, failure is not None and is_out_of_space(failure)))
    if any(failed for _, _, failed, _ in every_rank):
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        if any(full for *_, full in every_rank):
            raise disk_full_error(root, f"checkpoint step_{step:06d}", needed) from None
        if isinstance(failure, CheckpointException) and any(isinstance(wrapped[0], KeyboardInterrupt)
                                                            for wrapped in failure.failures.values()):
            raise KeyboardInterrupt from None          # DCP wraps a Ctrl-C as a failed write: it is the Ctrl-C
        raise failure if failure is not None else RunDirError(f"checkpoint step_{step:06d} failed on another rank")
    if dist.is_main:
        all_files, all_objects = {}, {}
        for rank_files, rank_objects, _, _ in every_rank:
            all_files.update(rank_files)
            all_objects.update(rank_objects)
        if any(v is None for v in all_files.values()):
            all_files = {name: {"size": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                         for name in os.listdir(tmp)}
        try:
            (tmp / META_FILE).write_text(json.dumps({**meta, "format": FORMAT, "step": step,
                                                     "world_size": dist.world_size, "objects": all_objects,
                                                     "files": all_files}, indent=1))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_out_of_space(e):
                raise disk_full_error(root, f"checkpoint step_{step:06d}", needed) from None
            raise
        if target.exists():   # the same step saved again (a resumed run re-reaching it): swapped, never absent
            aside = root / f".old_step_{step:06d}"
            shutil.rmtree(aside, ignore_errors=True)
            target.rename(aside)
            tmp.rename(target)
            shutil.rmtree(aside)
        else:
            tmp.rename(target)
        if keep:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old)
    dist.barrier()
    return target


# ---------------------------------------------------------------------------------------------------------
# Reading: tensors only, through an index read without running anything

# What DCP's .metadata may name: its own metadata classes, torch's sizes, dtypes and layouts, a path.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"its DCP index (.metadata) names {module}.{name}, which is not checkpoint metadata "
                                    "(a pickle that would run code): refused, nothing in it was run")


def read_index(file: Path):
    """DCP's index (.metadata) of a checkpoint, read without running anything: only checkpoint metadata classes
    are admitted, no item may be a pickled object, and every file it names lies inside the checkpoint."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with open(file, "rb") as f:
        try:
            index = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as e:
            raise UnsafeCheckpointError(f"its DCP index ({Path(file).name}) does not read: {e}") from None
    pickled = [key for key, item in (getattr(index, "state_dict_metadata", None) or {}).items()
               if isinstance(item, BytesStorageMetadata)]
    if pickled:
        raise UnsafeCheckpointError(f"it holds a pickled object at {pickled[0]} where only tensors belong: refused, "
                                    "nothing in it was run")
    for info in (getattr(index, "storage_data", None) or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        if os.path.isabs(relative) or "/" in relative or "\\" in relative or relative.startswith(".."):
            raise UnsafeCheckpointError(f"its index points outside the checkpoint ({relative!r})")
    return index


def _data_only_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class DataOnlyReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_index(self._get_metadata_path(kwargs.get("rank")))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return DataOnlyReader(str(path))


def _tensors_only_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:   # read_index refuses these first
            raise UnsafeCheckpointError(f"it holds a pickled object at {read_item.dest_index.fqn} where a tensor "
                                        "belongs: refused, nothing in it was run")

    return TensorsOnlyPlanner()


def load_tensors(path: Path, tensors: dict) -> None:
    """DCP's tensors of a checkpoint into `tensors` (nested dicts of tensors), in place, and nothing else."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    index = Path(path) / ".metadata"
    if not index.is_file():
        raise RunDirError(f"checkpoint {path} has no DCP index (.metadata): it is incomplete")
    try:
        read_index(index)              # refused here, with its own message, before DCP reads anything
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"checkpoint {path} is refused: {e}") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(tensors, storage_reader=_data_only_reader(path), planner=_tensors_only_planner())
        except (CheckpointException, RuntimeError, KeyError, ValueError) as e:
            raise RunDirError(f"checkpoint {path} does not match this run (a different model or settings?): "
                              f"{str(e)[:400]}") from None


def load_checkpoint(path: Path, state: dict, dist: Dist) -> dict:
    """A checkpoint into `state` (same structure as saved): its tensors in place, its JSON values merged in.
    Returns its checkpoint.json."""
    meta = read_meta(path)
    if meta.get("format") != FORMAT:
        raise UnsafeCheckpointError(f"checkpoint {path} was written by an older mgrpo (pickled state): it is never "
                                    "loaded; start a fresh run")
    tensors, _ = split_objects(state)
    load_tensors(path, tensors)
    merge_objects(state, meta["objects"])
    return meta


def load_policy_weights(path: Path, model) -> None:
    """The policy's weights from a checkpoint into an unsharded Hugging Face model (for evaluation)."""
    # model.state_dict() shares storage with the parameters: DCP loads in place (and reshards if needed).
    load_tensors(path, {"policy": {f"causal_lm.{name}": t for name, t in model.state_dict().items()}})


# ---------------------------------------------------------------------------------------------------------
# A run's checkpoint: what it holds, restoring it, exporting the policy

def resume_settings(cfg) -> dict:
    """The settings that decide what a checkpoint holds: resuming with others is refused, clearly."""
    algo = cfg.algorithm
    return {"algorithm.mode": algo.mode, "algorithm.momentum_dtype": algo.momentum_dtype,
            "algorithm.kl_coef > 0": algo.kl_coef > 0, "algorithm.kl_reference": algo.kl_reference,
            "model.path": cfg.model.path, "model.precision": cfg.model.precision,
            "optim.name": cfg.optim.name}       # each optimizer's state is its own (torch's AdamW, bitsandbytes')


def checkpoint_state(models, optimization, dist: Dist, kl_reference: str, rng: Optional[dict] = None) -> dict:
    """The DCP state dict of a run's checkpoint, from its parts (mgrpo.build.Models and Optimization). Sharded
    tensors (policy, reference, fp32 momentum, AdamW states) are saved as shards; what is per rank by nature
    (RNG, and an optimizer that holds the momentum model's per-rank blocks) under the rank's key. rng: the
    generators' states to save (default: now's; an abandoned step saves its start's)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optimizer = optimization.optimizer
    mine = {"rng": rng if rng is not None else rng_state(), "layout": shard_layout(models.params)}
    state = {"policy": get_model_state_dict(models.policy), "scheduler": optimization.scheduler.state_dict(),
             "rank": {f"rank{dist.rank}": mine}}
    if getattr(optimizer, "per_rank_state", False):     # states of local shards (fused int8, 8-bit AdamW)
        mine["optimizer"] = optimizer.state_dict()
    else:
        state["optimizer"] = get_optimizer_state_dict(models.policy, optimizer)
    if models.momentum is not None:
        (mine if models.momentum.per_rank_state else state)["momentum"] = models.momentum.state_dict()
    if models.reference is not None and kl_reference == "initial":
        state["reference"] = get_model_state_dict(models.reference)
    return state


def load_rank_state_resharded(path: Path, meta: dict, mine: dict, params: list, dist: Dist) -> None:
    """This rank's per-rank state (`mine`, in place) from a checkpoint written by another number of ranks: from
    the old ranks whose shards overlap this rank's (mgrpo/storage/reshard.py)."""
    old_world, objects = meta["world_size"], meta["objects"]
    old_layouts = {r: objects.get(f"rank/rank{r}/layout") for r in range(old_world)}
    if any(layout is None for layout in old_layouts.values()):
        raise RunDirError(f"checkpoint {path} was written by {old_world} rank(s) by an mgrpo that did not record its "
                          f"shards: resume it with {old_world} rank(s) (torchrun --nproc_per_node)")
    layout = shard_layout(params)
    if len(layout) != len(old_layouts[0]):
        raise RunDirError(f"checkpoint {path} holds {len(old_layouts[0])} parameters, this model {len(layout)}")
    src = dist.rank if dist.rank < old_world else None
    wanted = sorted(set(overlapping_ranks(layout, old_layouts)) | ({src} if src is not None else set()))
    index = read_index(Path(path) / ".metadata")
    flat = {r: {} for r in wanted}
    for fqn, item in index.state_dict_metadata.items():
        head, _, rest = fqn.partition(".")
        rank_key, _, suffix = rest.partition(".")
        if head == "rank" and rank_key.startswith("rank") and int(rank_key[4:]) in flat:
            flat[int(rank_key[4:])][suffix] = torch.empty(item.size, dtype=item.properties.dtype)
    load_tensors(path, {f"rank.rank{r}.{k}": t for r, tensors in flat.items() for k, t in tensors.items()})
    template = flatten(split_objects(mine)[0])
    resharded = reshard_rank_state(template, layout, {r: old_layouts[r] for r in wanted}, flat, src)
    prefix = f"rank/rank{src if src is not None else wanted[0]}/"
    merge_objects(mine, {k[len(prefix):]: v for k, v in objects.items() if k.startswith(prefix)})
    for key, tensor in resharded.items():            # into the nested dicts the optimizer and momentum model load
        node, parts = mine, key.split(".")
        for part in parts[:-1]:
            node = node[part] if isinstance(node, dict) and part in node else node[int(part)]
        last = parts[-1]
        if isinstance(node, dict):
            node[last if last in node else int(last)] = tensor
        else:
            node[int(last)] = tensor


def restore(path: Path, models, optimization, dist: Dist, kl_reference: str) -> dict:
    """Load a checkpoint into the parts in place; returns the trainer counters saved with it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = checkpoint_state(models, optimization, dist, kl_reference)
    mine = state["rank"][f"rank{dist.rank}"]
    settings_now = optimizer_settings(optimization)
    if read_meta(path)["world_size"] == dist.world_size:
        meta = load_checkpoint(path, state, dist)
    else:                                  # DCP reshards the DTensors; the per-rank states are resharded here
        del state["rank"]
        meta = load_checkpoint(path, state, dist)
        load_rank_state_resharded(path, meta, mine, models.params, dist)
    set_model_state_dict(models.policy, state["policy"])   # in place already; this also resets FSDP2's views
    if "optimizer" in mine:
        optimization.optimizer.load_state_dict(mine["optimizer"])
    else:
        set_optimizer_state_dict(models.policy, optimization.optimizer, state["optimizer"])
    if models.momentum is not None:
        models.momentum.load_state_dict(mine["momentum"] if models.momentum.per_rank_state else state["momentum"])
    if "reference" in state:
        set_model_state_dict(models.reference, state["reference"])
    optimization.scheduler.load_state_dict(state["scheduler"])
    apply_optimizer_settings(optimization, settings_now)
    set_rng_state(mine["rng"])
    return meta["trainer"]


def optimizer_settings(optimization) -> tuple:
    """The optimizer's hyperparameters per parameter group (lr, betas, eps, weight decay, the fused int8 kernel's
    momentum m) and the schedule's peak learning rates, as this run's settings made them."""
    groups = [{k: v for k, v in group.items() if k not in ("params", "lr")}
              for group in optimization.optimizer.param_groups]
    return groups, list(optimization.scheduler.base_lrs)


def apply_optimizer_settings(optimization, settings: tuple) -> None:
    """Loading a checkpoint's optimizer and schedule brings back the hyperparameters it was written with; a resume
    that changes optim.lr (or betas, eps, weight decay, m) says so (keep_changed_config) and must run with the new
    ones. The moments and the schedule's position stay the checkpoint's; the learning rate is the new peak on the
    schedule (whose warmup and length are this run's) at that position."""
    groups, base_lrs = settings
    optimizer, scheduler = optimization.optimizer, optimization.scheduler
    for group, now in zip(optimizer.param_groups, groups):
        group.update(now)
    scheduler.base_lrs = base_lrs
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def export_policy(policy, tokenizer, export_dtype: torch.dtype, dist: Dist, target: Path) -> None:
    """The policy as a Hugging Face directory (gathered full weights, safetensors, in the base model's dtype)
    that transformers and vLLM load; rank 0 writes, into a temporary directory renamed when complete."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    failure = None
    if dist.is_main:
        prefix = "causal_lm."
        weights = {k[len(prefix):]: v.to(export_dtype) for k, v in full.items()}
        tmp = target.parent / f".tmp_{target.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            policy.causal_lm.save_pretrained(tmp, state_dict=weights)
            config = copy.deepcopy(policy.causal_lm.config)   # it says fp32 (the master weights): say the truth
            config.dtype = export_dtype
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        except (OSError, RuntimeError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            needed = sum(v.numel() * v.element_size() for v in weights.values())
            failure = disk_full_error(target.parent, f"{target.parent.name}/{target.name}", needed) \
                if is_out_of_space(e) else e
        else:
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    failure = dist.broadcast_object(failure)
    if failure is not None:
        raise failure
    dist.barrier()
