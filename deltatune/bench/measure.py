"""Measuring the fast paths: activation bytes saved for backward, and step times taken round-robin.

Peak GPU memory of a training step is mostly the tensors saved for backward. Inside ``SavedBytes`` every tensor
autograd packs is seen by a ``torch.autograd.graph.saved_tensors_hooks`` pack hook; the bytes of the unique
storages are added up, leaving out those of the model's parameters and buffers (weights are resident anyway).
On shared machines step times drift, so ``round_robin`` steps every configuration once per round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from types import TracebackType

import torch
from torch import Tensor

from deltatune.kernels._common import transparent


def _key(t: Tensor) -> tuple[str, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (sparse, some subclasses)
        return None
    return str(t.device), storage.data_ptr()


class SavedBytes:
    """Context manager: ``.bytes`` is the size of the unique non-parameter storages saved for backward inside it.

    ``.total_bytes`` counts the excluded storages (weights) too, as targets.md's ratios do.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.bytes = 0
        self.total_bytes = 0
        self.tensors = 0
        self._excluded = {k for k in map(_key, exclude) if k is not None}
        self._seen: set[tuple[str, int]] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @torch.compiler.disable  # run as Python even when a compiled graph saves tensors: not traced, no recompiles
    def _pack(self, t: Tensor) -> Tensor:
        key = _key(t)
        if key is None or key in self._seen:
            return t
        self._seen.add(key)
        size = t.untyped_storage().nbytes()
        self.total_bytes += size
        if key not in self._excluded:
            self.bytes += size
            self.tensors += 1
        return t

    @staticmethod
    @transparent  # identity: the kernels' recompute paths may read saved tensors through it
    def _unpack(t: Tensor) -> Tensor:
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._hooks.__exit__(kind, value, tb)


def count_saved(model: torch.nn.Module, *args: object, **kwargs: object) -> SavedBytes:
    """What one forward of ``model(*args, **kwargs)`` saves for backward; ``.bytes`` leaves the weights out."""
    with SavedBytes([*model.parameters(), *model.buffers()]) as counter:
        model(*args, **kwargs)
    return counter


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(
    fns: dict[str, Callable[[], None]], warmup: int, steps: int, device: torch.device, clock: str = "wall"
) -> dict[str, list[float]]:
    """Milliseconds of each function's calls after ``warmup`` rounds, one call of each per round, order rotated.

    ``clock="cpu"`` reads this process's CPU time instead of the wall clock: with one thread it leaves out the
    time other processes hold the cores, which on a shared machine is most of the noise.
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    names, times = list(fns), {n: [] for n in fns}
    for i in range(warmup + steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            start = now()
            fns[name]()
            sync(device)
            if i >= warmup:
                times[name].append(1e3 * (now() - start))
    return times


def resident_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the unique storages of some tensors (weights, optimizer state)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def cuda_peak(step: Callable[[], None], device: torch.device) -> int:
    """Bytes ``step`` allocates at its peak beyond what was allocated before it (CUDA)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def _same_round_ratios(times: list[float], reference: list[float]) -> list[float]:
    return [t / ref for t, ref in zip(times, reference, strict=True)]


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time in the same round: less swayed by drift across rounds."""
    return statistics.median(_same_round_ratios(times, reference))


def paired_quartiles(times: list[float], reference: list[float]) -> tuple[float, float]:
    """First and third quartiles of the same-round ratios (linear interpolation): how far a round's ratio strays,
    so a reader sees whether a target lies inside the run's noise."""
    ratios = _same_round_ratios(times, reference)
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3
