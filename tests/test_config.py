import re

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
    with pytest.raises(ConfigError, match="algorithm: expected a mapping, got int"):
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


@pytest.mark.parametrize("override,message", [
    ("data.instruction=true", "data.instruction=true: expected text, got true/false"),
    ("data.source=[a]", "data.source=['a']: expected text, got a list"),
    ("run_dir={a: 1}", "run_dir={'a': 1}: expected text, got a mapping"),
    ("eval.pass_k=abc", "eval.pass_k='abc': expected a list of integers, e.g. [1, 4]"),
    ("eval.pass_k=5", "eval.pass_k=5: expected a list of integers, e.g. [1, 4]"),
    ("eval.pass_k=[1, 2.5]", "eval.pass_k=[1, 2.5]: expected a list of integers"),
    ("optim.betas=0.9", "optim.betas=0.9: expected a list of numbers, e.g. [0.9, 0.999]"),
    ("seed=-1", "seed=-1: must be in [0, 2**32)"),
    (f"seed={2 ** 32}", f"seed={2 ** 32}: must be in [0, 2**32)"),
    ("eval.seed=-1", "eval.seed=-1: must be in [0, 2**32)"),
    ("optim.lr=inf", "optim.lr='inf': expected a finite number"),
    ("optim.lr=.nan", "optim.lr=nan: expected a finite number"),
    ("plan.gpu_memory_gib=.inf", "plan.gpu_memory_gib=inf: expected a finite number"),
])
def test_wrongly_typed_values_are_config_errors_on_the_command_line(override, message, capsys):
    """A wrong type or an impossible number is one `error:` line naming the setting, before any run starts."""
    from mgrpo.commands import main
    with pytest.raises(ConfigError) as raised:
        load_config(None, [override])
    assert str(raised.value) == message or str(raised.value).startswith(message)
    assert main(["train", override]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mgrpo train: error: {message}") and "Traceback" not in err


def test_numbers_given_for_text_settings_are_their_text(tmp_path):
    """run_dir=123 means the directory "123"; YAML reads it as a number."""
    cfg = load_config(None, ["data.source=123", "run_dir=123", "resume_from=5", "warm_start.cache_dir=5"])
    assert (cfg.data.source, cfg.run_dir, cfg.resume_from, cfg.warm_start.cache_dir) == ("123", "123", "5", "5")
    path = tmp_path / "c.yaml"
    path.write_text('eval:\n  pass_k: "1,4"\n')
    with pytest.raises(ConfigError, match=r"eval.pass_k='1,4': expected a list of integers"):
        load_config(str(path))


@pytest.mark.parametrize("override, said", [
    ("eval.k=null", "eval.k is given no value: give it one (eval.k=<value>)"),
    ("steps=", "steps is given no value: give it one (steps=<value>)"),       # the checks said "'>=' not supported"
    ("data.instruction=", "for empty text, data.instruction=\"''\""),      # was None: prompts began "None"
])
def test_an_empty_value_names_the_setting(override, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(None, [override])
    assert load_config(None, ["data.instruction=''"]).data.instruction == ""


def test_an_empty_value_in_a_config_file_names_the_setting(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  group_size:\n")
    with pytest.raises(ConfigError, match=re.escape("algorithm.group_size is given no value")):
        load_config(str(path))


def test_a_config_file_that_is_not_utf8(tmp_path, capsys):
    from mgrpo.commands import main
    path = tmp_path / "latin1.yaml"
    path.write_bytes("steps: 3  # r\xe9sum\xe9\n".encode("latin-1"))
    assert main(["plan", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"error: config file {path} is not UTF-8 text (byte 13" in err and "Traceback" not in err


@pytest.mark.parametrize("what", ["an empty directory", "a run directory"])
def test_a_model_path_directory_that_is_not_a_model_says_so(what, tmp_path, capsys):
    """A directory without config.json (transformers would ask for sentencepiece or tiktoken); a run's directory
    points to its final/ model."""
    from mgrpo.commands import main
    directory = tmp_path / "d"
    (directory / "final").mkdir(parents=True)
    if what == "a run directory":
        (directory / "final" / "config.json").write_text("{}")
    assert main(["train", f"model.path={directory}", f"run_dir={tmp_path / 'run'}", "rollout.engine=hf",
                 "progress=false"]) == 1
    err = capsys.readouterr().err
    assert f"model.path={directory} is a directory without config.json, not a model" in err and "Traceback" not in err
    assert (f"model.path={directory / 'final'}" in err) == (what == "a run directory")
    assert "sentencepiece" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", ["/nonexistent/model", "./models/x", "~/no-such-model-dir", "models/qwen/x"])
def test_a_local_model_path_that_is_not_there_says_so_before_the_hub(path, tmp_path, capsys, monkeypatch):
    import transformers

    from mgrpo.commands import main
    from mgrpo.models.loading import check_model_path

    def from_pretrained(*args, **kwargs):
        raise AssertionError("asked the hub")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    assert main(["train", f"model.path={path}", f"run_dir={tmp_path / 'run'}", "rollout.engine=hf",
                 "progress=false"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mgrpo train: error: model.path={path}: no such directory") and "Traceback" not in err
    check_model_path("Qwen/Qwen3-4B")        # a hub name goes on to transformers, as before
