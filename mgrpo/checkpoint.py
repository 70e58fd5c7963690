"""Run directories and checkpoints (torch.distributed.checkpoint: sharded, one file set per checkpoint).

Layout of a run directory:
    config.yaml                      the resolved config
    metrics.jsonl                    one line per step
    checkpoints/step_000004/         a resumable checkpoint: DCP files + checkpoint.json (written last)
    snapshots/step_000050/           policy-only Hugging Face exports every `snapshot_every` steps (kept)
    final/                           the trained policy as a Hugging Face directory (safetensors + tokenizer)

What a checkpoint holds (`checkpoint_state`, from a run's parts): the policy and the KL reference (sharded
under FSDP2), the optimizer (with the int8 momentum's codes and scales), the momentum model, the scheduler,
each rank's RNG states, the data position and the step. Resuming needs the same world size and the settings
that decide what a checkpoint holds (`resume_settings`). `export_policy` writes the Hugging Face directory
(final model, snapshots).

A run directory holding another run is never overwritten unless overwrite=true. A checkpoint is written to a
temporary directory and renamed into place once complete, so a crash never leaves a torn one.
"""
from __future__ import annotations

import copy
import io
import json
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .distributed import Dist

_STEP_DIR = re.compile(r"^step_(\d+)$")
META_FILE = "checkpoint.json"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says how to proceed."""


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, dist: Optional[Dist] = None) -> Optional[Path]:
    """Check the run directory before anything expensive; return the checkpoint to resume from (or None).
    Rank 0 decides (and deletes, with overwrite=true) and tells the others, so no rank scans a directory
    another one is changing."""
    dist = dist or Dist()
    outcome = _prepare_run_dir(Path(run_dir), resume, overwrite) if dist.is_main else None
    outcome = dist.broadcast_object(outcome)
    dist.barrier()
    if isinstance(outcome, RunDirError):
        raise outcome
    return outcome


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool):
    """The checkpoint to resume from, None, or the RunDirError to raise on every rank."""
    latest = latest_checkpoint(run_dir)
    holds_a_run = latest is not None or any((run_dir / name).exists() for name in
                                            ("metrics.jsonl", "final", "checkpoints", "snapshots"))
    if resume:
        if latest is None:
            old = [p for p in (run_dir / "checkpoints").glob("step_*") if (p / "trainer_state.pt").is_file()]
            hint = (" (its checkpoints were written by an older mgrpo, before sharded checkpoints, and cannot be "
                    "resumed by this one)" if old else "")
            return RunDirError(f"resume=true but {run_dir} holds no checkpoint (checkpoints/step_*/{META_FILE}){hint}: "
                               "start a fresh run without resume=true")
        return latest
    if holds_a_run:
        if not overwrite:
            return RunDirError(f"{run_dir} already holds a run (checkpoints or metrics). Pass resume=true to continue "
                               "it, overwrite=true to delete it and start again, or run_dir=<new dir>.")
        for name in ("checkpoints", "snapshots", "final", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "metrics.png", "config.yaml", "base_model.txt"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


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


def rng_state() -> dict:
    """This process's random, numpy, torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, state: dict, meta: dict, keep: int, dist: Dist) -> Path:
    """Write `state` (a DCP state dict: tensors, DTensors, objects) as checkpoints/step_N; a collective."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    target, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    with warnings.catch_warnings():   # "torch.distributed ... uninitialized": one process is what we mean
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.is_main:
        (tmp / META_FILE).write_text(json.dumps({**meta, "step": step, "world_size": dist.world_size}, indent=1))
        if target.exists():   # the same step saved again (a resumed run re-reaching it)
            shutil.rmtree(target)
        tmp.rename(target)
        if keep:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old)
    dist.barrier()
    return target


def check_resumable(path: Path, dist: Dist, settings: dict) -> dict:
    """A checkpoint resumes only on the world size that wrote it and with the settings that decide what it
    holds (`settings`: name -> value, as saved in its checkpoint.json); returns that checkpoint.json."""
    meta = read_meta(path)
    if meta["world_size"] != dist.world_size:
        raise RunDirError(f"checkpoint {path} was written by {meta['world_size']} rank(s) and this run has "
                          f"{dist.world_size}: resume with the same torchrun --nproc_per_node (the momentum "
                          "model's 8-bit blocks and the optimizer state are per-rank shards, not resharded)")
    saved = meta.get("settings", {})
    changed = [f"{k}={saved[k]} (now {v})" for k, v in settings.items() if k in saved and saved[k] != v]
    if changed:
        raise RunDirError(f"checkpoint {path} was written with {', '.join(changed)}: resume with the settings "
                          "it was written with, or start a new run")
    return meta


def load_checkpoint(path: Path, state: dict, dist: Dist) -> dict:
    """Load a checkpoint into `state` in place (same keys and layout as saved; check_resumable first)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (RuntimeError, KeyError, ValueError) as e:   # DCP's CheckpointException is a RuntimeError
            raise RunDirError(f"checkpoint {path} does not match this run (a different model or settings?): "
                              f"{str(e)[:400]}") from e
    return read_meta(path)


