"""LoRA's rank-r gradients as one compiled CPU kernel (``lowrank.c``), beside the PyTorch ops that stay the fallback.

Eager PyTorch computes ``dA = s (dy B)^T x`` and ``dB = s dy^T (x A^T)`` as four skinny matmuls, each reading a whole
activation from memory for r multiply-adds per element. The kernel reads each row block of ``dy`` and ``x`` once and
does all four products on it while it is in cache; after a LayerNorm it recomputes x per block from the LayerNorm's
input, mean and rstd, so x is never written out whole (vit_small@112, b32, all linears, 2 threads: the products and
the LayerNorm recompute from 96 to 70 ms a step, the step from 1.099x to 1.068x the floor,
``scripts/ablate_fast_paths.py --pieces``). Results are deterministic for a given thread count.

It is built on first use with the system C compiler (``$CC``, else ``cc`` or ``gcc``; ``-O3 -march=native
-fopenmp``), cached under ``$DELTATUNE_KERNEL_CACHE`` (default ``~/.cache/deltatune/kernels``) by a hash of the
source, flags and CPU, and loaded with ctypes; its OpenMP threads are the ones torch's own libgomp runs. Without a
compiler, or where a build fails, a warning says so once and the PyTorch ops serve. ``DELTATUNE_NATIVE=0`` or
``kernels.native_kernels(False)`` switches it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.kernels._common import rows, wants_native

RANKS = (4, 8, 16)  # compiled per rank: the rank sizes the kernel's registers
SOURCE = Path(__file__).with_name("lowrank.c")
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"))  # the second where -march=native fails
FALLBACK = "LoRA's CPU backward runs its rank-r products as PyTorch matmuls (slower)"


def _cache_dir() -> Path:
    root = os.environ.get("DELTATUNE_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltatune" / "kernels"


def _cpu() -> str:
    """What ``-march=native`` builds for: the CPU's flags (Linux), else the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str, flags: tuple[str, ...], rank: int) -> Path:
    """The shared library for ``rank``, compiled into the cache unless it is there (written atomically)."""
    args = (*flags, "-fPIC", "-shared", f"-DR={rank}")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(args).encode(), _cpu().encode()]))
    path = _cache_dir() / f"lowrank_r{rank}_{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *args, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, path)  # concurrent builders (DDP ranks) each write their own file; the last rename wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def library(rank: int) -> ctypes.CDLL | None:
    """The kernel for ``rank``, built and loaded once per process; None (and a warning) where it cannot be."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn(f"deltatune: no C compiler found ($CC, cc, gcc): {FALLBACK}", stacklevel=2)
        return None
    errors = []
    for flags in FLAG_SETS:
        try:
            lib = ctypes.CDLL(str(_build(compiler, flags, rank)))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            errors.append(f"{' '.join(flags)}: {e} {detail.decode(errors='replace')[-300:]}".strip())
            continue
        fn = lib.lowrank_grads
        fn.restype = ctypes.c_int
        pointers = [ctypes.c_void_p] * 4
        fn.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_long] * 2 + pointers[:3] + [ctypes.c_int] * 2
        fn.argtypes += pointers
        return lib
    warnings.warn(f"deltatune: building {SOURCE.name} failed ({errors}): {FALLBACK}", stacklevel=2)
    return None


def _floats(*tensors: Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def _layer_norm(recipe: tuple[str, Any, Any], n: int) -> tuple[Tensor, list[Tensor | None]] | None:
    """A LayerNorm recipe's input as (N, in) rows with its mean, rstd, weight and bias for the kernel's prologue;
    None for other producers (a GELU's output is recomputed by PyTorch: erf per element in the kernel cost more)."""
    kind, _, saved = recipe
    if kind != "layer_norm":
        return None
    inp, mean, rstd, weight, bias = saved
    stats = [mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous()]
    affine = [None if t is None else t.detach().contiguous() for t in (weight, bias)]
    if not _floats(*stats, *affine) or stats[0].numel() != n:
        return None
    return rows(inp), [*stats, *affine]


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def lowrank_grads(
    dy: Tensor, x: Tensor | None, lora_a: Tensor, lora_b: Tensor, scaling: float, recipe: tuple | None = None
) -> tuple[Tensor, Tensor] | None:
    """``(s (dy B)^T x, s dy^T (x A^T))`` shaped as ``lora_a`` (r, in) and ``lora_b`` (1, out, r), for (N, out) dy
    and (N, in) x, or x recomputed block by block from a LayerNorm ``recipe`` (``kernels.lora.input_recipe``; x
    None). None where the kernel does not apply (not CPU float32, several chunks, a rank it is not built for, a
    backward that builds a graph: the kernel is not differentiable; torch.compile's graphs, where calling it as an
    operator measured no faster than inductor's matmuls) or cannot be built."""
    r = lora_b.shape[2]
    if not wants_native() or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    lib = library(r) if lora_b.shape[0] == 1 and r in RANKS and _floats(dy, lora_a, lora_b) else None
    if lib is None:
        return None
    n = dy.shape[0]
    src, extra = (x, [None] * 4) if recipe is None else (_layer_norm(recipe, n) or (None, None))
    if src is None or not _floats(src) or src.shape[0] != n or dy.stride(1) != 1 or src.stride(1) != 1:
        return None
    return _run(lib, dy, src, lora_a, lora_b, scaling, int(recipe is not None), extra)


def _run(
    lib: ctypes.CDLL,
    dy: Tensor,
    src: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    kind: int,
    extra: list[Tensor | None],
) -> tuple[Tensor, Tensor] | None:
    """The kernel's call on CPU float32 rows with unit column stride; None where its scratch could not be had (the
    matmuls serve)."""
    (n, out), inn, r = dy.shape, src.shape[1], lora_b.shape[2]
    at, b = lora_a.detach().t().contiguous(), lora_b[0].detach().contiguous()  # (in, r), (out, r)
    threads = torch.get_num_threads()
    work = dy.new_zeros(threads, r * (inn + out))  # one slice per thread, summed below: no atomics
    ran = lib.lowrank_grads(
        n, inn, out, dy.data_ptr(), dy.stride(0), src.data_ptr(), src.stride(0), at.data_ptr(), b.data_ptr(),
        work.data_ptr(), threads, kind, *map(_ptr, extra),
    )  # fmt: skip
    if ran < 1:
        return None
    total = work[0] if ran == 1 else work[:ran].sum(0)
    da = total[: r * inn].view(r, inn).mul(scaling)
    db = total[r * inn :].view(r, out).t().contiguous().mul_(scaling)
    return da, db.unsqueeze(0)
