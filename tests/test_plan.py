"""`mgrpo plan`: the computed parts against the exact bytes the trainer allocates (tiny and Qwen3-0.6B-shaped
models, 1 and 2 CPU ranks), the fit verdict and its suggestions, the one-GPU config, and bad input."""
import json

import pytest

from mgrpo.commands import main as cli
from mgrpo.config import load_config
from mgrpo.plan import GIB, PlanError, check_fits, make_plan
from tests.real_models import save_qwen3_06b

pytestmark = pytest.mark.slow
MEASURED = ("master weights (fp32)", "optimizer state", "momentum model", "KL reference")


def assert_plan_matches(plan, parts: dict, what: str):
    for name in MEASURED:
        planned, measured = plan.bytes_of(name), parts[name]
        assert planned == pytest.approx(measured, rel=0.02, abs=64), f"{what}: {name} planned {planned} measured {measured}"
    assert parts["master weights (fp32)"] > 0


@pytest.fixture(scope="module")
def qwen3_06b(tmp_path_factory):
    return save_qwen3_06b(tmp_path_factory.mktemp("qwen3-0.6b"))


@pytest.mark.parametrize("settings", [["optim.name=adamw", "algorithm.momentum_dtype=fp32"],
                                      ["optim.name=adamw", "algorithm.momentum_dtype=int8"],
                                      ["optim.name=adamw8bit", "algorithm.momentum_dtype=int8"],
                                      ["optim.name=adamw8bit", "algorithm.mode=srt"]])
def test_tiny_model_one_process_matches_the_plan(tiny_cache, tmp_path, settings):
    """One step of the embedded default (torch's AdamW allocates its moments at the first step)."""
    from mgrpo.build import measured_memory
    from mgrpo.loop.trainer import train
    cfg = load_config(None, [f"warm_start.cache_dir={tiny_cache}", "warm_start.steps=150", "warm_start.batch_size=16",
                             f"run_dir={tmp_path / 'run'}", "steps=1", "progress=false", "rollout.engine=hf",
                             "algorithm.prompts_per_step=2", "algorithm.group_size=4", "rollout.max_new_tokens=16",
                             "data.num_eval=0", *settings])
    summary = train(cfg, log=lambda *a: None)
    measured = measured_memory(summary["models"], summary["parts"].optimization.optimizer)
    assert_plan_matches(make_plan(cfg, 1, 80, on_gpu=False), measured, " ".join(settings))


def test_qwen3_06b_shaped_one_process_matches_the_plan(qwen3_06b, tmp_path):
    from tests.plan_worker import measure
    overrides = ["optim.name=adamw8bit", "algorithm.momentum_dtype=int8"]
    result = measure(str(qwen3_06b), tmp_path, overrides)
    cfg = load_config(None, [f"model.path={qwen3_06b}", *overrides])
    assert_plan_matches(make_plan(cfg, 1, 80, on_gpu=False), result["parts"], "0.6B, 1 process")
    assert result["parts"]["master weights (fp32)"] == pytest.approx(4 * 596_049_920, rel=0.01)


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


def test_train_refuses_a_config_that_does_not_fit_before_loading_weights(qwen3_06b, tmp_path, monkeypatch):
    from mgrpo import build
    from mgrpo.errors import TrainingError
    from mgrpo.loop.trainer import train

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(build, "load_policy", no_weights)
    cfg = load_config(None, [f"model.path={qwen3_06b}", f"run_dir={tmp_path / 'run'}", "plan.gpu_memory_gib=20",
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
    """Qwen3-0.6B's shapes (its config alone: random weights, nothing saved or read but config.json), padded
    micro-batches of 512 tokens, 8-bit AdamW: the vocabulary's [tokens, V] head and the [V, H] embedding gradient
    dominate the transients here, the layers' activations in the tiny model."""
    from transformers import Qwen3Config

    from tests.real_models import QWEN3_06B
    Qwen3Config(**QWEN3_06B).save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.path={tmp_path}", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
                             "rollout.max_new_tokens=32", "data.num_eval=0", "optim.micro_batch_tokens=512",
                             "optim.layout=padded", "optim.name=adamw8bit", "algorithm.momentum_dtype=fp32"])
    measurement, plans = assert_phases_match(cfg, "0.6B", steps=1)      # 8-bit AdamW: its state exists from setup
    assert plans["update"].bytes_of("master weights (fp32)") == pytest.approx(4 * 596_049_920, rel=0.01)
    assert measurement.phases["update"] > measurement.phases["rollout"] + 2 * GIB     # gradients + head: GiB


def test_plan_measure_prints_planned_against_measured(capsys, tmp_path):
    assert cli(["plan", "--measure", "--steps", "1", "--csv", str(tmp_path / "m.csv"), "algorithm.prompts_per_step=2", "algorithm.group_size=4",
                "data.num_eval=0", "algorithm.momentum_dtype=fp32", "rollout.max_new_tokens=16"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("phase    planned GiB"):].splitlines()
    assert [row.split()[0] for row in table[1:]] == ["load", "rollout", "score", "update", "step"]
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("date,device,model,phase,planned_bytes,measured_bytes")
