"""Scenarios of the 2-rank tests (tests/test_distributed.py), run under torchrun with the gloo backend:

    python -m torch.distributed.run --nproc_per_node=2 -m tests.distributed_worker CACHE OUT   (from the repository root)

Each scenario writes what the tests check to OUT/<scenario>_rank<r>.pt. The one-rank references are computed
by the same functions in the test process (world size 1, no process group).
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")     # before any kernel module is imported

import torch  # noqa: E402

from mgrpo.config import load_config  # noqa: E402
from mgrpo.distributed import close_distributed, exit_process, full_tensor, init_distributed, shard_model  # noqa: E402
from mgrpo.environment import configure_process  # noqa: E402
from mgrpo.loop.trainer import train  # noqa: E402
from mgrpo.models.logprobs import TokenScorer, score_padded  # noqa: E402
from tests.scripted_engine import ScriptedEngine  # noqa: E402


def config(cache, run_dir, *overrides):
    return load_config(None, [
        f"warm_start.cache_dir={cache}", f"run_dir={run_dir}",
        "steps=1", "progress=false", "log_every=0", "algorithm.prompts_per_step=4", "algorithm.group_size=4",
        "rollout.max_new_tokens=32", "data.num_eval=2", "eval.k=2", "optim.lr=1e-3", "optim.warmup_steps=0",
        "optim.micro_batch_tokens=160", "rollout.engine=hf", *overrides])


def scripted(cache):
    from transformers import AutoModelForCausalLM

    from mgrpo.data.tiny import base_model_dir, build_tokenizer
    cfg = config(cache, "unused")
    path = base_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None)
    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(path).named_parameters()]
    return ScriptedEngine(build_tokenizer(), names)


def one_update(cache, run_dir, momentum_dtype, precision="fp32", extra=()):
    """Two updates on fixed rollouts (the second has a non-zero KL and Adam's second moments); the full weights
    after them, every step's metrics, and the engine's pushes. precision=bf16: the GPU's mixed precision."""
    engine = scripted(cache)
    summary = train(config(cache, run_dir, f"algorithm.momentum_dtype={momentum_dtype}", "steps=2",
                           f"model.precision={precision}", *extra), log=lambda *a: None, engine=engine)
    run, dist = summary["models"], summary["dist"]
    import json
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()] \
        if dist.is_main else []
    # the momentum model's local shards, gathered independently of the push path (all_gather_object)
    local_momentum = {n: w.clone() for n, w in zip(run.momentum.names, run.momentum.local_weights(torch.float32))}
    # what rollout() pushes for the momentum model, through the engine
    engine.push_weights(run.momentum.named_weights(engine.weight_dtype))
    return {
        "policy": {n: full_tensor(p).detach().clone() for n, p in run.policy.hf_named_parameters()},
        "momentum": engine.pushes[-1], "momentum_local_parts": dist.all_gather_object(local_momentum),
        "final_policy_push": engine.pushes[-2],   # validate() after the last step pushed the trained policy
        "first_pushes": engine.pushes[1:3],       # step 1 (after the initial validation): policy, momentum
        "records": [r for r in records if "reward" in r],
        "momentum_bytes_per_parameter": run.momentum.bytes_per_parameter(),
        "reference_dtype": next(run.reference.parameters()).dtype,
        "parameter_dtype": next(run.policy.parameters()).dtype,
    }


