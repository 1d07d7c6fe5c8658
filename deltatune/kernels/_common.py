"""Helpers shared by the fused fast paths: which layers qualify, and the switches, per thread (context variables).

``disabled()`` switches the fast paths off inside a block, so the wrappers' plain formulas serve as the reference
in tests and benchmarks; ``recompute_inputs`` chooses whether LoRA (and the adapter's down-projection) recompute
their input in backward instead of keeping a copy. Both are
context variables: a block in one thread never changes what another thread runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

# Context variables: each thread (and asyncio task) sees its own setting, so switching in one never affects another.
_ENABLED: ContextVar[bool] = ContextVar("deltatune_fast_paths", default=True)
_RECOMPUTE: ContextVar[bool | None] = ContextVar("deltatune_lora_recompute", default=None)  # None: the default (on)


def is_enabled() -> bool:
    """Whether the wrappers route through the fast paths: True by default, False inside ``disabled()``, under
    torch.func transforms (vmap, grad, jacrev: per-sample gradients) and inside forward-mode AD's dual levels, which
    the fast paths' autograd Functions (backward only, old style) do not support; the plain formulas serve there."""
    if not _ENABLED.get():
        return False
    if torch.compiler.is_compiling():
        return True
    return torch._C._functorch.peek_interpreter_stack() is None and forward_ad._current_level < 0


@contextmanager
def disabled() -> Iterator[None]:
    """Runs the wrappers' plain formulas inside the block: the reference the fast paths are checked against."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


@contextmanager
def recompute_inputs(enabled: bool | None) -> Iterator[None]:
    """Inside the block LoRA recomputes x from its LayerNorm/GELU producer's kept tensors (True), keeps x (False),
    or does the default (None: recompute, on every device); in this thread only."""
    token = _RECOMPUTE.set(enabled)
    try:
        yield
    finally:
        _RECOMPUTE.reset(token)


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
