"""Structural copies of a backbone that share its tensors: the basis of many tasks on one backbone."""

from __future__ import annotations

from typing import Any

from torch import nn


def share_copy(model: nn.Module, own: set[str] = frozenset()) -> nn.Module:
    """A copy of the model's module tree whose parameters ARE the model's (same storage), except those named in
    ``own`` (plain parameter names), which get their own copy, and the buffers, which are copied (small: BatchNorm
    statistics). Each module is copied shallowly with its own dicts, so wrapping or replacing modules in the copy
    never reaches the model; no weight is copied, so the copy costs the module objects only."""
    done: dict[int, Any] = {}

    def clone(module: nn.Module, prefix: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = object.__new__(type(module))
        new.__dict__ = {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()}
        done[id(module)] = new
        params = new.__dict__["_parameters"]
        for k, p in params.items():
            if p is not None and prefix + k in own:
                params[k] = nn.Parameter(p.detach().clone(), p.requires_grad)
        buffers = new.__dict__["_buffers"]
        for k, b in buffers.items():
            buffers[k] = None if b is None else b.clone()
        children = new.__dict__["_modules"]
        for k, child in children.items():
            children[k] = None if child is None else clone(child, f"{prefix}{k}.")
        return new

    return clone(model, "")
