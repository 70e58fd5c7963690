"""model.path as a Hugging Face hub name (mgrpo/models/loading.py, model_source): where the hub answers, the name
goes on to transformers; where it cannot be reached, the cached snapshot is opened at once (transformers alone
retries every file's request five times with back-off first: 2 min 23 s for the tiny model's config and tokenizer),
and a model that is not cached is an error within seconds.

The hub is made unreachable on purpose (HF_ENDPOINT at a closed local port), so these tests do not depend on the
machine's network; "reachable" is a local HTTP server. The cache is a real huggingface_hub cache layout (refs/main
naming a snapshot directory) holding the shipped tiny model."""
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import pytest
from huggingface_hub import constants

from mgrpo.commands import main
from mgrpo.config import DataConfig
from mgrpo.data.problems import load_problems
from mgrpo.data.tiny import SHIPPED_BASE
from mgrpo.errors import TrainingError
from mgrpo.hub import hub_unreachable, may_name_the_hub, settle
from mgrpo.models.loading import model_source

CLOSED = "http://127.0.0.1:9"          # the discard port: nothing listens, the connection is refused at once
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding acme/tiny (the shipped tiny model), made the process's cache."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    shutil.copytree(SHIPPED_BASE, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def unreachable(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def serving(status: int, heads: Optional[list] = None):
    """A local 'hub' answering every HEAD with `status` (each one noted in `heads`); returns (server, its URL)."""
    class Answer(BaseHTTPRequestHandler):
        def do_HEAD(self):
            if heads is not None:
                heads.append(self.path)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_where_the_hub_answers_the_name_goes_on_to_transformers(hub_cache, monkeypatch):
    server, url = serving(200)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        assert model_source("acme/tiny") == "acme/tiny"
    finally:
        server.shutdown()


@pytest.mark.parametrize("how", ["refused", "server error", "HF_HUB_OFFLINE"])
def test_where_the_hub_cannot_be_reached_the_cached_snapshot_is_opened(hub_cache, monkeypatch, how):
    server = None
    if how == "refused":
        monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    elif how == "server error":
        server, url = serving(503)
        monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", how == "HF_HUB_OFFLINE")
    said = []
    try:
        assert model_source("acme/tiny", log=said.append) == str(hub_cache / "models--acme--tiny" / "snapshots"
                                                                 / SNAPSHOT)
    finally:
        if server is not None:
            server.shutdown()
    assert len(said) == 1 and "cannot be reached" in said[0]
    assert model_source(str(SHIPPED_BASE)) == str(SHIPPED_BASE)          # a local directory: as it is, always


