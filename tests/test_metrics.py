"""The collapse monitor, metrics.jsonl on resume, and the metric line."""
import json

from mgrpo.metrics import CollapseMonitor, MetricsLogger, format_metrics_line


def test_collapse_monitor_warns_once_on_the_trailing_mean():
    lines = []
    monitor = CollapseMonitor(log=lines.append, window=3)
    healthy = {"entropy": 1.0, "kl": 0.01, "collapse/unanimous_frac": 0.1, "collapse/momentum_agreement": 0.7}
    assert monitor.observe(1, healthy)["collapse/entropy_ratio"] == 1.0
    monitor.observe(2, {**healthy, "collapse/momentum_agreement": 0.0})     # one noisy step: no warning
    monitor.observe(3, healthy)                                              # (0.7 + 0.0 + 0.7) / 3 > 0.3
    assert lines == []
    for step in range(4, 8):                                                 # the policy drifts from its anchor
        monitor.observe(step, {**healthy, "collapse/momentum_agreement": 0.1})   # (0.0 + 0.7 + 0.1) / 3 < 0.3
    assert len(lines) == 1 and "collapse/momentum_agreement" in lines[0] and "step 4" in lines[0]
    assert "a sign of collapse" in lines[0]
    monitor.observe(8, {**healthy, "kl": 0.27})                              # (0.01 + 0.01 + 0.27) / 3 < 0.1
    assert len(lines) == 1
    monitor.observe(9, {**healthy, "kl": 0.27})                              # (0.01 + 0.27 + 0.27) / 3 > 0.1
    assert len(lines) == 2 and lines[1].startswith("[warning] step 9: kl = 0.183") and "initial model" in lines[1]
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
    assert set(CollapseMonitor.thresholds_for(AlgorithmConfig())) == {"kl", "collapse/momentum_agreement",
                                                                       "collapse/family_length_ratio"}
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
    the kernel's peak-RSS counter (VmHWM) starts over at the current resident set. In a fresh interpreter: in a
    pytest worker that had run an in-process vLLM engine, the freed block stayed resident (peak = current, a
    failure that was the worker's history, not the reset)."""
    import subprocess
    import sys
    program = """
import torch
from mgrpo.metrics import peak_memory_gib, process_memory_gib, reset_peak_memory
cpu = torch.device("cpu")
block = torch.ones(2**27)                   # 0.5 GiB, touched
del block
before = peak_memory_gib(cpu)
reset_peak_memory(cpu)
after = peak_memory_gib(cpu)
print(before, after, process_memory_gib(cpu))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after, now = map(float, done.stdout.split())
    assert before - after > 0.4
    assert after <= now + 0.05


def test_family_length_ratio_compares_each_familys_last_window_with_its_first():
    """collapse/family_length_ratio: per family, the mean response length over its last `window` steps / over its
    first `window` (a step holds only some families); the lowest family's; warned on below 0.65, as it is (it is a
    trailing mean already)."""
    lines = []
    monitor = CollapseMonitor(log=lines.append, window=2)
    steps = [{"family/3-term/mean_length": 30.0, "family/5-term/mean_length": 40.0},
             {"family/3-term/mean_length": 34.0},                              # 3-term full: start 32
             {"family/5-term/mean_length": 44.0},                              # 5-term full: start 42
             {"family/3-term/mean_length": 32.0, "family/5-term/mean_length": 20.0},   # 5-term (44 + 20) / 2 = 32
             {"family/3-term/mean_length": 32.0}]                              # 5-term absent: still 32 / 42
    ratios = [monitor.observe(i, {"entropy": 0.1, **r})["collapse/family_length_ratio"] for i, r in enumerate(steps, 1)]
    assert ratios[0] is None and ratios[1] == 1.0 and ratios[2] == 1.0
    assert ratios[3] == ratios[4] == 32.0 / 42.0
    assert lines == []                                                      # 32 / 42 = 0.76: above 0.65
    # checkpointed: a resumed monitor keeps each family's start, and its window
    again = CollapseMonitor.from_state(json.loads(json.dumps(monitor.state())), log=lines.append)
    assert again.observe(6, {"entropy": 0.1, "family/5-term/mean_length": 26.0})["collapse/family_length_ratio"] \
        == (20.0 + 26.0) / 2 / 42.0                                          # 0.548: below 0.65
    assert len(lines) == 1 and lines[0].startswith("[warning] step 6: collapse/family_length_ratio = 0.548")
    assert "shorter answers" in lines[0]
    # data without families: nothing to compare
    assert CollapseMonitor(window=1).observe(1, {"entropy": 0.1})["collapse/family_length_ratio"] is None


def test_plot_to_a_path_that_cannot_be_written_is_an_error(tmp_path, capsys):
    from mgrpo.commands import main
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["plot", str(tmp_path), "--out", str(afile / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mgrpo plot: error: cannot write the plot to {afile / 'x.png'} (Not a directory)")
    assert "Traceback" not in err


def test_plot_into_an_existing_directory_writes_inside_it_and_prints_the_file(tmp_path, capsys):
    """matplotlib saves --out DIR as DIR.png beside it (and a name without a suffix with .png added): the plot goes
    where the printed path says."""
    from mgrpo.commands import main
    run = tmp_path / "run-7"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    plots = tmp_path / "plots"
    plots.mkdir()
    assert main(["plot", str(run), "--out", str(plots)]) == 0
    assert capsys.readouterr().out.strip() == str(plots / "run-7.png")
    assert (plots / "run-7.png").is_file() and not (tmp_path / "plots.png").exists()
    assert main(["plot", str(run), "--out", str(tmp_path / "curves")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").is_file()
