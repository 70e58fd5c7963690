"""How sequences become forward passes: micro-batches in one of three layouts.

The trainer keeps per-token quantities (log-probs, entropies, KL reference) as [B, L] arrays over sequence b's
tokens (its prompt, then its response). A forward pass computes them for the response tokens of a
micro-batch, in one of three layouts of the same sequences:

    padded    one row per sequence, right-padded to the micro-batch's longest (the classic layout)
    packed    whole sequences concatenated into rows with no padding; position ids restart per sequence and a
              block-diagonal causal mask keeps them apart (flash-attention's varlen kernels on GPUs)
    grouped   one row per prompt: the prompt once, then each of its responses, every response attending to
              the shared prompt and to itself. A group of G responses to a P-token prompt costs P + sum(R_i)
              tokens instead of G (P + R_max): the prompt's forward and backward are shared by the group, as
              GRPO's G samples of one prompt allow (the idea of Prefix Grouper, arXiv 2506.05433).

All three give the same log-probs and gradients up to floating-point summation order (tested). `auto` picks
grouped where every group fits one row of the token budget and saves at least a fifth of the tokens (short
responses to long prompts: the embedded default), packed with flash_attention_2, and padded otherwise (the
dense masks of packed and grouped rows grow with the square of the row length, which only flash-attention's
varlen path avoids).

Each MicroBatch lists its targets: the flat index (row * T + position) of the hidden state that predicts each
response token, the token, and where the result goes in the [B, L] arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .grouped_attention import GroupedRows

LAYOUTS = ("auto", "padded", "packed", "grouped")


@dataclass
class Sequences:
    """B sequences: each one a prompt and a response (token ids), and the prompt group it belongs to (the
    sequences of one group share their prompt)."""
    prompts: list
    responses: list
    groups: list

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def width(self) -> int:
        """L of the [B, L] arrays: the longest prompt + response."""
        return max((len(p) + len(r) for p, r in zip(self.prompts, self.responses)), default=2)

    def subset(self, index: list) -> "Sequences":
        return Sequences([self.prompts[i] for i in index], [self.responses[i] for i in index],
                         [self.groups[i] for i in index])

    def response_mask(self) -> torch.Tensor:
        """[B, L] bool: True on response tokens."""
        mask = torch.zeros((len(self), self.width), dtype=torch.bool)
        for b, (p, r) in enumerate(zip(self.prompts, self.responses)):
            mask[b, len(p):len(p) + len(r)] = True
        return mask

    def padded_tokens(self, token_budget: int) -> int:
        """Tokens (padding included) the padded layout would compute: the padding share of a batch is
        1 - real tokens / this."""
        return sum(len(rows) * max(len(self.prompts[b]) + len(self.responses[b]) for b in rows)
                   for rows in _consecutive(self._lengths(), token_budget))

    def _lengths(self) -> list:
        return [len(p) + len(r) for p, r in zip(self.prompts, self.responses)]


@dataclass
class MicroBatch:
    """One forward pass. attention: a [R, T] padding mask (padded layout), an [R, 1, T, T] bool mask
    (packed and grouped rows), or None (packed rows for flash-attention, told apart by position ids)."""
    input_ids: torch.Tensor          # [R, T]
    position_ids: torch.Tensor       # [R, T]
    attention: Optional[torch.Tensor]
    predictor: torch.Tensor          # [N] flat index into R * T: the hidden state that predicts each target
    targets: torch.Tensor            # [N] the target tokens
    seq_index: torch.Tensor          # [N] b of each target in the [B, L] arrays
    seq_pos: torch.Tensor            # [N] its position l there
    grouped: Optional[GroupedRows] = None
    """Grouped rows for the blockwise attention (mgrpo/models/grouped_attention.py), which then replaces the mask."""

    def to(self, device) -> "MicroBatch":
        return MicroBatch(*(None if t is None else t.to(device) for t in (
            self.input_ids, self.position_ids, self.attention, self.predictor, self.targets, self.seq_index,
            self.seq_pos, self.grouped)))

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def dummy_micro_batch() -> MicroBatch:
    """A one-row pass with no targets: it still runs every layer, so FSDP2's collectives line up across
    ranks that have fewer real micro-batches."""
    empty = torch.zeros(0, dtype=torch.long)
    return MicroBatch(torch.zeros((1, 2), dtype=torch.long), torch.arange(2)[None], torch.ones((1, 2), dtype=torch.long),
                      empty, empty, empty, empty)


# ---------------------------------------------------------------------------------------------------------
# Choosing a layout

def resolve_layout(layout: str, seqs: Sequences, token_budget: int, attn_implementation: str) -> str:
    """auto -> grouped, packed or padded for these sequences (module docstring); an explicit layout as is,
    except that grouped and packed rows need a mask flash-attention cannot take (packed it can, by position)."""
    if layout == "grouped" and attn_implementation == "flash_attention_2":
        raise ValueError("optim.layout=grouped needs model.attn_implementation sdpa or eager (flash-attention "
                         "takes no custom attention mask): use layout=packed or auto")
    if layout != "auto":
        return layout
    if attn_implementation == "flash_attention_2":
        return "packed"
    rows = _group_rows(seqs)
    grouped_tokens = sum(_grouped_row_length(seqs, members) for members in rows)
    fits = all(_grouped_row_length(seqs, members) <= token_budget for members in rows)
    if fits and grouped_tokens <= 0.8 * seqs.padded_tokens(token_budget):
        return "grouped"
    return "padded"


# ---------------------------------------------------------------------------------------------------------
# Building micro-batches

def micro_batches(seqs: Sequences, layout: str, token_budget: int, pad_id: int,
                  mask_for_flash: bool = False, blockwise: bool = False) -> list:
    """The micro-batches of `seqs` in a resolved layout, each within `token_budget` tokens (a row longer than
    the budget gets a micro-batch of its own). blockwise: grouped rows carry their blocks for
    mgrpo/models/grouped_attention.py instead of a dense [T, T] mask (the model must use that attention)."""
    if layout == "padded":
        return [_padded(seqs, rows, pad_id) for rows in _consecutive(seqs._lengths(), token_budget)]
    if layout == "packed":
        rows = _packed_rows(seqs._lengths(), token_budget)
        per_batch = [[r] for r in rows] if mask_for_flash else _rows_within(
            [sum(seqs._lengths()[b] for b in r) for r in rows], rows, token_budget)
        return [_rows(seqs, batch, pad_id, shared_prompt=False, block_mask=not mask_for_flash) for batch in per_batch]
    if layout == "grouped":
        rows = _group_rows(seqs)
        lengths = [_grouped_row_length(seqs, members) for members in rows]
        return [_rows(seqs, batch, pad_id, shared_prompt=True, block_mask=not blockwise, blocks=blockwise)
                for batch in _rows_within(lengths, rows, token_budget)]
    raise ValueError(f"optim.layout={layout!r}: use one of {', '.join(LAYOUTS)}")


def _consecutive(lengths: list, token_budget: int) -> list:
    """Consecutive index ranges whose padded size (count x longest) stays within the token budget."""
    batches, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and max(longest, n) * (i - start + 1) > token_budget:
            batches.append(list(range(start, i)))
            start, longest = i, 0
        longest = max(longest, n)
    if lengths:
        batches.append(list(range(start, len(lengths))))
    return batches


def _padded(seqs: Sequences, rows: list, pad_id: int) -> MicroBatch:
    width = max(len(seqs.prompts[b]) + len(seqs.responses[b]) for b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    predictor, targets, seq_index, seq_pos = [], [], [], []
    for r, b in enumerate(rows):
        tokens = seqs.prompts[b] + seqs.responses[b]
        ids[r, :len(tokens)] = torch.tensor(tokens)
        attention[r, :len(tokens)] = 1
        for pos in range(len(seqs.prompts[b]), len(tokens)):
            if pos == 0:
                continue          # the first token of a sequence has nothing to predict it
            predictor.append(r * width + pos - 1)
            targets.append(tokens[pos])
            seq_index.append(b)
            seq_pos.append(pos)
    positions = torch.arange(width).expand(len(rows), width)
    return MicroBatch(ids, positions, attention, *map(_long, (predictor, targets, seq_index, seq_pos)))


def _packed_rows(lengths: list, token_budget: int) -> list:
    """Consecutive sequences concatenated while the row stays within the budget."""
    rows, current, size = [], [], 0
    for b, n in enumerate(lengths):
        if current and size + n > token_budget:
            rows.append(current)
            current, size = [], 0
        current.append(b)
        size += n
    if current:
        rows.append(current)
    return rows


def _group_rows(seqs: Sequences) -> list:
    """The sequences of each prompt group, groups in order of first appearance."""
    rows: dict = {}
    for b, g in enumerate(seqs.groups):
        rows.setdefault(g, []).append(b)
    return list(rows.values())


def _grouped_row_length(seqs: Sequences, members: list) -> int:
    return len(seqs.prompts[members[0]]) + sum(len(seqs.responses[b]) for b in members)


def _rows_within(lengths: list, rows: list, token_budget: int) -> list:
    """Consecutive rows per micro-batch, count x longest row within the budget."""
    return [[rows[i] for i in batch] for batch in _consecutive(lengths, token_budget)]


def _rows(seqs: Sequences, row_members: list, pad_id: int, shared_prompt: bool, block_mask: bool,
          blocks: bool = False) -> MicroBatch:
    """Rows of whole sequences (packed) or of one prompt and its responses (grouped), right-padded to the
    longest row. Per token: a segment id (-1 - position for padding: it sees only itself) and the segment it
    may see besides its own (the shared prompt, for a grouped response)."""
    layouts = [_row_layout(seqs, members, shared_prompt) for members in row_members]
    width = max(len(tokens) for tokens, *_ in layouts)
    R = len(layouts)
    ids = torch.full((R, width), pad_id, dtype=torch.long)
    positions = torch.zeros((R, width), dtype=torch.long)
    segment = -1 - torch.arange(width).repeat(R, 1)                  # padding: a segment of its own per token
    sees = torch.full((R, width), -(10 ** 9), dtype=torch.long)
    predictor, targets, seq_index, seq_pos = [], [], [], []
    for r, (tokens, pos, seg, see, tgt) in enumerate(layouts):
        n = len(tokens)
        ids[r, :n] = torch.tensor(tokens)
        positions[r, :n] = torch.tensor(pos)
        segment[r, :n] = torch.tensor(seg)
        sees[r, :n] = torch.tensor(see)
        for column, token, b, l in tgt:
            predictor.append(r * width + column)
            targets.append(token)
            seq_index.append(b)
            seq_pos.append(l)
    attention = None
    if block_mask:
        q, k = segment[:, :, None], segment[:, None, :]                                   # [R, T, 1], [R, 1, T]
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        attention = (causal & ((q == k) | (sees[:, :, None] == k)))[:, None]             # [R, 1, T, T]
    grouped = None
    if blocks:   # every row's prompt (segment 0) and responses (1, 2, ...), by position
        attention = torch.ones((R, width), dtype=torch.long)       # no padding to mask: the blocks say it all
        grouped = _grouped_rows(segment)
    return MicroBatch(ids, positions, attention, *map(_long, (predictor, targets, seq_index, seq_pos)), grouped)


def _grouped_rows(segment: torch.Tensor) -> GroupedRows:
    """The blocks of grouped rows from their segment ids [R, T] (0: the prompt, s > 0: response s)."""
    R, T = segment.shape
    prompts, responses, response_row = [], [], []
    for r, row in enumerate(segment.tolist()):
        prompts.append([r * T + t for t, s in enumerate(row) if s == 0])
        by_segment: dict = {}
        for t, s in enumerate(row):
            if s > 0:
                by_segment.setdefault(s, []).append(r * T + t)
        for s in sorted(by_segment):
            responses.append(by_segment[s])
            response_row.append(r)
    P = max(len(x) for x in prompts)
    L = max((len(x) for x in responses), default=1)

    def padded(lists, width):   # flat positions, padded with the list's first (a valid position, masked out)
        flat = torch.tensor([x + [x[0] if x else 0] * (width - len(x)) for x in lists], dtype=torch.long)
        valid = torch.tensor([[True] * len(x) + [False] * (width - len(x)) for x in lists], dtype=torch.bool)
        return flat.reshape(-1), valid.reshape(len(lists), width)
    prompt_flat, prompt_valid = padded(prompts, P)
    response_flat, response_valid = padded(responses, L) if responses else (
        torch.zeros(0, dtype=torch.long), torch.zeros((0, L), dtype=torch.bool))
    inverse = torch.full((R * T,), R * P + len(responses) * L, dtype=torch.long)     # padding: the zero row
    inverse[prompt_flat[prompt_valid.reshape(-1)]] = torch.arange(R * P)[prompt_valid.reshape(-1)]
    if responses:
        inverse[response_flat[response_valid.reshape(-1)]] = R * P + torch.arange(len(responses) * L)[
            response_valid.reshape(-1)]
    return GroupedRows(prompt_flat, prompt_valid, _long(response_row), response_flat, response_valid, inverse)


def _row_layout(seqs: Sequences, members: list, shared_prompt: bool) -> tuple:
    """(tokens, position ids, segment ids, visible other segment, targets [(predictor column, token, b, l)])."""
    tokens, pos, seg, see, targets = [], [], [], [], []
    if shared_prompt:
        prompt = seqs.prompts[members[0]]
        prompt_last = len(prompt) - 1
        tokens += prompt
        pos += list(range(len(prompt)))
        seg += [0] * len(prompt)
        see += [-(10 ** 9)] * len(prompt)
        for s, b in enumerate(members, start=1):
            start = len(tokens)
            response = seqs.responses[b]
            for j, token in enumerate(response):
                targets.append((prompt_last if j == 0 else start + j - 1, token, b, len(prompt) + j))
            tokens += response
            pos += range(len(prompt), len(prompt) + len(response))
            seg += [s] * len(response)
            see += [0] * len(response)
        return tokens, pos, seg, see, targets
    for s, b in enumerate(members):
        start = len(tokens)
        sequence = seqs.prompts[b] + seqs.responses[b]
        for l in range(max(len(seqs.prompts[b]), 1), len(sequence)):
            targets.append((start + l - 1, sequence[l], b, l))
        tokens += sequence
        pos += range(len(sequence))
        seg += [s] * len(sequence)
        see += [-(10 ** 9)] * len(sequence)
    return tokens, pos, seg, see, targets


def _long(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)
