"""Spies on the training loop's stage boundaries, and the contracts the stages must keep between them
(tests/test_wiring.py on one process; tests/distributed_worker.py's "wiring" scenario on 2 ranks).

The loop (mgrpo.loop.trainer) is run for real; the spies only look: before each rollout they take the policy's
and the momentum model's weights (gathered here, independently of the push path), around each step the momentum
model's local shards and the policy's, at each optimizer step the global gradient norm the optimizer is about to
apply; the engine records every push and every generate call. The checks then say, per step:

    the M policy samples came from the policy's weights, the N momentum samples from the momentum model's;
    the momentum samples drew from their own random stream;
    after the optimizer step, theta_k = m theta_k + (1 - m) theta_q (fp32: to rounding; int8: within one
    quantization step of each block);
    the gradient the optimizer applied had a global norm of at most max_grad_norm.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from mgrpo.distributed import full_tensor, local_tensor
from mgrpo.engines.base import PROMPT_SEED_STRIDE
from tests.scripted_engine import ScriptedEngine

QUANT_BLOCK = 256          # the int8 storage's block (a format constant: mgrpo_kernels.momentum_int8.QUANT_BLOCK)


class RecordingEngine(ScriptedEngine):
    """The scripted engine, recording every push (a copy of the weights) and generate call in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []

    def push_weights(self, named_tensors) -> None:
        super().push_weights(named_tensors)
        self.events.append(("push", self.pushes[-1]))

    def generate(self, prompts, params):
        self.events.append(("generate", params.n, params.seed, len(prompts)))
        return super().generate(prompts, params)


def momentum_local(momentum) -> list:
    """theta_k's local shards in fp32, rebuilt from the storage itself (not through the momentum model's own
    accessors): the fp32 copy, or theta_q + codes * scales (blocks of QUANT_BLOCK) for the int8 delta."""
    if momentum.__class__.__name__ == "FP32Momentum":
        return [w.detach().clone() for w in momentum.weights]
    if momentum.optimizer_holds_state:
        states = [momentum.fused_optimizer.state[p] for p in momentum.policy_params]
        codes, scales = [s["codes"] for s in states], [s["scales"] for s in states]
    else:
        codes, scales = momentum.codes, momentum.scales
    out = []
    for p, c, s in zip(momentum.policy_params, codes, scales):
        q = local_tensor(p.detach()).float()
        delta = c.float() * s.repeat_interleave(QUANT_BLOCK)[:c.numel()]
        out.append((q.reshape(-1) + delta).reshape(q.shape))
    return out


def gathered(dist, names: list, local: list) -> dict:
    """Full tensors from every rank's local shards (dim-0 shards, as FSDP2 lays them out), by name."""
    parts = dist.all_gather_object([t.cpu() for t in local])
    return {n: torch.cat([part[i] for part in parts], dim=0) for i, n in enumerate(names)}


def grad_global_norm(params) -> float:
    """The 2-norm over every rank's gradients (torch's get_total_norm reduces FSDP2's sharded DTensors)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


class Observations:
    def __init__(self):
        self.policy_at_rollout, self.momentum_at_rollout = [], []     # per step: full weights, by name
        self.updates = []                                             # per step: (k before, q after, k after, skipped)
        self.applied_grad_norms = []                                  # per optimizer step
        self.momentum = None
        self.dist = None


@contextmanager
def spies():
    """Patch the loop's stage functions (as mgrpo.loop.trainer calls them) with observers that call the real ones."""
    import mgrpo.loop.trainer as trainer
    obs = Observations()
    real_rollout, real_step, real_setup = trainer.rollout, trainer.train_step, trainer.setup

    def rollout(engine, policy, momentum, *args, **kwargs):
        names = [n for n, _ in policy.hf_named_parameters()]
        obs.policy_at_rollout.append({n: full_tensor(p.detach()).float().clone()
                                      for n, p in policy.hf_named_parameters()})
        obs.momentum_at_rollout.append(gathered(obs.dist, names, momentum_local(momentum))
                                       if momentum is not None else None)
        return real_rollout(engine, policy, momentum, *args, **kwargs)

    def train_step(parts, *args, **kwargs):
        momentum = parts.models.momentum
        before = momentum_local(momentum) if momentum is not None else None
        outcome = real_step(parts, *args, **kwargs)
        if momentum is not None:
            q_after = [local_tensor(p.detach()).float().clone() for p in parts.models.params]
            obs.updates.append((before, q_after, momentum_local(momentum), outcome.step.skipped))
        return outcome

    def setup(cfg, dist, log, engine=None):
        parts = real_setup(cfg, dist, log, engine)
        obs.momentum, obs.dist = cfg.algorithm.momentum, dist
        optimizer = parts.optimization.optimizer
        optimizer_step = optimizer.step

        def observed_step(*a, **k):
            obs.applied_grad_norms.append(grad_global_norm(parts.models.params))
            return optimizer_step(*a, **k)
        optimizer.step = observed_step
        return parts

    trainer.rollout, trainer.train_step, trainer.setup = rollout, train_step, setup
    try:
        yield obs
    finally:
        trainer.rollout, trainer.train_step, trainer.setup = real_rollout, real_step, real_setup


# ---------------------------------------------------------------------------------------------------------
# The contracts (each returns a list of failures: empty when kept)

