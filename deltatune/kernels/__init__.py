"""Fused fast paths for delta wrappers on frozen layers: one file per method (``ssf.py``, ``lora.py``,
``adapter.py``), shared helpers and the per-thread switches in ``_common.py``."""

from deltatune.kernels._common import disabled, is_enabled, recompute_inputs

__all__ = ["disabled", "is_enabled", "recompute_inputs"]
