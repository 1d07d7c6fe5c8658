"""Where a run writes: its own new folder by default (``runs/<method>-<YYYYmmdd-HHMMSS>``), never a previous run's
folder behind the user's back (refused unless ``--resume`` or ``--overwrite``)."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from deltatune.errors import DeltaTuneError
from deltatune.train.distributed import Runtime

RUNS = Path("runs")
EXTRA_OUTPUTS = ("allocation.png", "tb")  # written by some runs only; --overwrite removes them too


def default_output_dir(cfg: Any, now: float | None = None) -> str:
    """``runs/<method>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... if that folder already exists."""
    names = cfg.stages or (cfg.method if isinstance(cfg.method, list) else [cfg.method])
    label = "-".join(n.replace("+", "-") for n in names)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path, n = RUNS / f"{label}-{stamp}", 1
    while path.exists():
        n += 1
        path = RUNS / f"{label}-{stamp}-{n}"
    return str(path)


def resolve_output_dir(cfg: Any, rt: Runtime, outputs: list[str]) -> Any:
    """The config with its output folder decided (the same on every process), checked and, with --overwrite,
    cleared of the previous run's files (only the file names a run writes; nothing else is deleted)."""
    if cfg.output_dir is None:
        if cfg.resume:
            raise DeltaTuneError("--resume continues a run in its folder: give that folder as --output-dir")
        chosen = [default_output_dir(cfg) if rt.is_main else None]
        if rt.distributed:
            dist.broadcast_object_list(chosen, src=0)
        cfg = dataclasses.replace(cfg, output_dir=chosen[0])
    out = Path(cfg.output_dir)
    used = out.is_dir() and any(not (f.name.startswith(".") and f.name.endswith(".tmp")) for f in out.iterdir())
    if used and not cfg.resume:  # a killed write's temporaries alone do not make a run
        if not cfg.overwrite:
            raise DeltaTuneError(
                f"output_dir {str(out)!r} is not empty (a previous run?): pass --resume to continue it, --overwrite"
                " to replace its run files, or another --output-dir (without one, each run gets runs/<method>-<time>)"
            )
        if rt.is_main:
            _remove_outputs(out, [*outputs, *EXTRA_OUTPUTS])
    if rt.distributed:
        dist.barrier()
    return cfg


def _remove_outputs(out: Path, names: list[str]) -> None:
    for name in names:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def result_line(report: dict[str, Any], out: str | Path) -> str:
    """The one line every run prints at its end, even with --no-progress: the result and where it went."""
    return (
        f"{report['method']}: {_score(report)} after {report['epochs']} epochs, "
        f"{report.get('trainable_params', 0):,} trainable parameters; wrote {out}/ (delta.safetensors, report.json)"
    )


def _score(report: dict[str, Any]) -> str:
    """The run's main number: perplexity for a causal LM, else top-1."""
    return f"perplexity {report['perplexity']:.2f}" if "perplexity" in report else f"top-1 {report['top1']:.2f}%"
