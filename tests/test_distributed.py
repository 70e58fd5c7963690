"""FSDP2 + torchrun on this CPU: 2 processes, gloo, the tiny model (scenarios in tests/distributed_worker.py).

One torchrun job runs every 2-rank scenario once (module fixture); the 1-rank references run in this process.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_worker import (
    RESHARD_KINDS,
    config,
    fused_through_fsdp,
    one_update,
    reshard_resume,
    reshard_write,
)
from tests.reshard_check import compare

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args, timeout=1200, ranks=2, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def one_rank_checkpoints(tiny_cache, tmp_path_factory):
    """Runs of one process checkpointed at step 1 of 2 (one per storage kind), for the 2-rank job to resume."""
    out = tmp_path_factory.mktemp("one-rank-checkpoints")
    return out, {kind: reshard_write(tiny_cache, out / kind, kind)["state"] for kind in RESHARD_KINDS}


@pytest.fixture(scope="module")
def two_ranks(tiny_cache, tmp_path_factory, one_rank_checkpoints):
    out = tmp_path_factory.mktemp("two-ranks")
    torchrun("-m", "tests.distributed_worker", tiny_cache, out, env={"MGRPO_RESHARD_FROM1": str(one_rank_checkpoints[0])})

    def load(name):
        return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]
    return load, out


@pytest.fixture(scope="module")
def one_rank(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-rank")
    runs = {dtype: one_update(tiny_cache, out / dtype, dtype) for dtype in ("fp32", "int8")}
    # bf16 mixed precision on one process: FSDP2 on a one-rank group, as `mgrpo train model.precision=bf16`
    runs["bf16_int8"] = one_update(tiny_cache, out / "bf16_int8", "int8", "bf16")
    runs["adamw8bit"] = one_update(tiny_cache, out / "adamw8bit", "int8", extra=("optim.name=adamw8bit",))
    return runs


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_one_update_on_two_ranks_equals_one_rank(two_ranks, one_rank, dtype):
    """Same rollouts, two updates: the global token normalisation and the summed gradients give the same
    gradient norm, loss, KL and weights as one process (grad_norm would be off by the world size otherwise;
    the KL is zero at the first step and only the second one checks its reduction)."""
    load, _ = two_ranks
    ref = one_rank[dtype]
    # Adam's first step is lr * g / (|g| + eps): for the odd element whose gradient is near eps the summation
    # order's rounding shows, so the weights are compared to 0.2% of a step per step (lr = 1e-3); the gradient
    # itself is compared through its global norm, exactly.
    steps = 2
    step_tolerance = steps * 2e-3 * 1e-3
    for got in load(f"update_{dtype}"):
        for name, w in ref["policy"].items():
            # Adam normalises every element's step to about lr: an element whose gradient is within rounding
            # of zero moves by an order-dependent amount (seen: a handful in 10^5 elements); every other one
            # matches to 0.2% of a step per step.
            diff = (got["policy"][name] - w).abs()
            assert float(diff.max()) <= steps * 1e-3, name
            assert int((diff > step_tolerance).sum()) <= max(2, diff.numel() // 2000), name
            assert not torch.equal(w, ref["first_pushes"][0][name]), f"{name} did not move"
    a_records, b_records = ref["records"], load(f"update_{dtype}")[0]["records"]
    assert [r["step"] for r in a_records] == [r["step"] for r in b_records] == list(range(1, steps + 1))
    assert a_records[-1]["kl"] > 1e-6, "the second step's KL should be non-zero (else nothing is checked)"
    for a, b in zip(a_records, b_records):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-8)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-9)
        for key in ("reward", "iqr/pruned_frac", "majority_ratio", "frac_reward_zero_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
        assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5)
    for got in load(f"update_{dtype}"):
        for name, k in ref["momentum"].items():
            if dtype == "fp32":
                torch.testing.assert_close(got["momentum"][name], k, rtol=0, atol=step_tolerance, msg=name)
            else:
                # int8 blocks are blocks of each rank's shard, with their own stochastic rounding: the two
                # momentum models differ by at most one quantization step of each per update.
                delta = ref["momentum"][name] - ref["policy"][name]
                bound = steps * 2 * float(delta.abs().max()) / 127 + 1e-7
                assert float((got["momentum"][name] - k).abs().max()) <= bound, name
                assert float(delta.abs().max()) > 25 * bound / 2, "the momentum model did not move"
    if dtype == "int8":
        assert all(g["momentum_bytes_per_parameter"] <= 1.05 for g in load("update_int8"))


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_pushed_weights_are_the_full_weights_bit_for_bit(two_ranks, tiny_cache, dtype):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mgrpo.data.tiny import base_model_dir
    load, out = two_ranks
    ranks = load(f"update_{dtype}")
    base = dict(AutoModelForCausalLM.from_pretrained(
        base_model_dir(config(tiny_cache, "x").warm_start, config(tiny_cache, "x").data.instruction),
        dtype=torch.float32).named_parameters())
    exported = load_file(out / f"update_{dtype}" / "final" / "model.safetensors")
    for got in ranks:
        # step 1: the policy and the momentum model are the base model, pushed whole
        for push in got["first_pushes"]:
            assert set(push) == set(base)
            for name, w in base.items():
                assert torch.equal(push[name], w.detach()), name
        # after the update: the policy push equals the export (a separate gather); the momentum push equals
        # the ranks' local momentum shards concatenated (all_gather_object, no DTensor involved)
        for name, w in got["final_policy_push"].items():
            assert torch.equal(w, exported[name]), name
            assert torch.equal(w, ranks[0]["final_policy_push"][name]), name
        for name, w in got["momentum"].items():
            parts = torch.cat([part[name] for part in got["momentum_local_parts"]], dim=0)
            assert torch.equal(w, parts), name
        assert any(not torch.equal(got["momentum"][n], got["final_policy_push"][n]) for n in base)


def test_the_loop_is_wired_the_same_on_two_ranks(two_ranks):
    """tests/test_wiring.py's contracts on every rank of 2: each sampler drew from its own weights and stream,
    the momentum model is the EMA of the policy after every step (local shards), and the optimizer applied
    gradients clipped to max_grad_norm by the global norm over both ranks. (The int8 momentum model on 2 ranks is
    checked against one process after 2 updates, above; its EMA step by step on one process, test_wiring.py.)"""
    load, _ = two_ranks
    for got in load("wiring_fp32"):
        assert got["updates"] == 3
        assert got["samplers"] == [] and got["ema"] == [] and got["clipping"] == []


def test_resume_on_two_ranks_is_bit_exact(two_ranks):
    """2 straight steps against 1 + resume + 1 on 2 ranks, the transformers engine sampling (its generators' state
    resumes too): the policy and the momentum model bit for bit."""
    load, _ = two_ranks
    for got in load("resume"):
        for name, w in got["straight"].items():
            assert torch.equal(got["resumed"][name], w), name
        for name, w in got["straight_momentum"].items():
            assert torch.equal(got["resumed_momentum"][name], w), name


def test_resume_with_bitsandbytes_8bit_adamw_on_two_ranks_is_bit_exact(two_ranks):
    """The same with bitsandbytes' per-rank 8-bit moments and the int8 momentum model: 1 step + resume + 1 against
    update_adamw8bit's 2 straight steps (the same config and scripted rollouts)."""
    load, _ = two_ranks
    for got, straight in zip(load("resume_adamw8bit"), load("update_adamw8bit")):
        for name, w in straight["policy"].items():
            assert torch.equal(got["resumed"][name], w), name
        for name, w in straight["momentum"].items():
            assert torch.equal(got["resumed_momentum"][name], w), name


