"""Resumable training checkpoints: one safetensors file, written atomically, read without unpickling anything.

Tensors: the model's deltas and head (``deltatune.delta_state_dict``) and buffers, the EMA copy of those, the
optimizer state, and the torch / CUDA / numpy RNG states. Everything else (epoch, optimizer hyper-parameters,
scheduler, Python RNG state, config, history) is JSON in the file's metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deltatune.core import delta_state_dict
from deltatune.errors import DeltaTuneError
from deltatune.train.config import RESUME_MAY_CHANGE, TrainConfig
from deltatune.train.distributed import Runtime
from deltatune.train.phases import Phase

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
        "optimizer_state": {str(idx): sorted(state) for idx, state in opt["state"].items()},
        "scheduler": scheduler.state_dict(),
        "python_rng": python_rng,
        "numpy_rng": numpy_rng,
    }
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    text = json.dumps(meta)
    metadata = {"deltatune": text, "digest": digest(text, cpu)}
    replace_file(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def digest(meta: str, tensors: dict[str, Tensor]) -> str:
    """sha256 of the metadata text and every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def umask_mode() -> int:
    """The permissions a plainly created file gets (0666 less the umask); mkstemp's 0600 would hide outputs."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def replace_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Writes ``path`` through ``write(temporary path)`` then renames it into place: atomic (a kill leaves the old
    file or the new one), with the umask's permissions, and a symlink at ``path`` is replaced, not written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``replace_file`` for a text file."""
    replace_file(path, lambda tmp: Path(tmp).write_text(text))


def remove_temporaries(folder: Path, names: list[str]) -> list[Path]:
    """Deletes the temporary files ``replace_file`` left for ``names`` in ``folder`` when a run was killed mid-write."""
    found = [f for name in names for f in folder.glob(f".{name}.*.tmp") if f.is_file() or f.is_symlink()]
    for f in found:
        f.unlink(missing_ok=True)
    return found


def _damaged(path: Path, what: str) -> DeltaTuneError:
    return DeltaTuneError(
        f"checkpoint {str(path)!r} {what}; it is damaged or was edited: delete it (or use another --output-dir)"
        " to start over"
    )


def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A checkpoint's metadata and tensors, after checking its digest and that every value is finite."""
    path = Path(path)
    if not path.is_file():
        raise DeltaTuneError(f"checkpoint {str(path)!r} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors has its own error types for corrupt files
        raise DeltaTuneError(f"checkpoint {str(path)!r} is unreadable (corrupt?): {e}; delete it to start over") from e
    try:
        meta = json.loads(raw.get("deltatune", "{}"))
    except json.JSONDecodeError as e:
        raise _damaged(path, f"has unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DeltaTuneError(f"{str(path)!r} is not a deltatune training checkpoint")
    if "digest" not in raw:
        raise _damaged(path, "has no digest (written by an older deltatune?)")
    if digest(raw["deltatune"], tensors) != raw["digest"]:
        raise _damaged(path, "does not match its digest")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise _damaged(path, f"holds NaN/inf values in {bad[:3]}")
    return meta, tensors


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a checkpoint (``info`` holds epoch, history, config), after checking the whole file."""
    return read_state(path)[0]


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
    meta, tensors = read_state(path)
    _load_module(model, tensors, "model", path)
    if ema is not None:
        _load_module(ema, tensors, "ema", path)
    if f"rng/{rank}/torch" not in tensors:
        raise DeltaTuneError(
            f"checkpoint {str(path)!r} was written by {len(meta.get('python_rng', []))} process(es); "
            f"resume it with the same number of processes (this is rank {rank})"
        )
    try:
        _load_optimizer(meta, tensors, optimizer, path)
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors[f"rng/{rank}/torch"])
        if f"rng/{rank}/cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors[f"rng/{rank}/cuda"])
        version, internal, gauss = meta["python_rng"][rank]
        random.setstate((version, tuple(internal), gauss))
        name, pos, has_gauss, cached = meta["numpy_rng"][rank]
        np.random.set_state((name, tensors[f"rng/{rank}/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    except DeltaTuneError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise _damaged(path, f"cannot be restored ({type(e).__name__}: {e})") from None
    return meta["info"]


def _load_optimizer(
    meta: dict[str, Any], tensors: dict[str, Tensor], optimizer: torch.optim.Optimizer, path: Path
) -> None:
    """The optimizer's state, refused unless it holds exactly the entries the file recorded when it was written."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, scalars in meta["optimizer_scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    recorded = {int(k): sorted(v) for k, v in meta["optimizer_state"].items()}
    if {k: sorted(v) for k, v in state.items()} != recorded:
        raise _damaged(path, "lacks part of the optimizer state it recorded")
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})


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


