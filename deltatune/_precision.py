"""Deltas kept in a wider dtype than the backbone (peft's ``autocast_adapter_dtype``): a bfloat16 backbone with
float32 deltas.

The trainable tensors are stored in ``delta_dtype`` (the optimizer updates them there, so updates smaller than half
a bfloat16 ulp are not rounded away) and cast to the activations' dtype at the point of use: while a module that
owns one runs its forward, its attribute resolves to the cast copy (an entry in the module's ``__dict__``, which
attribute lookup finds before ``_parameters``), and autograd carries the gradient back to the float32 tensor. The
wrappers' own code is unchanged; merges read the stored tensors and round once to the weights' dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import DeltaTuneError

_CAST = "_deltatune_cast"  # module.__dict__ key: {name: backbone dtype} of its parameters kept in another dtype
_HOOKED = "_deltatune_cast_hooked"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}  # fmt: skip


def as_dtype(value: torch.dtype | str | None, what: str = "delta_dtype") -> torch.dtype | None:
    """A floating dtype from a torch dtype or its name (float32, bf16, ...); None stays None."""
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    if isinstance(value, str) and value.lower() in DTYPES:
        return DTYPES[value.lower()]
    raise DeltaTuneError(f"{what} must be a floating dtype such as 'float32' or 'bf16', got {value!r}")


def keep_in_dtype(model: nn.Module, params: Iterable[nn.Parameter], dtype: torch.dtype) -> None:
    """Stores ``params`` in ``dtype`` and makes every module that owns or contains one cast them at the point of use."""
    wanted = {id(p): p for p in params if p.is_floating_point()}
    if not wanted:
        return
    compute = {id(p): p.dtype for p in wanted.values()}  # the backbone's dtype: what they compute in
    if all(c == dtype for c in compute.values()):
        return
    for p in wanted.values():
        p.data = p.data.to(dtype)
    owners = [m for m in model.modules() if any(id(p) in wanted for p in m._parameters.values() if p is not None)]
    for module in owners:
        names = {n: compute[id(p)] for n, p in module._parameters.items() if p is not None and id(p) in wanted}
        module.__dict__.setdefault(_CAST, {}).update(names)
    users = set(map(id, owners))
    for module in model.modules():  # owners and the modules above them that call them or read their tensors
        if id(module) in users or any(id(m) in users for m in module.modules()):
            _hook(module)


def _hook(module: nn.Module) -> None:
    if module.__dict__.get(_HOOKED):
        return
    module.register_forward_pre_hook(_shadow, with_kwargs=True)
    module.register_forward_hook(_unshadow, always_call=True)
    module.__dict__[_HOOKED] = True


def _activation_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.dtype
    return None


def _shadow(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before a forward: each kept tensor in this subtree resolves to its copy in the activations' dtype."""
    dtype = _activation_dtype(args, kwargs)
    for m in module.modules():
        for name, original in m.__dict__.get(_CAST, {}).items():
            p = m._parameters[name]
            target = dtype or original
            if p.dtype != target:
                m.__dict__[name] = p.to(target)


def _unshadow(module: nn.Module, args: Any, output: Any) -> None:
    """After the forward (also when it raised): the attributes are the stored tensors again."""
    for m in module.modules():
        for name in m.__dict__.get(_CAST, ()):
            m.__dict__.pop(name, None)

