"""`mgrpo plan`: every part's GPU memory for a config, phase by phase, and whether it fits (exit 1 if not);
`--nodes N --gpus G`: under the run's mesh, with fsdp's and hsdp's traffic per step side by side and which pays;
`--measure`: the phases run on this machine and measured against the plan (mgrpo/measure.py)."""
from __future__ import annotations

import csv
import datetime
import os
from pathlib import Path

import torch

from ..config import load_config
from ..environment import return_large_blocks_to_the_system
from ..errors import MgrpoError
from ..measure import MEASURED_PHASES, measure_phases, planned_for, planned_peak, report
from ..plan import GIB, INTER_NODE_GBPS, INTRA_NODE_GBPS, check_positive, print_plan

HELP = "every part's GPU memory for a config, and whether it fits (exit 1 if not); --measure: measured against it"


def run(args) -> int:
    check_measure_flags(args)
    cfg = load_config(args.config, args.overrides)
    gpus = 1 if args.gpus is None else args.gpus
    if not args.measure:
        return print_plan(cfg, gpus, args.gpu_memory, args.nodes, args.mesh, args.inter_node_gbps, args.intra_node_gbps)
    if args.nodes != 1:
        raise MgrpoError(f"--nodes {args.nodes} with --measure: the measurement runs on this machine (plan "
                         "several nodes without --measure)")
    if cfg.model.path is not None:
        return_large_blocks_to_the_system()          # as mgrpo train does for a real model
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1" and cfg.algorithm.momentum_dtype == "int8":
        raise MgrpoError("--measure on a CPU with algorithm.momentum_dtype=int8 runs Triton's interpreter: set "
                         "TRITON_INTERPRET=1, or measure algorithm.momentum_dtype=fp32")
    measurement = measure_phases(cfg, args.steps)
    memory = args.gpu_memory or (torch.cuda.get_device_properties(0).total_memory / GIB if on_gpu else 80.0)
    plans = planned_for(cfg, measurement, measurement_world(), memory, on_gpu)
    largest = measurement.micro_batches
    print(f"[plan --measure] {plans['update'].model}, random weights, {args.steps} steps on {measurement.device}; "
          f"largest micro-batch {largest['update'].tokens} tokens in the update, {largest['score'].tokens} in the "
          "scoring (each phase is planned for its own; the table: the update's)")
    print(plans["update"].table())
    print(report(plans, measurement))
    if args.csv:
        write_csv(args.csv, plans, measurement)
    return 0


def check_measure_flags(args) -> None:
    """--steps and --csv only with --measure, and usable: before a minute of measuring, not after it."""
    if not args.measure:
        given = [flag for flag, value in (("--steps", args.steps), ("--csv", args.csv)) if value is not None]
        if given:
            raise MgrpoError(f"{' and '.join(given)}: only used by a measurement: add --measure (or leave "
                             f"{'them' if len(given) > 1 else 'it'} out)")
        return
    if args.steps is None:
        args.steps = 2
    if args.steps < 1:
        raise MgrpoError(f"--steps {args.steps}: must be >= 1 (the last step is the one reported)")
    if args.gpu_memory is not None:
        check_positive("--gpu-memory", args.gpu_memory, "GiB")
    if args.csv:
        path = Path(args.csv)
        if path.is_dir():
            raise MgrpoError(f"--csv {path} is a directory: give a file path")
        files = [p for p in path.parents if p.exists() and not p.is_dir()]
        if files:
            raise MgrpoError(f"--csv {path}: {files[0]} is a file, not a directory: give a path in a directory")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MgrpoError(f"--csv {path}: cannot make its directory {path.parent} ({e.strerror or e})") from None
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise MgrpoError(f"--csv {path}: not writable here: give a path that can be written")


def write_csv(path: str, plans: dict, measurement) -> None:
    """Append one row per phase (bench/run_gpu.sh keeps them with the other benchmarks' rows)."""
    path = Path(path)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "device", "model", "phase", "planned_bytes", "measured_bytes", "micro_batch_tokens"])
        for phase in MEASURED_PHASES:
            shape = measurement.micro_batches.get("score" if phase == "score" else "update")
            writer.writerow([datetime.datetime.now().isoformat(timespec="seconds"), measurement.device,
                             plans[phase].model, phase, int(planned_peak(plans[phase], phase)),
                             measurement.phases.get(phase, ""), shape.tokens if shape else ""])


def measurement_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML config (e.g. configs/qwen3_4b_1gpu.yaml)")
    parser.add_argument("--gpus", type=int, help="GPUs (ranks) the run uses, per node (default 1)")
    parser.add_argument("--nodes", type=int, default=1,
                        help="nodes of --gpus GPUs each (default 1); more than one adds both meshes' traffic per step "
                             "and which mesh pays")
    parser.add_argument("--mesh", help="FSDP2's device mesh to plan the memory for: auto (hsdp on several nodes), fsdp "
                                       "(sharded over every GPU) or hsdp (sharded within a node, replicated across "
                                       "nodes); default: the config's distributed.mesh")
    parser.add_argument("--inter-node-gbps", type=float, default=INTER_NODE_GBPS,
                        help=f"the inter-node link, Gb/s per node shared by its GPUs (default {INTER_NODE_GBPS:g})")
    parser.add_argument("--intra-node-gbps", type=float, default=INTRA_NODE_GBPS,
                        help=f"a GPU's intra-node link, Gb/s each way (default {INTRA_NODE_GBPS:g}: NVLink 4)")
    parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (default: this machine's GPU, else 80)")
    parser.add_argument("--measure", action="store_true",
                        help="run setup and --steps training steps here (random weights at the config's shape, "
                             "synthetic rollouts) and print each phase's measured peak against the plan")
    parser.add_argument("--steps", type=int, help="with --measure: steps to run (default 2; the last one is reported)")
    parser.add_argument("--csv", help="with --measure: append planned and measured bytes per phase to this CSV")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as mgrpo train takes them")