def fused_through_fsdp(dist, precision="fp32", cache=None, gold_head=False):
    """Log-probs, entropies and gradients of the fused kernel through an FSDP2-wrapped tiny model; on one
    process (the reference) the unsharded model itself, in bf16 for precision=bf16 (FSDP2's bf16 forward
    computes on exactly these bf16 parameters, and reduces their gradients in fp32).

    With `cache`: the warm-started model scoring worked solutions of the task, i.e. a trained model's peaked
    logits on its confident tokens (where a bf16 head goes wrong); else a random model on random tokens.
    gold_head: the head in float64 on the same (bf16) hidden states and weight, by the PyTorch reference: the
    gold the fused head is measured against, with the backbone's own rounding the same on both sides."""
    from mgrpo.data.tiny import build_tiny_model, build_tokenizer
    tokenizer = build_tokenizer()
    if cache is None:
        model = build_tiny_model(tokenizer, seed=3)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 98, (4, 13), generator=g)
    else:
        import random

        from transformers import AutoModelForCausalLM

        from mgrpo.data.prompts import format_prompt
        from mgrpo.data.tiny import base_model_dir, training_problem
        cfg = config(cache, "unused")
        model = AutoModelForCausalLM.from_pretrained(
            base_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None),
            dtype=torch.float32)
        rows = [training_problem(random.Random(i)) for i in range(4)]
        prompts = [tokenizer.encode(format_prompt(r["problem"], cfg.data.instruction)) for r in rows]
        texts = [p + tokenizer.encode(r["solution"]) + [tokenizer.eos_token_id] for p, r in zip(prompts, rows)]
        width = max(map(len, texts))
        ids = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in texts])
        g = torch.Generator().manual_seed(0)
        response = torch.zeros(ids.shape, dtype=torch.bool)     # the model's own tokens: what it scores in RL
        for i, (p, t) in enumerate(zip(prompts, texts)):
            response[i, len(p):len(t)] = True
    bf16 = precision == "bf16"
    scorer = TokenScorer(model, torch.float64 if gold_head else torch.bfloat16 if bf16 else None)
    if dist.enabled:
        shard_model(scorer, list(scorer.decoder_layers), dist, torch.bfloat16 if bf16 else None)
    elif bf16:   # the parameters only, as FSDP2's MixedPrecisionPolicy casts them (buffers such as the rotary
        for param in scorer.parameters():   # inv_freq stay fp32: a bf16 inv_freq moves every position)
            param.data = param.data.to(torch.bfloat16)
    attention = torch.ones_like(ids)
    attention[3, ids.shape[1] - 3:] = 0                       # ragged: one shorter row
    target = (torch.rand(ids.shape, generator=g) > 0.3) & attention.bool()
    if cache is not None:
        target = response & attention.bool()
    rows = dist.split_evenly(list(range(4)))
    logprob, entropy = score_padded(scorer, ids[rows], attention[rows], target[rows], 1.1 if cache is None else 0.5,
                                    "torch" if gold_head else "fused")
    (logprob.sum() * 0.7 + entropy.sum() * 0.3).backward()
    grads = {n: full_tensor(p.grad).float().clone() for n, p in scorer.hf_named_parameters()}
    return {"rows": rows, "logprob": logprob.detach(), "entropy": entropy.detach(), "grads": grads}


def resume(cache, out_dir, *overrides):
    """2 straight steps against 1 + resume + 1, with the real transformers engine."""
    straight = train(config(cache, out_dir / "straight", "steps=2", *overrides), log=lambda *a: None)["models"]
    train(config(cache, out_dir / "split", "steps=2", *overrides), log=lambda *a: None, stop_after_steps=1)
    resumed = train(config(cache, out_dir / "split", "steps=2", "resume=true", *overrides), log=lambda *a: None)["models"]
    return {"straight": {n: full_tensor(p) for n, p in straight.policy.hf_named_parameters()},
            "resumed": {n: full_tensor(p) for n, p in resumed.policy.hf_named_parameters()},
            "straight_momentum": dict(straight.momentum.named_weights(torch.float32)),
            "resumed_momentum": dict(resumed.momentum.named_weights(torch.float32)),
            "run_dir": str(out_dir / "split")}


def resume_scripted(cache, out_dir, *overrides):
    """1 step, stopped and checkpointed, then resumed for the 2nd, on the scripted engine: the weights to compare
    bit for bit with one_update's straight run of the same config (its rollouts depend on the prompts alone)."""
    train(config(cache, out_dir, "steps=2", *overrides), log=lambda *a: None, stop_after_steps=1,
          engine=scripted(cache))
    resumed = train(config(cache, out_dir, "steps=2", "resume=true", *overrides), log=lambda *a: None,
                    engine=scripted(cache))["models"]
    return {"resumed": {n: full_tensor(p) for n, p in resumed.policy.hf_named_parameters()},
            "resumed_momentum": dict(resumed.momentum.named_weights(torch.float32))}


