import json
import sys

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


@pytest.mark.parametrize("name,content,message", [
    ("unclosed.json", b'[{"problem": "x"}', "dataset file {path} is not valid JSON (line 1, column 18: "),
    ("latin1.jsonl", '{"problem": "caf\xe9"}\n'.encode("latin-1"), "dataset file {path} is not UTF-8 text (byte 16"),
    ("corrupt.parquet", b"not a parquet file", "dataset file {path} is not a readable parquet file"),
])
def test_broken_files_are_data_errors_naming_the_file(tmp_path, capsys, name, content, message):
    from mgrpo.commands import main
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as raised:
        load_problems(str(path), DataConfig())
    assert str(raised.value).startswith(message.format(path=path))
    assert main(["train", f"data.source={path}", f"run_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert f"error: {message.format(path=path)}" in err and "Traceback" not in err


@pytest.mark.parametrize("source,message", [
    ("./data/typo", "dataset file ./data/typo does not exist"),
    ("/no/such/data", "dataset file /no/such/data does not exist"),
    ("builtin", "no such built-in task; did you mean builtin:arithmetic or builtin:arithmetic-long?"),
    ("arithmetic-long", "no such built-in task; did you mean builtin:arithmetic"),
])
def test_a_source_that_is_no_file_says_so_before_any_dataset_library(source, message, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):   # the hub library is never reached for these
        assert name != "datasets", f"{source} went to `datasets`"
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=message.replace("?", r"\?")):
        load_problems(source, DataConfig())


def test_a_missing_file_without_datasets_installed_says_no_such_file(monkeypatch):
    """data/typo_no_ext could be a hub name (namespace/name): without `datasets` it can only be a file."""
    monkeypatch.setitem(sys.modules, "datasets", None)      # `import datasets` raises ImportError, as uninstalled
    with pytest.raises(DataError, match=r"dataset 'data/typo_no_ext': no such file \(a local dataset is a .jsonl"):
        load_problems("data/typo_no_ext", DataConfig())
