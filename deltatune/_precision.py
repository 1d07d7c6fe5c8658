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

_CAST = "_deltatune_cast"  # module.__dict__ key: {path below it: backbone dtype} of the tensors kept in another dtype
_HOOKED = "_deltatune_cast_hooked"
_STACK = "_deltatune_cast_stack"  # what each running forward shadowed, to put back after it
_MISSING = object()
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
    """Stores ``params`` in ``dtype`` and makes every module above one cast it at the point of use.

    Each such module records the kept tensors by their paths below it, so a method that later swaps a submodule
    (MiMi's pruning shrinks an adapter's layers) still has the new one's tensors cast.
    """
    wanted = {id(p): p for p in params if p.is_floating_point()}
    compute = {i: p.dtype for i, p in wanted.items()}  # the backbone's dtype: what they compute in
    if all(c == dtype for c in compute.values()):
        return
    for p in wanted.values():
        p.data = p.data.to(dtype)
    for prefix, module in model.named_modules(remove_duplicate=False):
        found = {name[len(prefix) + 1 if prefix else 0 :]: compute[id(p)] for name, p in _kept(module, prefix, wanted)}
        if found:
            module.__dict__.setdefault(_CAST, {}).update(found)
            _hook(module)


def _kept(module: nn.Module, prefix: str, wanted: dict[int, nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
    named = module.named_parameters(prefix=prefix, remove_duplicate=False)
    return [(name, p) for name, p in named if id(p) in wanted]


def settle(model: nn.Module, still_deltas: set[int]) -> None:
    """After a merge: kept tensors that are plain weights now (selected biases, the head), not ids in
    ``still_deltas``, go back to the backbone's dtype, rounded once, and are no longer cast."""
    for module in model.modules():
        cast = module.__dict__.get(_CAST)
        for path, original in list((cast or {}).items()):
            try:
                p = module.get_parameter(path)
            except AttributeError:
                p = None
            if p is not None and id(p) in still_deltas:
                continue
            if p is not None and p.dtype != original:
                p.data = p.data.to(original)
            del cast[path]


def compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the kept tensors compute in (the backbone's), or None when the model keeps none wider."""
    for module in model.modules():
        for dtype in module.__dict__.get(_CAST, {}).values():
            return dtype
    return None


def release(model: nn.Module) -> None:
    """Stops casting at the point of use (the hooks find nothing to do): FSDP's mixed-precision all-gather casts
    the kept tensors instead (``train.fsdp.shard``)."""
    for module in model.modules():
        module.__dict__.pop(_CAST, None)


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
    """Before a forward: each kept tensor below resolves to its copy in the activations' dtype (made once)."""
    dtype = _activation_dtype(args, kwargs)
    previous = []
    for path, original in module.__dict__.get(_CAST, {}).items():
        owner_path, _, name = path.rpartition(".")
        try:
            owner = module.get_submodule(owner_path) if owner_path else module
        except AttributeError:  # removed since (MiMi drops an adapter that lost every neuron)
            continue
        p = owner._parameters.get(name)
        if p is None:
            continue
        target = dtype or original
        current = owner.__dict__.get(name, _MISSING)
        previous.append((owner, name, current))
        if p.dtype != target and getattr(current, "dtype", None) != target:
            owner.__dict__[name] = p.to(target)
    module.__dict__.setdefault(_STACK, []).append(previous)


def _unshadow(module: nn.Module, args: Any, output: Any) -> None:
    """After the forward (also when it raised): each attribute as it was before it, the stored tensor at the top."""
    stack = module.__dict__.get(_STACK)
    if not stack:
        return
    for owner, name, before in reversed(stack.pop()):
        if before is _MISSING:
            owner.__dict__.pop(name, None)
        else:
            owner.__dict__[name] = before
