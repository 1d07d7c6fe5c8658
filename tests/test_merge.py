"""Merges: idempotent at every level, and rounded once to bf16/fp16 (checked against a nearest-value reference)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from torch import nn

import deltatune
from deltatune.core import delta_modules
from deltatune.methods.lora import LoRALinear
from deltatune.methods.ssf import SSF
from deltatune.numerics import round_to

MERGEABLE = ["lora", "ssf", "fact-tt", "fact-tk", "bitfit", "attn-only", "mlp-only", "layernorm", "full"]
HALF = [torch.bfloat16, torch.float16]
MANTISSA = {torch.bfloat16: 8, torch.float16: 11}  # significant bits


def nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference: the ``dtype`` value nearest to float64 ``x`` (ties to an even bit pattern), by enumeration.

    Candidates are torch's cast (at most one step off) and its two neighbours by bit pattern; the nearest by
    float64 distance wins. At or beyond the midpoint above the largest finite value, the result is infinite.
    """
    bits = x.to(dtype).view(torch.int16).int()
    cand = torch.stack([bits - 1, bits, bits + 1])  # (3, ...) neighbours in magnitude, same sign
    dist = (cand.short().view(dtype).double() - x).abs().nan_to_num(nan=math.inf)
    tied = dist == dist.min(0, keepdim=True).values
    rank = tied.int() * 2 + (tied & (cand % 2 == 0)).int()  # nearest and even > nearest and odd > farther
    out = cand.gather(0, rank.argmax(0, keepdim=True))[0].short().view(dtype)
    big = torch.finfo(dtype).max
    limit = big + 2.0 ** (math.frexp(big)[1] - MANTISSA[dtype]) / 2  # max + half a step: ties go up (max is odd)
    return torch.where(x.abs() >= limit, torch.copysign(torch.full_like(x, math.inf), x).to(dtype), out)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (tells -0 from +0)."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def hard_values(dtype: torch.dtype, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Random float64 values of every magnitude, and midpoints of ``dtype`` nudged by less than float32 resolves."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-30, 15) if dtype == torch.float16 else (-140, 120)
    spread = torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(lo, hi, (n,), generator=g)
    v = spread.to(dtype)
    up = (v.view(torch.int16) + 1).view(dtype)  # the next value away from zero
    mid = (v.double() + up.double()) / 2
    nudge = mid.abs() * 2.0 ** -torch.randint(25, 50, (n,), generator=g).double()
    sign = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    x = torch.cat([spread, mid, mid + sign * nudge])
    return x[torch.isfinite(x) & (x.abs() < torch.finfo(dtype).max)]


@pytest.mark.parametrize("dtype", HALF)
def test_round_to_is_the_nearest_value(dtype: torch.dtype) -> None:
    x = hard_values(dtype)
    ref = nearest(x, dtype)
    assert (x.to(dtype) != ref).any()  # the set holds cases that a cast through float32 gets wrong
    assert same_bits(round_to(x, dtype), ref)


P2 = 2.0  # short names for the hand-built cases
CASES = [  # (value, dtype, correctly rounded): double rounding picks the other neighbour in the first rows
    (1 + P2**-8 + P2**-25, torch.bfloat16, 1.0078125),
    (-(1 + P2**-8 + P2**-25), torch.bfloat16, -1.0078125),
    (1 + P2**-11 + P2**-30, torch.float16, 1 + P2**-10),
    (P2**-25 + P2**-60, torch.float16, P2**-24),  # fp16 subnormal
    (P2**-134 + P2**-170, torch.bfloat16, P2**-133),  # bf16 (and float32) subnormal
    (65520 - P2**-30, torch.float16, 65504.0),
    (1 + P2**-8, torch.bfloat16, 1.0),  # exact ties: to even
    (1 + 3 * P2**-8, torch.bfloat16, 1 + P2**-6),
    (1 + P2**-11, torch.float16, 1.0),
    (P2**-25, torch.float16, 0.0),
    (65520.0, torch.float16, math.inf),  # overflow
    (-1e300, torch.float16, -math.inf),
    (torch.finfo(torch.bfloat16).max + P2**119, torch.bfloat16, math.inf),
    (torch.finfo(torch.bfloat16).max + P2**119 - P2**90, torch.bfloat16, torch.finfo(torch.bfloat16).max),
    (1e300, torch.bfloat16, math.inf),
    (-1e-300, torch.float16, -0.0),  # underflow keeps the sign
    (-1e-300, torch.bfloat16, -0.0),
    (-0.0, torch.bfloat16, -0.0),
    (0.0, torch.float16, 0.0),
    (-math.inf, torch.float16, -math.inf),
    (1 + P2**-24 + P2**-40, torch.float32, 1 + P2**-23),  # direct casts are rounded once already
]


@pytest.mark.parametrize("value,dtype,expected", CASES)
def test_round_to_hand_built_cases(value: float, dtype: torch.dtype, expected: float) -> None:
    x = torch.tensor([value], dtype=torch.float64)
    want = torch.tensor([expected], dtype=dtype)
    assert same_bits(round_to(x, dtype), want) if dtype in HALF else torch.equal(round_to(x, dtype), want)
    if dtype in HALF:
        assert same_bits(nearest(x, dtype), want)  # the reference agrees


