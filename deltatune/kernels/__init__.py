"""Fused fast paths for delta wrappers on frozen layers: one file per method (``ssf.py``, ``lora.py``,
``adapter.py``), shared helpers and the per-thread switches in ``_common.py``; ``compile.py``: torch.compile with
a partitioner that recomputes what the frozen backbone keeps anyway; ``native.py``: LoRA's rank-r gradients as one
compiled CPU kernel (``lowrank.c``), built on first use."""

from deltatune.kernels._common import disabled, is_enabled, native_kernels, recompute_inputs
from deltatune.kernels.compile import compile

__all__ = ["compile", "disabled", "is_enabled", "native_kernels", "recompute_inputs"]
