"""Preemption: SIGTERM or SIGUSR1 ends a run at the next stage boundary, with a checkpoint, and exit code 75.

A cluster warns a job before it takes its nodes back: Slurm sends SIGUSR1 `--signal=USR1@300` seconds before
the end (examples/slurm/mgrpo.sbatch), and SIGTERM when it preempts or cancels (then SIGKILL after its KillWait,
30 s by default). While `mgrpo train` runs, either signal only sets a flag; the loop looks at it at two points
of every step, on every rank together (one rank's signal stops them all):

    after the rollout and the rewards   the step is abandoned: nothing has been updated yet, so the checkpoint is
                                        the state at the step's start (its data position and RNG included), and
                                        the resumed run redoes the step from its rollout
    after the step                      the step is finished: the checkpoint holds it

Then rank 0 writes run_dir/preempted.json (the step, the signal, the checkpoint) and every rank exits with
PREEMPTED_EXIT_CODE; `mgrpo train ... resume=true` continues from that checkpoint. A run loses at most the step
in flight. A signal during the final evaluation and export is not acted on (the run is about to end).
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

PREEMPTED_EXIT_CODE = 75          # EX_TEMPFAIL: "try again later", distinct from a failure (1) and a kill (137)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MARKER = "preempted.json"


class Preempted(Exception):
    """The run stopped on a signal after writing a resumable checkpoint (not an error: exit 75)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"{signal_name} received: checkpoint {checkpoint} holds {step} steps; continue with "
                         "resume=true")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StepAbandoned(Exception):
    """Raised inside a step, before anything was updated, when a preemption was requested."""


class PreemptionWatch:
    """Catches SIGNALS while entered (main thread only: Python delivers signals there) and restores the previous
    handlers on exit. `requested()` is a collective over ranks."""

    def __init__(self, dist):
        self.dist = dist
        self.caught = None               # the first signal's number
        self._previous = {}

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _catch(self, signum, frame) -> None:
        if self.caught is None:
            self.caught = signum

    def requested(self) -> bool:
        """True on every rank when any rank caught a signal (every rank must call it at the same point)."""
        return self.dist.all_reduce([0.0 if self.caught is None else 1.0], op="max")[0] > 0

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.caught).name if self.caught is not None else "a signal on another rank"


def write_marker(run_dir: Path, signal_name: str, step: int, checkpoint: Path) -> None:
    """run_dir/preempted.json: what a batch script reads to requeue the job rather than fail it."""
    (Path(run_dir) / MARKER).write_text(json.dumps({"step": step, "signal": signal_name, "checkpoint": str(checkpoint),
                                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
