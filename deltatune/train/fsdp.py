"""Fully sharded training (PyTorch FSDP2, ``fully_shard``) for ``deltatune train --fsdp`` under ``torchrun``.

Every transformer block is one FSDP unit and the root holds the rest (embeddings, head, final norm). A unit mixes
the frozen backbone with the trainable deltas: FSDP2 shards both alike, all-gathers both for the forward and
reduce-scatters gradients only for the parameters that have them. Each rank then holds 1/N of the backbone.

Files stay the single-process ones: ``gathered`` all-gathers the delta and head tensors (and their AdamW state)
into full plain parameters for the time rank 0 saves a checkpoint or a delta file, or all ranks load one; on the
way out loaded values are re-sharded into the ranks' shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from deltatune import _precision
from deltatune.core import delta_state_dict
from deltatune.errors import DeltaTuneError
from deltatune.train.distributed import Runtime


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the children of the ModuleList / Sequential that holds the most parameters."""
    best: list[nn.Module] = []
    size = 0
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = list(module), n
    return best


def shard(model: nn.Module, rt: Runtime) -> nn.Module:
    """Shards ``model`` in place over all ranks: one FSDP unit per block, then the root; returns it."""
    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    policy = _policy(model)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _policy(model: nn.Module) -> MixedPrecisionPolicy:
    """Deltas kept wider than the backbone (``--precision bf16 --delta-dtype float32``): FSDP casts every parameter
    to the backbone's dtype at the all-gather and reduces gradients in float32, in place of the cast-at-use hooks
    (which would cast the sharded tensors before FSDP gathers them)."""
    compute = _precision.compute_dtype(model)
    if compute is None:
        return MixedPrecisionPolicy()
    _precision.release(model)
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def check_supported(ema: bool, phases: int) -> None:
    """Refuses what --fsdp does not do yet: an EMA copy, and runs whose phases change the model's structure."""
    if ema:
        raise DeltaTuneError("--fsdp does not keep an EMA copy yet: drop --ema-decay, or train without --fsdp (DDP)")
    if phases > 1:
        raise DeltaTuneError(
            "--fsdp trains one phase: sequential --stages and MiMi pruning rebuild the model between phases; train"
            " them without --fsdp (DDP)"
        )


def local_bytes(model: nn.Module, trainable: bool = False) -> int:
    """Bytes of the parameters this rank holds (its shards under FSDP): the frozen backbone's, or the deltas'."""
    total = 0
    for p in model.parameters():
        if p.requires_grad == trainable:
            local = p.to_local() if isinstance(p, DTensor) else p
            total += local.numel() * local.element_size()
    return total


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) that holds each parameter: tied parameters have several."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, name))
    return out


def _set(owners: list[tuple[nn.Module, str]], value: nn.Parameter) -> None:
    for module, name in owners:
        module._parameters[name] = value


def _gather(model: nn.Module, frozen: bool) -> dict[str, tuple[DTensor, nn.Parameter]]:
    """Each sharded delta/head parameter (and with ``frozen`` the backbone's, on the CPU), all-gathered: by name,
    (the shard, a full plain parameter). Every rank calls it in the same order."""
    for module in model.modules():  # the root keeps its parameters unsharded after a forward (evaluation)
        if isinstance(module, FSDPModule):
            module.reshard()
    deltas = set(delta_state_dict(model))
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor) and (name in deltas or frozen):
            full = p.full_tensor().detach()
            out[name] = (p, nn.Parameter(full if name in deltas else full.cpu(), requires_grad=p.requires_grad))
    return out


def _reshard(state: dict[str, Any], sharded: DTensor) -> dict[str, Any]:
    """An optimizer state entry of a full parameter, its tensors of the parameter's shape sharded like it."""
    return {
        k: distribute_tensor(v.to(sharded.device), sharded.device_mesh, sharded.placements)
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape == sharded.shape
        else v
        for k, v in state.items()
    }


def _swap_optimizer(optimizer: torch.optim.Optimizer, old: Any, new: Any, state: dict[str, Any] | None) -> None:
    """Puts ``new`` in ``old``'s place in the optimizer's groups, with ``state`` (if any) as its state."""
    for group in optimizer.param_groups:
        group["params"] = [new if q is old else q for q in group["params"]]
    optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = state


@contextmanager
def gathered(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, frozen: bool = False, load: bool = False
) -> Iterator[None]:
    """Inside: the delta/head parameters are full plain parameters on every rank (and their optimizer state full
    tensors), so the single-process checkpoint and delta-file code reads or writes them unchanged.

    Args:
        model: A model sharded by ``shard`` (a no-op for any other).
        optimizer: Its optimizer, whose state follows the parameters.
        frozen: Gather the frozen backbone too, to the CPU (``save_delta`` records a hash of its values).
        load: Copy the values (and optimizer state) found inside back into the shards on the way out.
    """
    swapped = _gather(model, frozen)
    owners = _owners(model)  # after _gather: resharding registers the shards again
    kept: dict[int, dict[str, Any]] = {}
    for sharded, full in swapped.values():
        _set(owners[id(sharded)], full)
        if optimizer is not None and sharded in optimizer.state:
            kept[id(sharded)] = optimizer.state[sharded]
            state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in kept[id(sharded)].items()}
            _swap_optimizer(optimizer, sharded, full, state)
        elif optimizer is not None:
            _swap_optimizer(optimizer, sharded, full, None)
    try:
        yield
    finally:
        for sharded, full in swapped.values():
            _set(owners[id(sharded)], sharded)
            if load:
                with torch.no_grad():
                    value = distribute_tensor(full.detach().to(sharded.device), sharded.device_mesh, sharded.placements)
                    sharded.to_local().copy_(value.to_local())
            if optimizer is not None:
                state = optimizer.state.get(full)
                state = _reshard(state, sharded) if load and state is not None else kept.get(id(sharded))
                _swap_optimizer(optimizer, full, sharded, state)
