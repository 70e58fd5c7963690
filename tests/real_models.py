"""What a real model brings, built in the test: a byte-level BPE tokenizer with Qwen3's chat template, and tiny
random models of two architectures (Qwen3 with tied embeddings, Llama with an untied lm_head).

The tokenizer is trained here with the `tokenizers` library (the kind of tokenizer Qwen3 and Llama 3 ship:
byte-level BPE with merges, special tokens for the chat format), and carries the published Qwen3 chat template
(tests/assets/qwen3_chat_template.jinja, from Qwen/Qwen3-4B-Base's tokenizer_config.json). transformers 5
returns a BatchEncoding from apply_chat_template(tokenize=True): the path real models take.

`chat_sft` teaches a random model, in a few hundred steps, to answer the built-in task through the chat
template, so the models used end to end produce \\boxed{} answers and rewards that differ.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

TEMPLATE = Path(__file__).with_name("assets") / "qwen3_chat_template.jinja"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_bpe_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the built-in task's text, with Qwen3's chat template and special
    tokens (<|im_end|> ends a turn and is the EOS, <|endoftext|> pads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mgrpo.config import PAPER_INSTRUCTION
    from mgrpo.data.tiny import arithmetic_problem

    rng = random.Random(0)
    corpus = [PAPER_INSTRUCTION, "system user assistant think The answer is"]
    for _ in range(2000):
        row = arithmetic_problem(rng)
        corpus += [row["problem"], row["solution"]]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    tokenizer.chat_template = TEMPLATE.read_text()
    return tokenizer


def build_model(architecture: str, tokenizer, seed: int = 0):
    """A tiny random causal LM: "qwen3" (tied embeddings) or "llama" (untied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if architecture == "qwen3":
            model = Qwen3ForCausalLM(Qwen3Config(**common, tie_word_embeddings=True))
        elif architecture == "llama":
            model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
        else:
            raise ValueError(architecture)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def chat_sft(model, tokenizer, steps: int, seed: int = 0) -> float:
    """Supervised steps on the built-in task through the chat template (prompt = template with the generation
    prompt, target = the worked solution and <|im_end|>); returns the last loss."""
    from mgrpo.config import PAPER_INSTRUCTION
    from mgrpo.data.prompts import encode_prompt
    from mgrpo.data.tiny import training_problem

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        rows = [training_problem(rng) for _ in range(16)]
        prompts = [encode_prompt(tokenizer, r["problem"], PAPER_INSTRUCTION, True) for r in rows]
        answers = [tokenizer.encode(r["solution"], add_special_tokens=False) + [tokenizer.eos_token_id] for r in rows]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full_like(ids, -100)
        attention = torch.zeros_like(ids)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
            attention[i, :len(p) + len(a)] = 1
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def save_model(architecture: str, root: Path, sft_steps: int = 0) -> Path:
    """The tokenizer and a tiny model of `architecture` (after `sft_steps` chat SFT steps) as a Hugging Face
    directory, written once per root."""
    path = root / f"{architecture}-bpe-sft{sft_steps}"
    if not (path / "config.json").is_file():
        tokenizer = build_bpe_tokenizer()
        model = build_model(architecture, tokenizer)
        if sft_steps:
            chat_sft(model, tokenizer, sft_steps)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=4096)


QWEN3_06B_PARAMETERS = 596_049_920     # Qwen3-0.6B's parameter count (the tied head counted once)
# Qwen3-0.6B's widths and vocabulary with 4 of its 28 layers: the [V, H] embedding and the [tokens, V] head, the
# parts whose size the tiny model cannot show, are whole; every layer is the same, and the plan's per-layer
# parts are checked where layers dominate (the tiny model). The phases test: 20 s here against 50 s at 28 layers.
QWEN3_06B_WIDTHS = {**QWEN3_06B, "num_hidden_layers": 4}


def save_qwen3_06b(root: Path, shape: dict = QWEN3_06B_WIDTHS, weights: bool = True) -> Path:
    """A random model of Qwen3-0.6B's widths (bf16 files as real checkpoints store) with the BPE tokenizer: for
    checks at a real model's scale (nothing downloaded). weights=False: config and tokenizer only (the plan and
    its verdicts read nothing else)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    path = root / f"qwen3-0.6b-shaped-{shape['num_hidden_layers']}-layers{'' if weights else '-config'}"
    if not (path / "config.json").is_file():
        tokenizer = build_bpe_tokenizer()
        config = Qwen3Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=None)
        if weights:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = Qwen3ForCausalLM(config).to(torch.bfloat16)
            model.save_pretrained(path)
        else:
            config.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def parameter_count(shape: dict) -> int:
    """The parameters transformers itself makes for a Qwen3 of this shape (on the meta device: no memory)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen3ForCausalLM(Qwen3Config(**shape)).parameters())
