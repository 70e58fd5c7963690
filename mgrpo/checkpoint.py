"""Run directories and checkpoints: policy, momentum model, optimizer, scheduler, RNG states, data position, step.

Layout of a run directory:
    config.yaml            the resolved config
    metrics.jsonl          one line per step
    checkpoints/step_000004/{policy/ (save_pretrained), trainer_state.pt}
    final/                 the trained policy (save_pretrained + tokenizer)

A run directory holding another run's checkpoints or metrics is never overwritten unless overwrite=true.
Checkpoints are written to a temporary directory and renamed into place, so a crash never leaves a torn one.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says how to proceed."""


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Check the run directory before anything expensive; return the checkpoint to resume from (or None)."""
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    holds_a_run = latest is not None or (run_dir / "metrics.jsonl").exists() or (run_dir / "final").exists()
    if resume:
        if latest is None:
            raise RunDirError(f"resume=true but {run_dir} holds no checkpoint (checkpoints/step_*): "
                              "start a fresh run without resume=true")
        return latest
    if holds_a_run:
        if not overwrite:
            raise RunDirError(f"{run_dir} already holds a run (checkpoints or metrics). Pass resume=true to continue "
                              "it, overwrite=true to delete it and start again, or run_dir=<new dir>.")
        for name in ("checkpoints", "final", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "metrics.png", "config.yaml"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    steps = checkpoint_dirs(run_dir)
    return steps[-1] if steps else None


def checkpoint_dirs(run_dir: Path) -> list:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / "trainer_state.pt").is_file()]
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
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


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, trainer_state: dict, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    if target.exists():  # the same step saved again (a resumed run re-reaching it): replace atomically-ish
        shutil.rmtree(target)
    tmp.rename(target)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return target


def load_checkpoint(path: Path, policy) -> dict:
    from safetensors.torch import load_file

    files = sorted((Path(path) / "policy").glob("*.safetensors"))
    if not files:
        raise RunDirError(f"checkpoint {path} has no policy weights (policy/*.safetensors)")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = policy.load_state_dict(state, strict=False)
    # Tied embeddings are saved once; anything else missing means the checkpoint is of another model.
    missing = [k for k in missing if not (k == "lm_head.weight" and policy.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RunDirError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return torch.load(Path(path) / "trainer_state.pt", weights_only=False)
