"""Where a training process runs: device, rank and world size, from ``torchrun``'s environment variables.

Under ``torchrun --nproc_per_node N`` (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
the process group is initialised with nccl on GPUs and gloo on CPU; otherwise everything is single-process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deltatune.errors import DeltaTuneError


@dataclass
class Runtime:
    """The process's place in the run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast when AMP is on, a no-op context otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeltaTuneError(f"device {name!r} is not a device name (cpu, cuda, cuda:N or auto): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeltaTuneError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def runtime(device: str = "auto", amp: bool | None = None) -> Iterator[Runtime]:
    """Joins the process group if launched by torchrun (and leaves it at the end); yields the Runtime."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        created = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    use_amp = dev.type == "cuda" if amp is None else amp
    try:
        yield Runtime(dev, rank, world_size, use_amp)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(rt: Runtime, values: list[float]) -> list[float]:
    """Sums a few numbers over all processes (identity when single-process)."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(rt: Runtime) -> None:
    """Waits for every process (no-op when single-process)."""
    if rt.distributed:
        dist.barrier()


def broadcast_flag(rt: Runtime, flag: bool) -> bool:
    """Rank 0's boolean, on every process."""
    if not rt.distributed:
        return flag
    t = torch.tensor([int(flag)], device=rt.device)
    dist.broadcast(t, 0)
    return bool(t.item())
