"""The embedded default's warm start trains the same base model on every machine (pinned numerics)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WARM_START = """
import hashlib, sys, torch
from safetensors.torch import load_file
from mgrpo.config import load_config
from mgrpo.data.tiny import warm_started_model_dir
cfg = load_config(None, [f"warm_start.cache_dir={sys.argv[1]}", "warm_start.steps=12", "warm_start.batch_size=8"])
path = warm_started_model_dir(cfg.warm_start, cfg.data.instruction, seed=0, log=lambda *a: None)
weights = load_file(str(path / "model.safetensors"))
print(hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest())
"""


def warm_start_under(env_overrides: dict, cache: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", WARM_START, str(cache)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_same_base_model_whatever_the_machines_instruction_set(tmp_path):
    """Two parents that run PyTorch and MKL on different instruction sets (as two machines do; measured: such a
    difference alone changed the trained model) get bit-identical warm-started weights, because the warm start
    runs in a child process whose numerics are pinned (mgrpo.tiny.PINNED_NUMERICS)."""
    a = warm_start_under({"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"},
                         tmp_path / "a")
    b = warm_start_under({"OMP_NUM_THREADS": "2"}, tmp_path / "b")
    assert a == b


def test_pinning_is_what_makes_it_reproducible():
    """The premise, checked: the same training in processes on different instruction sets differs unpinned."""
    script = """
import hashlib, torch
from mgrpo.config import load_config
from mgrpo.data.tiny import build_tiny_model, build_tokenizer, supervised_warm_start
cfg = load_config(None, ["warm_start.steps=6", "warm_start.batch_size=8"])
tok = build_tokenizer(); model = build_tiny_model(tok, 0)
supervised_warm_start(model, tok, cfg.warm_start, cfg.data.instruction, 0, log=lambda *a: None)
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest())
"""
    digests = set()
    for capability in ("default", "avx2"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.add(proc.stdout.strip().splitlines()[-1])
    assert len(digests) == 2
