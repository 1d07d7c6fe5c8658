"""Correctly rounded casts: a float64 result rounded ONCE to the weights' dtype (merges, folds).

torch casts float64 to bf16/fp16 through float32, rounding twice: 1 + 2^-8 + 2^-25 becomes 1 + 2^-8 in float32,
a bf16 tie that rounds to even, 1.0, though the value lies above the midpoint and its nearest bf16 is 1 + 2^-7.
Rounding to float32 "to odd" first (truncate toward zero, then set the last mantissa bit if anything was cut)
keeps the information that the value was not a midpoint; a second round-to-nearest-even to any format with at
most 22 mantissa bits then gives the correctly rounded result (Boldo & Melquiond, "Emulation of FMA and correctly
rounded sums: proved algorithms using rounding to odd", IEEE TC 2008). bf16 (8 bits) and fp16 (11) qualify.
"""

from __future__ import annotations

import torch
from torch import Tensor

_VIA_ODD = (torch.bfloat16, torch.float16)


def round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` (float64) rounded once, to nearest-even, to ``dtype``: direct casts for fp32/fp64, to-odd for bf16/fp16."""
    if dtype not in _VIA_ODD or x.dtype != torch.float64:
        return x.to(dtype)
    return float32_round_to_odd(x).to(dtype)


def float32_round_to_odd(x: Tensor) -> Tensor:
    """float64 -> float32 rounded "to odd": toward zero, with the last mantissa bit set when the cast is inexact.

    Signs, zeros, infinities and NaNs pass through; a finite value beyond float32's range becomes the (odd)
    largest float32, which any narrower format rounds to infinity as it should; values below float32's smallest
    subnormal become zero or the (odd) smallest subnormal, which rounds to zero in any narrower format.
    """
    a = x.abs()
    f = a.float()  # round to nearest: at most one float32 step above |x|
    over = f.double() > a
    f = torch.where(over, torch.nextafter(f, torch.zeros_like(f)), f)  # toward zero
    inexact = (f.double() != a).to(torch.int32)  # NaN != NaN: its bit is set, and it stays a NaN
    f = (f.view(torch.int32) | inexact).view(torch.float32)
    return torch.copysign(f, x.float())
