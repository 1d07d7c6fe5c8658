"""VPT-deep on Swin against a hand-written forward of the official code (KMnP/vpt, ``PromptedSwinTransformer``).

The reference follows the official structure: prompts are residual-stream tokens in front of the patches, replaced
before every block; each block normalises all tokens, appends the prompts to every window, runs window attention
with zero bias and zero shift mask for the prompts, averages the prompt outputs over the windows and adds them back;
patch merging upsamples the prompts by concatenation; the final norm and average pool cover prompts and patches.
It uses only the plain timm backbone's layers (same weights) and deltatune's prompt values.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from torch import Tensor, nn

import deltatune
from deltatune import DeltaTuneError

SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=5)


def _swin64(**kw: object) -> nn.Module:
    """The tiny Swin of conftest at 64 px: the last stage is 8 x 8, so 4 windows and a shifted last block."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, **{**SWIN, **kw}).eval()
    with torch.no_grad():
        model.head.fc.weight.normal_(0.0, 0.5)
    return model


def _windows(x: Tensor, ws: int) -> Tensor:
    """Official window_partition, flattened: (B, H, W, C) -> (B * nW, ws * ws, C), image-major."""
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _unwindows(x: Tensor, ws: int, h: int, w: int) -> Tensor:
    """Official window_reverse: (B * nW, ws * ws, C) -> (B, H, W, C)."""
    b = x.shape[0] // (h * w // ws // ws)
    return x.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def _shift_mask(h: int, w: int, ws: int, shift: int) -> Tensor:
    """Official SW-MSA mask (nW, ws * ws, ws * ws): -100 between tokens from different regions."""
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    mw = _windows(img, ws).squeeze(-1)  # (nW, ws * ws)
    return (mw.unsqueeze(1) - mw.unsqueeze(2)).ne(0).float() * -100.0


