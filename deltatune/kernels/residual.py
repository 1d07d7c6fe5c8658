"""A LayerNorm after a residual add need not keep its input when both addends are kept anyway.

In a pre-norm transformer block ``t = a + y`` feeds the next LayerNorm, where ``a`` is the residual stream (the
input the previous LayerNorm keeps) and ``y`` the output of a folded SSF projection (attention ``proj``, MLP
``fc2``), which ``SSFLinearFn`` keeps for its scale gradient. The LayerNorm would keep t a third time; here it
keeps a and y (the same storages: no new bytes) and recomputes ``t = a + y`` in backward, bit for bit the sum of
the forward. So SSF keeps what the floor keeps plus nothing per residual add.

The pattern is found from autograd's graph: t's node is an ``AddBackward0`` (alpha 1) of the previous folded
LayerNorm's input (the same node and output index) and of output 0 of an ``SSFLinearFn`` that kept its output.
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

# The previous folded LayerNorm's input in this thread: the residual stream the next one's input may add to.
_PREVIOUS: ContextVar[weakref.ref[Tensor] | None] = ContextVar("deltatune_previous_norm_input", default=None)


class ResidualLayerNormFn(torch.autograd.Function):
    """``F.layer_norm(t)`` for ``t = a + y``: keeps a, y, mean and rstd (a and y are kept anyway), not t."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, a: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        shape = (t.shape[-1],)
        out, mean, rstd = torch.native_layer_norm(t, shape, weight, bias, eps)
        ctx.save_for_backward(a, y, mean, rstd, weight, bias)
        return out

    @staticmethod
    @once_differentiable  # its backward is not itself differentiable: a double backward raises, not errs silently
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        a, y, mean, rstd, weight, bias = ctx.saved_tensors
        need_t, _, _, need_w, need_b, _ = ctx.needs_input_grad
        t = a + y  # the forward's sum, recomputed exactly
        mask = [need_t, need_w and weight is not None, need_b and bias is not None]
        dt, dw, db = torch.ops.aten.native_layer_norm_backward(dout, t, [t.shape[-1]], mean, rstd, weight, bias, mask)
        return dt, None, None, dw, db, None


def _addends(t: Tensor, previous: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """(a, y) with ``t = a + y``: a the previous norm's input, y an output ``SSFLinearFn`` keeps; else None."""
    node = t.grad_fn
    if previous is None or type(node).__name__ != "AddBackward0" or node._saved_alpha != 1:
        return None
    (n0, i0), (n1, i1) = node.next_functions
    for (a_node, a_nr), (y_node, y_nr) in (((n0, i0), (n1, i1)), ((n1, i1), (n0, i0))):
        if type(y_node).__name__ != "SSFLinearFnBackward" or y_nr != 0:
            continue
        if not _is_output(previous, a_node, a_nr):
            continue
        y = y_node.saved_tensors[-1]  # SSFLinearFn keeps its output last (None when no scale gradient is needed)
        if y is not None and y.shape == t.shape == previous.shape:
            return previous, y
    return None


def _is_output(t: Tensor, node: Any, index: int) -> bool:
    """Whether t is what autograd's edge (node, index) carries: output ``index`` of t's node, or the leaf t itself."""
    if t.grad_fn is None:
        return type(node).__name__ == "AccumulateGrad" and node.variable is t
    return t.grad_fn is node and t.output_nr == index


def layer_norm(t: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``F.layer_norm`` over the last dim, keeping the addends of a residual sum instead of t where it can."""
    if torch.compiler.is_compiling():
        return F.layer_norm(t, (t.shape[-1],), weight, bias, eps)
    ref = _PREVIOUS.get()
    previous = ref() if ref is not None else None
    grad = torch.is_grad_enabled() and t.requires_grad
    _PREVIOUS.set(weakref.ref(t) if grad else None)
    same = all(p is None or p.dtype == t.dtype for p in (weight, bias))
    plain = torch.is_autocast_enabled(t.device.type) and t.dtype != torch.float32
    addends = _addends(t, previous) if grad and same and not plain else None
    if addends is None:
        return F.layer_norm(t, (t.shape[-1],), weight, bias, eps)
    a, y = addends  # detached: material for the backward, not inputs that gradients flow to
    return ResidualLayerNormFn.apply(t, a.detach(), y.detach(), weight, bias, eps)
