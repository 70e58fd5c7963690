"""The collapse monitor, metrics.jsonl on resume, and the metric line."""
import json

from mgrpo.metrics import CollapseMonitor, MetricsLogger, format_metrics_line


def test_collapse_monitor_warns_once_on_the_trailing_mean():
    lines = []
    monitor = CollapseMonitor(log=lines.append, window=3)
    healthy = {"entropy": 1.0, "kl": 0.01, "collapse/unanimous_frac": 0.1, "collapse/momentum_agreement": 0.7}
    assert monitor.observe(1, healthy)["collapse/entropy_ratio"] == 1.0
    monitor.observe(2, {**healthy, "collapse/momentum_agreement": 0.2})     # one noisy step: no warning
    monitor.observe(3, healthy)
    assert lines == []
    for step in range(4, 8):                                                 # the policy drifts from its anchor
        monitor.observe(step, {**healthy, "collapse/momentum_agreement": 0.3})
    assert len(lines) == 1 and "collapse/momentum_agreement" in lines[0] and "step 4" in lines[0]
    assert "a sign of collapse" in lines[0]
    monitor.observe(8, {**healthy, "kl": 0.12})                              # (0.01 + 0.01 + 0.12) / 3 < 0.08
    assert len(lines) == 1
    monitor.observe(9, {**healthy, "kl": 0.12})                              # (0.01 + 0.12 + 0.12) / 3 > 0.08
    assert len(lines) == 2 and lines[1].startswith("[warning] step 9: kl = 0.0833") and "initial model" in lines[1]
    # sharpening alone (entropy ratio 0.3, unanimous groups) is logged, not warned on: healthy runs do it too
    for step in range(10, 20):
        out = monitor.observe(step, {**healthy, "entropy": 0.3, "collapse/unanimous_frac": 0.95})
    assert out["collapse/entropy_ratio"] == 0.3 and len(lines) == 2
    # state round trip (checkpointed): the same warnings are not repeated after a resume
    again = CollapseMonitor.from_state(json.loads(json.dumps(monitor.state())), log=lines.append)
    for step in range(20, 24):
        again.observe(step, {**healthy, "kl": 0.3, "collapse/momentum_agreement": 0.3})
    assert len(lines) == 2
    # SRT has no momentum model: the agreement is None and never warns
    srt = CollapseMonitor(log=lines.append, window=1)
    srt.observe(1, {"entropy": 1.0, "kl": 0.0, "collapse/unanimous_frac": 0.0, "collapse/momentum_agreement": None})
    assert len(lines) == 2


def test_kl_is_watched_only_against_the_initial_model():
    from mgrpo.config import AlgorithmConfig
    assert set(CollapseMonitor.thresholds_for(AlgorithmConfig())) == {"kl", "collapse/momentum_agreement"}
    assert "kl" not in CollapseMonitor.thresholds_for(AlgorithmConfig(kl_coef=0.0))
    assert "kl" not in CollapseMonitor.thresholds_for(AlgorithmConfig(kl_reference="momentum"))
    lines = []
    quiet = CollapseMonitor.from_state(None, lines.append, CollapseMonitor.thresholds_for(AlgorithmConfig(kl_coef=0.0)))
    for step in range(1, 20):
        quiet.observe(step, {"entropy": 1.0, "kl": 0.5, "collapse/momentum_agreement": 0.9})
    assert lines == []


def test_metrics_logger_drops_steps_after_the_resumed_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (0, 1, 2, 3, 4, 5):
        logger.log(step, {"reward": float(step)})
    logger.close()
    MetricsLogger(tmp_path, tensorboard=False, resume_step=3).close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_metrics_line_handles_missing_values():
    line = format_metrics_line(3, 30, {"reward": 0.5, "pseudo_label_accuracy": None, "entropy": 0.25})
    assert line.startswith("step 3/30 reward 0.500 pl_acc - maj -") and "ent 0.250" in line


def test_peak_memory_starts_over_after_reset():
    """setup() resets the peak after building the engine, so peak_memory_gib is the trainer's own: on a CPU
    the kernel's peak-RSS counter (VmHWM) starts over at the current resident set."""
    import torch

    from mgrpo.metrics import peak_memory_gib, process_memory_gib, reset_peak_memory
    cpu = torch.device("cpu")
    block = torch.ones(2**27)                   # 0.5 GiB, touched
    del block
    before = peak_memory_gib(cpu)
    reset_peak_memory(cpu)
    after = peak_memory_gib(cpu)
    assert before - after > 0.4
    assert after <= process_memory_gib(cpu) + 0.05
