"""Problems: the built-in arithmetic task, or MATH-style rows from a local jsonl/parquet file or a `datasets` name.

Rows need a problem; an answer (or a solution whose last \\boxed{} is the answer) is optional and is used for
monitoring only: it never enters the reward.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..answers import extract_boxed_answer
from ..config import BUILTIN_TASKS, DataConfig, looks_like_a_path
from ..errors import DataError
from ..hub import hub_unreachable
from .tiny import held_out_dataset, training_problem

BUILTIN_ARITHMETIC = "builtin:arithmetic"


def is_builtin(source: str) -> bool:
    return source in BUILTIN_TASKS


@dataclass
class Problem:
    problem: str
    answer: Optional[str]   # ground truth for monitoring, None when the data has none
    family: Optional[str] = None   # a kind of problem; held-out figures are also reported per family


def _read_rows(source: str, split: str) -> list:
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise DataError(f"dataset file {source} does not exist")
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise DataError("reading parquet needs pyarrow: pip install pyarrow") from e
            try:
                return pq.read_table(path).to_pylist()
            except (OSError, ValueError) as e:   # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
                raise DataError(f"dataset file {source} is not a readable parquet file: {e}") from None
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"dataset file {source} is not UTF-8 text (byte {e.start}: {e.reason}): save it as "
                            "UTF-8") from None
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"dataset file {source} is not valid JSON (line {e.lineno}, column {e.colno}: "
                                f"{e.msg})") from None
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{source} line {n} is not valid JSON: {e}") from e
        return rows
    if source.partition(":")[0] == "builtin" or source in {task.partition(":")[2] for task in BUILTIN_TASKS}:
        raise DataError(f"dataset {source!r}: no such built-in task; did you mean {' or '.join(BUILTIN_TASKS)}?")
    if path.exists():
        raise DataError(f"dataset {source}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if looks_like_a_path(source):   # not a `datasets` name (namespace/name): a file that is not there
        raise DataError(f"dataset file {source} does not exist (a local dataset is a .jsonl, .json or .parquet file)")
    return _read_hub_dataset(source, split)


def _read_hub_dataset(source: str, split: str) -> list:
    """The rows of a `datasets` name: from the hub, or, where the hub cannot be reached, from the datasets cache at
    once (datasets would retry every request with back-off first: 24 s a dataset, measured 2026-12-08)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"dataset {source!r}: no such file (a local dataset is a .jsonl, .json or .parquet file); "
                        "to read it as a `datasets` name, install `datasets` (pip install datasets)") from e
    unreachable = hub_unreachable()
    if unreachable is None:
        try:
            return list(datasets.load_dataset(source, split=split))
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
            raise DataError(f"could not load dataset {source!r} (split {split!r}): {e}") from e
    offline, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True
    try:
        rows = list(datasets.load_dataset(source, split=split))
        if os.environ.get("RANK", "0") == "0":      # one line under torchrun (whose ranks settled on one answer)
            print(f"[data] the Hugging Face hub cannot be reached ({unreachable}): dataset {source} from the "
                  f"datasets cache, {datasets.config.HF_DATASETS_CACHE}", flush=True)
        return rows
    except ConnectionError:                     # datasets' answer for a name it has not cached
        raise DataError(f"dataset {source!r}: the Hugging Face hub cannot be reached ({unreachable}) and the dataset "
                        f"is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}): load it once where the "
                        f"hub is reachable (python -c \"import datasets; datasets.load_dataset('{source}')\"), or "
                        "give a local .jsonl, .json or .parquet file") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise DataError(f"could not load dataset {source!r} (split {split!r}) from the datasets cache: {e}") from e
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def field_settings(*names: str) -> str:
    """How to name a file's fields, for both commands whose data these errors are about: a training config's
    data.<name> (mgrpo train, mgrpo compare) and mgrpo eval's --<name> flags."""
    return (f"{' or '.join('data.' + n for n in names)} (mgrpo eval: "
            f"{' or '.join('--' + n.replace('_', '-') for n in names)})")


def load_problems(source: str, cfg: DataConfig) -> list:
    """Problems of a file or dataset; clear errors for empty data and rows without a problem."""
    rows = _read_rows(source, cfg.split)
    if not rows:
        raise DataError(f"dataset {source} is empty: it needs rows with a {cfg.problem_field!r} field")
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"dataset {source} row {i} is not an object with a {cfg.problem_field!r} field")
        text = row.get(cfg.problem_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"dataset {source} row {i} has no {cfg.problem_field!r} text "
                            f"(fields: {', '.join(sorted(row)) or 'none'}); set {field_settings('problem_field')} to the "
                            "right field")
        answer = row.get(cfg.answer_field)
        if answer is None and isinstance(row.get(cfg.solution_field), str):
            answer = extract_boxed_answer(row[cfg.solution_field])
        family = row.get(cfg.family_field)
        problems.append(Problem(text, None if answer is None else str(answer), None if family is None else str(family)))
    return problems


class PromptStream:
    """Endless, reproducible stream of training problems; its position is part of every checkpoint.

    File data is shuffled once per epoch (permutation seeded by seed and epoch). The built-in task draws
    problem i from its own seeded generator, so the stream is infinite and never repeats a draw.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed, self.position = cfg, seed, 0
        self.builtin = is_builtin(cfg.source)
        self.problems = None if self.builtin else load_problems(cfg.source, cfg)
        self._order: Optional[list] = None
        self._order_epoch = -1

    def __len__(self) -> int:
        return 0 if self.builtin else len(self.problems)

    def peek(self, index: int) -> Problem:
        """Problem `index` of the stream (without moving it)."""
        return self._get(index)

    def _get(self, index: int) -> Problem:
        if self.builtin:
            row = training_problem(random.Random(f"{self.seed}-{index}"), BUILTIN_TASKS[self.cfg.source])
            return Problem(row["problem"], row["answer"], row["family"])
        epoch, offset = divmod(index, len(self.problems))
        if epoch != self._order_epoch:
            self._order = list(range(len(self.problems)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._order_epoch = epoch
        return self.problems[self._order[offset]]

    def next_batch(self, size: int) -> list:
        batch = [self._get(self.position + i) for i in range(size)]
        self.position += size
        return batch


def eval_problems(cfg: DataConfig) -> list:
    """Held-out problems for validation during and around training (empty when there are none)."""
    if cfg.num_eval == 0:
        return []
    source = cfg.eval_source or (cfg.source if is_builtin(cfg.source) else None)
    return [] if source is None else benchmark_problems(source, cfg, cfg.num_eval)


def benchmark_problems(source: str, cfg: DataConfig, limit: int = 0) -> list:
    """Problems with answers to grade against: the built-in task's held-out set (`limit` of them,
    data.num_eval when 0), or a file/dataset whose every row must have an answer (its field or its solution's last \\boxed{})."""
    if is_builtin(source):
        return [Problem(r["problem"], r["answer"], r["family"])
                for r in held_out_dataset(limit or cfg.num_eval or 512, BUILTIN_TASKS[source])]
    problems = load_problems(source, cfg)
    missing = [i for i, p in enumerate(problems) if p.answer is None]
    if missing:
        raise DataError(f"{source}: {len(missing)} of {len(problems)} rows have no answer to grade against "
                        f"(first: row {missing[0]}); rows need {cfg.answer_field!r}, or {cfg.solution_field!r} "
                        f"with a \\boxed{{}} answer: set {field_settings('answer_field', 'solution_field')} to match "
                        "the file")
    return problems[:limit] if limit else problems
