"""LoRA's plain and fused classes, rsLoRA scaling and per-site rank/alpha patterns, against hand-written formulas."""

from __future__ import annotations

import math

import torch
from conftest import make_backbone
from torch import nn

import deltatune
from deltatune.core import delta_modules
from deltatune.methods.lora import LoRAFusedQKV, LoRALinear


def test_plain_class_is_the_three_line_formula_and_keeps_the_file_layout() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    lora = LoRALinear(layer, r=3, alpha=6.0, dropout=0.0)
    assert type(lora) is LoRALinear and lora.lora_a.shape == (3, 6) and lora.lora_b.shape == (1, 4, 3)
    nn.init.normal_(lora.lora_b)
    x = torch.randn(5, 6, dtype=torch.float64)
    a, b = lora.lora_a.double(), lora.lora_b[0].double()
    expected = x @ layer.weight.double().T + layer.bias.double() + 2.0 * x @ a.T @ b.T
    assert torch.allclose(lora.double()(x), expected, atol=1e-12)


def test_fused_parts_build_the_fused_class() -> None:
    lora = LoRALinear(nn.Linear(4, 12), 2, 2.0, 0.0, ([0, 2], 3))
    assert type(lora) is LoRAFusedQKV and lora.lora_b.shape == (2, 4, 2)
    model = deltatune.apply(make_backbone("vit"), "lora", fused_qkv="qv", r=2)
    assert all(type(m) is LoRAFusedQKV for _, m in delta_modules(model))


def test_rslora_scales_by_alpha_over_sqrt_r() -> None:
    lora = LoRALinear(nn.Linear(4, 4), r=4, alpha=8.0, dropout=0.0, rslora=True)
    assert lora.scaling == 8.0 / math.sqrt(4)
    model = deltatune.apply(make_backbone("vit"), "lora", r=4, alpha=8.0, rslora=True)
    assert {m.scaling for _, m in delta_modules(model)} == {4.0}


def test_rank_and_alpha_patterns_override_per_site() -> None:
    model = deltatune.apply(
        make_backbone("bert"), "lora", r=2, alpha=4.0, rank_pattern={"layer.0.attention.self.query": 5},
        alpha_pattern={"value": 1.0},
    )  # fmt: skip
    ranks = {n: (m.lora_a.shape[0], m.scaling) for n, m in delta_modules(model)}
    assert ranks["bert.encoder.layer.0.attention.self.query"] == (5, 4.0 / 5)
    assert ranks["bert.encoder.layer.1.attention.self.query"] == (2, 4.0 / 2)
    assert ranks["bert.encoder.layer.0.attention.self.value"] == (2, 1.0 / 2)
