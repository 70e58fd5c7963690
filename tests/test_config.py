import pytest

from mgrpo.config import ConfigError, load_config, save_config


def test_defaults_and_derived_values():
    cfg = load_config()
    assert cfg.algorithm.momentum_samples == cfg.algorithm.group_size // 4
    assert cfg.algorithm.iqr_filter is True
    srt = load_config(None, ["algorithm.mode=srt"])
    assert srt.algorithm.momentum_samples == 0 and srt.algorithm.iqr_filter is False


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  group_size: 16\noptim:\n  lr: 1.0e-6\n")
    cfg = load_config(str(path), ["algorithm.group_size=12", "steps=7", "optim.betas=[0.8, 0.9]"])
    assert cfg.algorithm.group_size == 12 and cfg.optim.lr == 1e-6 and cfg.steps == 7 and cfg.optim.betas == (0.8, 0.9)
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == cfg


def test_paper_config_loads():
    from pathlib import Path
    cfg = load_config(str(Path(__file__).parents[1] / "configs" / "qwen3_4b.yaml"))
    a = cfg.algorithm
    assert (a.prompts_per_step, a.group_size, a.momentum_samples) == (8, 32, 8)
    assert (a.momentum, a.iqr_k, a.kl_coef, cfg.rollout.temperature, cfg.optim.lr) == (0.99, 0.75, 0.005, 1.1, 1e-6)


@pytest.mark.parametrize("override,fragment", [
    ("algorithm.group_size=1", "G must be >= 2"),
    ("algorithm.momentum_samples=16", "N must satisfy"),
    ("algorithm.momentum=1.0", "m must be in [0, 1)"),
    ("algorithm.momentum=-0.1", "m must be in [0, 1)"),
    ("algorithm.iqr_k=-1", "k must be >= 0"),
    ("algorithm.group_sise=4", "did you mean algorithm.group_size"),
    ("nonsense=1", "unknown config key nonsense"),
    ("algorithm.loss_agg=sum", "token_mean or seq_mean"),
    ("rollout.temperature=0", "must be > 0"),
    ("algorithm.momentum_dtype=int4", "fp32 or int8"),
])
def test_invalid_values_name_the_setting(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_srt_rejects_momentum_settings():
    with pytest.raises(ConfigError, match="momentum_samples=0"):
        load_config(None, ["algorithm.mode=srt", "algorithm.momentum_samples=2"])
    with pytest.raises(ConfigError, match="iqr_filter=false"):
        load_config(None, ["algorithm.mode=srt", "algorithm.iqr_filter=true"])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["algorithm.group_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_yaml_that_does_not_parse_or_is_not_a_mapping(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("algorithm:\n  group_size: [16\noptim: {}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML \(line \d+, column \d+\)"):
        load_config(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- algorithm\n- optim\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections.*holds a list"):
        load_config(str(listing))
    section = tmp_path / "section.yaml"
    section.write_text("algorithm: 16\n")
    with pytest.raises(ConfigError, match="algorithm.: expected a mapping, got int"):
        load_config(str(section))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config(str(empty)) == load_config()


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    from mgrpo.commands import main
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [\n")
    assert main(["train", "--config", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mgrpo train: error: config file") and "Traceback" not in err


def test_eval_settings():
    cfg = load_config(None, ["eval.k=4", "eval.n=16", "eval.pass_k=[1,4,16]"])
    assert cfg.eval.num_samples == 16 and cfg.eval.pass_k == [1, 4, 16]
    assert load_config(None, ["eval.k=4"]).eval.num_samples == 4
    for override, fragment in (("eval.k=0", "k >= 1"), ("eval.n=2", "n >= k"), ("eval.pass_k=[9]", "pass_k"),
                               ("eval.top_p=0", "top_p")):
        with pytest.raises(ConfigError, match=fragment):
            load_config(None, [override])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(capsys):
    from mgrpo.commands import main as cli
    with pytest.raises(ConfigError, match="device=cuda but no CUDA device"):
        load_config(None, ["device=cuda"])
    assert cli(["train", "device=cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mgrpo train: error: device=cuda") and "Traceback" not in err