def _attention(attn: nn.Module, t: Tensor, mask: Tensor | None, p: int) -> Tensor:
    """Official PromptedWindowAttention on (B_, p + N, C): every token is a query, prompts first."""
    b_, n, c = t.shape
    h = attn.num_heads
    q, k, v = attn.qkv(t).reshape(b_, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    area = attn.relative_position_index.shape[0]
    rel = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(area, area, -1)
    rel = rel.permute(2, 0, 1)  # (h, N, N)
    rel = torch.cat([torch.zeros(h, p, area), rel], dim=1)
    rel = torch.cat([torch.zeros(h, area + p, p), rel], dim=-1)
    a = a + rel.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        mask = torch.cat([torch.zeros(nw, p, area), mask], dim=1)
        mask = torch.cat([torch.zeros(nw, area + p, p), mask], dim=-1)
        a = (a.view(b_ // nw, nw, h, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, h, n, n)
    return attn.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, c))


def _block(blk: nn.Module, x: Tensor, hw: tuple[int, int], p: int) -> Tensor:
    """Official PromptedSwinTransformerBlock on (B, p + H * W, C)."""
    (h, w), ws, shift = hw, blk.window_size[0], blk.shift_size[0]
    b, _, c = x.shape
    shortcut = x
    x = blk.norm1(x)
    prompt, x = x[:, :p], x[:, p:].reshape(b, h, w, c)
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    win = _windows(x, ws)
    nw = win.shape[0] // b
    win = torch.cat([prompt.unsqueeze(0).expand(nw, -1, -1, -1).reshape(-1, p, c), win], dim=1)
    out = _attention(blk.attn, win, _shift_mask(h, w, ws, shift) if shift else None, p)
    prompt = out[:, :p].view(-1, b, p, c).mean(0)  # official: a (nW, B) view of image-major rows
    x = _unwindows(out[:, p:], ws, h, w)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + torch.cat([prompt, x.reshape(b, h * w, c)], dim=1)
    return x + blk.mlp(blk.norm2(x))


def _merge(ds: nn.Module, x: Tensor, hw: tuple[int, int], p: int) -> Tensor:
    """Official PromptedPatchMerging: prompts upsampled by concatenating 4 copies, merged patches after them."""
    prompt, x = torch.cat([x[:, :p]] * 4, dim=-1), x[:, p:]
    b, _, c = x.shape
    x = x.view(b, *hw, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    return ds.reduction(ds.norm(torch.cat([prompt, x.reshape(b, -1, 4 * c)], dim=1)))


def official_logits(ref: nn.Module, prompts: list[Tensor], img: Tensor, pool_prompts: bool = True) -> Tensor:
    """PromptedSwinTransformer (prepend, deep) forward with the plain backbone's weights and the given prompts."""
    x = ref.patch_embed(img)  # (B, H, W, C)
    b, h, w, c = x.shape
    p = prompts[0].shape[0]
    x = torch.cat([prompts[0].expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)  # incorporate_prompt
    i = 0
    for s, stage in enumerate(ref.layers):
        if s:
            x = _merge(stage.downsample, x, (h, w), p)
            h, w = h // 2, w // 2
        for blk in stage.blocks:
            if i:  # deep prompts replace the previous block's prompt outputs
                x = torch.cat([prompts[i].expand(b, -1, -1), x[:, p:]], dim=1)
            x = _block(blk, x, (h, w), p)
            i += 1
    x = ref.norm(x)
    return ref.head.fc(x.mean(1) if pool_prompts else x[:, p:].mean(1))


def _prompts(model: nn.Module) -> list[Tensor]:
    return [blk.attn.vpt_prompt.detach() for stage in model.layers for blk in stage.blocks]


def _check(plain: nn.Module, img: Tensor, pool_prompts: bool = True) -> None:
    ref = plain()
    model = deltatune.apply(plain(), "vpt-deep", num_tokens=3, pool_prompts=pool_prompts, head=False)
    perturb_deltas(model, std=0.5)
    with torch.no_grad():
        expected = official_logits(ref, _prompts(model), img, pool_prompts)
        assert rel_err(run(model, img), expected) <= 1e-5


def test_vpt_swin_equals_the_official_forward() -> None:
    _check(lambda: make_backbone("swin"), make_input("swin"))


def test_vpt_swin_equals_the_official_forward_with_several_windows_in_the_last_stage() -> None:
    img = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # one image: no official mix-up
    _check(_swin64, img)


def test_vpt_swin_pool_prompts_false_pools_the_patches_only() -> None:
    _check(lambda: make_backbone("swin"), make_input("swin"), pool_prompts=False)


def test_vpt_swin_images_do_not_mix_in_the_prompt_pool() -> None:
    """Each image's prompt outputs average its own windows (the official view would mix images here)."""
    model = deltatune.apply(_swin64(), "vpt-deep", num_tokens=3)
    img = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        both = run(model, img)
        assert rel_err(both[1:], run(model, img[1:])) <= 1e-5
        assert rel_err(both[:1], official_logits(_swin64(), _prompts(model), img[:1])) <= 1e-5


def test_vpt_swin_prompt_pool_needs_the_blocks_to_run_first() -> None:
    model = deltatune.apply(make_backbone("swin"), "vpt-deep", num_tokens=3)
    x = make_input("swin")
    with torch.no_grad():
        features = model.forward_features(x)
        model.forward_head(features)
        with pytest.raises(DeltaTuneError, match="pool_prompts=False"):
            model.forward_head(features)


def test_vpt_swin_prompt_pool_refuses_a_non_average_pool() -> None:
    with pytest.raises(DeltaTuneError, match="pool_prompts=False"):
        deltatune.apply(_swin64(global_pool="max"), "vpt-deep")
    model = deltatune.apply(_swin64(global_pool="max"), "vpt-deep", pool_prompts=False)
    assert run(model, torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_vpt_swin_prompt_gradients_equal_the_official_ones() -> None:
    model = deltatune.apply(make_backbone("swin"), "vpt-deep", num_tokens=3, head=False)
    perturb_deltas(model, std=0.5)
    x = make_input("swin")
    prompts = [p.clone().requires_grad_(True) for p in _prompts(model)]
    official_logits(make_backbone("swin"), prompts, x).square().sum().backward()
    run(model, x).square().sum().backward()
    mine = [blk.attn.vpt_prompt.grad for stage in model.layers for blk in stage.blocks]
    for got, expected in zip(mine, prompts, strict=True):
        assert rel_err(got, expected.grad) <= 1e-4
