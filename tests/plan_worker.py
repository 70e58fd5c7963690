"""Set a run up (no step) and write the exact bytes of each part this rank holds, for tests/test_plan.py:

    python -m torch.distributed.run --nproc_per_node=2 -m tests.plan_worker MODEL_DIR OUT [overrides ...]   (from the
    repository root; tests/test_plan.py also calls `measure` in its own process)
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")     # before any kernel module is imported

from transformers import AutoConfig, AutoTokenizer  # noqa: E402

from mgrpo.build import measured_memory, setup  # noqa: E402
from mgrpo.config import load_config  # noqa: E402
from mgrpo.distributed import init_distributed  # noqa: E402
from mgrpo.models.loading import parameter_names  # noqa: E402
from tests.scripted_engine import ScriptedEngine  # noqa: E402


def measure(model_dir: str, out: Path, overrides: list) -> dict:
    cfg = load_config(None, [f"model.path={model_dir}", f"run_dir={out / 'run'}", "data.num_eval=0", "rollout.engine=hf",
                             *overrides])
    dist = init_distributed(cfg.device, cfg.model.precision)
    # the parameter names from the config alone (a meta-device model: shapes, no weights, no loader)
    names = parameter_names(AutoConfig.from_pretrained(model_dir), cfg)
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(model_dir), names, record_pushes=False)
    parts = setup(cfg, dist, lambda *a: None, engine)
    return {"rank": dist.rank, "world_size": dist.world_size,
            "parts": measured_memory(parts.models, parts.optimization.optimizer)}


if __name__ == "__main__":
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    result = measure(model_dir, out, sys.argv[3:])
    (out / f"memory_rank{result['rank']}.json").write_text(json.dumps(result))
    import torch.distributed
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
