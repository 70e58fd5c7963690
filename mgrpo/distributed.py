"""The thin rank layer: process group, FSDP2 sharding, full-tensor gathers and cross-rank reductions.

One process (no torchrun) is world size 1: every collective here is then the identity. In fp32 no process
group exists and the model is a plain module; in bf16 mixed precision one process runs FSDP2 too, on a
one-rank process group (an in-memory store, nothing listens), so its numerics, its loading and its memory
(bf16 copies of one layer at a time, not autocast's cache of all of them) are those of the 8-GPU path.
Under torchrun:

    torchrun --nproc_per_node=8 -m mgrpo train --config configs/qwen3_4b.yaml ...

every rank runs the same loop on its own share of the step's prompts (every prompt's whole group on one
rank: the vote, the filter and the advantages stay local), with FSDP2 (`fully_shard`) sharding the policy
and the KL reference: each decoder layer, then the root. The process group is nccl on GPUs, gloo on CPUs.

On several nodes (`torchrun --nnodes N --nproc_per_node G --rdzv_backend c10d --rdzv_endpoint HOST:PORT ...`),
distributed.mesh picks FSDP2's mesh: hsdp (auto's choice there) is a 2-D mesh, replicate across the N nodes x
shard over a node's G ranks, so the parameter gathers of every forward and the engines' weight push stay inside a
node and only the gradients' all-reduce crosses nodes; fsdp shards over all N x G ranks.

The math never sees a rank: the trainer calls `Dist` for the few global quantities (token counts for the
loss normalisation, the step's metrics) and `full_tensors` to feed the engines one full tensor at a time.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, NoReturn, Optional

import torch
from mgrpo_kernels.runtime import local_tensor  # noqa: F401  (the kernels' own: one definition)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False
    """The model is sharded by FSDP2 (always under torchrun; on one process for mixed precision)."""
    nodes: int = 1
    """Nodes torchrun runs on (WORLD_SIZE / LOCAL_WORLD_SIZE)."""
    mesh: str = "fsdp"
    """FSDP2's mesh: fsdp (1-D, shard over every rank) or hsdp (2-D: replicate across nodes, shard within one)."""
    _device_mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # -- collectives: identity on one process ------------------------------------------------------------
    def all_reduce(self, values: list, op: str = "sum") -> list:
        """Element-wise sum or max of a list of floats over ranks."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def device_mesh(self):
        """FSDP2's device mesh, made once (a mesh makes process groups: every rank must ask for it together)."""
        if self._device_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh
            shape, names = ((self.nodes, self.world_size // self.nodes), ("replicate", "shard")) \
                if self.mesh == "hsdp" else ((self.world_size,), ("shard",))
            self._device_mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
        return self._device_mesh

    def split_evenly(self, items: list) -> list:
        """This rank's share of a list of any length, strided (the first ranks take one more when it does not
        divide)."""
        return items[self.rank::self.world_size]


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype forwards compute in (model.precision): auto = bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def node_count() -> int:
    """Nodes of a torchrun job: its ranks over the ranks per node (torchrun's LOCAL_WORLD_SIZE)."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if not local or world % local:
        return 1
    return world // local


def choose_mesh(mesh: str, nodes: int) -> str:
    """distributed.mesh resolved: auto = hsdp on more than one node, else fsdp; hsdp on one node is fsdp (a 1 x G
    mesh replicates nothing)."""
    if mesh == "auto":
        return "hsdp" if nodes > 1 else "fsdp"
    return "fsdp" if nodes == 1 else mesh


# The process groups init_distributed opened (close_distributed destroys them; one a caller opened is theirs).
_OPENED_HERE: list = []
_OPENED_ANY = [False]       # whether init_distributed ever opened one in this process (exit_process)


def close_distributed() -> None:
    """Destroy the process group init_distributed opened, while the interpreter is still whole. Left to exit,
    gloo's worker threads outlive it and the process can abort after a clean run ("terminate called without an
    active exception", SIGABRT: pytorch/pytorch PR 179291), which torchrun reports as a failed rank."""
    while _OPENED_HERE:
        group = _OPENED_HERE.pop()
        if torch.distributed.is_initialized() and torch.distributed.group.WORLD is group:
            torch.distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with exit status `code`, after close_distributed. A torchrun rank, or one process that
    opened a process group (FSDP2 in mixed precision: bf16 on a CPU, every run on a GPU), leaves through os._exit
    once its output is flushed, skipping the interpreter's teardown. Destroying the group is not enough:
    references survive it (DTensor's module-level caches hold the DeviceMesh, and through it the gloo groups),
    their worker threads are destroyed unjoined during the teardown, and a rank that finished (or checkpointed on
    a signal) can still abort ("terminate called without an active exception", SIGABRT), which torchrun reports
    as a failed rank in place of exit 0 or 75. Nothing is left to the teardown by then: the trainer has closed
    its files and written its checkpoints, and the vLLM engine runs inside this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, mgrpo/environment.py). A process without a group exits normally."""
    if not (launched_by_torchrun() or _OPENED_ANY[0]):
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def init_distributed(device: str = "auto", precision: str = "fp32", mesh: str = "auto") -> Dist:
    """The process group when launched by torchrun (reused if one exists), else world size 1. One process in
    mixed precision (`precision` resolving to bf16) gets a one-rank group on an in-memory store, for FSDP2.
    `mesh`: distributed.mesh (auto, fsdp or hsdp), resolved by the node count."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible: use device=cpu or device=auto")
    if not launched_by_torchrun():
        dev = torch.device("cuda" if want_cuda else "cpu")
        fsdp_on_one_process = compute_dtype(precision, dev) != torch.float32
        if fsdp_on_one_process and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if want_cuda else "gloo", store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1)
            _OPENED_HERE.append(torch.distributed.group.WORLD)
            _OPENED_ANY[0] = True
        return Dist(device=dev, fsdp=fsdp_on_one_process)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                             device_id=dev if dev.type == "cuda" else None)
        _OPENED_HERE.append(torch.distributed.group.WORLD)
        _OPENED_ANY[0] = True
    nodes = node_count()
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, fsdp=True, nodes=nodes,
                mesh=choose_mesh(mesh, nodes))