def test_adamw8bit_on_two_ranks_equals_one_rank(two_ranks, one_rank):
    """bitsandbytes' 8-bit AdamW on each rank's local shards (it takes no DTensor) against one process: its
    blockwise 8-bit moments are quantized per shard, so the steps agree to the moments' rounding, not bit for
    bit; every parameter moves and the int8 momentum model follows."""
    load, _ = two_ranks
    ref = one_rank["adamw8bit"]
    lr, steps = 1e-3, 2
    for got in load("update_adamw8bit"):
        for name, w in ref["policy"].items():
            diff = (got["policy"][name] - w).abs()
            assert float(diff.max()) <= steps * 2.5 * lr, name
            assert not torch.equal(w, ref["first_pushes"][0][name]), f"{name} did not move"
        for name, k in ref["momentum"].items():
            delta = ref["momentum"][name] - ref["policy"][name]
            assert float((got["momentum"][name] - k).abs().max()) <= steps * 2.5 * lr + 2 * float(delta.abs().max()) / 127
    for a, b in zip(ref["records"], load("update_adamw8bit")[0]["records"]):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_export_loads_in_transformers_with_the_trained_weights(two_ranks):
    from transformers import AutoModelForCausalLM
    load, out = two_ranks
    trained = load("update_fp32")[0]["policy"]
    model = AutoModelForCausalLM.from_pretrained(out / "update_fp32" / "final", dtype=torch.float32)
    loaded = dict(model.named_parameters())
    assert set(loaded) == set(trained)
    for name, w in trained.items():
        assert torch.equal(loaded[name].detach(), w), name