def test_round_to_keeps_nan() -> None:
    x = torch.tensor([math.nan, -math.nan], dtype=torch.float64)
    assert round_to(x, torch.float16).isnan().all() and round_to(x, torch.bfloat16).isnan().all()


# ------------------------------------------------------------------------------------------------ idempotence


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model after unwrapping (names of the plain backbone)."""
    return {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", MERGEABLE)
def test_merge_three_times(method: str) -> None:
    model = make_backbone("vit")
    deltatune.apply(model, method)
    perturb_deltas(model)
    x = make_input("vit")
    with torch.no_grad():
        want = run(model, x)
    once, thrice = copy.deepcopy(model), model
    deltatune.merge(once)
    wrappers = [m for _, m in delta_modules(thrice) if hasattr(m, "merge")]
    for m in wrappers:
        for _ in range(3):
            m.merge()
    with torch.no_grad():  # merged wrappers still in place: their delta lives in the weights only
        assert rel_err(run(thrice, x), want) < 1e-5
    deltatune.merge(thrice)
    deltatune.merge(thrice)
    a, b = weights(once), weights(thrice)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert rel_err(run(thrice, x), want) < 1e-5


# ------------------------------------------------------------------------------------------- half precision


def two_term(hi: float, lo: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) in ``dtype`` with a1 b1 + a2 b2 = hi + lo exactly: the LoRA rank-2 product of a hand-built case."""
    return torch.tensor([hi, lo * 2**7], dtype=dtype), torch.tensor([1.0, 2**-7], dtype=dtype)


def plant_lora_case(model: nn.Module, dtype: torch.dtype) -> None:
    """W[0, 0] = 1 and (alpha/r) (B A)[0, 0] = 2^-p + 2^-(p+19): a sum float32 rounds to a tie of ``dtype``."""
    p = MANTISSA[dtype]
    site = next(m for _, m in delta_modules(model) if isinstance(m, LoRALinear))
    with torch.no_grad():
        site.base.weight[0, 0] = 1.0
        a, b = two_term(2.0**-p / site.scaling, 2.0 ** -(p + 19) / site.scaling, dtype)
        site.lora_a[:2, 0], site.lora_b[0, 0, :2], site.lora_b[0, 0, 2:] = a, b, 0.0


def plant_ssf_case(model: nn.Module, dtype: torch.dtype) -> None:
    """bias * scale + shift = a midpoint of ``dtype`` plus a tiny shift: 261/256 + 2^-25 (bf16), 1 + 2^-11 + 2^-24."""
    b, s, t = (9 / 8, 29 / 32, 2.0**-25) if dtype == torch.bfloat16 else (3 / 2, 683 / 1024, 2.0**-24)
    site = next(m for _, m in delta_modules(model) if isinstance(m, SSF) and m.base.bias is not None)
    with torch.no_grad():
        site.base.bias[0], site.ssf_scale[0], site.ssf_shift[0] = b, s, t


def lora_reference(model: nn.Module) -> dict[int, torch.Tensor]:
    """W + (alpha/r) B A in float64 per LoRA site (by the id of its base weight)."""
    out = {}
    for _, m in delta_modules(model):
        w = m.base.weight.double().clone()
        r = m.lora_b.shape[2]
        for i, chunk in enumerate(m.chunks):
            rows = slice(chunk * m.chunk, (chunk + 1) * m.chunk)
            w[rows] += m.scaling * m.lora_b[i].double() @ m.lora_a[i * r : (i + 1) * r].double()
        out[id(m.base.weight)] = w
    return out


def ssf_reference(model: nn.Module) -> dict[int, torch.Tensor]:
    """scale * W (per output row) and scale * b + shift in float64 per SSF site."""
    out = {}
    for _, m in delta_modules(model):
        s, t, base = m.ssf_scale.double(), m.ssf_shift.double(), m.base
        out[id(base.weight)] = base.weight.double() * s.view(-1, *[1] * (base.weight.ndim - 1))
        out[id(base.bias)] = base.bias.double() * s + t
    return out


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_half_merge_is_rounded_once(method: str, dtype: torch.dtype) -> None:
    model = make_backbone("vit").to(dtype)
    deltatune.apply(model, method)
    perturb_deltas(model, std=0.3)
    (plant_lora_case if method == "lora" else plant_ssf_case)(model, dtype)
    with torch.no_grad():
        exact = (lora_reference if method == "lora" else ssf_reference)(model)
    tensors = {id(p): p for p in model.parameters()}
    deltatune.merge(model)
    wrong_before = 0
    for key, value in exact.items():
        want = nearest(value, dtype)
        assert same_bits(tensors[key].detach(), want)
        wrong_before += int((value.to(dtype) != want).sum())  # what a cast through float32 gives
    assert wrong_before >= 1  # the planted case: the old double rounding fails here