INFO_KEYS = {"epoch": int, "phase": int, "history": list, "config": dict}


def saved_info(path: Path, resume: bool, announce: bool) -> dict[str, Any] | None:
    """The info (epoch, phase, the methods' state, history, config) of the checkpoint to resume from, its whole file
    checked; None without --resume or without a checkpoint yet (``announce``: say so)."""
    if not resume or not (path.exists() or path.is_symlink()):
        if resume and announce:
            print(f"resume: no checkpoint at {path}; starting from epoch 1")
        return None
    info = read_info(path).get("info")
    wrong = [k for k, t in INFO_KEYS.items() if not isinstance(info, dict) or type(info.get(k)) is not t]
    if wrong:
        raise _damaged(path, f"has no valid {', '.join(wrong)} in its info")
    if info["epoch"] < 1 or info["phase"] < 0 or len(info["history"]) != info["epoch"]:
        raise _damaged(
            path,
            f"records epoch {info['epoch']} and phase {info['phase'] + 1} with {len(info['history'])}"
            " epochs of history",
        )
    return info


def check_same_config(path: Path, saved: dict[str, Any], config: dict[str, Any], may_change: tuple[str, ...]) -> None:
    """Refuses to resume with options other than the checkpoint's (but ``may_change``): the run would train a
    mixture of two configurations."""
    changed = [
        f"{k}: {saved.get(k)!r} -> {config.get(k)!r}"
        for k in sorted(set(saved) | set(config))
        if k not in may_change and saved.get(k) != config.get(k)
    ]
    if changed:
        raise DeltaTuneError(
            f"--resume with options changed since {str(path)!r} was written ({'; '.join(changed)}): resume with the"
            f" options it was started with (see config.yaml), or start a new run in another --output-dir. Only"
            f" {', '.join(may_change)} may change"
        )


def resume_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: nn.Module | None,
    rt: Runtime,
    announce: bool,
) -> None:
    """``load_state`` into a model that already has the checkpoint's structure; ``announce``: say so."""
    info = load_state(path, model, optimizer, scheduler, ema, rt.rank)
    if announce:
        print(f"resumed from {path} after epoch {info['epoch']}")


def prepare_output(cfg: TrainConfig, rt: Runtime, checkpoint: str, outputs: list[str]) -> dict[str, Any] | None:
    """Before any data or model is loaded: the output folder is writable, a killed run's temporary files are gone,
    and a checkpoint to resume (returned) is intact and was written with these options."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise DeltaTuneError(
            f"output_dir {cfg.output_dir!r} cannot be created or written ({e.strerror or e}); choose another"
            " --output-dir (a folder you may write to)"
        ) from None
    if rt.is_main:
        remove_temporaries(out, outputs)
    saved = saved_info(out / checkpoint, cfg.resume, rt.is_main and cfg.progress)
    if saved:
        check_same_config(out / checkpoint, saved["config"], cfg.to_dict(), RESUME_MAY_CHANGE)
    return saved


def resume_phase(cfg: TrainConfig, phases: list[Phase], saved: dict[str, Any] | None) -> Phase:
    """The phase the checkpoint was written in, refused when its epoch and phase do not fit this run's plan."""
    if not saved:
        return phases[0]
    index, epoch = saved["phase"], saved["epoch"]
    if index >= len(phases):
        raise DeltaTuneError(
            f"the checkpoint in {cfg.output_dir!r} is from phase {index + 1}, but this run has {len(phases)} phase(s):"
            " resume with the options it was started with (see its config.yaml), or drop --resume"
        )
    if not phases[index].start < epoch <= phases[index].end:
        raise DeltaTuneError(
            f"the checkpoint in {cfg.output_dir!r} records epoch {epoch} in phase {index + 1}, which spans epochs"
            f" {phases[index].start + 1}-{phases[index].end}: it is damaged or was edited; delete it to start over"
        )
    return phases[index]
