"""The embedded default: a tiny Qwen3-architecture model, a character tokenizer and a built-in arithmetic task.

Everything is built here, nothing is downloaded. The model is a normal Hugging Face directory (config.json,
model.safetensors, tokenizer.json), so transformers and vLLM both load it. A short supervised warm start on
worked solutions brings it to answering part of the held-out problems correctly.

The base model the default trains from is shipped with the package (mgrpo/data/assets/tiny-qwen3-arith: 3.2 MB of
fp32 safetensors, their sha256 in base.json, verified on every use): a warm start is 800 steps of floating
point on the CPU, and CPUs round differently (the same code and settings gave different base models on AMD and
Intel machines, pinned numerics and all: measured), so shipping the result is the only way every machine
starts from the same model. The warm start below is how it was made, and what runs for any other warm-start
settings (or warm_start.remake=true): trained in a child process with pinned numerics, cached under
warm_start.cache_dir, keyed by everything that determines it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..config import WarmStartConfig
from ..errors import MgrpoError
from ..storage.run_dir import file_sha256
from .prompts import format_prompt

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Every printable ASCII character and the newline: any prompt or answer of the task can be encoded.
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]

TINY_MODEL_CONFIG = dict(
    vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=10000.0,
    tie_word_embeddings=True, rms_norm_eps=1e-6, torch_dtype="float32",
)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer

def build_tokenizer():
    """A character-level PreTrainedTokenizerFast (tokenizers WordLevel model, one token per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([EOS_TOKEN, PAD_TOKEN] + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                        clean_up_tokenization_spaces=False)
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**TINY_MODEL_CONFIG, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------------
# Built-in task: multi-step integer arithmetic with worked steps

def arithmetic_problem(rng: random.Random, num_terms_choices: tuple = (3, 4)) -> dict:
    """One problem of 3 or 4 terms (or one of `num_terms_choices`) with a worked solution that adds its signed
    terms in a random order.

    'Compute 7 + 8 - 9.' -> '8 - 9 = -1. -1 + 7 = 6. \\boxed{6}' (or any of the other 5 orders).

    Several routes lead to the same answer, and a tiny model's mistakes differ from route to route: so the
    answer most sampled routes agree on is right more often than the single greedy route. That is the regime
    in which a majority vote is a useful label (self-consistency), which label-free RL needs in order to
    help at all; with one fixed route the vote was less accurate than greedy decoding (measured: see
    README, "The embedded default"). Single-digit operands keep the table of facts small enough for a
    tiny model to learn in minutes.
    """
    num_terms = rng.choice(num_terms_choices)
    terms = [rng.randint(1, 9)] + [rng.choice((1, -1)) * rng.randint(1, 9) for _ in range(num_terms - 1)]
    expression = str(terms[0]) + "".join(f" {'+' if t > 0 else '-'} {abs(t)}" for t in terms[1:])
    order = terms[:]
    rng.shuffle(order)
    value, steps = order[0], []
    for term in order[1:]:
        new_value = value + term
        steps.append(f"{value} {'+' if term > 0 else '-'} {abs(term)} = {new_value}.")
        value = new_value
    return {"problem": f"Compute {expression}.", "solution": " ".join(steps) + f" \\boxed{{{value}}}",
            "answer": str(value), "family": f"{num_terms}-term"}


def is_held_out(problem: str) -> bool:
    """About one problem in ten is held out, by a hash of its text: never trained on (supervised or RL),
    whatever the seed, so held-out accuracy measures generalisation to unseen problems."""
    return int(hashlib.sha256(problem.encode()).hexdigest()[:8], 16) % 10 == 0


def training_problem(rng: random.Random, num_terms_choices: tuple = (3, 4)) -> dict:
    """A problem that is not held out (drawn again until so)."""
    while True:
        row = arithmetic_problem(rng, num_terms_choices)
        if not is_held_out(row["problem"]):
            return row


# The held-out set is one fixed list of distinct problems, the same for every seed, so that runs with
# different seeds start from the same measured accuracy.
HELD_OUT_SEED = 1_000_003


def held_out_dataset(num: int, num_terms_choices: tuple = (3, 4)) -> list:
    rng, rows, seen = random.Random(HELD_OUT_SEED), [], set()
    while len(rows) < num:
        row = arithmetic_problem(rng, num_terms_choices)
        if is_held_out(row["problem"]) and row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Supervised warm start, cached

def _cache_key(cfg: WarmStartConfig, instruction: str, seed: int) -> str:
    # "task" versions the warm-start code and data: bump it whenever they change, so that a model cached by an
    # older version is never reused (6: trained in a child process with pinned numerics, the same model on
    # every x86-64 machine with AVX2; 5 was one machine's).
    blob = json.dumps({"model": TINY_MODEL_CONFIG, "chars": CHARACTERS, "steps": cfg.steps, "bs": cfg.batch_size,
                       "lr": cfg.lr, "instruction": instruction, "seed": seed, "task": 6}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The warm start's numerics, pinned so that every machine trains the same base model (measured: the same
# seed and code gave different models on CPUs with and without AVX-512, because PyTorch's vectorized kernels
# and MKL's GEMMs pick their instruction set at run time; the thread count changed nothing here). AVX2 is what
# x86-64 CPUs of the last decade share: PyTorch's kernels are capped at it (ATEN_CPU_CAPABILITY) and MKL runs
# its AVX2 branch in strict conditional-numerical-reproducibility mode (MKL_CBWR), at about 4% of the speed.
# Both are read when torch loads, so the warm start runs in a child process. CPUs without AVX2 (ARM) still
# train a good base model, but not this exact one.
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "OMP_NUM_THREADS": "2"}


SHIPPED_BASE = Path(__file__).resolve().parent / "assets" / "tiny-qwen3-arith"
SHIPPED_MANIFEST = "base.json"


class BaseModelError(MgrpoError, RuntimeError):
    """The shipped base model is missing or damaged; the message says how to get a good one."""


def shipped_manifest(root: Optional[Path] = None) -> dict:
    """base.json of the shipped base: the warm-start cache key it answers for, each file's sha256, how it was
    made."""
    path = Path(root or SHIPPED_BASE) / SHIPPED_MANIFEST
    if not path.is_file():
        raise BaseModelError(f"the shipped base model is missing ({path}): reinstall mgrpo (pip install -e .), or "
                             "set warm_start.remake=true to train one here (about 10 minutes on 2 cores)")
    return json.loads(path.read_text())


def verify_shipped_base(root: Optional[Path] = None) -> None:
    """Every file base.json lists, with its recorded sha256 (3.2 MB: milliseconds)."""
    root = root or SHIPPED_BASE
    manifest = shipped_manifest(root)
    for name, expected in manifest["sha256"].items():
        path = Path(root) / name
        found = file_sha256(path) if path.is_file() else "missing"
        if found != expected:
            raise BaseModelError(f"the shipped base model is damaged: {path} has sha256 {found}, base.json says "
                                 f"{expected}. Restore it (git checkout -- {Path(root).name}, or reinstall mgrpo), "
                                 "or set warm_start.remake=true to train one here")


def base_model_dir(cfg: WarmStartConfig, instruction: str, seed: int = 0, log=print) -> Path:
    """The embedded default's base model: the shipped one when these are the settings it was made with (and
    warm_start.remake is off), verified against its sha256; else a warm start with these settings (cached)."""
    if not cfg.remake and shipped_manifest()["cache_key"] == _cache_key(cfg, instruction, seed):
        verify_shipped_base()
        log(f"[base] the shipped base model {SHIPPED_BASE} (sha256 verified)")
        return SHIPPED_BASE
    log(f"[base] not the shipped base model: {why_not_shipped(cfg, instruction)}")
    return warm_started_model_dir(cfg, instruction, seed, log)


def why_not_shipped(cfg: WarmStartConfig, instruction: str) -> str:
    """Which setting moved the embedded default off the shipped base (a warm start of minutes on a laptop): the
    warm start's own, or data.instruction, which the base model was trained to follow."""
    if cfg.remake:
        return "warm_start.remake=true"
    made = shipped_manifest()["made_with"]
    now = {f"warm_start.{k}": getattr(cfg, k) for k in made["warm_start"]}
    now["data.instruction"] = instruction
    was = {**{f"warm_start.{k}": v for k, v in made["warm_start"].items()}, "data.instruction": made["instruction"]}
    changed = [f"{k}={now[k]!r} (the shipped one: {was[k]!r})" for k in now if now[k] != was[k]]
    return ("it was made with other settings: " + ", ".join(changed)) if changed else \
        "it was made by another version of the warm start"


def warm_started_model_dir(cfg: WarmStartConfig, instruction: str, seed: int = 0, log=print) -> Path:
    """Directory of the warm-started tiny model, trained (in a child process with pinned numerics) and cached
    on first use."""
    cache_root = Path(os.path.expanduser(cfg.cache_dir))
    target = cache_root / f"tiny-qwen3-arith-{_cache_key(cfg, instruction, seed)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        log(f"[warm start] reusing cached base model {target}")
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    log(f"[warm start] training the tiny base model ({cfg.steps} supervised steps), cached at {target}")
    # Write to a temporary directory, then rename: a crash never leaves a half-written cache entry.
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".tmp-"))
    request = json.dumps({"config": dataclasses.asdict(cfg), "instruction": instruction, "seed": seed, "out": str(tmp)})
    env = {**os.environ, **PINNED_NUMERICS}
    env.pop("TRITON_INTERPRET", None)
    with subprocess.Popen([sys.executable, "-m", "mgrpo.data.tiny", request], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as child:
        output = []
        for line in child.stdout:
            output.append(line)
            if line.startswith("[warm start]"):
                log(line.rstrip("\n"))
    if child.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError("the supervised warm start failed:\n" + "".join(output[-30:]))
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _warm_start_child(request: str) -> None:
    """`python -m mgrpo.data.tiny REQUEST`: the warm start itself, in the pinned-numerics process."""
    args = json.loads(request)
    torch.set_num_threads(int(PINNED_NUMERICS["OMP_NUM_THREADS"]))
    cfg = WarmStartConfig(**args["config"])
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, args["seed"])
    supervised_warm_start(model, tokenizer, cfg, args["instruction"], args["seed"], log=lambda line: print(line, flush=True))
    model.save_pretrained(args["out"])
    tokenizer.save_pretrained(args["out"])


