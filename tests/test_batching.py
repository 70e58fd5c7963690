"""Layouts of micro-batches (mgrpo/models/batching.py): padded, packed and grouped rows give the same log-probs,
entropies and gradients; each target is computed once, from the right hidden state; auto picks sensibly."""
import random

import pytest
import torch

from mgrpo.models.batching import Sequences, micro_batches, resolve_layout
from mgrpo.models.logprobs import TokenScorer


def ragged_groups(seed=0, prompts=3, group=4, vocab=90):
    """Prompt groups of different prompt lengths, each with responses of different lengths (one empty)."""
    rng = random.Random(seed)
    p, r, g = [], [], []
    for i in range(prompts):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(5, 12))]
        for j in range(group):
            p.append(prompt)
            r.append([rng.randrange(2, vocab) for _ in range(0 if (i, j) == (1, 2) else rng.randint(1, 9))])
            g.append(i)
    return Sequences(p, r, g)


def model_of(architecture, attn):
    from tests.real_models import build_model

    class Vocab:   # what build_model reads of a tokenizer
        eos_token_id, pad_token_id = 0, 1

        def __len__(self):
            return 96
    model = build_model(architecture, Vocab(), seed=1)
    model.config._attn_implementation = attn
    return TokenScorer(model).train()


def scores_and_grads(scorer, seqs, layout, budget=64, blockwise=False):
    """logprob and entropy [B, L] of the response tokens and the gradient of a weighted sum of both."""
    scorer.zero_grad(set_to_none=True)
    logp = torch.zeros((len(seqs), seqs.width))
    ent = torch.zeros((len(seqs), seqs.width))
    batches = micro_batches(seqs, layout, budget, pad_id=1, blockwise=blockwise)
    for batch in batches:
        lp, en = scorer(batch, 0.8, "torch")
        weights = 1.0 + 0.1 * batch.seq_pos.float()
        ((lp * weights).sum() + 0.3 * en.sum()).backward()
        logp[batch.seq_index, batch.seq_pos] = lp.detach()
        ent[batch.seq_index, batch.seq_pos] = en.detach()
    grads = {n: p.grad.clone() for n, p in scorer.named_parameters()}
    return logp, ent, grads, sum(b.tokens for b in batches)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_layouts_agree_forward_and_gradients(architecture, attn):
    seqs = ragged_groups()
    scorer = model_of(architecture, attn)
    padded = scores_and_grads(scorer, seqs, "padded")
    mask = seqs.response_mask()
    assert (padded[0][mask] < 0).all() and (padded[0][~mask] == 0).all()   # every response token, nothing else
    for layout in ("packed", "grouped"):
        logp, ent, grads, tokens = scores_and_grads(scorer, seqs, layout)
        torch.testing.assert_close(logp, padded[0], atol=2e-5, rtol=1e-5, msg=layout)
        torch.testing.assert_close(ent, padded[1], atol=2e-5, rtol=1e-5, msg=layout)
        for name, g in padded[2].items():
            torch.testing.assert_close(grads[name], g, atol=2e-5, rtol=1e-4, msg=f"{layout} {name}")
    grouped_tokens = scores_and_grads(scorer, seqs, "grouped")[3]
    assert grouped_tokens < padded[3]          # the shared prompts are computed once per group
    if attn == "sdpa":   # the blockwise attention of grouped rows (what training runs with sdpa)
        from mgrpo.models import grouped_attention
        scorer.causal_lm.config._attn_implementation = grouped_attention.register()
        for layout, blockwise in (("grouped", True), ("padded", False), ("packed", False)):
            logp, ent, grads, _ = scores_and_grads(scorer, seqs, layout, blockwise=blockwise)
            torch.testing.assert_close(logp, padded[0], atol=2e-5, rtol=1e-5, msg=f"blockwise {layout}")
            torch.testing.assert_close(ent, padded[1], atol=2e-5, rtol=1e-5, msg=f"blockwise {layout}")
            for name, g in padded[2].items():
                torch.testing.assert_close(grads[name], g, atol=2e-5, rtol=1e-4, msg=f"blockwise {layout} {name}")


