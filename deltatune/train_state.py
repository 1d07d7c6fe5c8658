"""Resumable training checkpoints: one safetensors file, written atomically, read without unpickling anything.

Tensors: the model's deltas and head (``deltatune.delta_state_dict``) and buffers, the EMA copy of those, the
optimizer state, and the torch / CUDA / numpy RNG states. Everything else (epoch, optimizer hyper-parameters,
scheduler, Python RNG state, config, history) is JSON in the file's metadata.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deltatune.core import delta_state_dict
from deltatune.distributed import Runtime
from deltatune.errors import DeltaTuneError

FORMAT = "deltatune-train-state"


def _module_tensors(model: nn.Module, prefix: str) -> dict[str, Tensor]:
    out = {f"{prefix}/param/{k}": v for k, v in delta_state_dict(model).items()}
    out.update({f"{prefix}/buffer/{k}": v for k, v in model.state_dict().items() if k in dict(model.named_buffers())})
    return out


def save_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: nn.Module | None,
    info: dict[str, Any],
    rng_states: list[dict[str, Any]],
) -> None:
    """Writes everything needed to continue training exactly.

    Args:
        path: The checkpoint file (replaced atomically).
        model: The tuned model (not the DDP wrapper).
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler.
        ema: The EMA copy of the model, if any.
        info: JSON-able facts: epoch, history, config.
        rng_states: ``rng_state()`` of every process, by rank.
    """
    tensors = _module_tensors(model, "model")
    if ema is not None:
        tensors.update(_module_tensors(ema, "ema"))
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    python_rng, numpy_rng = [], []
    for rank, rng in enumerate(rng_states):
        tensors[f"rng/{rank}/torch"] = rng["torch"]
        if rng["cuda"] is not None:
            tensors[f"rng/{rank}/cuda"] = rng["cuda"]
        name, keys, pos, has_gauss, cached = rng["numpy"]
        tensors[f"rng/{rank}/numpy"] = torch.from_numpy(keys.astype(np.int64))
        numpy_rng.append([name, int(pos), int(has_gauss), float(cached)])
        python_rng.append(rng["python"])
    meta = {
        "format": FORMAT,
        "info": info,
        "optimizer_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "python_rng": python_rng,
        "numpy_rng": numpy_rng,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        save_file(cpu, tmp, metadata={"deltatune": json.dumps(meta)})
        os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a checkpoint (``info`` holds epoch, history, config)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("deltatune", "{}"))
    except Exception as e:  # safetensors has its own error types for corrupt files
        raise DeltaTuneError(f"checkpoint {str(path)!r} is unreadable (corrupt?): {e}; delete it to start over") from e
    if meta.get("format") != FORMAT:
        raise DeltaTuneError(f"{str(path)!r} is not a deltatune training checkpoint")
    return meta


def _load_module(module: nn.Module, tensors: dict[str, Tensor], prefix: str, path: Path) -> None:
    params = {**dict(module.named_buffers()), **dict(module.named_parameters())}  # delta: BatchNorm statistics too
    buffers = dict(module.named_buffers())
    expected = {f"{prefix}/param/{k}" for k in delta_state_dict(module)}
    expected |= {f"{prefix}/buffer/{k}" for k in module.state_dict() if k in buffers}
    got = {k for k in tensors if k.startswith(prefix + "/")}
    if got != expected:
        raise DeltaTuneError(
            f"checkpoint {str(path)!r} does not fit this model (missing {sorted(expected - got)[:3]}"
            f", unexpected {sorted(got - expected)[:3]}); it was written by another configuration:"
            " use another --output-dir or drop --resume"
        )
    with torch.no_grad():
        for key in expected:
            kind, name = key[len(prefix) + 1 :].split("/", 1)
            target = params[name] if kind == "param" else buffers[name]
            if target.shape != tensors[key].shape:
                raise DeltaTuneError(
                    f"checkpoint {str(path)!r}: {name} has shape {tuple(tensors[key].shape)}, "
                    f"the model's is {tuple(target.shape)}"
                )
            target.copy_(tensors[key])


def load_state(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: nn.Module | None,
    rank: int = 0,
) -> dict[str, Any]:
    """Restores a checkpoint written by ``save_state`` into freshly built objects; returns its ``info``."""
    path = Path(path)
    meta = read_info(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _load_module(model, tensors, "model", path)
    if ema is not None:
        _load_module(ema, tensors, "ema", path)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, scalars in meta["optimizer_scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if f"rng/{rank}/torch" not in tensors:
        raise DeltaTuneError(
            f"checkpoint {str(path)!r} was written by {len(meta['python_rng'])} process(es); "
            f"resume it with the same number of processes (this is rank {rank})"
        )
    torch.set_rng_state(tensors[f"rng/{rank}/torch"])
    if f"rng/{rank}/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng/{rank}/cuda"])
    version, internal, gauss = meta["python_rng"][rank]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy_rng"][rank]
    np.random.set_state((name, tensors[f"rng/{rank}/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    return meta["info"]


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def write_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: nn.Module | None,
    info: dict[str, Any],
    rt: Runtime,
) -> None:
    """``save_state`` for a run on ``rt``: rank 0 writes every process's RNG state with the rest; the others wait
    so that no one runs ahead."""
    states: list[Any] = [None] * rt.world_size
    if rt.distributed:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if rt.is_main:
        save_state(path, model, optimizer, scheduler, ema, info, states)
    if rt.distributed:
        dist.barrier()


def saved_info(path: Path, resume: bool, announce: bool) -> dict[str, Any] | None:
    """The info (epoch, phase, adapter sizes, history) of the checkpoint to resume from; None without --resume
    or without a checkpoint yet (``announce``: say so)."""
    if not resume or not path.is_file():
        if resume and announce:
            print(f"resume: no checkpoint at {path}; starting from epoch 1")
        return None
    return read_info(path)["info"]


def resume_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: nn.Module | None,
    rt: Runtime,
    config: dict[str, Any],
    announce: bool,
) -> None:
    """``load_state`` into a model that already has the checkpoint's structure; ``announce``: say which options
    differ from the checkpoint's ``config``."""
    info = load_state(path, model, optimizer, scheduler, ema, rt.rank)
    ignored = ("resume", "progress", "num_workers", "threads")
    changed = sorted(k for k, v in info["config"].items() if config.get(k) != v and k not in ignored)
    if announce:
        print(
            f"resumed from {path} after epoch {info['epoch']}"
            + (f" (options changed since: {', '.join(changed)})" if changed else "")
        )
