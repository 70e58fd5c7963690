"""The embedded default trains from the shipped base model, bit for bit the same on every machine; a damaged one
is refused; any other warm-start settings (or warm_start.remake=true) train their own."""
import dataclasses
import hashlib
import json
import shutil

import pytest

from mgrpo.build import resolve_model_path
from mgrpo.commands import main as cli
from mgrpo.config import load_config
from mgrpo.data import tiny
from mgrpo.distributed import Dist
from mgrpo.errors import TrainingError

# The shipped base's weights (mgrpo/assets/tiny-qwen3-arith/model.safetensors). Changing the base is a decision:
# re-measure the README's figures on the new one (`python -m mgrpo.tiny --ship` writes it and base.json), then
# update this pin.
SHIPPED_WEIGHTS_SHA256 = "adb8f4919632e61672ae5dbb76ab5a8e1d3bec8979e4cd3f3ef35c7a7c7d0a46"


def test_the_default_trains_from_the_shipped_base_whose_hash_is_pinned():
    cfg = load_config(None, [])
    path = resolve_model_path(cfg, Dist(), log=lambda *a: None)
    assert path == str(tiny.SHIPPED_BASE)
    weights = (tiny.SHIPPED_BASE / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == SHIPPED_WEIGHTS_SHA256
    manifest = json.loads((tiny.SHIPPED_BASE / "base.json").read_text())
    assert manifest["sha256"]["model.safetensors"] == SHIPPED_WEIGHTS_SHA256
    # it answers for exactly the default's warm-start settings
    assert manifest["cache_key"] == tiny._cache_key(cfg.warm_start, cfg.data.instruction, 0)
    assert manifest["made_with"]["warm_start"] == {"steps": cfg.warm_start.steps, "batch_size": cfg.warm_start.batch_size,
                                                   "lr": cfg.warm_start.lr}


def test_a_damaged_or_missing_shipped_base_is_refused_clearly(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "base"
    shutil.copytree(tiny.SHIPPED_BASE, copy)
    blob = bytearray((copy / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 1                                          # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(blob))
    monkeypatch.setattr(tiny, "SHIPPED_BASE", copy)
    with pytest.raises(TrainingError, match="shipped base model is damaged: .*model.safetensors has sha256"):
        resolve_model_path(load_config(None, []), Dist(), log=lambda *a: None)
    assert cli(["train", f"run_dir={tmp_path / 'run'}"]) == 1          # one line, no traceback, nothing trained
    err = capsys.readouterr().err
    assert "error: the shipped base model is damaged" in err and "Traceback" not in err
    (copy / "model.safetensors").unlink()
    with pytest.raises(TrainingError, match="has sha256 missing"):
        resolve_model_path(load_config(None, []), Dist(), log=lambda *a: None)


def test_other_settings_or_remake_train_their_own_base(tmp_path, monkeypatch):
    trained = []

    def fake_warm_start(cfg, instruction, seed=0, log=print):
        trained.append(tiny._cache_key(cfg, instruction, seed))
        return tmp_path / "made-here"
    monkeypatch.setattr(tiny, "warm_started_model_dir", fake_warm_start)
    default = load_config(None, [])
    keys = []
    said = {"warm_start.steps=700": "warm_start.steps=700 (the shipped one: 800)",
            "warm_start.lr=1e-3": "warm_start.lr=0.001 (the shipped one: 0.003)",
            "warm_start.batch_size=16": "warm_start.batch_size=16 (the shipped one: 32)",
            "data.instruction=Answer in a box.": "data.instruction='Answer in a box.' (the shipped one: \"Let's think",
            "warm_start.remake=true": "not the shipped base model: warm_start.remake=true"}
    for override, why in said.items():
        trained.clear()
        cfg, lines = load_config(None, [override]), []
        assert resolve_model_path(cfg, Dist(), log=lines.append) == str(tmp_path / "made-here"), override
        assert trained, override
        assert any(line.startswith("[base] not the shipped base model") and why in line for line in lines), lines
        keys.append(trained[0])
    # the cache key tells every such base apart (remake alone keeps the key: it remakes that same base)
    shipped_key = tiny._cache_key(default.warm_start, default.data.instruction, 0)
    assert len(set(keys[:-1] + [shipped_key])) == len(keys) and keys[-1] == shipped_key
    assert tiny._cache_key(default.warm_start, default.data.instruction, 1) != shipped_key          # the seed too
    assert tiny._cache_key(dataclasses.replace(default.warm_start, cache_dir="/elsewhere"),
                           default.data.instruction, 0) == shipped_key                              # not where it lives
