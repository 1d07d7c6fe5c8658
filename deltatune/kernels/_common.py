"""Helpers shared by the fused fast paths: which layers qualify, and the switches, per thread (context variables).

``disabled()`` switches the fast paths off inside a block, so the wrappers' plain formulas serve as the reference
in tests and benchmarks; ``recompute_inputs`` chooses whether LoRA (and the adapter's down-projection) recompute
their input in backward instead of keeping a copy; ``native_kernels`` whether LoRA's rank-r gradients may run as
the compiled CPU kernel (``kernels.native``; ``DELTATUNE_NATIVE=0`` sets its default off). All are
context variables: a block in one thread never changes what another thread runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

# Context variables: each thread (and asyncio task) sees its own setting, so switching in one never affects another.
_ENABLED: ContextVar[bool] = ContextVar("deltatune_fast_paths", default=True)
_RECOMPUTE: ContextVar[bool | None] = ContextVar("deltatune_lora_recompute", default=None)  # None: the default (on)
_NATIVE: ContextVar[bool] = ContextVar("deltatune_native", default=os.environ.get("DELTATUNE_NATIVE", "1") != "0")


@contextmanager
def _setting(var: ContextVar[Any], value: Any) -> Iterator[None]:
    """``var`` set to ``value`` inside the block, in this thread (and asyncio task) only."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def is_enabled() -> bool:
    """Whether the wrappers route through the fast paths: True by default, False inside ``disabled()``, under
    torch.func transforms (vmap, grad, jacrev: per-sample gradients) and inside forward-mode AD's dual levels, which
    the fast paths' autograd Functions (backward only, old style) do not support; the plain formulas serve there."""
    if not _ENABLED.get():
        return False
    if torch.compiler.is_compiling():
        return True
    return torch._C._functorch.peek_interpreter_stack() is None and forward_ad._current_level < 0


def disabled() -> AbstractContextManager[None]:
    """Runs the wrappers' plain formulas inside the block: the reference the fast paths are checked against."""
    return _setting(_ENABLED, False)


def recompute_inputs(enabled: bool | None) -> AbstractContextManager[None]:
    """Inside the block LoRA recomputes x from its LayerNorm/GELU producer's kept tensors (True), keeps x (False),
    or does the default (None: recompute, on every device); in this thread only."""
    return _setting(_RECOMPUTE, enabled)


def native_kernels(enabled: bool) -> AbstractContextManager[None]:
    """Inside the block LoRA's compiled CPU kernel serves where it applies (True) or the PyTorch matmuls always do
    (False); in this thread only."""
    return _setting(_NATIVE, enabled)


def wants_native() -> bool:
    """Whether LoRA's rank-r gradients may run as the compiled CPU kernel here (``native_kernels``)."""
    return _NATIVE.get()


def wants_recompute(x: Tensor) -> bool:
    """Whether LoRA's fast path recomputes its input ``x`` in backward instead of keeping it."""
    return _RECOMPUTE.get() is not False  # costs 3-7% of a CPU step, saves a third of its bytes


def transparent(unpack: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Marks a saved-tensor unpack hook that returns what was packed (a counter): recomputing may read through it."""
    unpack.__dict__["deltatune_transparent"] = True
    return unpack


def saving_is_hooked() -> bool:
    """Whether saved tensors go through someone's saved-tensor hooks (gradient checkpointing, offloading). The
    recompute paths read tensors other nodes saved; under checkpointing that would unpack them a second time (an
    error), and a checkpointed region keeps nothing anyway, so they keep their own inputs instead."""
    if torch.compiler.is_compiling():  # not traceable; compiled graphs have no recompute recipes to protect
        return False
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and not getattr(hooks[1], "deltatune_transparent", False)


def plain_linear(layer: nn.Module) -> bool:
    """A Linear whose forward is ``F.linear(x, weight, bias)``, with a frozen weight (its gradient would need x)."""
    return type(layer).forward is nn.Linear.forward and isinstance(layer, nn.Linear) and not layer.weight.requires_grad


def plain_layer_norm(layer: nn.Module) -> bool:
    """A LayerNorm over the last dim whose forward is ``F.layer_norm`` (torch's, or timm's without fast-norm)."""
    if not isinstance(layer, nn.LayerNorm) or len(layer.normalized_shape) != 1:
        return False
    cls = type(layer)
    if cls.forward is nn.LayerNorm.forward:
        return True
    return cls.__module__ == "timm.layers.norm" and cls.__name__ == "LayerNorm" and not layer._fast_norm


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will want gradients through these tensors (else the inference formula serves)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rows(t: Tensor) -> Tensor:
    """(..., C) -> (N, C) without a copy when possible."""
    return t.reshape(-1, t.shape[-1])
