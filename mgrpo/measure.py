"""The memory plan, run and measured: `mgrpo plan --measure`.

The trainer's own stages run on a model built from the config with random weights (nothing downloaded, nothing
read) and rollouts from the synthetic engine (responses of max_new_tokens with boxed answers: full micro-batches,
non-zero advantages, no generation). Every stage of the loop is one of the plan's phases:

    load      setup: policy, KL reference, momentum model, optimizer
    rollout   the weight pushes around the rollouts (the engine itself holds nothing here)
    score     the no-grad scoring of all G trajectories, and the vote
    update    the KL reference's forward, the policy's forward and backward
    step      the optimizer step and the momentum update

and each phase's peak of live tensor bytes is measured on this device: torch.cuda's allocator statistics
(max_memory_allocated) on a GPU; on a CPU torch's MemTracker (torch.distributed._tools.mem_tracker), a dispatch
mode that counts every tensor storage alive, created inside or registered from outside. The peaks of the last
step (the optimizer's state exists by then) are compared with the plan's phases without the engine and the CUDA
runtime, which the measurement does not hold.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .build import measured_memory, setup
from .config import TrainConfig
from .data.tiny import build_tokenizer
from .distributed import init_distributed, tensor_bytes
from .engines.synthetic import SyntheticEngine
from .loop.stages import synced_micro_batches, training_batch
from .loop.trainer import scoring_for, train_step
from .metrics import StageTimes
from .plan import GIB, UPDATE, MicroBatchShape, make_plan, model_config

PHASE_OF_STAGE = {"weight_push": "rollout", "rollout_policy": "rollout", "rollout_momentum": "rollout",
                  "score": "score", "rewards": "score", "reference": "update", "update": "update",
                  "optimizer_step": "step", "momentum_update": "step"}
NOT_MEASURED = ("vLLM engine", "CUDA runtime and fragmentation")


def live_bytes_tracker():
    """torch's MemTracker counting live tensor storages on the CPU, without its per-module statistics, which refuse
    a module called twice in one session (every micro-batch calls the model)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class LiveBytes(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            pass

        def _post_fw_hook(self, module, inputs, outputs):
            pass

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass

    return LiveBytes()


class PhaseMeter(StageTimes):
    """The loop's stage clock (a StageTimes), also recording the peak of live tensor bytes inside every stage."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.peaks, self.snapshots = device, {}, {}
        self.tracker = live_bytes_tracker() if device.type != "cuda" else None

    def track(self, *holders) -> None:
        """Register what was allocated outside the meter (modules, optimizers, tensors): on a CPU the tracker only
        sees what it was told about or saw being made."""
        if self.tracker is not None:
            self.tracker.track_external(*holders)

    @contextmanager
    def __call__(self, stage: str):
        with super().__call__(stage):
            if self.tracker is None:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                yield
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                with self.tracker:       # entering resets the tracker's peak to what is alive now
                    yield
                snapshot = self.tracker.get_tracker_snapshot("peak").get(self.device, {})
                peak = snapshot.get("Total", 0)
                self.snapshots[PHASE_OF_STAGE.get(stage, stage), stage] = snapshot
        phase = PHASE_OF_STAGE.get(stage, stage)
        self.peaks[phase] = max(self.peaks.get(phase, 0), peak)


@dataclass
class Measurement:
    phases: dict                          # phase -> peak bytes (the last step's; load: setup's)
    parts: dict = field(default_factory=dict)   # the resident parts' exact bytes (build.measured_memory)
    micro_batches: dict = field(default_factory=dict)   # score / update -> its largest micro-batch (MicroBatchShape)
    device: str = ""


def measure_phases(cfg: TrainConfig, steps: int = 2, log=print) -> Measurement:
    """Run setup and `steps` training steps at cfg's model shape with random weights; each phase's peak."""
    dist = init_distributed(cfg.device, cfg.model.precision)
    config, _ = model_config(cfg.model.path)
    tokenizer = build_tokenizer()        # its ids (< 128) are in every vocabulary: the prompts only need ids
    meter = PhaseMeter(dist.device)
    with meter("load"):
        parts = setup(cfg, dist, lambda *a: None, engine=SyntheticEngine(tokenizer), random_weights=(config, tokenizer))
    models = parts.models
    meter.track(models.policy, parts.optimization.optimizer,
                *([models.reference] if models.reference is not None else []),
                *(models.momentum.tensors() if models.momentum is not None else []))
    scoring = scoring_for(cfg, parts, dist)
    largest = {}
    for step in range(steps):
        load = meter.peaks.get("load")
        meter.peaks = {"load": load}        # the last step's peaks: the optimizer's state exists by then
        out = train_step(parts, scoring, cfg, step, meter)
        meter.pop()
        updated = training_batch(out.scored, out.assigned, dist).sequences
        for stage, seqs in (("score", out.scored.sequences), ("update", updated)):
            shapes = [shape_of(mb) for mb in synced_micro_batches(seqs, scoring)]
            largest[stage] = max(shapes + [largest.get(stage, MicroBatchShape(0, 0, 0))], key=lambda s: s.tokens)
    resident = measured_memory(models, parts.optimization.optimizer)
    resident["gradients (fp32)"] = tensor_bytes(p for p in models.params if p.grad is not None)
    return Measurement(dict(meter.peaks), resident, largest, str(dist.device))


def shape_of(micro_batch) -> MicroBatchShape:
    """Its tokens (padding included), targets, and keys per query (grouped rows: a prompt and one response)."""
    grouped = micro_batch.grouped
    row = (grouped.prompt_valid.shape[1] + grouped.response_valid.shape[1] if grouped is not None
           else micro_batch.input_ids.shape[1])
    return MicroBatchShape(micro_batch.tokens, micro_batch.targets.numel(), row)


def planned_for(cfg: TrainConfig, measurement: Measurement, gpus: int, gpu_memory_gib: float, on_gpu: bool) -> dict:
    """phase -> the plan for what was measured: micro-batches shaped as the largest one measured in that phase
    (scoring and update each their own). Unmeasured, the plan assumes full ones (micro_batch_shape), an upper
    bound: how full they are depends on the data's lengths."""
    plans = {}
    for stage, phases in (("score", ("score",)), ("update", ("load", "rollout", "update", "step"))):
        plan = make_plan(cfg, gpus, gpu_memory_gib, on_gpu, shape=measurement.micro_batches.get(stage))
        plans.update(dict.fromkeys(phases, plan))
    return plans


MEASURED_PHASES = ("load", "rollout", "score", "update", "step")
"""The loop's stages as measured; the update holds the plan's two peaks (UPDATE), the larger is its plan."""


def planned_peak(plan, phase: str) -> float:
    """The plan's bytes for a measured phase, without what the measurement does not hold."""
    def at(ph):
        return sum(p.at(ph) for p in plan.parts if p.name not in NOT_MEASURED)
    return max(at(ph) for ph in UPDATE) if phase == "update" else at(phase)


def report(plans: dict, measurement: Measurement) -> str:
    """Planned against measured, per phase (plans: planned_for's)."""
    rows = [("phase", "planned GiB", "measured GiB", "measured / planned")]
    for phase in MEASURED_PHASES:
        planned, got = planned_peak(plans[phase], phase), measurement.phases.get(phase)
        rows.append((phase, f"{planned / GIB:.3f}", "-" if got is None else f"{got / GIB:.3f}",
                     "-" if not got or not planned else f"{got / planned:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
