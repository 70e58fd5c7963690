"""Preemption: SIGTERM or SIGUSR1 ends a run at the next stage boundary, with a checkpoint, and exit code 75; so
does Ctrl-C (SIGINT), with exit code 130 and no requeue marker.

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

Ctrl-C is the person at the terminal stopping a run that saves only at its end by default (save_every=0): it is
handled the same way, so the steps done are kept, but it is not a preemption: no preempted.json (a batch script
must not requeue what a person stopped) and exit code 130, the shell's for Ctrl-C. A second Ctrl-C stops at once,
without a checkpoint (KeyboardInterrupt), for a step that takes too long to wait for; one that comes within
REPEAT_WINDOW_S of the first is the same press delivered twice (a launcher in the same process group that passes
the terminal's SIGINT on to a process that got it already).

Under torchrun the ranks run in sessions of their own: the terminal's Ctrl-C reaches torchrun only, which passes
SIGINT on to every rank and SIGKILLs them --shutdown-timeout seconds later (30 by default): time for a small
model's step and checkpoint, not for a large one's. A second Ctrl-C makes torchrun send SIGTERM: after a Ctrl-C
that is the second press, not a preemption.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from ..distributed import launched_by_torchrun

PREEMPTED_EXIT_CODE = 75          # EX_TEMPFAIL: "try again later", distinct from a failure (1) and a kill (137)
INTERRUPTED_EXIT_CODE = 130       # 128 + SIGINT: what a shell reports for a Ctrl-C
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)     # the cluster's: checkpoint, marker, exit 75
INTERRUPT = signal.SIGINT                      # the person's: checkpoint, exit 130
REPEAT_WINDOW_S = 1.0
MARKER = "preempted.json"
# What requested() reduces over ranks (max): a cluster's signal outranks a Ctrl-C (its job must be requeued).
NOTHING, INTERRUPTED, PREEMPTED = 0.0, 1.0, 2.0


STOPPING = (b"\n[stopping] Ctrl-C: the run stops after this step and writes a checkpoint (resume=true continues it); "
            b"Ctrl-C again to stop at once without one\n")
STOPPING_UNDER_TORCHRUN = STOPPING.rstrip() + (b" (torchrun kills the ranks --shutdown-timeout seconds after the "
                                               b"first, 30 unless set)\n")


class Preempted(Exception):
    """The run stopped on a signal after writing a resumable checkpoint (not an error: exit 75, or 130 after a
    Ctrl-C)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path, exit_code: int = PREEMPTED_EXIT_CODE):
        super().__init__(f"{signal_name} received: checkpoint {checkpoint} holds {step} steps; continue with "
                         "resume=true")
        self.signal_name, self.step, self.checkpoint, self.exit_code = signal_name, step, checkpoint, exit_code


class StepAbandoned(Exception):
    """Raised inside a step, before anything was updated, when a preemption was requested."""


class PreemptionWatch:
    """Catches SIGNALS and INTERRUPT while entered (main thread only: Python delivers signals there) and restores
    the previous handlers on exit. `requested()` is a collective over ranks."""

    def __init__(self, dist):
        self.dist = dist
        self.caught = None               # the signal acted on: the first one, or a cluster's after a Ctrl-C
        self.interrupted_at = None       # time.monotonic() of the first Ctrl-C
        self.level = NOTHING             # over all ranks, as of the last requested()
        self._previous = {}

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for sig in (*SIGNALS, INTERRUPT):
                self._previous[sig] = signal.signal(sig, self._catch)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _catch(self, signum, frame) -> None:
        if signum == INTERRUPT or (signum == signal.SIGTERM and self.interrupted_at is not None):
            now = time.monotonic()               # SIGTERM after a Ctrl-C: torchrun passing on the second press
            if self.interrupted_at is not None:
                if now - self.interrupted_at > REPEAT_WINDOW_S:
                    raise KeyboardInterrupt          # the second press: stop now, no checkpoint
                return
            self.interrupted_at = now
            if self.dist.is_main:                    # os.write: a print here could re-enter a print it interrupted
                os.write(2, STOPPING_UNDER_TORCHRUN if launched_by_torchrun() else STOPPING)
        if self.caught is None or (self.caught == INTERRUPT and signum != INTERRUPT):
            self.caught = signum

    def requested(self) -> bool:
        """True on every rank when any rank caught a signal (every rank must call it at the same point)."""
        mine = NOTHING if self.caught is None else INTERRUPTED if self.caught == INTERRUPT else PREEMPTED
        self.level = self.dist.all_reduce([mine], op="max")[0]
        return self.level > NOTHING

    @property
    def preempted(self) -> bool:
        """A cluster's signal (on any rank): the job is requeued (marker, exit 75); else a Ctrl-C (exit 130)."""
        return self.level >= PREEMPTED

    @property
    def exit_code(self) -> int:
        return PREEMPTED_EXIT_CODE if self.preempted else INTERRUPTED_EXIT_CODE

    @property
    def signal_name(self) -> str:
        if self.caught is None or (self.caught == INTERRUPT and self.preempted):
            return "a signal on another rank"
        return "Ctrl-C (SIGINT)" if self.caught == INTERRUPT else signal.Signals(self.caught).name


def write_marker(run_dir: Path, signal_name: str, step: int, checkpoint: Path) -> None:
    """run_dir/preempted.json: what a batch script reads to requeue the job rather than fail it."""
    (Path(run_dir) / MARKER).write_text(json.dumps({"step": step, "signal": signal_name, "checkpoint": str(checkpoint),
                                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def clear_marker(run_dir: Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)
