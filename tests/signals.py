"""Signals sent to this process from a known point of a training step, for the tests of preemption and Ctrl-C."""
import os

import mgrpo.loop.trainer as trainer_module


def signal_during_update(monkeypatch, sig, update: int = 2) -> list:
    """Sends `sig` to this process from inside the `update`-th call of the trainer's policy_gradients (stage 5:
    the step in flight is then finished before the run stops). Returns the list the calls are counted in;
    monkeypatch.undo() puts the real stage back."""
    real, calls = trainer_module.policy_gradients, []

    def update_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == update:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "policy_gradients", update_then_signal)
    return calls