def rounds(events: list) -> list:
    """The engine's events split into rollout rounds: [push, generate(M), push, generate(N)] each."""
    out, current = [], []
    for event in events:
        current.append(event)
        if event[0] == "generate" and len(current) >= 4:
            out.append(current)
            current = []
    return out


def check_samplers(obs: Observations, events: list, policy_samples: int, momentum_samples: int) -> list:
    """Each step's M samples from the policy's weights, its N from the momentum model's, on their own streams."""
    failures = []
    steps = rounds(events)
    if len(steps) != len(obs.policy_at_rollout):
        return [f"{len(steps)} rollout rounds for {len(obs.policy_at_rollout)} steps: {[e[0] for e in events]}"]
    seeds = set()
    for step, (round_, policy, momentum) in enumerate(zip(steps, obs.policy_at_rollout, obs.momentum_at_rollout), 1):
        (p_kind, p_weights), (g_kind, m, seed_q, prompts), (k_kind, k_weights), (n_kind, n, seed_k, _) = round_
        if (p_kind, g_kind, k_kind, n_kind, m, n) != ("push", "generate", "push", "generate", policy_samples,
                                                      momentum_samples):
            failures.append(f"step {step}: events {[e[0] for e in round_]} with n = {m}, {n}")
            continue
        for name, w in policy.items():
            if not torch.equal(p_weights[name], w):
                failures.append(f"step {step}: the policy's samples were drawn from weights other than the "
                                f"policy's ({name} differs by {float((p_weights[name] - w).abs().max()):.2e})")
                break
        for name, w in momentum.items():
            if not torch.allclose(k_weights[name], w, rtol=1e-6, atol=1e-7):
                failures.append(f"step {step}: the momentum samples were drawn from weights other than the momentum "
                                f"model's ({name} differs by {float((k_weights[name] - w).abs().max()):.2e})")
                break
        if step > 1 and all(torch.equal(momentum[n], policy[n]) for n in policy):
            failures.append(f"step {step}: the momentum model equals the policy: nothing tells them apart")
        # streams: the policy's prompt i draws seed_q + i * STRIDE + j (j < M); the momentum model's must be new
        policy_stream = {seed_q + i * PROMPT_SEED_STRIDE + j for i in range(prompts) for j in range(m)}
        momentum_stream = {seed_k + i * PROMPT_SEED_STRIDE + j for i in range(prompts) for j in range(n)}
        if seed_q is None or seed_k is None or policy_stream & momentum_stream:
            failures.append(f"step {step}: the momentum samples reuse the policy's random stream (seeds {seed_q}, {seed_k})")
        if seeds & policy_stream:
            failures.append(f"step {step}: the policy's seed {seed_q} repeats an earlier step's")
        seeds |= policy_stream | momentum_stream
    return failures


def check_momentum_updates(obs: Observations, int8: bool) -> list:
    """After every optimizer step, theta_k = m theta_k + (1 - m) theta_q, every parameter (local shards)."""
    failures, m = [], obs.momentum
    if not obs.updates:
        return ["no update was observed"]
    for step, (before, q_after, k_after, skipped) in enumerate(obs.updates, 1):
        if skipped:
            continue
        for i, (k0, q1, k1) in enumerate(zip(before, q_after, k_after)):
            expected = m * k0.double() + (1 - m) * q1.double()
            error = (k1.double() - expected).abs().reshape(-1)
            if int8:      # one quantization step of each block of the new delta, plus fp32 rounding of theta
                delta = (expected - q1.double()).abs().reshape(-1)
                pad = (-delta.numel()) % QUANT_BLOCK
                block_max = torch.nn.functional.pad(delta, (0, pad)).view(-1, QUANT_BLOCK).amax(1)
                bound = block_max.repeat_interleave(QUANT_BLOCK)[:delta.numel()] / 127 * 1.001
            else:
                bound = torch.zeros_like(error)
            bound = bound + 4 * torch.finfo(torch.float32).eps * expected.abs().reshape(-1) + 1e-12
            if bool((error > bound).any()):
                failures.append(f"step {step}, parameter {i}: theta_k is not m theta_k + (1 - m) theta_q "
                                f"(off by {float(error.max()):.2e}, allowed {float(bound.max()):.2e})")
                break
        if all(torch.equal(a, b) for a, b in zip(before, k_after)):
            failures.append(f"step {step}: the momentum model did not move")
    return failures


def check_clipping(obs: Observations, max_grad_norm: float, logged_norms: list) -> list:
    """The optimizer applied gradients of global norm <= max_grad_norm, where the logged (pre-clip) norm was larger."""
    failures = []
    if len(obs.applied_grad_norms) != len(logged_norms):
        return [f"{len(obs.applied_grad_norms)} optimizer steps observed for {len(logged_norms)} logged"]
    for step, (applied, logged) in enumerate(zip(obs.applied_grad_norms, logged_norms), 1):
        if logged <= max_grad_norm:
            failures.append(f"step {step}: gradient norm {logged:.3g} <= max_grad_norm: clipping is not exercised")
        elif applied > max_grad_norm * (1 + 1e-4):
            failures.append(f"step {step}: the optimizer applied a gradient of global norm {applied:.4g} > "
                            f"max_grad_norm {max_grad_norm} (logged before clipping: {logged:.4g})")
    return failures