def test_fused_kernel_through_fsdp2_matches_unsharded(two_ranks):
    from mgrpo.distributed import Dist
    load, _ = two_ranks
    ref = fused_through_fsdp(Dist())
    grads = None
    for got in load("fused"):
        torch.testing.assert_close(got["logprob"], ref["logprob"][got["rows"]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["entropy"], ref["entropy"][got["rows"]], rtol=1e-5, atol=1e-5)
        grads = got["grads"]
    # both ranks' backward passes together: the unsharded gradient of the whole batch (the head's included)
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert grads["model.embed_tokens.weight"].abs().sum() > 0


def relative_error(got, gold):
    return float((got.double() - gold.double()).norm() / gold.double().norm().clamp(min=1e-30))


def test_fused_kernel_through_fsdp2_in_bf16_against_a_float64_head(two_ranks, tiny_cache):
    """The GPU's numerics on 2 CPU ranks: FSDP2 with MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32), the warm-started model's peaked logits on its own worked solutions (confident tokens),
    the fused head in bf16; against the unsharded bf16 model whose head is computed in float64 on the same
    bf16 hidden states and weight. The backbone rounds alike on both sides, so what differs is the head."""
    from mgrpo.distributed import Dist
    load, _ = two_ranks
    gold = fused_through_fsdp(Dist(), "bf16", tiny_cache, gold_head=True)
    plain = fused_through_fsdp(Dist(), "bf16", tiny_cache)            # unsharded, fused head in bf16
    mask = gold["logprob"] != 0
    confident = gold["logprob"][mask].exp() > 0.99
    assert float(confident.float().mean()) > 0.5, "not the confident regime this test is about"
    for got in load("fused_bf16"):
        rows = got["rows"]
        assert relative_error(got["logprob"], gold["logprob"][rows]) < 1e-2
        assert relative_error(got["entropy"], gold["entropy"][rows]) < 2e-2
    errors = {name: (relative_error(got["grads"][name], g), relative_error(plain["grads"][name], g),
                     relative_error(got["grads"][name], plain["grads"][name])) for name, g in gold["grads"].items()}
    # The head's own parameters (the tied embedding = lm_head, the final norm) see the head's error directly;
    # deeper ones also carry the bf16 backward's rounding of a 1-ulp different dh (measured up to 1.2% on the
    # 32-element q/k norms of layer 0, 0.3-0.7% elsewhere). Sharding itself (fp32 reduce of two halves
    # against one bf16 backward) must stay within bf16 noise everywhere.
    for name, (sharded, unsharded, sharding) in errors.items():
        head_tolerance = 1e-2 if name in ("model.embed_tokens.weight", "model.norm.weight") else 2e-2
        assert sharded < head_tolerance and unsharded < head_tolerance, (name, sharded, unsharded)
        assert sharding < 1e-2, (name, sharding)
    assert got["grads"]["model.embed_tokens.weight"].abs().sum() > 0


def test_bf16_update_on_two_ranks_equals_one_rank(two_ranks, one_rank):
    """Two updates in the GPU's mixed precision with the int8 momentum model: one process (FSDP2 on one
    rank) against two ranks, within bf16 tolerance; the reference is bf16, the master weights fp32."""
    load, _ = two_ranks
    ref = one_rank["bf16_int8"]
    assert ref["reference_dtype"] == torch.bfloat16 and ref["parameter_dtype"] == torch.float32
    lr, steps = 1e-3, 2
    fp32 = one_rank["int8"]["policy"]    # the same update in fp32 on one process: bf16's own noise floor
    for got in load("update_bf16_int8"):
        assert got["reference_dtype"] == torch.bfloat16 and got["parameter_dtype"] == torch.float32
        moved, flipped, floor = 0, {}, {}
        for name, w in ref["policy"].items():
            diff = (got["policy"][name] - w).abs()
            # Adam normalises each step to about lr per element: bf16 noise can flip an element whose gradient
            # is near zero, nothing can move it by more than the steps allow
            assert float(diff.max()) <= steps * 2.5 * lr, name
            # sharding may disagree with one bf16 process on no more elements than bf16 itself disagrees
            # with fp32 on the same update, over the model (layer 0's q_proj: a few % of its elements either way)
            flipped[name] = int((diff > 0.25 * lr).sum())
            floor[name] = int(((fp32[name] - w).abs() > 0.25 * lr).sum())
            moved += int((w != ref["first_pushes"][0][name]).any())
        assert sum(flipped.values()) <= 2 * sum(floor.values()), (flipped, floor)
        assert sum(floor.values()) > 0, "the one-process run equals fp32: it did not compute in bf16"
        assert moved == len(ref["policy"])
        for name, k in ref["momentum"].items():          # int8 delta on the fp32 shards, tracked on both
            delta = ref["momentum"][name] - ref["policy"][name]
            assert float((got["momentum"][name] - k).abs().max()) <= steps * 2.5 * lr + 2 * float(delta.abs().max()) / 127
        assert got["momentum_bytes_per_parameter"] <= 1.05
    records = load("update_bf16_int8")[0]["records"]                   # rank 0 writes the metrics
    assert [r["step"] for r in records] == [r["step"] for r in ref["records"]] == [1, 2]
    # step 1 starts from the same weights: sharding alone, within bf16 noise. Step 2 starts from weights that
    # already differ by bf16's flipped elements (lr 1e-3): within bf16's own distance from fp32 on one process
    # (measured: grad norm 2.150 fp32, 1.990 bf16 one rank, 2.105 bf16 two ranks)
    first, second = ref["records"][0], records[0]
    assert second["grad_norm"] == pytest.approx(first["grad_norm"], rel=2e-2)
    assert second["loss"] == pytest.approx(first["loss"], rel=5e-2, abs=1e-4)
    a, b, fp32_step2 = ref["records"][1], records[1], one_rank["int8"]["records"][1]
    assert abs(b["grad_norm"] - a["grad_norm"]) <= 2 * abs(a["grad_norm"] - fp32_step2["grad_norm"]) + 2e-2 * a["grad_norm"]
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-3)
    assert second["reward"] == pytest.approx(first["reward"], rel=1e-6)  # step 2's: an IQR cut on bf16 entropies
    assert ref["records"][0]["kl"] == records[0]["kl"] == 0.0          # policy = reference, computed alike
    assert ref["records"][1]["kl"] > 0 and records[1]["kl"] == pytest.approx(ref["records"][1]["kl"], rel=0.1)