def momentum_reference(cache, out_dir):
    """kl_reference=momentum over 2 steps: the reference's shards take theta_k before every update. A spy on the
    trainer's own refresh compares, right after each one, the reference's full weights with the momentum model's
    (both gathered; the momentum model through its storage's decoder, tests/wiring.py)."""
    import json

    import mgrpo.loop.stages as stages
    from mgrpo.distributed import Dist, is_dtensor
    from tests.wiring import gathered, momentum_local
    real, checks = stages.refresh_reference_from_momentum, []

    def spy(reference, momentum):
        real(reference, momentum)
        dist = Dist(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size())
        k = gathered(dist, momentum.names, momentum_local(momentum))
        checks.append([torch.equal(full_tensor(p), k[n]) for n, p in zip(momentum.names, reference.parameters())])

    stages.refresh_reference_from_momentum = spy
    try:
        summary = train(config(cache, out_dir, "steps=2", "algorithm.kl_reference=momentum",
                               "algorithm.momentum_dtype=int8"), log=lambda *a: None, engine=scripted(cache))
    finally:
        stages.refresh_reference_from_momentum = real
    run = summary["models"]
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()] \
        if summary["dist"].is_main else []
    # the reference's last use was a no-grad forward: its root parameters must be shards again, or the next
    # refresh would copy a shard into a stale full copy
    sharded = all(is_dtensor(p) for p in run.reference.parameters())
    return {"kl": [r["kl"] for r in records if "kl" in r], "sharded": sharded, "refreshes": checks}


def wiring(cache, out_dir, momentum_dtype):
    """3 steps with the loop's spies on (tests/wiring.py): which weights each sampler drew from, the momentum
    EMA after every optimizer step, and the gradient norm the optimizer applied, on this rank."""
    import json

    from tests.wiring import RecordingEngine, check_clipping, check_momentum_updates, check_samplers, spies
    names = scripted(cache).expected
    from mgrpo.data.tiny import build_tokenizer
    engine = RecordingEngine(build_tokenizer(), names)
    cfg = config(cache, out_dir, f"algorithm.momentum_dtype={momentum_dtype}", "steps=3", "data.num_eval=0",
                 "optim.max_grad_norm=0.05")
    with spies() as obs:
        train(cfg, log=lambda *a: None, engine=engine)
    torch.distributed.barrier()
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    algo = cfg.algorithm
    return {"samplers": check_samplers(obs, engine.events, algo.policy_samples, algo.momentum_samples),
            "ema": check_momentum_updates(obs, momentum_dtype == "int8"),
            "clipping": check_clipping(obs, 0.05, [r["grad_norm"] for r in records if "grad_norm" in r]),
            "updates": len(obs.updates)}


# Cross-size resume: the run's storages that keep per-rank state, and the one DCP reshards by itself.
RESHARD_KINDS = {"fp32": ("algorithm.momentum_dtype=fp32",), "int8": ("algorithm.momentum_dtype=int8",),
                 "adamw8bit": ("algorithm.momentum_dtype=int8", "optim.name=adamw8bit")}


def reshard_write(cache, out_dir, kind):
    """1 of 2 steps, checkpointed; what the checkpoint holds, as full tensors (tests/reshard_check.py)."""
    from tests.reshard_check import full_state
    summary = train(config(cache, out_dir, "steps=2", "data.num_eval=0", *RESHARD_KINDS[kind]), log=lambda *a: None,
                    stop_after_steps=1, engine=scripted(cache))
    return {"state": full_state(summary), "run_dir": str(out_dir)}


