"""The adapter's down-projection without keeping the base layer's output: the weight gradient from the base's input.

An adapter follows a frozen Linear: ``y = x W^T + b``, ``h = y D^T + d``. Autograd keeps y for ``dD = dh^T y``, an
activation that nothing else keeps (it feeds only the adapter and the residual add). Since y is linear in x::

    dD = dh^T y = (dh^T x) W^T + sum(dh) b^T        (h x in, then a weight-sized h x in x out product)

x is what the base's producer keeps anyway: a LayerNorm's or GELU's input (recomputed as LoRA's is,
``kernels.lora.input_recipe``) or, for timm's attention projection, a view of the attention output. Where x has no
such recipe it is kept only if it is no wider than y, so the path never keeps more than the plain formula. The
extra work is the h x in x out product (weight-sized) and dh^T x instead of dh^T y.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from deltatune.kernels._common import is_enabled, needs_grad, plain_linear, rows, saving_is_hooked, wants_recompute
from deltatune.kernels.lora import input_recipe, recompute


class AdapterDownFn(torch.autograd.Function):
    """``F.linear(y, down_w, down_b)`` for ``y = F.linear(x, weight, bias)``: keeps x (or its recipe), not y."""

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, down_w: Tensor, down_b: Tensor | None
    ) -> Tensor:
        recipe = input_recipe(x)
        kept = [x] if recipe is None else recipe[2]
        ctx.recipe, ctx.kept = recipe and recipe[:2], len(kept)
        ctx.save_for_backward(*kept, weight, bias, down_w)
        return F.linear(y, down_w, down_b)

    @staticmethod
    @once_differentiable  # its backward is not itself differentiable: a double backward raises, not errs silently
    def backward(ctx: Any, dh: Tensor) -> tuple[Tensor | None, ...]:
        *kept, weight, bias, down_w = ctx.saved_tensors
        need_y, _, _, _, need_w, need_b = ctx.needs_input_grad
        dh2 = rows(dh)  # (N, h)
        dy = dh.matmul(down_w.to(dh.dtype)) if need_y else None
        dsum = dh2.sum(0, dtype=torch.promote_types(dh.dtype, torch.float32))  # (h,)
        dw = None
        if need_w:
            x = kept[0] if ctx.recipe is None else recompute(*ctx.recipe, tuple(kept))
            g = dh2.t().mm(rows(x).to(dh.dtype))  # (h, in): dh^T x
            dw = g.to(weight.dtype).mm(weight.t())  # (h, out): (dh^T x) W^T
            if bias is not None:
                dw.addr_(dsum.to(bias.dtype), bias)
            dw = dw.to(down_w.dtype)
        db = dsum.to(down_w.dtype) if need_b else None
        return dy, None, None, None, dw, db


def down(base: nn.Module, x: Tensor, y: Tensor, layer: nn.Module) -> Tensor | None:
    """``layer(y)`` for ``y = base(x)`` keeping x's recipe instead of y, or None where the plain formula serves."""
    if not (is_enabled() and wants_recompute(x) and plain_linear(base) and type(layer) is nn.Linear):
        return None
    if not needs_grad(layer.weight):
        return None
    if input_recipe(x) is None and x.shape[-1] > y.shape[-1] and not saving_is_hooked():
        return None  # keeping x would cost more than y (compiled: no recipes); checkpointed regions keep nothing
    return AdapterDownFn.apply(y, x, base.weight, base.bias, layer.weight, layer.bias)


def infer(base: nn.Module, x: Tensor, down: nn.Module, act: nn.Module, up: nn.Module) -> Tensor | None:
    """``y + up(act(down(y)))`` for ``y = base(x)`` when nothing needs gradients, or None where the plain one serves.

    The up-projection accumulates into y in place (a matmul with beta 1) instead of writing its own output that a
    residual add then reads back with y: one pass and one allocation over the activations fewer a site.
    """
    if not (is_enabled() and plain_linear(base) and type(down) is nn.Linear and type(up) is nn.Linear):
        return None
    if needs_grad(x, *down.parameters(), *up.parameters()) or torch.is_autocast_enabled(x.device.type):
        return None
    if base._forward_hooks or base._forward_pre_hooks:  # a hook may keep y, which is modified in place here
        return None
    y = F.linear(x, base.weight, base.bias)
    if y.dtype != up.weight.dtype or y.dtype != down.weight.dtype:
        return None
    h = act(F.linear(y, down.weight, down.bias))
    out = rows(y)  # a view of y (fresh and contiguous): the sum lands in y
    out.addmm_(rows(h), up.weight.t())
    if up.bias is not None:
        out.add_(up.bias)
    return y