def test_momentum_as_kl_reference_on_two_ranks(two_ranks):
    load, _ = two_ranks
    rank0, rank1 = load("momentum_reference")
    assert len(rank0["kl"]) == 2 and rank0["kl"][1] > 0      # step 2: the policy has moved from theta_k
    for got in (rank0, rank1):       # the trainer refreshed the reference before each of the 2 updates, to theta_k
        assert got["sharded"] and len(got["refreshes"]) == 2
        assert all(all(equal) and len(equal) > 10 for equal in got["refreshes"])


def test_world_size_must_divide_prompts_per_step(two_ranks):
    load, _ = two_ranks
    for got in load("bad_world_size"):
        assert got["error"] is not None and "prompts_per_step=3 does not split over 2 ranks" in got["error"]
        assert not got["run_dir_created"]      # refused before anything was written or loaded


def test_rank_0_asks_the_hub_for_every_rank(two_ranks):
    """data.source names the hub; rank 0's probe fails, rank 1's would succeed: rank 1 takes rank 0's answer
    (build.py's settle), asks nothing itself, and reads the datasets cache as rank 0 does (here: not cached)."""
    load, out = two_ranks
    rank0, rank1 = load("hub_settled")
    assert len(rank0["asked"]) == 1 and rank1["asked"] == []
    for got in (rank0, rank1):
        assert got["answer"] == "scenario: rank 0 cannot reach it"
        assert got["error"].startswith("DataError") and "not in the datasets cache" in got["error"], got["error"]
    assert rank0["error"] == rank1["error"]
    assert not (out / "hub_settled" / "run").exists()     # stopped before writing anything: no trace left


