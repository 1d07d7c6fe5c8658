"""A LayerNorm after a residual add need not keep its input when both addends are kept anyway.

In a pre-norm transformer block ``t = a + y`` feeds the next LayerNorm, where ``a`` is the residual stream (the
input the previous LayerNorm keeps) and ``y`` the output of a folded SSF projection (attention ``proj``, MLP
``fc2``), which ``SSFLinearFn`` keeps for its scale gradient. The LayerNorm would keep t a third time; here it
keeps a and y (the same storages: no new bytes) and recomputes ``t = a + y`` in backward, bit for bit the sum of
the forward. When ``a`` was itself such a sum, kept as its parts, t is kept as ``a``'s parts and y (at most
``MAX_TERMS`` parts, so a backward recomputes at most MAX_TERMS - 1 additions); then a LayerNorm keeps its input
again and a new chain starts. So the residual stream is kept once every MAX_TERMS - 1 adds instead of at every add.

The pattern is found from autograd's graph: t's node is an ``AddBackward0`` (alpha 1) of the previous folded
LayerNorm's input (the same node and output index) and of output 0 of an ``SSFLinearFn`` that kept its output.
The previous input is remembered per thread by a weak reference (to the tensor, or to the node that keeps its
parts), so nothing outlives the autograd graph.
Anything else (another add, a layer scale between, a modified tensor, torch.compile, bf16 under autocast) runs the
plain LayerNorm.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from deltatune.kernels._common import saving_is_hooked

MAX_TERMS = 4  # parts of a recomputed sum: the stream is kept once every 3 residual adds, 3 adds recomputed at most

# The previous folded LayerNorm's input in this thread: the tensor, or the ResidualLayerNormFn node keeping its parts.
_PREVIOUS: ContextVar[weakref.ref[Any] | None] = ContextVar("deltatune_previous_norm_input", default=None)


class ResidualLayerNormFn(torch.autograd.Function):
    """``F.layer_norm(t)`` for ``t = parts[0] + parts[1] + ...`` (kept anyway): keeps the parts, mean and rstd."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *parts: Tensor):
        out, mean, rstd = torch.native_layer_norm(t, (t.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(mean, rstd, weight, bias, *parts)
        ctx.source = (t.grad_fn, t.output_nr)  # t's edge: a later sum with t as an addend finds t's parts here
        return out

    @staticmethod
    @once_differentiable  # its backward is not itself differentiable: a double backward raises, not errs silently
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        mean, rstd, weight, bias, *parts = ctx.saved_tensors
        need_t, need_w, need_b = ctx.needs_input_grad[:3]
        t = parts[0]
        for part in parts[1:]:
            t = t + part  # the forward's sums, in the forward's order: bit for bit
        mask = [need_t, need_w and weight is not None, need_b and bias is not None]
        dt, dw, db = torch.ops.aten.native_layer_norm_backward(dout, t, [t.shape[-1]], mean, rstd, weight, bias, mask)
        return (dt, dw, db, None, *[None] * len(parts))


def _parts_of(previous: Any, node: Any, index: int) -> tuple[Tensor, ...] | None:
    """The kept tensors summing to the previous norm's input, if autograd's edge (node, index) carries that input."""
    if isinstance(previous, Tensor):
        return (previous,) if _is_output(previous, node, index) else None
    source_node, source_index = previous.source
    return tuple(previous.saved_tensors[4:]) if source_node is node and source_index == index else None


def _is_output(t: Tensor, node: Any, index: int) -> bool:
    """Whether t is what autograd's edge (node, index) carries: output ``index`` of t's node, or the leaf t itself."""
    if t.grad_fn is None:
        return type(node).__name__ == "AccumulateGrad" and node.variable is t
    return t.grad_fn is node and t.output_nr == index


def _addends(t: Tensor, previous: Any) -> tuple[Tensor, ...] | None:
    """Kept tensors summing to t: the previous norm's input (or its parts) and an output ``SSFLinearFn`` keeps."""
    node = t.grad_fn
    if previous is None or type(node).__name__ != "AddBackward0" or node._saved_alpha != 1:
        return None
    (n0, i0), (n1, i1) = node.next_functions
    for (a_node, a_nr), (y_node, y_nr) in (((n0, i0), (n1, i1)), ((n1, i1), (n0, i0))):
        if type(y_node).__name__ != "SSFLinearFnBackward" or y_nr != 0:
            continue
        parts = _parts_of(previous, a_node, a_nr)
        y = y_node.saved_tensors[-1] if parts else None  # SSFLinearFn keeps its output last (or None)
        if y is not None and len(parts) < MAX_TERMS and all(p.shape == t.shape for p in (*parts, y)):
            return (*parts, y)
    return None


def layer_norm(t: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.layer_norm`` over the last dim, keeping the addends of a residual sum instead of t where it can."""
    if torch.compiler.is_compiling():
        return F.layer_norm(t, (t.shape[-1],), weight, bias, eps)
    ref = _PREVIOUS.get()
    previous = ref() if ref is not None else None
    grad = torch.is_grad_enabled() and t.requires_grad and not saving_is_hooked()
    same = all(p is None or p.dtype == t.dtype for p in (weight, bias))
    plain = torch.is_autocast_enabled(t.device.type) and t.dtype != torch.float32
    addends = _addends(t, previous) if grad and same and not plain else None
    if addends is None:
        _PREVIOUS.set(weakref.ref(t) if grad else None)
        return F.layer_norm(t, (t.shape[-1],), weight, bias, eps)
    parts = [p.detach() for p in addends]  # material for the backward, not inputs that gradients flow to
    out = ResidualLayerNormFn.apply(t, weight, bias, eps, *parts)
    _PREVIOUS.set(weakref.ref(out.grad_fn))
    return out
