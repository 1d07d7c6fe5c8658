"""Prompt-like methods (VPT deep/shallow on ViT and Swin, soft prompts, prefix tuning) against hand-written reference
forwards: the tokens they insert, the masks they extend, and the prefix MLP folded for storage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from safetensors.torch import load_file
from test_family import BERT, VIT, one_thread, sensitive_backbone  # noqa: F401 (one_thread: module fixture)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import deltatune
from deltatune.methods.prefix import fold_prefixes


def test_vpt_deep_vit_equals_reference_loop() -> None:
    model = deltatune.apply(make_backbone("vit"), "vpt-deep", num_tokens=3)
    x = make_input("vit")
    prompts = [model.norm_pre.vpt_prompt] + [b.norm1.vpt_prompt for b in model.blocks[1:]]
    ref = make_backbone("vit")
    with torch.no_grad():
        h = ref._pos_embed(ref.patch_embed(x))  # (B, 1 + N, d)
        for i, block in enumerate(ref.blocks):  # VPT-deep: fresh prompts after CLS at every block's input
            p = prompts[i].expand(h.shape[0], -1, -1)
            h = block(torch.cat([h[:, :1], p, h[:, 1 + (3 if i else 0) :]], dim=1))
        expected = ref.forward_head(ref.norm(torch.cat([h[:, :1], h[:, 4:]], dim=1)))
        assert rel_err(run(model, x), expected) <= 1e-6


def test_vpt_shallow_vit_equals_reference_loop() -> None:
    model = deltatune.apply(make_backbone("vit"), "vpt-shallow", num_tokens=4)
    x = make_input("vit")
    ref = make_backbone("vit")
    with torch.no_grad():
        h = ref._pos_embed(ref.patch_embed(x))
        h = ref.blocks(torch.cat([h[:, :1], model.norm_pre.vpt_prompt.expand(2, -1, -1), h[:, 1:]], dim=1))
        expected = ref.forward_head(ref.norm(torch.cat([h[:, :1], h[:, 5:]], dim=1)))
        assert rel_err(run(model, x), expected) <= 1e-6
    assert model.forward_features(x).shape == ref.forward_features(x).shape


def test_vpt_swin_window_attention_equals_prepended_tokens() -> None:
    model = deltatune.apply(make_backbone("swin"), "vpt-deep", num_tokens=3)
    wrapper = model.layers[0].blocks[1].attn  # shifted windows: has a mask
    attn = wrapper.base
    blk = model.layers[0].blocks[1]
    mask = blk.attn_mask
    assert mask is not None
    x = torch.randn(2 * mask.shape[0], 16, 16)
    with torch.no_grad():  # reference: prompts (normalised by the block's norm1) in every window, outputs dropped
        p = blk.norm1(wrapper.vpt_prompt).expand(x.shape[0], -1, -1)
        t = torch.cat([p, x], dim=1)  # (B_, 3 + N, C)
        q, k, v = attn.qkv(t).reshape(t.shape[0], 19, 3, 1, 16).permute(2, 0, 3, 1, 4)
        bias = F.pad(attn._get_rel_pos_bias(), (3, 0, 3, 0))
        m = F.pad(mask, (3, 0, 3, 0)).repeat(2, 1, 1).unsqueeze(1)
        a = (q * attn.scale @ k.transpose(-2, -1) + bias + m).softmax(-1)
        expected = attn.proj((a @ v).transpose(1, 2).reshape(t.shape[0], 19, 16))[:, 3:]
        assert rel_err(wrapper(x, mask=mask), expected) <= 1e-5


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_vpt_keeps_shapes_and_flops_grow_with_prompt_count(kind: str) -> None:
    x = make_input(kind)

    def flops(model: nn.Module) -> tuple[int, torch.Size]:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = run(model, x)
        return counter.get_total_flops(), out.shape

    base, shape = flops(make_backbone(kind))
    counts = []
    for p in (1, 8, 32):
        total, out_shape = flops(deltatune.apply(make_backbone(kind), "vpt-deep", num_tokens=p))
        assert out_shape == shape
        counts.append(total)
    assert base < counts[0] < counts[1] < counts[2]


@pytest.mark.parametrize("insert_at", [0, 1])
def test_prompt_extends_the_attention_mask(insert_at: int) -> None:
    model = deltatune.apply(sensitive_backbone("bert"), "prompt", num_tokens=5, insert_at=insert_at)
    x = make_input("bert")  # row 1 is padded from position 9
    ids, mask = x["input_ids"][1:], x["attention_mask"][1:]
    with torch.no_grad():
        padded = run(model, {"input_ids": ids, "attention_mask": mask})
        unpadded = run(model, {"input_ids": ids[:, :9], "attention_mask": mask[:, :9]})
        assert rel_err(padded, unpadded) <= 1e-5
        hidden = model.bert(**x).last_hidden_state
    assert hidden.shape == (2, 12 + 5, 32)


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_prefix_attention_equals_reference_and_merge_folds_the_mlp(kind: str) -> None:
    model = deltatune.apply(make_backbone(kind), "prefix")
    site = model.blocks[0].attn if kind == "vit" else model.bert.encoder.layer[0].attention.self
    x = torch.randn(2, 5, site.width)
    with torch.no_grad():  # reference: explicit softmax over [prefix; keys]
        kv = site.prefixes()  # (2, p, d)
        if kind == "vit":
            a = site.base
            q, k, v = a.qkv(x).reshape(2, 5, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
            heads, out = a.num_heads, a.proj
        else:
            a = site.base
            q, k, v = (
                lin(x).view(2, 5, -1, a.attention_head_size).transpose(1, 2) for lin in (a.query, a.key, a.value)
            )
            heads, out = a.num_attention_heads, nn.Identity()
        pk, pv = (t.reshape(6, heads, -1).transpose(0, 1).expand(2, -1, -1, -1) for t in kv)
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        expected = out((attn @ v).transpose(1, 2).reshape(2, 5, -1))
        got = site(x)
        got = got[0] if isinstance(got, tuple) else got
        assert rel_err(got, expected) <= 1e-5
    before_params = deltatune.trainable_parameters(model)
    perturb_deltas(model)
    xin = make_input(kind)
    with torch.no_grad():
        before = run(model, xin)
        with pytest.warns(UserWarning, match="cannot be merged"):
            deltatune.merge(model)
        assert rel_err(run(model, xin), before) <= 1e-5
    layers = VIT["depth"] if kind == "vit" else BERT["layers"]
    width = VIT["d"] if kind == "vit" else BERT["d"]
    folded = sum(p.numel() for n, p in model.named_parameters() if "prefix" in n)
    assert folded == layers * 2 * 6 * width < before_params


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_folded_prefix_delta_file_stores_only_the_prefixes_and_reloads_exactly(kind: str, tmp_path) -> None:
    model = deltatune.apply(make_backbone(kind), "prefix")
    perturb_deltas(model)
    xin = make_input(kind)
    with torch.no_grad():
        before = run(model, xin)
    fold_prefixes(model)
    deltatune.save_delta(model, tmp_path / "prefix.safetensors")
    layers = VIT["depth"] if kind == "vit" else BERT["layers"]
    width = VIT["d"] if kind == "vit" else BERT["d"]
    stored = load_file(tmp_path / "prefix.safetensors")
    prefixes = {k: v.shape for k, v in stored.items() if "prefix" in k}
    assert len(prefixes) == layers and set(prefixes.values()) == {(2, 6, width)}
    fresh = deltatune.load_delta(make_backbone(kind), tmp_path / "prefix.safetensors")
    with torch.no_grad():
        assert rel_err(run(fresh, xin), before) <= 1e-5