def reshard_resume(cache, source, out_dir, kind):
    """A copy of `source` (a run checkpointed at step 1 by another world size) resumed here: the state as
    restored (steps=1: nothing to train), then step 2 trained on this world size; the steps logged."""
    import json
    import shutil

    from mgrpo.distributed import Dist
    from tests.reshard_check import full_state
    dist = init_distributed("cpu")
    if dist.is_main:
        shutil.copytree(source, out_dir)
        shutil.rmtree(Path(out_dir) / "final", ignore_errors=True)
    Dist.barrier(dist)
    restored = train(config(cache, out_dir, "steps=1", "resume=true", "data.num_eval=0", *RESHARD_KINDS[kind]),
                     log=lambda *a: None, engine=scripted(cache))
    state = full_state(restored)
    shutil.rmtree(Path(out_dir) / "final", ignore_errors=True) if dist.is_main else None
    Dist.barrier(dist)
    train(config(cache, out_dir, "steps=2", "resume=true", "data.num_eval=0", *RESHARD_KINDS[kind]),
          log=lambda *a: None, engine=scripted(cache))
    steps = [json.loads(line)["step"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"state": state, "steps": steps}


def bad_world_size(cache, out_dir):
    from mgrpo.errors import TrainingError
    try:
        train(config(cache, out_dir / "bad", "algorithm.prompts_per_step=3"), log=lambda *a: None)
    except TrainingError as e:
        return {"error": str(e), "run_dir_created": (out_dir / "bad").exists()}
    return {"error": None}


def hub_settled(cache, out_dir, rank):
    """A run whose data names the hub, on ranks whose probes would disagree (rank 0's cannot reach it, rank 1's
    can): rank 0 asks for both (build.py settles its answer), so both read the datasets cache and fail alike,
    before any model is read (the run directory it locked is removed: tests/test_distributed.py looks)."""
    import mgrpo.hub as hub
    asked = []

    def ask(endpoint, offline):
        asked.append(endpoint)
        return "scenario: rank 0 cannot reach it" if rank == 0 else None
    hub._answers.clear()
    hub._ask, real = ask, hub._ask
    try:
        train(config(cache, out_dir / "run", "data.source=mgrpo-tests/never-published-dataset"), log=lambda *a: None)
    except Exception as e:  # noqa: BLE001 - the test reads which error each rank met
        return {"error": f"{type(e).__name__}: {e}", "asked": asked, "answer": hub.hub_unreachable()}
    finally:
        hub._ask = real
    return {"error": None, "asked": asked}


if __name__ == "__main__":
    configure_process()
    cache, out = sys.argv[1], Path(sys.argv[2])
    dist = init_distributed("cpu")
    # MGRPO_SCENARIOS=wiring_fp32,update_int8: only these (a quick check while developing, e.g. a planted mistake)
    only = set(filter(None, os.environ.get("MGRPO_SCENARIOS", "").split(",")))

    def save(name, value):
        start = time.perf_counter()
        torch.save(value() if callable(value) else value, out / f"{name}_rank{dist.rank}.pt")
        if dist.rank == 0:       # where the job's minutes go (the suite's slowest fixture)
            print(f"[scenario] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    scenarios = {
        "bad_world_size": lambda: bad_world_size(cache, out),
        "hub_settled": lambda: hub_settled(cache, out / "hub_settled", dist.rank),
        "fused": lambda: fused_through_fsdp(dist),
        "fused_bf16": lambda: fused_through_fsdp(dist, "bf16", cache),
        "update_fp32": lambda: one_update(cache, out / "update_fp32", "fp32"),
        "update_int8": lambda: one_update(cache, out / "update_int8", "int8"),
        "update_bf16_int8": lambda: one_update(cache, out / "update_bf16_int8", "int8", "bf16"),
        "resume": lambda: resume(cache, out / "resume"),
        # bitsandbytes' 8-bit AdamW on the local shards, with the int8 momentum's delta kernel in its hook; its
        # straight run is update_adamw8bit (the same config; the sampler's state is resume's, above)
        "update_adamw8bit": lambda: one_update(cache, out / "update_adamw8bit", "int8", extra=("optim.name=adamw8bit",)),
        "resume_adamw8bit": lambda: resume_scripted(cache, out / "resume_adamw8bit", "algorithm.momentum_dtype=int8",
                                                    "model.precision=fp32", "optim.name=adamw8bit"),
        "momentum_reference": lambda: momentum_reference(cache, out / "momentum_reference"),
        # the int8 momentum model on 2 ranks: update_int8 (against one process after 2 steps); its EMA step by
        # step: tests/test_wiring.py on one process
        "wiring_fp32": lambda: wiring(cache, out / "wiring_fp32", "fp32"),
    }
    one, two = os.environ.get("MGRPO_RESHARD_FROM1"), os.environ.get("MGRPO_RESHARD_FROM2")
    for kind in RESHARD_KINDS:
        scenarios[f"reshard_write{dist.world_size}_{kind}"] = \
            lambda kind=kind: reshard_write(cache, out / f"reshard_write{dist.world_size}_{kind}", kind)
        if one:          # a checkpoint of one process (tests/test_distributed.py writes it first)
            scenarios[f"reshard_from1_{kind}"] = \
                lambda kind=kind: reshard_resume(cache, Path(one) / kind, out / f"reshard_from1_{kind}", kind)
        if two:
            scenarios[f"reshard_from2_{kind}"] = \
                lambda kind=kind: reshard_resume(cache, Path(two) / f"reshard_write2_{kind}",
                                                 out / f"reshard_from2_{kind}", kind)
    for name, scenario in scenarios.items():
        if not only or name in only:
            save(name, scenario)
    close_distributed()
    exit_process(0)          # as `python -m mgrpo` leaves: no interpreter teardown to abort in