@pytest.mark.parametrize("kl_coef", [0.005, 0.0])
def test_the_update_does_not_depend_on_the_micro_batch_budget(kl_coef):
    """policy_gradients (loss, logged KL, gradients) on one micro-batch and on many, with one group unanimous
    (advantage 0) and the KL reference away from the policy (a later step): with a KL term every response is
    pulled towards the reference wherever the budget packed it; without one a zero-advantage micro-batch is
    skipped and changes nothing."""
    from mgrpo.config import AlgorithmConfig
    from mgrpo.distributed import Dist
    from mgrpo.loop.stages import Scoring, TrainingBatch, policy_gradients, score_sequences
    seqs = ragged_groups(seed=5, prompts=3, group=4)
    policy, reference = model_of("qwen3", "eager"), model_of("qwen3", "eager")
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    advantages = torch.tensor([0.0] * 4 + [0.9, -0.3, -0.3, -0.3] + [0.0] * 4)     # groups 0 and 2 unanimous
    tokens = torch.tensor([float(len(r)) for r in seqs.responses])
    algo = AlgorithmConfig(kl_coef=kl_coef)

    def update(budget):
        scoring = Scoring("padded", budget, "eager", 1, 0.8, "torch", Dist())
        old_logp, _ = score_sequences(policy, seqs, scoring)
        ref_logp = score_sequences(reference, seqs, scoring)[0] if kl_coef > 0 else None
        batch = TrainingBatch(seqs, old_logp, advantages, tokens, float(tokens.sum()), float(len(seqs)))
        policy.zero_grad(set_to_none=True)
        result = policy_gradients(policy, batch, ref_logp, algo, scoring)
        return result, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    whole, whole_grads = update(10_000)
    split, split_grads = update(16)
    assert whole.micro_batches == 1 and split.micro_batches > 3
    assert (split.skipped_micro_batches > 0) == (kl_coef == 0)          # one response per micro-batch here
    assert split.loss == pytest.approx(whole.loss, rel=1e-5, abs=1e-9)
    assert split.kl == pytest.approx(whole.kl, rel=1e-5)
    if kl_coef > 0:
        assert whole.kl > 1e-3                   # the reference is away from the policy: the KL term is live
    assert whole_grads.keys() == split_grads.keys()
    for name, g in whole_grads.items():
        torch.testing.assert_close(split_grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_grouped_rows_predict_the_first_response_token_from_the_prompts_last():
    seqs = Sequences([[5, 6, 7]] * 2, [[8, 9], [10]], [0, 0])
    (batch,) = micro_batches(seqs, "grouped", 64, pad_id=1)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert batch.targets.tolist() == [8, 9, 10]
    assert batch.predictor.tolist() == [2, 3, 2]            # 8 and 10 from the prompt's last token, 9 from 8
    assert list(zip(batch.seq_index.tolist(), batch.seq_pos.tolist())) == [(0, 3), (0, 4), (1, 3)]
    visible = batch.attention[0, 0]
    assert visible[5].tolist() == [True, True, True, False, False, True]   # the second response: prompt + itself


def test_micro_batches_stay_within_the_budget():
    seqs = ragged_groups(seed=3, prompts=6, group=5)
    for layout in ("padded", "packed", "grouped"):
        batches = micro_batches(seqs, layout, 48, pad_id=1)
        assert all(b.tokens <= 48 or b.input_ids.shape[0] == 1 for b in batches), layout
        seen = sorted(zip(torch.cat([b.seq_index for b in batches]).tolist(),
                          torch.cat([b.seq_pos for b in batches]).tolist()))
        assert len(seen) == len(set(seen)) == sum(len(r) for r in seqs.responses)   # each target exactly once


def test_auto_layout():
    short_answers = Sequences([[3] * 90] * 16, [[4] * 40] * 16, [0] * 16)     # the embedded default's shape
    assert resolve_layout("auto", short_answers, 4096, "sdpa") == "grouped"
    long_answers = Sequences([[3] * 100] * 4, [[4] * 3000] * 4, [0] * 4)      # a group longer than the budget
    assert resolve_layout("auto", long_answers, 4096, "sdpa") == "padded"
    assert resolve_layout("auto", short_answers, 4096, "flash_attention_2") == "packed"
    assert resolve_layout("padded", short_answers, 4096, "sdpa") == "padded"
    with pytest.raises(ValueError, match="grouped needs"):
        resolve_layout("grouped", short_answers, 4096, "flash_attention_2")
