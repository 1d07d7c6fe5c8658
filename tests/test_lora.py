"""LoRA: the merge formula, fused-qkv parts, depthwise conv, identity at init."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKBONES, make_backbone, make_input, rel_err, run
from torch import nn

import deltatune
from deltatune.methods.lora import LoRAConv, LoRALinear


@pytest.mark.parametrize("kind", BACKBONES)
def test_identity_at_init(kind: str) -> None:
    plain, tuned = make_backbone(kind), deltatune.apply(make_backbone(kind), "lora")
    x = make_input(kind)
    with torch.no_grad():
        assert torch.equal(run(tuned, x), run(plain, x))


def test_merge_is_w_plus_scaled_ba() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    w0 = layer.weight.detach().double().clone()
    lora = LoRALinear(layer, r=2, alpha=5.0, dropout=0.0, parts=([0], 1))
    nn.init.normal_(lora.lora_b)
    x = torch.randn(3, 8)
    expected = x.double() @ (w0 + 2.5 * lora.lora_b[0].double() @ lora.lora_a.double()).T + layer.bias.double()
    assert rel_err(lora(x).double(), expected) < 1e-6
    merged = lora.merge()
    assert torch.equal(merged.weight, (w0 + 2.5 * lora.lora_b[0].double() @ lora.lora_a.double()).float())


def test_parameter_count_closed_form() -> None:
    model = deltatune.apply(make_backbone("vit"), "lora", r=4, head=False)  # test_vit: dim 64, depth 6? count below
    blocks = len(model.blocks)
    c = model.embed_dim
    assert deltatune.trainable_parameters(model) == blocks * 4 * (c + 3 * c)


def test_fused_qkv_parts_match_separate_q_and_v_lora() -> None:
    torch.manual_seed(0)
    c = 8
    qkv = nn.Linear(c, 3 * c)
    lora = LoRALinear(qkv, r=2, alpha=2.0, dropout=0.0, parts=([0, 2], 3))
    nn.init.normal_(lora.lora_b)
    x = torch.randn(5, c)
    out = lora(x)
    base = qkv(x)
    a_q, a_v = lora.lora_a.view(2, 2, c)
    b_q, b_v = lora.lora_b
    assert torch.allclose(out[:, :c], base[:, :c] + x @ a_q.T @ b_q.T, atol=1e-6)
    assert torch.equal(out[:, c : 2 * c], base[:, c : 2 * c])  # k untouched
    assert torch.allclose(out[:, 2 * c :], base[:, 2 * c :] + x @ a_v.T @ b_v.T, atol=1e-6)
    w0 = qkv.weight.detach().clone()
    merged = lora.merge()
    assert torch.equal(merged.weight[c : 2 * c], w0[c : 2 * c])
    assert rel_err(merged(x), out) < 1e-6


def test_fused_qkv_on_vit_counts_and_merges() -> None:
    model = deltatune.apply(make_backbone("vit"), "lora", r=4, fused_qkv="qv", head=False)
    c, blocks = model.embed_dim, len(model.blocks)
    assert deltatune.trainable_parameters(model) == blocks * 2 * 4 * (c + c)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
        x = make_input("vit")
        before = run(model, x)
        deltatune.merge(model)
        assert rel_err(run(model, x), before) < 1e-5


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv_lora_any_groups_merges_exactly(groups: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups)
    lora = LoRAConv(conv, r=3, alpha=3.0, dropout=0.0)
    nn.init.normal_(lora.lora_b)
    x = torch.randn(2, 6, 7, 7)
    out = lora(x)
    assert not torch.allclose(out, conv(x))
    assert lora.lora_a.shape == (3, (6 // groups) * 9)
    assert rel_err(lora.merge()(x), out) < 1e-6


def test_convnext_depthwise_target() -> None:
    model = deltatune.apply(make_backbone("convnext"), "lora", target_modules=["conv_dw"], r=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n:
                p.normal_(0, 0.1)
        x = make_input("convnext")
        before = run(model, x)
        deltatune.merge(model)
        assert rel_err(run(model, x), before) < 1e-5


def test_all_linear_targets_every_linear_but_head() -> None:
    model = deltatune.apply(make_backbone("vit"), "lora", target_modules="all-linear", r=2, head=False)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * len(model.blocks) and "head" not in wrapped


@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_merged_model_is_the_plain_model_tensor_for_tensor(method: str) -> None:
    """Merged inference can only match the plain model's speed if nothing differs: module types, parameter names,
    shapes, strides, dtypes and contiguity of every tensor (the bench's 'merged x plain' spread is timing noise)."""
    plain = make_backbone("vit")
    options = {"target_modules": "all-linear"} if method == "lora" else {}
    merged = deltatune.merge(deltatune.apply(make_backbone("vit"), method, **options))
    assert [type(m) for m in merged.modules()] == [type(m) for m in plain.modules()]
    ref = dict(plain.named_parameters())
    got = dict(merged.named_parameters())
    assert got.keys() == ref.keys()
    for name, p in got.items():
        q = ref[name]
        assert (p.shape, p.stride(), p.dtype, p.is_contiguous()) == (q.shape, q.stride(), q.dtype, True), name