def load_policy_weights(path: Path, model) -> None:
    """The policy's weights from a checkpoint into an unsharded Hugging Face model (for evaluation)."""
    import torch.distributed.checkpoint as dcp

    # model.state_dict() shares storage with the parameters: DCP loads in place (and reshards if needed).
    state = {"policy": {f"causal_lm.{name}": t for name, t in model.state_dict().items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))


# ---------------------------------------------------------------------------------------------------------
# A run's checkpoint: what it holds, restoring it, exporting the policy

def resume_settings(cfg) -> dict:
    """The settings that decide what a checkpoint holds: resuming with others is refused, clearly."""
    algo = cfg.algorithm
    return {"algorithm.mode": algo.mode, "algorithm.momentum_dtype": algo.momentum_dtype,
            "algorithm.kl_coef > 0": algo.kl_coef > 0, "algorithm.kl_reference": algo.kl_reference,
            "model.path": cfg.model.path, "model.precision": cfg.model.precision}


def _blob(obj) -> io.BytesIO:
    return io.BytesIO(pickle.dumps(obj))


def checkpoint_state(run, trainer: dict) -> dict:
    """The DCP state dict of a run's checkpoint. Sharded tensors (policy, reference, fp32 momentum, AdamW
    states) are saved as shards; what is per rank by nature (RNG, and an optimizer that holds the momentum
    model's per-rank blocks) under the rank's key."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dist = run.dist
    mine = {"rng": _blob(rng_state())}
    state = {"policy": get_model_state_dict(run.policy),
             "trainer": _blob({**trainer, "scheduler": run.scheduler.state_dict()}),
             "rank": {f"rank{dist.rank}": mine}}
    if getattr(run.optimizer, "per_rank_state", False):     # states of local shards (fused int8, 8-bit AdamW)
        mine["optimizer"] = run.optimizer.state_dict()
    else:
        state["optimizer"] = get_optimizer_state_dict(run.policy, run.optimizer)
    if run.momentum is not None:
        (mine if run.momentum.per_rank_state else state)["momentum"] = run.momentum.state_dict()
    if run.reference is not None and run.cfg.algorithm.kl_reference == "initial":
        state["reference"] = get_model_state_dict(run.reference)
    return state


def restore(run, path: Path) -> dict:
    """Load a checkpoint into the run in place; returns the trainer counters saved with it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = checkpoint_state(run, {})
    load_checkpoint(path, state, run.dist)
    set_model_state_dict(run.policy, state["policy"])   # in place already; this also resets FSDP2's views
    mine = state["rank"][f"rank{run.dist.rank}"]
    if "optimizer" in mine:
        run.optimizer.load_state_dict(mine["optimizer"])
    else:
        set_optimizer_state_dict(run.policy, run.optimizer, state["optimizer"])
    if run.momentum is not None:
        run.momentum.load_state_dict(mine["momentum"] if run.momentum.per_rank_state else state["momentum"])
    if "reference" in state:
        set_model_state_dict(run.reference, state["reference"])
    trainer = pickle.loads(state["trainer"].getvalue())
    run.scheduler.load_state_dict(trainer.pop("scheduler"))
    set_rng_state(pickle.loads(mine["rng"].getvalue()))
    return trainer


def export_policy(run, target: Path) -> None:
    """The policy as a Hugging Face directory (gathered full weights, safetensors, in the base model's dtype)
    that transformers and vLLM load; rank 0 writes, into a temporary directory renamed when complete."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(run.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.dist.is_main:
        prefix = "causal_lm."
        weights = {k[len(prefix):]: v.to(run.export_dtype) for k, v in full.items()}
        tmp = target.parent / f".tmp_{target.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        run.policy.causal_lm.save_pretrained(tmp, state_dict=weights)
        config = copy.deepcopy(run.policy.causal_lm.config)     # it says fp32 (the master weights): say the truth
        config.dtype = run.export_dtype
        config.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    run.dist.barrier()
