import json

import pytest

from mgrpo.config import DataConfig
from mgrpo.data.problems import PromptStream, load_problems
from mgrpo.errors import DataError


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_with_answer_or_solution(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"problem": "1+1?", "answer": "2"},
        {"problem": "half?", "solution": "It is \\boxed{\\frac{1}{2}}."},
        {"problem": "no label"},
    ])
    probs = load_problems(src, DataConfig(source=src))
    assert [(p.problem, p.answer) for p in probs] == [("1+1?", "2"), ("half?", "\\frac{1}{2}"), ("no label", None)]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": ["1", "2"]}), path)
    assert [p.answer for p in load_problems(str(path), DataConfig(source=str(path)))] == ["1", "2"]


def test_bad_datasets_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"), DataConfig())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_problems(str(empty), DataConfig())
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok"}, {"question": "wrong field"}])
    with pytest.raises(DataError, match="row 1 has no 'problem'.*question"):
        load_problems(bad, DataConfig())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "x"}\n{not json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_problems(str(broken), DataConfig())


def test_stream_is_reproducible_and_resumable(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"p{i}"} for i in range(5)])
    cfg = DataConfig(source=src)
    a = PromptStream(cfg, seed=3)
    first = [p.problem for p in a.next_batch(7)]     # crosses an epoch boundary
    assert sorted(first[:5]) == [f"p{i}" for i in range(5)]   # each epoch is a permutation
    b = PromptStream(cfg, seed=3)
    b.position = 4
    assert [p.problem for p in b.next_batch(3)] == first[4:7]
    builtin = PromptStream(DataConfig(), seed=1)
    x = builtin.next_batch(3)
    builtin.position = 1
    assert builtin.next_batch(2) == x[1:]


def test_builtin_task_routes_and_held_out_split():
    import random
    import re

    from mgrpo.data.problems import eval_problems
    from mgrpo.data.tiny import arithmetic_problem, held_out_dataset, is_held_out
    rng = random.Random(0)
    orders = set()
    for _ in range(400):
        row = arithmetic_problem(rng)
        terms = [int(t.replace(" ", "")) for t in re.findall(r"[+-]? ?\d+", row["problem"].replace("Compute ", ""))]
        assert sum(terms) == int(row["answer"]) and row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
        steps = re.findall(r"(-?\d+) ([+-]) (\d+) = (-?\d+)\.", row["solution"])
        assert len(steps) == len(terms) - 1
        for a, op, b, c in steps:                       # every worked step is right
            assert int(a) + (int(b) if op == "+" else -int(b)) == int(c)
        orders.add((row["problem"], row["solution"]))
    # the same problem appears with different routes (orders) to its answer
    by_problem = {}
    for problem, solution in orders:
        by_problem.setdefault(problem, set()).add(solution)
    assert len(by_problem) < len(orders)
    held = held_out_dataset(256)
    assert len({r["problem"] for r in held}) == 256 and all(is_held_out(r["problem"]) for r in held)
    assert [p.problem for p in eval_problems(DataConfig(num_eval=256))] == [r["problem"] for r in held]
    stream = PromptStream(DataConfig(), seed=5)
    assert not any(is_held_out(p.problem) for p in stream.next_batch(500))   # never trained on


def test_long_task_adds_five_term_problems_and_leaves_the_default_unchanged():
    """builtin:arithmetic-long (the collapse preset's task) draws 3-, 4- and 5-term problems, labelled by family,
    never a held-out one; the default task's training stream and held-out set are exactly what they were before
    families existed (every README figure rests on them: the hash is of the stream as it was at e7e4ad3)."""
    import hashlib
    import re

    from mgrpo.config import ConfigError
    from mgrpo.data.problems import eval_problems
    from mgrpo.data.tiny import is_held_out
    long = DataConfig(source="builtin:arithmetic-long", num_eval=300)
    train = PromptStream(long, seed=5).next_batch(600)
    held = eval_problems(long)

    def terms(text):
        return len(re.findall(r"\d+", text))
    for rows in (train, held):
        assert {terms(p.problem) for p in rows} == {3, 4, 5}
        assert all(p.family == f"{terms(p.problem)}-term" for p in rows)
        assert all(sum(int(t.replace(" ", "")) for t in re.findall(r"[+-]? ?\d+", p.problem[8:])) == int(p.answer)
                   for p in rows)
    assert not any(is_held_out(p.problem) for p in train) and all(is_held_out(p.problem) for p in held)
    assert len({p.problem for p in held}) == 300
    default = PromptStream(DataConfig(), seed=3).next_batch(200) + eval_problems(DataConfig(num_eval=100))
    assert {terms(p.problem) for p in default} == {3, 4}
    digest = hashlib.sha256(repr([(p.problem, p.answer) for p in default]).encode()).hexdigest()
    assert digest == "9053664d3418286c9081d9b12c101ec0249229101ddb51ee1b5d8a0a8cfacc18"
    with pytest.raises(ConfigError, match="no such built-in task"):
        DataConfig(source="builtin:arithmetic-hard")


def test_family_field_of_a_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"problem": "1+1", "answer": "2", "topic": "algebra"}) + "\n"
                    + json.dumps({"problem": "2+2", "answer": "4"}) + "\n")
    assert [p.family for p in load_problems(str(path), DataConfig(family_field="topic"))] == ["algebra", None]
    assert [p.family for p in load_problems(str(path), DataConfig())] == [None, None]
