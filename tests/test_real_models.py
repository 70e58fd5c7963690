"""Real models, not only the tiny character-level one: a byte-level BPE tokenizer with Qwen3's chat template,
and two architectures (Qwen3 with tied embeddings, Llama with an untied lm_head), through training, evaluation
and the checkpoint sweep, on both engines and on 2 FSDP2 ranks (tests/real_models.py builds them).
"""
import json

import pytest
import torch

from mgrpo.commands import main as cli
from mgrpo.config import PAPER_INSTRUCTION, load_config
from mgrpo.data.prompts import check_prompt_ids, encode_prompt
from mgrpo.errors import DataError
from mgrpo.loop.trainer import train
from tests.real_models import build_bpe_tokenizer, save_model

pytestmark = pytest.mark.slow
ARCHITECTURES = ["qwen3", "llama"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> a chat-SFT'd tiny model (answers in \\boxed{} through the template); "random" -> an untrained one."""
    root = tmp_path_factory.mktemp("real-models")
    out = {arch: save_model(arch, root, sft_steps=150) for arch in ARCHITECTURES}
    out["random"] = save_model("qwen3", root, sft_steps=0)
    return out


def config(model, run_dir, *overrides):
    return load_config(None, [
        f"model.path={model}", "model.use_chat_template=true", f"run_dir={run_dir}", "steps=2", "progress=false",
        "log_every=0", "algorithm.prompts_per_step=4", "algorithm.group_size=4", "rollout.max_new_tokens=40",
        "data.num_eval=4", "eval.k=2", "optim.lr=1e-3", "optim.warmup_steps=0", "save_every=1", *overrides])


# ---------------------------------------------------------------------------------------------------------
# Prompts

def test_chat_template_prompt_is_token_ids_of_the_chatml_text():
    """transformers 5's apply_chat_template(tokenize=True) returns a BatchEncoding, whose list() is its keys:
    the prompt must come back as the conversation's token ids."""
    tokenizer = build_bpe_tokenizer()
    ids = encode_prompt(tokenizer, "Compute 3 + 4.", PAPER_INSTRUCTION, True)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    check_prompt_ids(ids, len(tokenizer), "test")
    assert tokenizer.decode(ids) == (f"<|im_start|>system\n{PAPER_INSTRUCTION}<|im_end|>\n"
                                     "<|im_start|>user\nCompute 3 + 4.<|im_end|>\n<|im_start|>assistant\n")
    plain = encode_prompt(tokenizer, "Compute 3 + 4.", PAPER_INSTRUCTION, False)
    assert tokenizer.decode(plain) == f"{PAPER_INSTRUCTION}\nCompute 3 + 4.\n"


def test_prompt_ids_are_checked_before_generation():
    with pytest.raises(DataError, match="did not return a list of token ids"):
        check_prompt_ids(["input_ids", "attention_mask"], 100, "m")
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        check_prompt_ids([1, 2, 500], 100, "m")
    with pytest.raises(DataError, match="did not return a list"):
        check_prompt_ids([], 100, "m")
    from mgrpo.data.tiny import build_tokenizer
    with pytest.raises(DataError, match="has none"):           # the chat template asked of a tokenizer without
        encode_prompt(build_tokenizer(), "Compute 1 + 1.", "x", True)


def test_a_tokenizer_of_another_model_is_refused_before_any_weights(models, tmp_path):
    """A model directory whose tokenizer gives ids beyond the model's vocabulary: a clear error at setup."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(models["qwen3"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 50
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        train(config(bad, tmp_path / "run", "rollout.engine=hf"), log=lambda *a: None)


# ---------------------------------------------------------------------------------------------------------
# Training, evaluation and the sweep, both architectures, both engines

@pytest.mark.parametrize("engine", ["hf", "vllm"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_train_eval_and_sweep(models, tmp_path, arch, engine, capsys):
    if engine == "vllm":
        pytest.importorskip("vllm")
    run_dir = tmp_path / "run"
    # vLLM eager here (no torch.compile: 2-4 s to build, not 10-40 s); the compiled path is tested where the
    # pushed weights are checked token for token (test_vllm_engine.py) and in the user's first run (test_train_e2e)
    summary = train(config(models[arch], run_dir, f"rollout.engine={engine}", "rollout.enforce_eager=true"),
                    log=lambda *a: None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert max(r["no_answer_frac"] for r in steps) < 0.5      # the model answers through the template
    assert summary["before"]["no_answer_frac"] < 0.5
    run = summary["models"]
    if engine == "vllm":   # vLLM's own list of what it loaded covered every parameter of its model
        assert ("lm_head.weight" in summary["parts"].engine.loaded_names) == (arch == "llama")
        assert summary["parts"].engine.llm.llm_engine.model_config.enforce_eager      # the setting reached vLLM
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    assert exported.config.tie_word_embeddings == (arch == "qwen3")
    for name, param in run.policy.hf_named_parameters():
        torch.testing.assert_close(exported.get_parameter(name), param.detach().float(), rtol=0, atol=0, msg=name)
    if arch == "llama":   # untied: the head trained on its own
        assert not torch.equal(exported.lm_head.weight, exported.model.embed_tokens.weight)

    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Compute {a} + {b}.", "answer": str(a + b)}) + "\n"
                            for a, b in ((1, 2), (3, 4), (5, 1))))
    capsys.readouterr()
    assert cli(["eval", str(models[arch]), "--data", str(data), "--chat-template", "--k", "2", "--engine", engine,
                "--enforce-eager", "--max-new-tokens", "40", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"][0]
    assert result["problems"] == 3 and result["no_answer_frac"] < 0.5
    assert cli(["eval", str(run_dir), "--all-checkpoints", "--engine", engine, "--enforce-eager",
                "--out", str(tmp_path / "sweep")]) == 0
    sweep = (tmp_path / "sweep" / "accuracy_vs_step.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in sweep[1:] if "[" not in line.split(",")[1]] == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------------------
# Responses without answers

def test_no_answer_warning_in_training(models, tmp_path):
    """An untrained model writes no \\boxed{}: one warning, at the first such step, showing a response and
    naming the settings to change."""
    lines = []
    train(config(models["random"], tmp_path / "run", "rollout.engine=hf", "data.num_eval=0"), log=lines.append)
    warnings = [line for line in lines if "have no answer" in line]
    assert len(warnings) == 1 and warnings[0].startswith("[warning] step 1: 100% of the responses")
    for setting in ("data.instruction", "model.use_chat_template=true", "rollout.max_new_tokens",
                    "data.answer_format=math_verify", "One of them: '"):
        assert setting in warnings[0], setting


def test_no_answer_warning_in_evaluation(models, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "Compute 1 + 2.", "answer": "3"}) + "\n")
    assert cli(["eval", str(models["random"]), "--data", str(data), "--chat-template", "--k", "2", "--engine", "hf",
                "--max-new-tokens", "16", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert out.count("have no answer") == 1 and "--instruction" in out and "--answer-format=math_verify" in out


def test_eval_default_budget_fits_the_model(models, tmp_path, capsys):
    """The default budget (3072 new tokens) does not fit a 512-position model: it is cut to what fits, said
    in one line; an explicit budget that does not fit stays an error."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "Compute 1 + 2.", "answer": "3"}) + "\n")
    capsys.readouterr()
    assert cli(["eval", str(models["qwen3"]), "--data", str(data), "--chat-template", "--k", "1", "--engine", "hf",
                "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "the default budget of 3072 new tokens does not fit this model" in out
    budget = json.loads((tmp_path / "e" / "eval.json").read_text())["benchmarks"]["d"]["max_new_tokens"]
    prompt = len(encode_prompt(build_bpe_tokenizer(), "Compute 1 + 2.", PAPER_INSTRUCTION, True))
    assert budget == 512 - prompt
    assert cli(["eval", str(models["qwen3"]), "--data", str(data), "--chat-template", "--engine", "hf",
                "--max-new-tokens", "3072", "--out", str(tmp_path / "e2")]) == 1
    assert f"pass --max-new-tokens {512 - prompt} or less" in capsys.readouterr().err


def test_llama_with_chat_template_on_two_fsdp2_ranks(models, tmp_path):
    """The untied architecture through FSDP2 on 2 gloo ranks (one engine per rank, vLLM where installed), in the
    GPU's bf16 mixed precision, to the end; the export holds the trained, untied head."""
    from tests.test_distributed import torchrun
    run_dir = tmp_path / "run"
    torchrun("-m", "mgrpo", "train", f"model.path={models['llama']}", "model.use_chat_template=true",
             f"run_dir={run_dir}", "steps=2", "algorithm.prompts_per_step=4", "algorithm.group_size=4",
             "rollout.max_new_tokens=40", "data.num_eval=3", "eval.k=2", "progress=false", "optim.lr=1e-3",
             "model.precision=bf16", "rollout.enforce_eager=true")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and max(r["no_answer_frac"] for r in steps) < 0.5
    from transformers import AutoModelForCausalLM
    before = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    after = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
    assert not torch.equal(after.lm_head.weight, after.model.embed_tokens.weight)
