"""Layer kinds beyond torch's that the methods treat like torch's: transformers' ``Conv1D`` and RMSNorm classes.

GPT-2's projections are transformers' ``Conv1D``: ``y = x W + b`` with W stored (in, out), the transpose of a
Linear's. ``out_in(layer)`` gives every linear-like weight as (out, in) (a transposed view for Conv1D), so a merge
written for Linear (``W[i]`` is output row i) writes through to the stored tensor unchanged. transformers is never
imported here: a model can hold a Conv1D only once transformers is imported.

RMSNorm classes (torch's ``nn.RMSNorm``, transformers' ``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``MistralRMSNorm``,
``T5LayerNorm``, ...) share no base class; they are recognised by name, as peft and transformers do.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn


def conv1d_types() -> tuple[type, ...]:
    """transformers' ``Conv1D`` class, or nothing when transformers is not imported (no model can hold one)."""
    module = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(module, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def linear_types() -> tuple[type, ...]:
    """Layers computing ``x W^T + b``: nn.Linear and transformers' Conv1D."""
    return (nn.Linear, *conv1d_types())


def is_conv1d(layer: nn.Module) -> bool:
    """Whether ``layer`` is transformers' Conv1D (weight stored (in, out))."""
    return isinstance(layer, conv1d_types())


def out_in(layer: nn.Module) -> Tensor:
    """The weight of a Linear or Conv1D as (out, in): a transposed view for Conv1D, so in-place writes land."""
    return layer.weight.T if is_conv1d(layer) else layer.weight


def features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or Conv1D."""
    out, n_in = out_in(layer).shape
    return n_in, out


def is_rms_norm(layer: nn.Module) -> bool:
    """An RMSNorm: torch's, or any class named ``*RMSNorm`` (Llama, Qwen2, Mistral, ...) or T5's ``T5LayerNorm``."""
    name = type(layer).__name__
    return isinstance(layer, nn.RMSNorm) or name.endswith("RMSNorm") or name == "T5LayerNorm"


def rms_norm_types(model: nn.Module) -> tuple[type, ...]:
    """The RMSNorm classes found in ``model`` (always including nn.RMSNorm), for ``isinstance`` site filters."""
    return tuple(dict.fromkeys([nn.RMSNorm, *(type(m) for m in model.modules() if is_rms_norm(m))]))
