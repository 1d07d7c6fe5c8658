"""Fast training paths for deltas on frozen layers: one matmul per layer, no weight gradient, small saved state.

A frozen linear layer needs no weight gradient, so it need not keep its input for backward (autograd already
skips it when the weight does not require grad). The wrappers' ``forward`` methods call the functions here,
which return None where no fast path applies (the wrapper then runs its plain formula):

- SSF after a Linear: ``y = x (scale * W)^T + (scale * b + shift)``, one matmul with the weight scaled on the
  fly. Backward keeps the OUTPUT y (often kept anyway by the next op: attention, GELU) instead of the input:
  ``dshift = sum(dy)``, ``dscale = sum(dy * (y - shift) / scale) = (sum(dy * y) - shift * dshift) / scale``.
  The output holds y0 = (y - shift) / scale only to about ``2^-24 (|y0| + |shift / scale|)``: once |shift / scale|
  outgrows ``SAFE_SHIFT_RATIO`` (scale -> 0; it starts at N(1, 0.02) and stays near 1) the plain formula runs,
  which keeps y0 itself. The check is one reduction over the C scales (a host sync on CUDA); under torch.compile,
  where a data-dependent branch would break the graph, the plain formula always runs. The output must not be
  modified in place afterwards (autograd then raises). The two sums are one pass over dy and y (``column_sums``).
- SSF after a LayerNorm: folded into its affine (``w * scale``, ``b * scale + shift``); native LN backward. After a
  residual add of a folded projection's output it keeps the addends (kept anyway), not the sum
  (``kernels/residual.py``).
- LoRA on a Linear (no dropout): ``y = x (W + s B A)^T + b``, one matmul with the merged weight built on the fly
  (weight-sized work, not activation-sized); see ``kernels/lora.py``.
- BitFit needs nothing here: a frozen-weight linear with a trainable bias saves nothing and reduces dy once.
- Adapters: the down-projection's weight gradient is taken from the base layer's input (kept anyway, or recomputed
  as LoRA's) instead of its output, which nothing else keeps; see ``kernels/adapter.py``.

Elsewhere (a trainable base weight, convolutions, SSF over another delta, LoRA dropout in training) the plain
formulas run. All of it is plain PyTorch, traceable by torch.compile without graph breaks, on CPU and CUDA alike.
``kernels.disabled()`` switches the fast paths off, so the plain formulas serve as the reference in tests and
benchmarks.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.kernels import residual
from deltatune.kernels._common import is_enabled, needs_grad, plain_layer_norm, plain_linear, rows

SAFE_SHIFT_RATIO = 2.0  # max |shift / scale| for which the folded SSF recovers its scale gradient from the output


def _column_sums_plain(dy: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    acc = torch.promote_types(dy.dtype, torch.float32)  # bf16/fp16 gradients are summed in fp32
    dy = dy.to(acc)
    return dy.sum(0), None if y is None else (dy * y.to(acc)).sum(0)


@functools.cache
def _column_sums_compiled() -> Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
    return torch.compile(_column_sums_plain, dynamic=True)


_compile_failed: list[str] = []  # the first compile error, once one happened: the plain formula serves from then


def _column_sums_fused(dy: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The compiled one-pass reduction (a Triton kernel from inductor on CUDA); plain sums if it cannot compile."""
    if not _compile_failed:
        try:
            return _column_sums_compiled()(dy, y)
        except Exception as error:  # a broken compiler toolchain must not stop training
            _compile_failed.append(f"{type(error).__name__}: {error}")
            warnings.warn(f"deltatune: SSF's fused reduction could not compile ({_compile_failed[0][:200]}); "
                          "using plain PyTorch sums, which are slower", RuntimeWarning, stacklevel=2)  # fmt: skip
    return _column_sums_plain(dy, y)