def supervised_warm_start(model, tokenizer, cfg: WarmStartConfig, instruction: str, seed: int, log=print) -> None:
    from transformers import get_cosine_schedule_with_warmup

    rng = random.Random(seed + 17)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, cfg.steps // 20), max(1, cfg.steps))
    model.train()
    loss = torch.zeros(())
    for step in range(cfg.steps):
        rows = [training_problem(rng) for _ in range(cfg.batch_size)]
        prompts = [tokenizer.encode(format_prompt(r["problem"], instruction)) for r in rows]
        answers = [tokenizer.encode(r["solution"]) + [tokenizer.eos_token_id] for r in rows]
        length = max(len(p) + len(a) for p, a in zip(prompts, answers))
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        attention_mask = torch.zeros_like(input_ids)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            input_ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)   # loss on the solution only
            attention_mask[i, :len(p) + len(a)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, cfg.steps // 5) == 0 or step == cfg.steps - 1:
            log(f"[warm start] step {step + 1}/{cfg.steps} loss {loss.item():.3f}")
    model.eval()
    if not math.isfinite(loss.item()):
        raise RuntimeError("the supervised warm start diverged (non-finite loss): lower warm_start.lr")


def ship_base(cfg: WarmStartConfig, instruction: str, target: Optional[Path] = None, log=print) -> dict:
    """How the shipped base was made: train it here (warm_start settings, pinned numerics) and write it to
    `target` with base.json (the cache key it answers for, each file's sha256, the machine that made it)."""
    import platform
    source = warm_started_model_dir(dataclasses.replace(cfg, remake=True), instruction, seed=0, log=log)
    target = Path(target or SHIPPED_BASE)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    manifest = {"cache_key": _cache_key(cfg, instruction, 0),
                "made_with": {"warm_start": {k: v for k, v in dataclasses.asdict(cfg).items()
                                             if k in ("steps", "batch_size", "lr")},
                              "instruction": instruction, "seed": 0, "pinned_numerics": PINNED_NUMERICS,
                              "command": "python -m mgrpo.data.tiny --ship", "cpu": cpu, "torch": torch.__version__},
                "sha256": {p.name: file_sha256(p) for p in sorted(target.iterdir()) if p.name != SHIPPED_MANIFEST}}
    (target / SHIPPED_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


if __name__ == "__main__":
    if sys.argv[1:] == ["--ship"]:      # remake the shipped base on this machine (README, "The embedded default")
        from ..config import load_config
        defaults = load_config(None, [])
        print(json.dumps(ship_base(defaults.warm_start, defaults.data.instruction), indent=1))
    else:
        _warm_start_child(sys.argv[1])
