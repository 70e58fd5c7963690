"""Liger-Kernel in the trained models (model.liger): its RoPE under the interpreter on this CPU against the
unpatched model, forward and gradients, for both architectures; its RMSNorm and SwiGLU on a GPU (they do not
run under the interpreter: tests/test_kernels_compile.py compiles them for sm_80/sm_90); the settings' errors."""
import os

import pytest
import torch

from tests.conftest import requires_gpu
from tests.real_models import build_model

pytest.importorskip("liger_kernel")


class Vocab:   # what build_model reads of a tokenizer
    eos_token_id, pad_token_id = 0, 1

    def __len__(self):
        return 96


@pytest.fixture
def restore_transformers(monkeypatch):
    """Liger replaces transformers' rotary function module-wide: put it back after the test."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3 import modeling_qwen3
    for module in (modeling_qwen3, modeling_llama):
        for name in ("apply_rotary_pos_emb", "Qwen3RMSNorm", "Qwen3MLP", "LlamaRMSNorm", "LlamaMLP"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))


def logits_and_grads(model, ids, position_ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    (logits.float().square().mean() + logits.float()[..., 3].sum()).backward()
    return logits.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def runs_plain_pytorch(model) -> bool:
    """Whether `model` would run transformers' own RoPE, RMSNorm and MLP: Liger patches the rotary function in the
    modeling module (module-wide) and the norm and MLP forwards of an instance."""
    import importlib
    modeling = importlib.import_module(type(model).__module__)
    own = [modeling.apply_rotary_pos_emb]
    for module in model.modules():
        if type(module).__name__.endswith(("RMSNorm", "MLP")):
            own.append(module.forward)
    return all(getattr(f, "__module__", "").startswith("transformers") for f in own)


def compare(architecture, device, dtype, atol, **kernels):
    """The unpatched model's logits and gradients, computed first and checked to come from transformers' own ops
    (a module-wide patch would otherwise reach the reference too), against the patched model's."""
    from mgrpo.models.liger import apply_liger
    plain = build_model(architecture, Vocab(), seed=2).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (2, 17), generator=g).to(device)
    positions = torch.cat([torch.arange(9), torch.arange(8)])[None].expand(2, -1).to(device)   # a restart
    assert runs_plain_pytorch(plain), "the reference is patched: a module-wide patch leaked from an earlier test"
    a, ga = logits_and_grads(plain, ids, positions)
    patched = build_model(architecture, Vocab(), seed=2).to(device, dtype)
    apply_liger(patched, **kernels)
    assert not runs_plain_pytorch(patched)                          # Liger's kernels are what runs now
    b, gb = logits_and_grads(patched, ids, positions)
    torch.testing.assert_close(b, a, atol=atol, rtol=atol)
    for name, grad in ga.items():
        torch.testing.assert_close(gb[name], grad, atol=atol, rtol=atol, msg=name)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Liger's RoPE on CPU tensors needs Triton's interpreter (TRITON_INTERPRET=1; a GPU box "
                           "runs the GPU test below instead)")
@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_liger_rope_under_the_interpreter_matches_the_unpatched_model(architecture, restore_transformers):
    compare(architecture, "cpu", torch.float32, 1e-5, rope=True, rms_norm=False, swiglu=False)


def test_liger_settings_are_checked_before_loading(tmp_path):
    from mgrpo.config import ConfigError, load_config
    from mgrpo.errors import TrainingError
    from mgrpo.loop.trainer import train
    from mgrpo.models.liger import LigerError, apply_liger, use_liger
    assert use_liger("auto", torch.device("cpu")) is False and use_liger("false", torch.device("cuda")) is False
    with pytest.raises(LigerError, match="needs a CUDA GPU"):
        use_liger("true", torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.liger"):
        load_config(None, ["model.liger=maybe"])
    assert load_config(None, ["model.liger=true"]).model.liger == "true"
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="model.liger=true needs a CUDA GPU"):
            train(load_config(None, ["model.liger=true", f"run_dir={tmp_path / 'r'}", "rollout.engine=hf"]),
                  log=lambda *a: None)
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(LigerError, match="no kernels for model type 'gpt2'"):
        apply_liger(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_gpu_liger_rmsnorm_rope_swiglu_match_the_unpatched_model(architecture, dtype, atol, restore_transformers):
    compare(architecture, "cuda", dtype, atol, rope=True, rms_norm=True, swiglu=True)
