"""Adapters: sizes, placement, the forward formula, resizing, and conv sites."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_backbone, make_input, run
from torch import nn

import deltatune
from deltatune.methods.adapter import Adapter


def test_sizes_from_sigma_and_hidden() -> None:
    model = deltatune.apply(make_backbone("vit"), "adapter", sigma=4, head=False)
    c, blocks = model.embed_dim, len(model.blocks)
    h = c // 4
    assert deltatune.trainable_parameters(model) == blocks * 2 * (2 * c * h)
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=3, bias=True, head=False)
    assert deltatune.trainable_parameters(model) == blocks * 2 * (2 * c * 3 + 3 + c)


def test_swin_uses_four_d_over_sigma() -> None:
    model = deltatune.apply(make_backbone("swin"), "adapter", sigma=8, head=False)
    sizes = {n: m.hidden for n, m in model.named_modules() if isinstance(m, Adapter)}
    assert sizes["layers.0.blocks.0.attn.proj"] == 4 * 16 // 8
    assert sizes["layers.1.blocks.0.mlp.fc2"] == 4 * 32 // 8


def test_placement_before_residual_and_formula() -> None:
    model = deltatune.apply(make_backbone("vit"), "adapter")
    sites = sorted(n for n, m in model.named_modules() if isinstance(m, Adapter))
    assert sites == sorted(f"blocks.{i}.{s}" for i in range(len(model.blocks)) for s in ("attn.proj", "mlp.fc2"))
    adapter = model.blocks[0].mlp.fc2
    z = torch.randn(2, 3, adapter.base.in_features)
    y = adapter.base(z)
    expected = y + F.linear(F.gelu(F.linear(y, adapter.adapter_down.weight)), adapter.adapter_up.weight)
    assert torch.allclose(adapter(z), expected, atol=1e-6)


def test_zero_up_is_identity_at_init() -> None:
    plain, tuned = make_backbone("swin"), deltatune.apply(make_backbone("swin"), "adapter", zero_up=True)
    x = make_input("swin")
    with torch.no_grad():
        assert torch.equal(run(tuned, x), run(plain, x))


def test_resize_drops_zero_neurons_without_changing_outputs() -> None:
    torch.manual_seed(0)
    adapter = Adapter(nn.Linear(8, 8), hidden=5, act="gelu", bias=False, init_std=0.5)
    with torch.no_grad():
        adapter.adapter_down.weight[[1, 3]] = 0
        adapter.adapter_up.weight[:, [1, 3]] = 0
    x = torch.randn(4, 8)
    before = adapter(x)
    adapter.resize(torch.tensor([0, 2, 4]))
    assert adapter.hidden == 3 and adapter.adapter_up.weight.shape == (8, 3)
    assert torch.allclose(adapter(x), before, atol=1e-6)


def test_conv_site_channels_first() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 1)
    adapter = Adapter(conv, hidden=2, act="relu", bias=True, init_std=0.5)
    x = torch.randn(2, 4, 3, 3)
    y = conv(x).movedim(1, -1)
    expected = y + adapter.adapter_up(F.relu(adapter.adapter_down(y)))
    assert torch.allclose(adapter(x), expected.movedim(-1, 1), atol=1e-6)


def test_pruned_sizes_rebuild_from_config() -> None:
    model = deltatune.apply(
        make_backbone("vit"), "adapter", hidden=4, hidden_sizes={"blocks.0.mlp.fc2": 1, "blocks.1.attn.proj": 0}
    )
    assert model.blocks[0].mlp.fc2.hidden == 1
    assert not isinstance(model.blocks[1].attn.proj, Adapter)
    assert model.blocks[1].mlp.fc2.hidden == 4


@pytest.mark.parametrize("bias", [False, True])
def test_inference_adds_in_place_and_matches_float64(bias: bool) -> None:
    """Inference on a frozen Linear: the up-projection accumulates into the base's output (no separate residual
    add, one pass over the activations fewer), equal to the formula in float64; training keeps the plain graph."""
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=5, bias=bias)
    adapter = model.blocks[0].mlp.fc2
    with torch.no_grad():
        for p in adapter.delta_parameters():
            p.normal_(0.0, 0.3)
    z = torch.randn(2, 7, adapter.base.in_features)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = adapter(z)
    ops = {e.name for e in prof.events()}
    assert "aten::addmm_" in ops and "aten::add" not in ops, ops
    lin = {n: p.detach().double() for n, p in adapter.named_parameters()}
    y = F.linear(z.double(), lin["base.weight"], lin["base.bias"])
    h = F.gelu(F.linear(y, lin["adapter_down.weight"], lin.get("adapter_down.bias")))
    expected = y + F.linear(h, lin["adapter_up.weight"], lin.get("adapter_up.bias"))
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6
    assert adapter(z).grad_fn is not None and adapter(z).requires_grad  # training: the autograd path
