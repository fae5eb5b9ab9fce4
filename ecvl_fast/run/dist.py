"""Distributed setup, read from torchrun's environment in one place, and the one gather helper."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ecvl_fast import EcvlError


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto": this rank's GPU where CUDA is available, else the CPU; "cpu" or "cuda" as asked."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


SRUN_FORM = (
    "srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc-per-node=$GPUS_PER_NODE "
    "--rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 -m ecvl_fast.cli train ..."
)


def check_launcher(env=os.environ) -> None:
    """Several SLURM tasks without torchrun's variables would each train as rank 0 of a world of 1,
    all writing the same folder: refuse, showing the form that works (docs/cluster.md)."""
    tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if tasks > 1 and not {"WORLD_SIZE", "RANK", "LOCAL_RANK"} & set(env):
        raise EcvlError(
            f"SLURM_NTASKS={tasks} but no torchrun variables: each task would train alone as rank 0. "
            f"Start one torchrun per node: {SRUN_FORM}"
        )


def setup(device: str = "auto", backend: str = "auto") -> Dist:
    """One process per GPU under torchrun (NCCL), or per CPU process (gloo); plain single process otherwise."""
    check_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=("nccl" if use_cuda else "gloo") if backend == "auto" else backend,
            store=attempt_store(rank, world),
            rank=rank,
            world_size=world,
        )
    return Dist(rank, local_rank, world, dev)


def attempt_store(rank: int, world: int) -> dist.Store:
    """The env:// store, with a prefix that names this start of the worker group.

    torchrun's agent serves one TCPStore to every restart of its workers and adds no prefix per
    restart (torch 2.4+; pytorch/pytorch#135712), so a restarted worker can read the keys of the
    attempt that failed (gloo's peer addresses: "connectFullMesh failed ... Connection refused",
    or a hang). TORCHELASTIC_RESTART_COUNT cannot name the attempt: each agent counts its own
    restarts, and a healthy node restarts its workers without counting. Every rank index is
    started once per attempt on every node, though, so the number of starts of this rank index,
    counted in the store itself, is the same on all ranks."""
    store, _, _ = next(dist.rendezvous("env://", rank, world))
    starts = store.add(f"ecvl/starts/rank{rank}", 1)
    return dist.PrefixStore(f"ecvl/attempt{starts}/", store)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class session:
    """`with D.session(device, backend) as d:` sets up the process group if none exists and tears
    down only one it set up, so several stages can share one group (`ablate` runs many in turn:
    re-creating a group under torchrun's store can hang)."""

    def __init__(self, device: str = "auto", backend: str = "auto"):
        self.device, self.backend = device, backend

    def __enter__(self) -> Dist:
        self.owned = not dist.is_initialized()
        return setup(self.device, self.backend)

    def __exit__(self, *exc) -> None:
        if self.owned:
            teardown()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over ranks, rank order; gradients flow back to each rank's slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), 0)


def gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over ranks without gradients (labels)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def gather_arrays(*arrays):
    """Concatenate numpy arrays over ranks (eval predictions); every rank gets the result."""
    import numpy as np

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return arrays
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, arrays)
    return tuple(np.concatenate([o[i] for o in out]) for i in range(len(arrays)))


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
