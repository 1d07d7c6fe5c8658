"""LoRA's fast path: one matmul with the merged weight forward, one for dx backward, small products for the rest.

    forward    y = x (W + s B A)^T + b                        (the merged weight is weight-sized work)
    backward   dx = dy (W + s B A)       dh = dy B            (dh: a skinny product of its own)
               dA = s dh^T x        dB = s dy^T (x A^T)

dh once rode along dx's matmul as r extra columns of the weight, but then dx was a view with strided rows, which
the producer's backward (GELU's, LayerNorm's) reads at half speed: the separate skinny product is cheaper
(vit_small@112, b32, all linears: a step 2-3% faster on two threads, 0.5% on one).

LoRA needs its input x for dA and dB. When x is the output of a LayerNorm or a GELU that autograd already keeps
the input of (qkv and fc1 follow LayerNorms, fc2 follows the MLP's GELU), x can be recomputed in backward from
those kept tensors instead of being kept a second time: one elementwise pass for a copy of the activations.
It is the default on every device (``kernels.recompute_inputs(False)`` keeps x instead): on vit_small@112 it
brings LoRA on all linears from 1.57x the floor's saved bytes to 0.99x, for 3-7% of a CPU step (``lora`` against
``lora-keep`` in ``deltatune bench``: the recomputed GELU output of fc2 goes through memory again). The proj input
is a view of the attention output, kept anyway.
Under torch.compile (no autograd graph to read while tracing) the backward reads x through a negation instead, so
AOTAutograd's partitioner recomputes x from its producer's kept tensors too (``_for_products``): 0.99x the compiled
floor's saved bytes on vit_small@112, with torch's default partitioner settings (1.56x before).

On CPU in float32, dA and dB come from one compiled kernel (``kernels.native``) that reads dy and x once, a row
block at a time, instead of four skinny matmuls that each read a whole activation; after a LayerNorm it recomputes
x block by block inside the kernel, so x is never written out whole (``_from_recipe``). Elsewhere, or without a C
compiler, the matmuls serve.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.kernels import native
from deltatune.kernels._common import is_enabled, needs_grad, plain_linear, rows, saving_is_hooked, wants_recompute


def lora_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, chunks: tuple[int, ...], scaling: float) -> Tensor:
    """``W + s B A`` on the output chunks that carry LoRA: (out, in), built without touching activations.

    The one chunked B A product: the fast path builds its merged weight with it, and a merge can too (in float64:
    pass float64 tensors, then round once).
    """
    p, c, r = lora_b.shape  # lora_a: (P*r, in), lora_b: (P, C, r)
    if p == 1 and c == weight.shape[0]:
        return torch.addmm(weight, lora_b[0], lora_a, alpha=scaling)
    merged = weight.clone()
    for i, chunk in enumerate(chunks):
        merged[chunk * c : (chunk + 1) * c].addmm_(lora_b[i], lora_a[i * r : (i + 1) * r], alpha=scaling)
    return merged


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
    x = inp - mean.reshape(stat)  # (x - mean) first, not x rstd - mean rstd: exact under a large common offset
    x.mul_(rstd.reshape(stat))  # in place: one activation-sized allocation, not three
    if weight is not None and bias is not None and not torch.is_grad_enabled():  # out=: not differentiable
        return torch.addcmul(bias, x, weight, out=x)
    x = x if weight is None else x.mul_(weight)
    return x if bias is None else x.add_(bias)


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
        dy2 = rows(dy)  # (N, out)
        dx = dbias = da = db = spare = None
        grads = _from_recipe(dy2, ctx.recipe, kept, lora_a, lora_b, chunks, s) if need_a and need_b else None
        if grads is not None:
            da, db = grads
        elif need_a or need_b:
            x = kept[0] if ctx.recipe is None else recompute(*ctx.recipe, tuple(kept))
            x2, s = _for_products(rows(x).to(dy.dtype), s)  # (N, in)
            da, db = _low_rank_grads(dy2, x2, lora_a, lora_b, chunks, s, need_a, need_b)
            if ctx.recipe is not None and x2.is_contiguous() and not torch.is_grad_enabled():
                spare = x2  # recomputed here, used up: dx (same shape) is written into it, one allocation fewer
        if need_x:
            dx = input_grad(dy2, weight, lora_a, lora_b, chunks, ctx.scaling, spare)
            dx = dx.view(*dy.shape[:-1], weight.shape[1])
        if need_bias:
            dbias = dy2.sum(0)
        return dx, None, dbias, da, db, None, None


def input_grad(
    dy2: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    chunks: tuple[int, ...],
    scaling: float,
    out: Tensor | None = None,
) -> Tensor:
    """``dx = dy (W + s B A)`` for (N, out) dy, contiguous (the producer's backward reads it at full speed), written
    into ``out`` when given."""
    # W + (-s)(-B) A: bit for bit the forward's weight, but not the same graph, which torch.compile would merge with
    # the forward's and keep (a weight-sized copy a layer) instead of rebuilding it here
    w = lora_weight(weight, lora_a, -lora_b, chunks, -scaling).to(dy2.dtype)  # (out, in)
    return torch.mm(dy2, w) if out is None else torch.mm(dy2, w, out=out)


def _from_recipe(
    dy2: Tensor,
    recipe: tuple[str, Any] | None,
    kept: list[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    chunks: tuple[int, ...],
    s: float,
) -> tuple[Tensor, Tensor] | None:
    """dA and dB by the compiled kernel with x recomputed inside it, a row block at a time, from what its producer
    keeps (one LoRA chunk): x is never written out whole. None where the kernel does not serve."""
    if recipe is None or len(chunks) != 1:
        return None
    c = lora_b.shape[1]
    part = dy2[:, chunks[0] * c : (chunks[0] + 1) * c]
    return native.lowrank_grads(part, None, lora_a, lora_b, s, (*recipe, tuple(kept)))


def _low_rank_grads(
    dy2: Tensor,
    x2: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    chunks: tuple[int, ...],
    s: float,
    need_a: bool,
    need_b: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """``dA = s (dy B)^T x`` and ``dB = s dy^T (x A^T)`` per output chunk, from (N, out) dy and (N, in) x: one pass of
    the compiled kernel where it applies (``kernels.native``), else four skinny matmuls."""
    _, c, r = lora_b.shape
    parts = [dy2[:, k * c : (k + 1) * c] for k in chunks]  # (N, C) each, strided views
    if need_a and need_b and len(parts) == 1:  # the compiled kernel: one pass over dy and x (CPU, float32)
        fused = native.lowrank_grads(parts[0], x2, lora_a, lora_b, s)
        if fused is not None:
            return fused
    da = db = None
    if need_a:  # dA's and dB's products put the small dim in the output's rows: several times faster on CPU
        dhs = [part.mm(b.to(dy2.dtype)) for b, part in zip(lora_b, parts)]  # (N, r): 10-25% faster than (B^T dy^T)^T
        dh = dhs[0] if len(dhs) == 1 else torch.cat(dhs, 1)  # (N, P*r)
        da = dh.t().mm(x2).mul_(s)  # (P*r, in)
    if need_b:
        h = x2.mm(lora_a.to(dy2.dtype).t()).t()  # (P*r, N)
        db = torch.stack([h[i * r : (i + 1) * r].mm(part).t() for i, part in enumerate(parts)]).mul_(s)
    return da, db


def lora(
    base: nn.Module, x: Tensor, lora_a: Tensor, lora_b: Tensor, chunks: tuple[int, ...], scaling: float
) -> Tensor | None:
    """LoRA beside ``base`` as one matmul with the merged weight, or None where no fast path applies."""
    if not is_enabled() or not plain_linear(base):
        return None
    if not needs_grad(x, base.bias, lora_a, lora_b):  # inference: merged on the fly
        return F.linear(x, lora_weight(base.weight, lora_a, lora_b, chunks, scaling), base.bias)
    return LoRALinearFn.apply(x, base.weight, base.bias, lora_a, lora_b, chunks, scaling)