def test_a_model_neither_reachable_nor_cached_is_an_error_within_seconds(hub_cache, unreachable, tmp_path, capsys):
    with pytest.raises(TrainingError, match="not in its cache"):
        model_source("acme/missing")
    start = time.monotonic()
    assert main(["train", "model.path=acme/missing", f"run_dir={tmp_path / 'run'}", "rollout.engine=hf",
                 "progress=false"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mgrpo train: error: model.path=acme/missing: the Hugging Face hub cannot be reached")
    assert "hf download acme/missing" in err and "Traceback" not in err
    assert time.monotonic() - start < 30 and not (tmp_path / "run").exists()
    assert main(["plan", "model.path=acme/missing"]) == 1
    assert "not in its cache" in capsys.readouterr().err


@pytest.mark.slow
def test_a_cached_hub_model_trains_and_plans_offline_without_waiting(hub_cache, unreachable, tmp_path, capsys):
    """`mgrpo plan` and one training step of acme/tiny with the hub unreachable: each in seconds (transformers' own
    retries would take minutes), and the run records the snapshot it loaded as its base model."""
    start = time.monotonic()
    assert main(["plan", "model.path=acme/tiny", "--gpu-memory", "80"]) in (0, 1)
    assert "acme/tiny" in capsys.readouterr().out
    planned = time.monotonic() - start
    run = tmp_path / "run"
    start = time.monotonic()
    assert main(["train", "model.path=acme/tiny", f"run_dir={run}", "steps=1", "data.num_eval=0",
                 "rollout.engine=hf", "progress=false"]) == 0
    trained = time.monotonic() - start
    assert planned < 20 and trained < 90, (planned, trained)
    assert (run / "base_model.txt").read_text().strip() == str(hub_cache / "models--acme--tiny" / "snapshots"
                                                                  / SNAPSHOT)
    assert (run / "final" / "config.json").is_file()
    assert "from its cache" in capsys.readouterr().out


def test_eval_takes_a_hub_name_and_a_sweep_a_base_trained_from_one(hub_cache, unreachable, tmp_path, capsys):
    """`mgrpo eval acme/tiny` (offline: the cached snapshot), a sweep of a run whose base_model.txt names the hub
    model (trained where the hub answered), and a mistyped run directory, which reads as a hub name: its error
    says both readings."""
    data = tmp_path / "two.jsonl"
    data.write_text('{"problem": "Compute 1 + 2.", "answer": "3"}\n{"problem": "Compute 4 + 1.", "answer": "5"}\n')
    common = ["--data", str(data), "--engine", "hf", "--k", "2", "--n", "2"]
    assert main(["eval", "acme/tiny", *common, "--out", str(tmp_path / "direct")]) == 0
    assert (tmp_path / "direct" / "eval.json").is_file()
    run = tmp_path / "run"
    shutil.copytree(SHIPPED_BASE, run / "final")
    (run / "config.yaml").write_text("steps: 1\n")
    (run / "base_model.txt").write_text("acme/tiny\n")
    assert main(["eval", str(run), "--all-checkpoints", *common, "--out", str(tmp_path / "sweep")]) == 0
    assert "[eval] step 0: " + str(hub_cache / "models--acme--tiny" / "snapshots" / SNAPSHOT) in capsys.readouterr().out
    assert main(["eval", "runs/mistyped", *common]) == 1
    err = capsys.readouterr().err
    assert "runs/mistyped is no directory here, and as a hub name: " in err and "not in its cache" in err


def test_a_cached_copy_with_only_the_config_plans_and_does_not_train(hub_cache, unreachable, tmp_path, capsys):
    """A cache that fetched config.json alone (`mgrpo plan` on a login node): plan reads it; training is refused
    naming what the copy lacks, before any model is built (transformers would build a tokenizer of one token from
    such a directory and fail later on something else)."""
    snapshot = hub_cache / "models--acme--tiny" / "snapshots" / SNAPSHOT
    for path in snapshot.iterdir():
        if path.name != "config.json":
            path.unlink()
    assert main(["plan", "model.path=acme/tiny", "--gpu-memory", "80"]) in (0, 1)
    assert "acme/tiny" in capsys.readouterr().out
    assert main(["train", "model.path=acme/tiny", f"run_dir={tmp_path / 'run'}", "rollout.engine=hf",
                 "progress=false"]) == 1
    err = capsys.readouterr().err
    assert f"its cached copy {snapshot} lacks a tokenizer (tokenizer.json), the weights (model.safetensors)" in err


def test_every_shard_an_index_names_must_be_cached(tmp_path):
    from mgrpo.models.loading import missing_files
    model = tmp_path / "m"
    shutil.copytree(SHIPPED_BASE, model)
    assert missing_files(model) == []
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    assert missing_files(model) == ["model-00002-of-00002.safetensors"]
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    assert missing_files(model, whole=False) == []
    assert missing_files(model)[0] == "a tokenizer (tokenizer.json)"


# data.source (and `mgrpo eval --data`) as a `datasets` name: the same, for the datasets cache


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """A datasets cache holding acme/problems as datasets keeps a hub dataset it has loaded
    (<cache>/acme___problems/default/0.0.0/<revision>/: the arrow file and dataset_info.json, written here by
    datasets' own json builder), made the process's cache, with datasets' endpoint the closed port too."""
    import datasets
    from datasets.packaged_modules.json.json import Json
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"problem": "Compute 1 + 2.", "answer": "3"}\n{"problem": "Compute 4 + 1.", "answer": "5"}\n')
    built = Json(data_files={"train": str(rows)}, dataset_name="problems", config_name="default",
                 cache_dir=str(tmp_path / "build"))
    built.download_and_prepare()
    cache = tmp_path / "datasets"
    revision = cache / "acme___problems" / "default" / "0.0.0" / SNAPSHOT
    revision.mkdir(parents=True)
    for path in Path(built.cache_dir).iterdir():
        if path.suffix in (".arrow", ".json"):
            shutil.copy(path, revision)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", CLOSED)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    return cache


def test_a_cached_hub_dataset_is_read_offline_without_waiting(unreachable, datasets_cache, capsys):
    import datasets
    start = time.monotonic()
    problems = load_problems("acme/problems", DataConfig(source="acme/problems"))
    assert time.monotonic() - start < 10                 # datasets' own retries: 24 s
    assert [(p.problem, p.answer) for p in problems] == [("Compute 1 + 2.", "3"), ("Compute 4 + 1.", "5")]
    assert "[data] the Hugging Face hub cannot be reached" in capsys.readouterr().out
    assert datasets.config.HF_HUB_OFFLINE is False       # datasets' offline mode only for that read


def test_a_dataset_neither_reachable_nor_cached_is_an_error_within_seconds(unreachable, datasets_cache, tmp_path,
                                                                         capsys):
    start = time.monotonic()
    assert main(["train", f"model.path={SHIPPED_BASE}", "data.source=acme/missing", f"run_dir={tmp_path / 'run'}",
                 "rollout.engine=hf", "progress=false"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mgrpo train: error: dataset 'acme/missing': the Hugging Face hub cannot be reached")
    assert "not in the datasets cache" in err and "Traceback" not in err
    assert time.monotonic() - start < 10 and not (tmp_path / "run").exists()     # datasets' own retries: 24 s


def test_the_hub_is_asked_once_per_endpoint_and_a_settled_answer_is_kept(monkeypatch):
    """One HEAD per process and endpoint (a run reads its model and datasets, eval several, compare many runs);
    `settle` (rank 0's answer under torchrun) replaces this process's own."""
    heads = []
    server, url = serving(200, heads)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        assert hub_unreachable() is None and hub_unreachable() is None and len(heads) == 1
        settle("rank 0 could not reach it")
        assert hub_unreachable() == "rank 0 could not reach it" and len(heads) == 1
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)          # another setting: asked anew
        assert hub_unreachable() == "HF_HUB_OFFLINE is set"
    finally:
        server.shutdown()


def test_whether_a_setting_may_name_the_hub_is_read_from_its_text():
    """From the text alone: every rank must agree, whatever its node's disk holds (the rank-0 answer is shared by
    a collective only where this says so)."""
    assert may_name_the_hub("Qwen/Qwen3-4B") and may_name_the_hub("gsm8k") and may_name_the_hub("runs/x")
    assert not any(may_name_the_hub(s) for s in (None, "builtin:arithmetic", "/models/q", "./d.jsonl", "~/m",
                                                 "data/math/train.jsonl"))


def test_eval_reads_a_cached_hub_dataset_offline(hub_cache, unreachable, datasets_cache, tmp_path, capsys):
    """`mgrpo eval acme/tiny --data acme/problems` with the hub unreachable: model and data from their caches."""
    start = time.monotonic()
    assert main(["eval", "acme/tiny", "--data", "acme/problems", "--engine", "hf", "--k", "2", "--n", "2",
                 "--out", str(tmp_path / "eval")]) == 0
    assert time.monotonic() - start < 30
    assert (tmp_path / "eval" / "eval.json").is_file()
    assert "dataset acme/problems from the datasets cache" in capsys.readouterr().out
