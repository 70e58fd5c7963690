"""`mgrpo plan`: the computed parts against the exact bytes the trainer allocates (tiny models and Qwen3-0.6B's
widths with 4 of its layers, 1 and 2 CPU ranks; Qwen3-0.6B's parameter count at its 28), the fit verdict and its
suggestions, the one-GPU config, several nodes (the mesh's shard degree, both meshes' traffic against a hand count,
which mesh pays), and bad input."""
import json
import math

import pytest

from mgrpo.commands import main as cli
from mgrpo.config import load_config
from mgrpo.plan import GIB, PHASES, PlanError, check_fits, make_plan, parameter_shapes, plan_on_mesh, traffic
from tests.real_models import QWEN3_06B, QWEN3_06B_PARAMETERS, QWEN3_06B_WIDTHS, parameter_count, save_qwen3_06b

pytestmark = pytest.mark.slow
MEASURED = ("master weights (fp32)", "optimizer state", "momentum model", "KL reference")


def assert_plan_matches(plan, parts: dict, what: str):
    for name in MEASURED:
        planned, measured = plan.bytes_of(name), parts[name]
        assert planned == pytest.approx(measured, rel=0.02, abs=64), f"{what}: {name} planned {planned} measured {measured}"
    assert parts["master weights (fp32)"] > 0


@pytest.fixture(scope="module")
def qwen3_06b(tmp_path_factory):
    """Qwen3-0.6B's widths and vocabulary, 4 of its 28 layers, random bf16 weights (tests/real_models.py)."""
    return save_qwen3_06b(tmp_path_factory.mktemp("qwen3-0.6b"))


@pytest.fixture(scope="module")
def qwen3_06b_config(tmp_path_factory):
    """Qwen3-0.6B's whole shape, 28 layers: config and tokenizer only (verdicts read nothing else)."""
    return save_qwen3_06b(tmp_path_factory.mktemp("qwen3-0.6b-config"), QWEN3_06B, weights=False)


def test_the_plan_counts_qwen3_06b_as_transformers_builds_it(qwen3_06b_config):
    """The plan's parameter shapes for the real model's config sum to what transformers allocates (a meta-device
    model) and to Qwen3-0.6B's published count; its fp32 master weights are 4 bytes each."""
    from transformers import Qwen3Config
    assert sum(math.prod(s) for _, s in parameter_shapes(Qwen3Config(**QWEN3_06B))) == QWEN3_06B_PARAMETERS
    assert parameter_count(QWEN3_06B) == QWEN3_06B_PARAMETERS
    plan = make_plan(load_config(None, [f"model.path={qwen3_06b_config}"]), 1, 80, on_gpu=False)
    assert plan.bytes_of("master weights (fp32)") == 4 * QWEN3_06B_PARAMETERS


@pytest.mark.parametrize("settings", [["optim.name=adamw", "algorithm.momentum_dtype=fp32"],
                                      ["optim.name=adamw", "algorithm.momentum_dtype=int8"],
                                      ["optim.name=adamw8bit", "algorithm.momentum_dtype=int8"],
                                      ["optim.name=adamw8bit", "algorithm.mode=srt"]])
def test_tiny_model_one_process_matches_the_plan(tiny_cache, tmp_path, settings):
    """One step of the embedded default (torch's AdamW allocates its moments at the first step)."""
    from mgrpo.build import measured_memory
    from mgrpo.loop.trainer import train
    cfg = load_config(None, [f"warm_start.cache_dir={tiny_cache}", f"run_dir={tmp_path / 'run'}", "steps=1",
                             "progress=false", "rollout.engine=hf", "algorithm.prompts_per_step=2",
                             "algorithm.group_size=4", "rollout.max_new_tokens=16", "data.num_eval=0", *settings])
    summary = train(cfg, log=lambda *a: None)
    measured = measured_memory(summary["models"], summary["parts"].optimization.optimizer)
    assert_plan_matches(make_plan(cfg, 1, 80, on_gpu=False), measured, " ".join(settings))


def test_qwen3_06b_shaped_one_process_matches_the_plan(qwen3_06b, tmp_path):
    from tests.plan_worker import measure
    overrides = ["optim.name=adamw8bit", "algorithm.momentum_dtype=int8"]
    result = measure(str(qwen3_06b), tmp_path, overrides)
    cfg = load_config(None, [f"model.path={qwen3_06b}", *overrides])
    assert_plan_matches(make_plan(cfg, 1, 80, on_gpu=False), result["parts"], "0.6B, 1 process")
    assert result["parts"]["master weights (fp32)"] == 4 * parameter_count(QWEN3_06B_WIDTHS)


