"""Distributed setup, read from torchrun's environment in one place, and the one gather helper."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    """"auto": this rank's GPU where CUDA is available, else the CPU; "cpu" or "cuda" as asked."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def setup(device: str = "auto", backend: str = "auto") -> Dist:
    """One process per GPU under torchrun (NCCL), or per CPU process (gloo); plain single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=("nccl" if use_cuda else "gloo") if backend == "auto" else backend)
    return Dist(rank, local_rank, world, dev)


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

