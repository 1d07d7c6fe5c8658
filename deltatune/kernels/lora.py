"""LoRA's fast path: one matmul with the merged weight forward, one for dx and dh backward, small products for the rest.

    forward    y = x (W + s B A)^T + b                        (the merged weight is weight-sized work)
    backward   [dx | dh] = dy [W + s B A | B]                 (dh = dy B rides along as r extra columns)
               dA = s dh^T x        dB = s dy^T (x A^T)

LoRA needs its input x for dA and dB. When x is the output of a LayerNorm or a GELU that autograd already keeps
the input of (qkv and fc1 follow LayerNorms, fc2 follows the MLP's GELU), x can be recomputed in backward from
those kept tensors instead of being kept a second time: one elementwise pass for a copy of the activations.
It is the default on every device (``kernels.recompute_inputs(False)`` keeps x instead): on vit_small@112 it
brings LoRA on all linears from 1.57x the floor's saved bytes to 0.99x, for ~0.4% of a one-thread CPU step (the
elementwise pass is cheap next to the matmuls). The proj input is a view of the attention output, kept anyway.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.kernels._common import is_enabled, needs_grad, plain_linear, rows, saving_is_hooked, wants_recompute


def lora_weight(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, chunks: tuple[int, ...], scaling: float, with_b: bool = False
) -> Tensor:
    """``W + s B A`` on the output chunks that carry LoRA: (out, in), built without touching activations.

    The one chunked B A product: the fast path builds its merged weight with it, and a merge can too (in float64:
    pass float64 tensors, then round once).

    ``with_b`` appends B as P*r extra columns (each part's B on its chunk's rows): (out, in + P*r).
    """
    p, c, r = lora_b.shape  # lora_a: (P*r, in), lora_b: (P, C, r)
    out = weight.shape[0]
    if not with_b and p == 1 and c == out:
        return torch.addmm(weight, lora_b[0], lora_a, alpha=scaling)
    if with_b:
        merged = torch.cat([weight, _block_columns(lora_b, chunks, out)], 1)
        lora_a = F.pad(lora_a, (0, p * r))  # zeros under B's columns: the update leaves them as they are
    else:
        merged = weight.clone()
    for i, chunk in enumerate(chunks):
        merged[chunk * c : (chunk + 1) * c].addmm_(lora_b[i], lora_a[i * r : (i + 1) * r], alpha=scaling)
    return merged


def _block_columns(lora_b: Tensor, chunks: tuple[int, ...], out: int) -> Tensor:
    """B laid out as (out, P*r): part i's B on its chunk's rows and its own r columns, zeros elsewhere."""
    p, c, r = lora_b.shape
    if p == 1 and c == out:
        return lora_b[0]
    cols = lora_b.new_zeros(out, p * r)
    for i, chunk in enumerate(chunks):
        cols[chunk * c : (chunk + 1) * c, i * r : (i + 1) * r] = lora_b[i]
    return cols


def input_recipe(x: Tensor) -> tuple[str, Any, list[Tensor | None]] | None:
    """How to recompute x from what its producer keeps anyway (LayerNorm: input, mean, rstd, affine; GELU: input)."""
    if torch.compiler.is_compiling():  # checked first: reading grad_fn while tracing breaks the graph
        return None
    if saving_is_hooked():  # checkpointing: the producer's saved tensors must be unpacked once, by the producer
        return None
    node = x.grad_fn
    if node is None or x.output_nr != 0:
        return None
    kind = type(node).__name__
    if kind == "NativeLayerNormBackward0":
        return "layer_norm", None, [node._saved_input, node._saved_result1, node._saved_result2, node._saved_weight,
                                    node._saved_bias]  # fmt: skip
    if kind == "GeluBackward0":
        return "gelu", node._saved_approximate, [node._saved_self]
    return None


def recompute(kind: str, arg: Any, saved: tuple[Tensor | None, ...]) -> Tensor:
    """x again, from an ``input_recipe``."""
    if kind == "gelu":
        return F.gelu(saved[0], approximate=arg)
    inp, mean, rstd, weight, bias = saved
    stat = (*inp.shape[:-1], 1)
    x = (inp - mean.reshape(stat)) * rstd.reshape(stat)
    if weight is not None:
        x = x * weight if bias is None else torch.addcmul(bias, x, weight)
    elif bias is not None:
        x = x + bias
    return x


def _for_products(x: Tensor, scaling: float) -> tuple[Tensor, float]:
    """x as the backward's products take it, and the factor for their (small) results: ``(x, s)``, or traced
    ``(-x, -s)``.

    Under torch.compile the partitioner keeps any activation that a backward matmul reads directly ("materialized
    in backward"), so x (a LayerNorm's or GELU's output) would be kept beside what its producer keeps. Read through
    a negation (fused into x's recompute, not a no-op that graph passes remove), x is recomputed from its producer's
    kept tensors instead: the compiled twin of ``input_recipe``. Eager runs take x as it is.
    """
    if torch.compiler.is_compiling():
        return -x, -scaling
    return x, scaling


class LoRALinearFn(torch.autograd.Function):
    """``F.linear(x, W + s B A, b)`` for a frozen W: one matmul forward, the low-rank grads from x (or its recipe)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor,
        lora_b: Tensor,
        chunks: tuple[int, ...],
        scaling: float,
    ) -> Tensor:
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        recipe = input_recipe(x) if (need_a or need_b) and wants_recompute(x) else None
        kept = ([x] if need_a or need_b else [None]) if recipe is None else recipe[2]
        ctx.chunks, ctx.scaling, ctx.recipe, ctx.kept = chunks, scaling, recipe and recipe[:2], len(kept)
        ctx.save_for_backward(*kept, weight if need_x else None, lora_a, lora_b)
        return F.linear(x, lora_weight(weight, lora_a, lora_b, chunks, scaling), bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        *kept, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        chunks, s = ctx.chunks, ctx.scaling
        _, c, r = lora_b.shape
        dy2 = rows(dy)  # (N, out)
        parts = [dy2[:, k * c : (k + 1) * c] for k in chunks]  # (N, C) each, strided views
        dx = dbias = da = db = dh = None
        if need_x:  # one matmul gives dx and, in r extra columns a part, dh = dy B: dy [W + s B A | B]
            w = lora_weight(weight, lora_a, lora_b, chunks, s, with_b=need_a)  # (out, in [+ P*r])
            dx2 = dy2.mm(w.to(dy.dtype))
            n_in = weight.shape[1]
            dx = dx2[:, :n_in].view(*dy.shape[:-1], n_in)  # (..., in), rows strided when dh rides along
            dh = dx2[:, n_in:] if need_a else None  # (N, P*r)
        if need_bias:
            dbias = dy2.sum(0)
        if need_a or need_b:
            x = kept[0] if ctx.recipe is None else recompute(*ctx.recipe, tuple(kept))
            x2, s = _for_products(rows(x).to(dy.dtype), s)  # (N, in)
        if need_a:  # products ordered so that the small dim is the output's rows: several times faster on CPU
            if dh is None:
                dh = torch.cat([b.to(dy.dtype).t().mm(part.t()).t() for b, part in zip(lora_b, parts)], 1)
            da = dh.t().mm(x2).mul_(s)  # (P*r, in)
        if need_b:
            h = x2.mm(lora_a.to(dy.dtype).t()).t()  # (P*r, N)
            db = torch.stack([h[i * r : (i + 1) * r].mm(part).t() for i, part in enumerate(parts)]).mul_(s)
        return dx, None, dbias, da, db, None, None


def lora(
    base: nn.Module, x: Tensor, lora_a: Tensor, lora_b: Tensor, chunks: tuple[int, ...], scaling: float
) -> Tensor | None:
    """LoRA beside ``base`` as one matmul with the merged weight, or None where no fast path applies."""
    if not is_enabled() or not plain_linear(base):
        return None
    if not needs_grad(x, base.bias, lora_a, lora_b):  # inference: merged on the fly
        return F.linear(x, lora_weight(base.weight, lora_a, lora_b, chunks, scaling), base.bias)
    return LoRALinearFn.apply(x, base.weight, base.bias, lora_a, lora_b, chunks, scaling)