def test_qwen3_06b_shaped_two_ranks_in_bf16_match_the_plan(qwen3_06b, tmp_path):
    """FSDP2 on 2 gloo ranks in the GPU's mixed precision: rank 0's shards (the larger ones), bf16 reference."""
    from tests.test_distributed import torchrun
    overrides = ["optim.name=adamw8bit", "algorithm.momentum_dtype=int8", "model.precision=bf16"]
    torchrun("-m", "tests.plan_worker", qwen3_06b, tmp_path, *overrides)
    rank0 = json.loads((tmp_path / "memory_rank0.json").read_text())
    cfg = load_config(None, [f"model.path={qwen3_06b}", *overrides])
    plan = make_plan(cfg, 2, 80, on_gpu=False)
    assert_plan_matches(plan, rank0["parts"], "0.6B, 2 ranks, bf16")
    assert plan.bytes_of("KL reference") == pytest.approx(plan.bytes_of("master weights (fp32)") / 2)


# ---------------------------------------------------------------------------------------------------------
# Verdicts

def test_one_gpu_config_fits_80_gib_under_72(capsys):
    assert cli(["plan", "--config", "configs/qwen3_4b_1gpu.yaml", "--gpus", "1", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("fits: peak")
    plan = make_plan(load_config("configs/qwen3_4b_1gpu.yaml"), 1, 80)
    assert plan.peak <= 72 * GIB and plan.phase("rollout") > 0.5 * plan.peak     # the engine awake: most of it


def test_a_config_that_does_not_fit_says_what_would(capsys):
    """The 8-GPU config on one GPU: 30 GiB of fp32 Adam moments alone; the 8-bit optimizer or more GPUs fit."""
    assert cli(["plan", "--config", "configs/qwen3_4b.yaml", "--gpus", "1", "--gpu-memory", "80"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does not fit: peak") and "GiB over" in last
    assert "optim.name=adamw8bit" in last and "2 GPUs" in last
    assert cli(["plan", "--config", "configs/qwen3_4b.yaml", "--gpus", "8", "--gpu-memory", "80"]) == 0


def test_eight_gpus_with_the_8bit_optimizer_shrink_the_state_and_auto_takes_the_largest_kv_share():
    cfg = load_config("configs/qwen3_4b.yaml")
    adamw, eight_bit = make_plan(cfg, 8, 80), make_plan(load_config("configs/qwen3_4b.yaml", ["optim.name=adamw8bit"]), 8, 80)
    assert eight_bit.bytes_of("optimizer state") < 0.3 * adamw.bytes_of("optimizer state")
    auto = make_plan(load_config("configs/qwen3_4b.yaml", ["rollout.gpu_memory_utilization=auto"]), 8, 80)
    assert auto.fits and auto.kv_cache_tokens > 2 * adamw.kv_cache_tokens
    assert auto.phase("rollout") <= 80 * GIB < make_plan(load_config(
        "configs/qwen3_4b.yaml", [f"rollout.gpu_memory_utilization={auto.max_gpu_memory_utilization + 0.03:.2f}"]),
        8, 80).phase("rollout")


def test_train_refuses_a_config_that_does_not_fit_before_loading_weights(qwen3_06b_config, tmp_path, monkeypatch):
    from mgrpo import build
    from mgrpo.errors import TrainingError
    from mgrpo.loop.trainer import train

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(build, "load_policy", no_weights)
    cfg = load_config(None, [f"model.path={qwen3_06b_config}", f"run_dir={tmp_path / 'run'}",
                             "plan.gpu_memory_gib=20",
                             "rollout.engine=hf", "data.num_eval=0"])
    with pytest.raises(TrainingError, match="does not fit.*Would fit with: optim.name=adamw8bit"):
        train(cfg, log=lambda *a: None)
    with pytest.raises(PlanError, match="does not fit.*Would fit with: .*optim.name=adamw8bit.*2 GPUs"):
        check_fits(cfg, 1, 20)
    with pytest.raises(PlanError, match="Would fit with: optim.name=adamw8bit algorithm.momentum_dtype=int8 "
                                        "model.gradient_checkpointing=true; 8 GPUs"):
        check_fits(cfg, 1, 14)          # no single setting: several together


def test_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(["plan", "model.path=" + str(tmp_path / "empty")]) == 1
    assert "has no config.json" in capsys.readouterr().err
    assert cli(["plan", "optim.name=sgd"]) == 1
    assert "optim.name='sgd'" in capsys.readouterr().err
    assert cli(["plan", "--gpu-memory", "0"]) == 1
    assert "--gpu-memory 0" in capsys.readouterr().err
    assert cli(["plan", "rollout.gpu_memory_utilization=lots"]) == 1
    capsys.readouterr()
    for args, says in ((["--nodes", "0"], "--nodes 0: must be >= 1"), (["--mesh", "bad"], "--mesh bad: use auto"),
                       (["--nodes", "2", "--inter-node-gbps", "-400"], "--inter-node-gbps -400: must be > 0"),
                       (["--intra-node-gbps", "0"], "--intra-node-gbps 0: must be > 0")):
        assert cli(["plan", *args]) == 1, args
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_ranks_train_refuses_are_refused_before_planning(capsys, monkeypatch):
    """qwen3_4b.yaml's 8 prompts per step do not split over 3 ranks (nor a million, nor 2 x 3): mgrpo train stops at
    its start, so the plan says so in its words, with a prompts_per_step and a --gpus that would run, and plans
    nothing; the settings it suggests for a config that does not fit are ones train would run too."""
    from mgrpo import plan as plan_module

    def no_planning(*a, **k):
        raise AssertionError("planned a world size train refuses")
    base = ["plan", "--config", "configs/qwen3_4b.yaml", "--gpu-memory", "80"]
    with monkeypatch.context() as m:
        m.setattr(plan_module, "make_plan", no_planning)
        for flags, says in ((["--gpus", "3"], "--gpus 3: algorithm.prompts_per_step=8 does not split over 3 ranks"),
                            (["--gpus", "1000000"], "does not split over 1000000 ranks"),
                            (["--nodes", "2", "--gpus", "3"], "--nodes 2 --gpus 3: algorithm.prompts_per_step=8 "
                                                              "does not split over 6 ranks")):
            assert cli([*base, *flags]) == 1, flags
            err = capsys.readouterr().err
            assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
            assert "mgrpo train refuses it" in err and "algorithm.prompts_per_step=" in err.split("e.g.")[1], err
        assert cli([*base, "--gpus", "3"]) == 1
        assert capsys.readouterr().err.strip().endswith("e.g. algorithm.prompts_per_step=9, or use --gpus 2")
    # one GPU does not fit; 2 GPUs would, but 3 prompts do not split over 2 (nor 4 or 8) ranks: not suggested
    assert cli([*base, "--gpus", "1", "algorithm.prompts_per_step=3"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does not fit") and "optim.name=adamw8bit" in last and "GPUs (torchrun" not in last


def test_a_fraction_of_a_gib_is_not_shown_as_0(capsys):
    assert cli(["plan", "--gpu-memory", "0.1"]) == 1
    assert "of 0.1 GiB per GPU" in capsys.readouterr().out.strip().splitlines()[-1]
    assert cli(["plan", "--gpu-memory", "79.19"]) == 0
    assert "of 79.2 GiB per GPU" in capsys.readouterr().out.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------
# Several nodes: the mesh's shard degree, the traffic of both meshes, which pays

def test_one_node_plans_and_prints_as_before(capsys):
    """--nodes 1 (whatever --mesh or bandwidth) is the plan and the output there were before meshes: the 8-GPU
    config's phase totals as printed then, and no traffic section."""
    cfg = load_config("configs/qwen3_4b.yaml")
    before = make_plan(cfg, 8, 80)
    assert [round(before.phase(ph) / GIB, 2) for ph in PHASES] == [37.45, 38.90, 12.37, 21.37, 17.84, 11.83]
    for mesh in ("auto", "fsdp", "hsdp"):
        plan = plan_on_mesh(cfg, 1, 8, 80, mesh)
        assert (plan.gpus, plan.replicas, plan.mesh) == (8, 1, "fsdp")
        assert [(p.name, p.bytes, p.note) for p in plan.parts] == [(p.name, p.bytes, p.note) for p in before.parts]
    assert cli(["plan", "--config", "configs/qwen3_4b.yaml", "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert cli(["plan", "--config", "configs/qwen3_4b.yaml", "--gpus", "8", "--gpu-memory", "80", "--nodes", "1",
                "--mesh", "hsdp", "--inter-node-gbps", "1", "distributed.mesh=hsdp"]) == 0
    assert capsys.readouterr().out == out
    assert out.startswith("[plan] Qwen/Qwen3-4B-Base (built-in qwen3-4b config) on 8 x 80 GiB (per GPU;")
    assert "traffic" not in out and "mesh" not in out and len(out.strip().splitlines()) == 20


def test_hsdp_holds_per_gpu_what_one_node_does(capsys):
    """hsdp on 2 nodes x 8 GPUs shards within a node: every part per GPU is the one-node 8-GPU plan's; fsdp over all
    16 holds less."""
    cfg = load_config("configs/qwen3_4b.yaml")
    one_node, hsdp, fsdp = make_plan(cfg, 8, 80), plan_on_mesh(cfg, 2, 8, 80, "hsdp"), plan_on_mesh(cfg, 2, 8, 80, "fsdp")
    assert (hsdp.gpus, hsdp.replicas, fsdp.gpus, fsdp.replicas) == (8, 2, 16, 1)
    assert [(p.name, p.bytes) for p in hsdp.parts] == [(p.name, p.bytes) for p in one_node.parts]
    assert hsdp.peak == one_node.peak > fsdp.peak
    assert fsdp.bytes_of("master weights (fp32)") == pytest.approx(hsdp.bytes_of("master weights (fp32)") / 2,
                                                                   rel=0.01)
    assert plan_on_mesh(cfg, 2, 8, 80, "auto").peak == hsdp.peak           # auto: hsdp on more than one node
    # the table follows distributed.mesh, and --mesh overrides it
    assert cli(["plan", "--config", "configs/qwen3_4b.yaml", "--nodes", "2", "--gpus", "8", "--gpu-memory", "80",
                "--mesh", "fsdp", "distributed.mesh=hsdp", "algorithm.prompts_per_step=16"]) == 0
    out = capsys.readouterr().out
    assert "2 nodes x 8 GPUs x 80 GiB, mesh fsdp (sharded over all 16 GPUs)" in out.splitlines()[0]
    assert f"fits: peak {fsdp.peak / GIB:.1f} GiB" in out.splitlines()[-1]


QWEN3_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True,
                   max_position_embeddings=512)


def test_traffic_matches_a_hand_count(tmp_path):
    """2 nodes x 8 GPUs, a model whose every dim 0 divides by 16 (no padding), counted by hand: 1 prompt per rank,
    G = 8 responses (M = 6 from the policy) of 100 + 28 tokens, 2 per 256-token micro-batch: 4 scoring, 3 reference,
    3 update micro-batches per rank."""
    from transformers import Qwen3Config
    Qwen3Config(**QWEN3_SMALL).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.path={tmp_path}", "algorithm.prompts_per_step=16", "algorithm.group_size=8",
                             "algorithm.momentum_samples=2", "rollout.max_new_tokens=28", "optim.micro_batch_tokens=256"])
    H, I, V, q, kv = 64, 128, 256, 4 * 16, 2 * 16
    layer = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H + 2 * 16      # attention, MLP, 2 norms, q/k norms
    root = V * H + H                                                     # tied embedding = head, final norm
    P, layers = root + 2 * layer, 2 * layer
    assert sum(math.prod(s) for _, s in parameter_shapes(Qwen3Config(**QWEN3_SMALL))) == P == 90_496
    N, G, W = 2, 8, 16
    fsdp = traffic(cfg, parameter_shapes(Qwen3Config(**QWEN3_SMALL)), N, G, "fsdp", 400, 3600)
    hsdp = traffic(cfg, parameter_shapes(Qwen3Config(**QWEN3_SMALL)), N, G, "hsdp", 400, 3600)
    assert fsdp.micro_batches == hsdp.micro_batches == dict(score=4, reference=3, update=3)
    push = 2 * 2 * P                                       # policy and momentum model, bf16, full size
    gathered = 2 * ((4 * layers + root) + (3 * layers + root) + 3 * (root + 2 * layers))   # bf16
    grads = 3 * 4 * P                                      # one fp32 reduce-scatter per update backward
    # fsdp: rings over all 16 ranks, each moving 15/16 of the tensor per rank; 1/8 of it on the node's link
    expect = {"weight push": push, "parameter gathers": gathered, "gradient reduce-scatter": grads}
    for name, inter, intra, _ in fsdp.rows:
        full = expect.get(name, 0) * (W - 1) / W
        assert (inter, intra) == (pytest.approx(full / G), pytest.approx(full * (G - 1) / G)), name
    # hsdp: the same inside a node (8-way rings), and each rank's 1/8 fp32 gradient shard all-reduced across the 2
    # nodes once per update (after its last backward): 2 (N - 1) / N of it per rank, all over the inter-node link
    for name, inter, intra, _ in hsdp.rows:
        if name == "gradient all-reduce":
            assert (inter, intra) == (pytest.approx(2 * (N - 1) / N * 4 * P / G), 0)
        else:
            assert (inter, intra) == (0, pytest.approx(expect[name] * (G - 1) / G)), name
    assert hsdp.inter == pytest.approx(4 * P / G)
    assert hsdp.inter_seconds == pytest.approx(G * 4 * P / G / 50e9)            # 400 Gb/s = 50 GB/s per node
    assert fsdp.inter_seconds == pytest.approx((push + gathered + grads) * 15 / 16 / 50e9)
    assert hsdp.intra_seconds == pytest.approx((push + gathered + grads) * 7 / 8 / 450e9)   # 3600 Gb/s per GPU


def test_hsdp_pays_on_two_nodes_and_fsdp_where_only_its_shards_fit(capsys):
    """Qwen3-4B on 2 x 8 GPUs at 400 Gb/s: hsdp keeps the gathers and pushes on NVLink and fits 80 GiB; at 20 GiB
    (the engine's share auto) only fsdp's 16-way shards fit."""
    base, per_rank = ["plan", "--config", "configs/qwen3_4b.yaml", "--nodes", "2", "--gpus", "8",
                      "--inter-node-gbps", "400"], "algorithm.prompts_per_step=16"
    assert cli([*base, "--gpu-memory", "80", per_rank]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("mesh: hsdp pays: ") and "This plan is for" not in lines[-2]
    assert "per-GPU peak 38.9 GiB under hsdp (8-way shards), 35.2 GiB under fsdp (16-way)" in lines[-2]
    seconds = lines[[i for i, line in enumerate(lines) if line.startswith("seconds per step")][0]].split()[3:7]
    fsdp_inter, hsdp_inter = float(seconds[0]), float(seconds[2])
    assert hsdp_inter < fsdp_inter / 2 and f"{hsdp_inter:.2f} s per step across the nodes under hsdp" in lines[-2]
    assert cli([*base, "--gpu-memory", "20", per_rank, "rollout.gpu_memory_utilization=auto"]) == 1   # auto: hsdp
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("mesh: fsdp: hsdp does not fit (peak 21.4 GiB of 20 GiB per GPU")
    assert "fsdp's 16-way shards peak at 19.8 GiB" in lines[-2] and "set distributed.mesh=fsdp" in lines[-2]
    assert lines[-1].startswith("does not fit") and "distributed.mesh=fsdp" in lines[-1]
    assert cli([*base, "--gpu-memory", "20", "--mesh", "fsdp", per_rank, "rollout.gpu_memory_utilization=auto"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("mesh: fsdp: hsdp does not fit") and "This plan is for" not in lines[-2]


# ---------------------------------------------------------------------------------------------------------
# mgrpo plan --measure: every phase run (random weights, synthetic rollouts) and measured against the plan

def assert_phases_match(cfg, what: str, steps: int = 2):
    """Each phase's peak of live tensor bytes (torch's MemTracker on this CPU) within 10% of the plan (the phases'
    own micro-batches), or 1 MiB for parts the size of the tiny model's (its whole gradient is 3 MiB)."""
    from mgrpo.measure import MEASURED_PHASES, measure_phases, planned_for, planned_peak
    measurement = measure_phases(cfg, steps, log=lambda *a: None)
    plans = planned_for(cfg, measurement, 1, 80, on_gpu=False)
    for phase in MEASURED_PHASES:
        planned, measured = planned_peak(plans[phase], phase), measurement.phases[phase]
        assert measured == pytest.approx(planned, rel=0.10, abs=2 ** 20), \
            f"{what}: {phase} measured {measured / GIB:.4f} GiB, planned {planned / GIB:.4f} GiB"
    return measurement, plans


@pytest.mark.parametrize("settings", [["algorithm.momentum_dtype=fp32"], ["algorithm.momentum_dtype=int8"]])
def test_each_phase_of_the_tiny_model_measures_as_planned(settings):
    """The embedded default's model and layout (grouped rows), fewer prompts; torch's AdamW (moments made at the first
    step), the fp32 momentum model or the int8 delta updated inside the optimizer step."""
    cfg = load_config(None, ["algorithm.prompts_per_step=8", "algorithm.group_size=8", "data.num_eval=0",
                             *settings])
    measurement, _ = assert_phases_match(cfg, " ".join(settings))
    assert measurement.micro_batches["update"].tokens > 1000          # micro-batches large enough to matter


def test_each_phase_of_a_qwen3_06b_shaped_model_measures_as_planned(tmp_path):
    """Qwen3-0.6B's widths, 4 of its layers (its config alone: random weights, nothing read but config.json), padded
    micro-batches of 512 tokens, 8-bit AdamW: the vocabulary's [tokens, V] head and the [V, H] embedding gradient
    dominate the transients here, the layers' activations in the tiny model."""
    from transformers import Qwen3Config

    Qwen3Config(**QWEN3_06B_WIDTHS).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.path={tmp_path}", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
                             "rollout.max_new_tokens=32", "data.num_eval=0", "optim.micro_batch_tokens=512",
                             "optim.layout=padded", "optim.name=adamw8bit", "algorithm.momentum_dtype=fp32"])
    measurement, plans = assert_phases_match(cfg, "0.6B", steps=1)      # 8-bit AdamW: its state exists from setup
    assert plans["update"].bytes_of("master weights (fp32)") == 4 * parameter_count(QWEN3_06B_WIDTHS)
    assert measurement.phases["update"] > measurement.phases["rollout"] + 2 * GIB     # gradients + head: GiB


def test_plan_measure_prints_planned_against_measured(capsys, tmp_path):
    assert cli(["plan", "--measure", "--steps", "1", "--csv", str(tmp_path / "m.csv"), "algorithm.prompts_per_step=2", "algorithm.group_size=4",
                "data.num_eval=0", "algorithm.momentum_dtype=fp32", "rollout.max_new_tokens=16"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("phase    planned GiB"):].splitlines()
    assert [row.split()[0] for row in table[1:]] == ["load", "rollout", "score", "update", "step"]
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("date,device,model,phase,planned_bytes,measured_bytes")


@pytest.mark.parametrize("args,says", [
    (["--gpu-memory", "inf"], "--gpu-memory inf: must be > 0 and finite (GiB)"),
    (["--gpu-memory", "nan"], "--gpu-memory nan: must be > 0 and finite (GiB)"),
    (["--nodes", "2", "--inter-node-gbps", "inf"], "--inter-node-gbps inf: must be > 0 and finite (Gb/s)"),
    (["--intra-node-gbps", "nan"], "--intra-node-gbps nan: must be > 0 and finite (Gb/s)"),
    (["--steps", "3"], "--steps: only used by a measurement: add --measure"),
    (["--csv", "x.csv", "--steps", "1"], "--steps and --csv: only used by a measurement: add --measure"),
    (["--measure", "--steps", "0"], "--steps 0: must be >= 1"),
    (["--measure", "--steps", "-1"], "--steps -1: must be >= 1"),
    (["--measure", "--gpu-memory", "inf"], "--gpu-memory inf: must be > 0 and finite (GiB)"),
    (["--measure", "--steps", "1", "--csv", "{afile}/x.csv"],
     "--csv {afile}/x.csv: {afile} is a file, not a directory"),
])
def test_bad_flags_fail_before_any_measuring(args, says, tmp_path, capsys, monkeypatch):
    from mgrpo.commands import plan as plan_command

    def measure_phases(*a, **k):
        raise AssertionError("measured before the flags were checked")
    monkeypatch.setattr(plan_command, "measure_phases", measure_phases)
    afile = tmp_path / "afile"
    afile.write_text("")
    args = [a.format(afile=afile) for a in args]
    assert cli(["plan", *args]) == 1, args
    err = capsys.readouterr().err
    assert says.format(afile=afile) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