@pytest.fixture(scope="module")
def four_ranks(tiny_cache, tmp_path_factory, two_ranks):
    """4 ranks: the 2-rank checkpoints resumed, and checkpoints of 4 written (for one process to resume)."""
    _, two = two_ranks
    out = tmp_path_factory.mktemp("four-ranks")
    scenarios = [f"{s}_{kind}" for kind in FOUR_RANK_KINDS for s in ("reshard_from2", "reshard_write4")]
    torchrun("-m", "tests.distributed_worker", tiny_cache, out, ranks=4,
             env={"MGRPO_RESHARD_FROM2": str(two), "MGRPO_SCENARIOS": ",".join(scenarios)})
    return lambda name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(4)], out


# Every storage 1 <-> 2 (fp32 + torch's AdamW is resharded by DCP alone; the int8 delta's and bitsandbytes' moments
# are per-rank state, requantized where shard boundaries move). 2 -> 4 and 4 -> 1: the int8 delta, our kernel's
# state (bitsandbytes' moments at 4 ranks were a 4-rank job of their own: 30 CPU-seconds for the same requantization).
FOUR_RANK_KINDS = ("int8",)
RESHARD_CASES = [(sizes, kind) for kind in RESHARD_KINDS for sizes in ("1->2", "2->1", "2->4", "4->1")
                 if kind in FOUR_RANK_KINDS or sizes in ("1->2", "2->1")]