# ---------------------------------------------------------------------------------------------------------
# FSDP2

def shard_model(module: torch.nn.Module, decoder_layers: list, dist: Dist,
                param_dtype: Optional[torch.dtype]) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root `module` (which holds the rest: embedding = tied lm_head,
    final norm), on the run's mesh (a 2-D one is HSDP: sharded within a node, replicated across nodes).
    param_dtype=bf16 on GPUs computes in bf16 from fp32 master shards and reduces gradients in fp32; None (CPU)
    computes in the parameters' dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = dist.device_mesh()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in decoder_layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    # The loss is normalised by the global token count already (trainer: update), so gradients must be
    # summed over ranks, not averaged. Plain SUM collectives: gloo has neither AVG nor PREMUL_SUM, and NCCL's
    # zero-copy path wants SUM too.
    for m in [*decoder_layers, module]:
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return module


def reduce_across_nodes(module: torch.nn.Module, dist: Dist, now: bool) -> None:
    """HSDP: the next backward all-reduces the gradients across nodes only when `now` (the update's last
    micro-batch). Every backward still reduce-scatters within the node, and FSDP2 accumulates those shards, so
    the slow inter-node link carries one all-reduce per update, not one per micro-batch."""
    if dist.fsdp and dist.mesh == "hsdp":
        module.set_requires_all_reduce(now, recurse=True)


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "to_local")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor), or the tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like `param`: a DTensor with param's mesh and placements for a sharded param."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(),
                              run_check=False)


def full_tensors(named: Iterable, dtype: Optional[torch.dtype] = None) -> Iterator:
    """(name, full tensor) one at a time, cast to `dtype` before the gather (exact, and half the traffic for
    bf16). A collective per tensor: every rank must walk the same names in the same order."""
    for name, t in named:
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        yield name, full_tensor(t)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for these tensors (local shards of DTensors)."""
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)
