"""Test setup: Triton runs under its interpreter on a CPU (set before any kernel module is imported), and the
process is configured as the mgrpo command configures it.

Under pytest-xdist (the README's `-n 2`) each worker gets its share of the cores, and a thread that waits for its
team sleeps instead of spinning: two workers of two OpenMP threads each on two cores spin against each other (a
150-step warm start took 7 minutes instead of 48 s). Processes a test starts inherit both settings."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mgrpo.environment import configure_process  # noqa: E402  (after TRITON_INTERPRET: kernels read it at import)

configure_process()          # what the mgrpo command does at its entry: vLLM in-process, quiet libraries

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: end-to-end runs of the trainer (seconds to a minute each)")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """The session's warm-start cache directory, empty: with the default warm-start settings every test's base
    model is the shipped one (mgrpo/data/assets, sha256-verified), the model `mgrpo train` starts from with no
    arguments, so nothing is trained here (a 150-step warm start of our own cost 80 CPU-seconds of the suite).
    A test that changes the warm-start settings trains that model in here, never in the user's ~/.cache."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                 # each worker's basetemp is a folder of the session's
    cache = root / "model-cache"
    cache.mkdir(exist_ok=True)
    return cache