@pytest.mark.parametrize("sizes,kind", RESHARD_CASES)
def test_resume_on_another_world_size(tiny_cache, tmp_path, one_rank_checkpoints, two_ranks, four_ranks, sizes, kind):
    """A checkpoint written by N ranks resumes on M: the policy, the momentum model (fp32, or the int8 delta and its
    scales), the optimizer's state (torch's AdamW, the fused int8 AdamW's moments, bitsandbytes' 8-bit moments) as
    they were saved, element for element (within half a code step where an 8-bit block was requantized because
    the shard boundaries moved); then the next step trains there and every step is logged once."""
    load2, two = two_ranks
    load4, four = four_ranks
    saved = {"1": lambda: one_rank_checkpoints[1][kind], "2": lambda: load2(f"reshard_write2_{kind}")[0]["state"],
             "4": lambda: load4(f"reshard_write4_{kind}")[0]["state"]}
    source, target = sizes.split("->")
    if target == "1":
        run = (two if source == "2" else four) / f"reshard_write{source}_{kind}"
        results = [reshard_resume(tiny_cache, run, tmp_path / "resumed", kind)]
    else:
        results = load2(f"reshard_from1_{kind}") if target == "2" else load4(f"reshard_from2_{kind}")
    for got in results:
        assert compare(got["state"], saved[source](), kind != "fp32", kind == "adamw8bit") == []
        assert got["steps"] == [1, 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_like_two_ranks_on_one_node(tiny_cache, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 1 on localhost (two launchers, --node_rank 0 and 1, c10d rendezvous,
    gloo): distributed.mesh=auto makes it HSDP (replicated across the 2 nodes, a shard of 1 within each), and
    it trains to the end as FSDP over 2 ranks of one node does: the same rewards, gradient norms and weights
    (tolerance 1e-6: the same sums of two ranks' gradients, reduced by an all-reduce instead of a reduce-scatter)."""
    train_args = ["-m", "mgrpo", "train", f"warm_start.cache_dir={tiny_cache}", "steps=3",
                  "algorithm.prompts_per_step=4", "algorithm.group_size=4", "rollout.max_new_tokens=48",
                  "data.num_eval=4", "eval.k=2", "progress=false", "rollout.engine=hf"]
    port = free_port()
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(i),
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes", *train_args,
         f"run_dir={tmp_path / 'nodes'}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "[distributed] 2 nodes x 1 ranks, mesh hsdp" in "".join(logs)
    torchrun(*train_args, f"run_dir={tmp_path / 'one-node'}")

    def steps(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    nodes, one_node = steps("nodes"), steps("one-node")
    assert [r["step"] for r in nodes] == [r["step"] for r in one_node] == [0, 1, 2, 3, 3]
    assert any(r.get("grad_norm", 0) > 0 for r in nodes)
    for a, b in zip(nodes, one_node):
        for key in ("reward", "majority_ratio", "eval/greedy", "eval/maj@k"):
            assert a.get(key) == b.get(key), key
        for key in ("grad_norm", "loss", "entropy"):
            assert (key in a) == (key in b), key
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    from safetensors.torch import load_file
    w_nodes, w_one = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("nodes", "one-node"))
    # (the tied lm_head.weight is written by one export and deduplicated by the other: both load the same model)
    assert set(w_nodes) - {"lm_head.weight"} == set(w_one) - {"lm_head.weight"}
    for name, w in w_nodes.items():
        torch.testing.assert_close(w, w_one[name], rtol=0, atol=1e-6, msg=name)


def test_torchrun_cli_trains_to_the_end_in_bf16(tiny_cache, tmp_path):
    """The README's torchrun command on 2 CPU ranks (vLLM when installed: one engine per rank, bf16 weights) in
    the GPU's mixed precision; 3 held-out problems split 2 + 1, so the ranks' engines get unequal work and must
    still step together."""
    run_dir = tmp_path / "cli"
    proc = torchrun("-m", "mgrpo", "train", f"warm_start.cache_dir={tiny_cache}", f"run_dir={run_dir}", "steps=2",
                    "algorithm.prompts_per_step=4", "algorithm.group_size=4", "rollout.max_new_tokens=32",
                    "data.num_eval=3", "eval.k=2", "progress=false", "save_every=1", "model.precision=bf16",
                    "rollout.enforce_eager=true")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert proc.stdout.count("[done]") == 1          # only rank 0 prints
    assert "[memory]" in proc.stdout


def test_the_cli_destroys_the_process_group_it_opened_and_only_that(tiny_cache, tmp_path):
    """`mgrpo train` destroys the process group it opened before returning: one left to the interpreter's
    teardown lets gloo's threads outlive it, and a rank that finished cleanly can abort at exit ("terminate called
    without an active exception", which failed a torchrun test in CI). A group its caller opened stays open."""
    from mgrpo.commands import main
    tiny = [f"warm_start.cache_dir={tiny_cache}", "steps=1", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
            "rollout.max_new_tokens=16", "data.num_eval=2", "eval.k=2", "progress=false", "rollout.engine=hf",
            "model.precision=bf16"]
    if torch.distributed.is_initialized():        # left by a test that called train() directly
        torch.distributed.destroy_process_group()
    assert main(["train", *tiny, f"run_dir={tmp_path / 'opened-here'}"]) == 0
    assert not torch.distributed.is_initialized()

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        assert main(["train", *tiny, f"run_dir={tmp_path / 'opened-by-caller'}"]) == 0
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


EXIT_CASES = {   # name: (torchrun's env?, code run before `python -m mgrpo train ...`, teardown expected?)
    "torchrun rank": (True, "", False),
    "one process with a group": (False, "from mgrpo.distributed import init_distributed; "
                                        "init_distributed('cpu', 'bf16')", False),
    "a bug on a torchrun rank": (True, "import mgrpo.commands.train as t; t.run = lambda args: 1 / 0", False),
    "one process": (False, "", True),
}


@pytest.mark.parametrize("case", EXIT_CASES)
def test_a_torchrun_rank_leaves_without_the_interpreters_teardown(case):
    """`python -m mgrpo` (what torchrun launches) ends a torchrun rank, or a process that opened a process group,
    through os._exit once its output is flushed: the interpreter's teardown, where gloo's threads can abort a rank
    that finished ("terminate called without an active exception", SIGABRT in place of exit 0 or 75: a CI
    failure), never runs. An atexit handler stands for that teardown here; the command is a user error (exit 1, its
    message on stderr) or a bug (exit 1, its traceback). A process without a group exits normally."""
    torchrun_env, before, teardown = EXIT_CASES[case]
    program = "\n".join(["import atexit, runpy, sys", "atexit.register(lambda: print('teardown ran', flush=True))",
                         before, "sys.argv = ['mgrpo', 'train', 'no_such.key=1']",
                         "runpy.run_module('mgrpo', run_name='__main__')"])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if torchrun_env:
        env.update(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    expected = "ZeroDivisionError" if "bug" in case else "mgrpo train: error: unknown config key no_such"
    assert done.returncode == 1 and expected in done.stderr, done.stderr[-3000:]
    assert ("teardown ran" in done.stdout) is teardown, done.stdout