def _column_sums_cpu(dy: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Both sums in one pass over dy and y, no temporary: batch norm's backward reduction with mean 0, rstd 1.

    ``native_batch_norm_backward`` on (N, C) returns ``sum(dy * (y - mean) * rstd)`` and ``sum(dy)`` per channel,
    accumulated in float32 for bf16/fp16, from one fused loop; the plain formula's three ops write and re-read an
    activation-sized product (vit_small@112, b32: leaving them out saved 7% of the floor's step at 2 threads, the
    one pass 3.4%; ``scripts/ablate_fast_paths.py``).
    """
    if y is None or dy.shape[0] == 0:
        return _column_sums_plain(dy, y)
    stats = torch.promote_types(dy.dtype, torch.float32)
    zero = torch.zeros(dy.shape[1], dtype=stats, device=dy.device)
    one = torch.ones(dy.shape[1], dtype=stats, device=dy.device)
    _, dot, dsum = torch.ops.aten.native_batch_norm_backward(
        dy, y.to(dy.dtype), None, None, None, zero, one, True, 0.0, [False, True, True]
    )
    return dsum, dot


def column_sums(dy: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(dy.sum(0), (dy * y).sum(0))`` for (N, C) tensors, accumulated in at least float32.

    Under torch.compile inductor fuses the plain formula into one pass; on CUDA a compiled copy of it runs; on CPU
    batch norm's backward reduction does both sums in one pass (``_column_sums_cpu``). A backward that builds a graph
    (``create_graph=True``: second-order gradients) runs the plain formula, whose derivative is exact; batch norm's
    double backward would treat the fixed mean and rstd as batch statistics.
    """
    if torch.compiler.is_compiling() or torch.is_grad_enabled():  # create_graph: the differentiable formula
        return _column_sums_plain(dy, y)
    if dy.device.type == "cpu":
        return _column_sums_cpu(dy, y)
    return _column_sums_fused(dy, y)


class SSFLinearFn(torch.autograd.Function):
    """``F.linear(x, W * scale[:, None], b * scale + shift)`` for a frozen W; saves the output, not the input."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor) -> Tensor:
        folded_bias = shift if bias is None else torch.addcmul(shift, bias, scale)
        y = F.linear(x, weight * scale[:, None], folded_bias)
        need_x, _, _, need_scale, _ = ctx.needs_input_grad
        ctx.save_for_backward(weight if need_x else None, scale, shift, y if need_scale else None)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        weight, scale, shift, y = ctx.saved_tensors
        need_x, _, need_b, need_scale, need_shift = ctx.needs_input_grad
        dx = db = dscale = dshift = None
        if need_x and torch.compiler.is_compiling():  # scale dy, which fuses into dy's producer; a scaled copy
            dx = (dy * scale.to(dy.dtype)).matmul(weight.to(dy.dtype))  # of W would be kept from the forward
        elif need_x:
            dx = dy.matmul((weight * scale[:, None]).to(dy.dtype))  # (..., in)
        if need_b or need_scale or need_shift:
            dsum, dot = column_sums(rows(dy), rows(y) if need_scale else None)  # (out,), one pass over dy and y
            dsum = dsum.to(scale.dtype)
            dshift = dsum if need_shift else None
            db = dsum * scale if need_b else None
            if need_scale:  # sum(dy * y0) with y0 = (y - shift) / scale, the pre-affine output
                dscale = (dot.to(scale.dtype) - shift * dsum) / scale
        return dx, None, db, dscale, dshift


def ssf(base: nn.Module, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor | None:
    """SSF over ``base`` folded into it, or None where no fast path applies (the caller then runs the plain one)."""
    if not is_enabled():
        return None
    if plain_layer_norm(base):
        weight = scale if base.weight is None else base.weight * scale
        bias = shift if base.bias is None else torch.addcmul(shift, base.bias, scale)
        return residual.layer_norm(x, weight, bias, base.eps)  # F.layer_norm, keeping less after a residual add
    if not plain_linear(base):
        return None
    if not needs_grad(x, base.bias, scale, shift):  # inference: the folded layer, one matmul
        bias = shift if base.bias is None else torch.addcmul(shift, base.bias, scale)
        return F.linear(x, base.weight * scale[:, None], bias)
    if scale.requires_grad and not output_holds_input(scale, shift):
        return None
    return SSFLinearFn.apply(x, base.weight, base.bias, scale, shift)


def output_holds_input(scale: Tensor, shift: Tensor) -> bool:
    """Whether y = y0 * scale + shift gives back y0 to float32 precision: every |shift| <= ratio * |scale|."""
    if torch.compiler.is_compiling():
        return False  # a data-dependent branch would break the graph; the plain formula fuses well there
    with torch.no_grad():
        return bool((shift.abs() <= scale.abs() * SAFE_SHIFT_RATIO).all())
