"""Fidelity to the official code (issue 12, items 10-14, 16): each method against a hand-written reference of its
official forward, init or count, never against deltatune's own output."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err
from torch import nn

import deltatune


def _adaptformer_branch(w: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official AdaptFormer adapter (eval, ``adapter_layernorm_option="none"``): s * up(relu(down(x)))."""
    h = torch.relu(x @ w.adaptformer_down.weight.T + w.adaptformer_down.bias)
    return 0.1 * (h @ w.adaptformer_up.weight.T + w.adaptformer_up.bias)


def test_adaptformer_branch_reads_the_residual_stream_as_the_official_vit_block() -> None:
    model = deltatune.apply(make_backbone("vit"), "adaptformer")
    perturb_deltas(model, std=0.3)
    x = make_input("vit")
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks:  # official Block.forward, ffn_option="parallel"
            h = h + block.attn(block.norm1(h))
            adapt = _adaptformer_branch(block.mlp, h)  # reads x, not norm2(x)
            h = h + block.mlp.base(block.norm2(h)) + adapt
        expected = model.forward_head(model.norm(h))
        assert rel_err(model(x), expected) <= 1e-5


@pytest.mark.parametrize("kind,mlp", [("swin", "layers.0.blocks.0.mlp"), ("mixer", "blocks.0.mlp_channels")])
def test_adaptformer_swin_and_mixer_branch_reads_the_input_of_norm2(kind: str, mlp: str) -> None:
    model = deltatune.apply(make_backbone(kind), "adaptformer")
    perturb_deltas(model, std=0.3)
    wrapper = model.get_submodule(mlp)
    norm2 = model.get_submodule(mlp.rpartition(".")[0] + ".norm2")
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str, t: torch.Tensor) -> None:
        seen[key] = t

    norm2.register_forward_pre_hook(lambda m, a: keep("stream", a[0]))
    wrapper.register_forward_hook(lambda m, a, o: keep("in", a[0]) or keep("out", o))
    with torch.no_grad():
        model(make_input(kind))
        expected = wrapper.base(seen["in"]) + _adaptformer_branch(wrapper, seen["stream"])
    assert torch.allclose(seen["out"], expected, atol=1e-6)
    assert not torch.allclose(seen["in"], seen["stream"])  # norm2 changes the input: the test can tell them apart


def _vit48() -> nn.Module:
    """A tiny timm ViT whose width (48) the official PHM-adapter n = 12 divides."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=8)


def _phm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.endswith(("phm_down", "phm_up"))]


def test_phm_adapter_defaults_to_the_official_n12_and_rule_std() -> None:
    layers = _phm_layers(deltatune.apply(_vit48(), "phm-adapter"))
    rules = torch.cat([m.rule.flatten() for m in layers])
    assert layers[0].rule.shape == (12, 12, 12)  # n = 12
    assert 0.009 < rules.std().item() < 0.011  # N(0, 0.01), 8 layers x 1728 values


def test_compacter_shared_rule_starts_n0_1e4() -> None:
    layers = _phm_layers(deltatune.apply(_vit48(), "compacter"))
    rule = layers[0].rule
    assert rule.shape == (4, 4, 4) and all(m.rule is rule for m in layers)
    assert 0.6e-4 < rule.std().item() < 1.5e-4  # 64 values of N(0, 1e-4)


@pytest.mark.parametrize("method", ["phm-adapter", "compacter"])
def test_phm_fast_weights_are_glorot_uniform_with_gain_sqrt2(method: str) -> None:
    """xavier_uniform_(gain=sqrt 2) per Kronecker factor: U(-b, b), b = sqrt(2) * sqrt(6 / (fan_in + fan_out))."""
    fractions = []
    for m in _phm_layers(deltatune.apply(_vit48(), method)):
        for t in [m.left, m.right] if method == "compacter" else [m.fast]:
            for slice_ in t:  # (fan_in, fan_out) per i
                bound = math.sqrt(2.0) * math.sqrt(6.0 / (slice_.shape[0] + slice_.shape[1]))
                assert slice_.abs().max().item() <= bound
                fractions.append((slice_.abs() > bound / math.sqrt(2.0)).float().flatten())
    beyond_gain1 = torch.cat(fractions).mean().item()
    assert abs(beyond_gain1 - (1 - 1 / math.sqrt(2.0))) < 0.06  # U(-b, b): P(|v| > b / sqrt 2) = 0.293


def test_mimi_init_is_n0_002_truncated_at_absolute_2() -> None:
    """timm's trunc_normal_(std=0.02) keeps its default bounds a=-2, b=2 (absolute), so the draw is N(0, 0.02)."""
    torch.manual_seed(0)
    model = deltatune.apply(make_backbone("vit"), "mimi")  # sigma 4: 6 blocks x 2 adapters x (64x16 + 16x64)
    w = torch.cat([p.flatten() for n, p in model.named_parameters() if "adapter_" in n])
    assert w.numel() == 6 * 2 * 2 * 64 * 16
    assert abs(w.std().item() - 0.02) < 0.0006  # a cut at +-2 std would give std 0.0176
    assert (w.abs() > 2 * 0.02).float().mean().item() > 0.03  # N(0, 1): P(|z| > 2) = 0.0455; cut at 2 std: 0


@pytest.mark.parametrize("kind,sigma,expected", [("vit", 5.0, [12]), ("swin", 6.0, [10, 21])])
def test_mimi_start_sizes_floor(kind: str, sigma: float, expected: list[int]) -> None:
    """Official: hidden = int(d / sigma) (Swin int(4d / sigma)): 64/5 = 12.8 -> 12; 64/6 = 10.7 -> 10; 128/6 = 21.3."""
    model = deltatune.apply(make_backbone(kind), "mimi", sigma=sigma, target_sigma=None)
    sizes = sorted({m.hidden for n, m in model.named_modules() if hasattr(m, "adapter_down")})
    assert sizes == expected


def test_mimi_global_prune_keeps_the_floor_of_the_kept_fraction() -> None:
    """ViT, sigma 5: 12 adapters x 12 = 144 neurons; pruning 0.3 keeps floor(144 * 0.7) = floor(100.8) = 100."""
    model = deltatune.apply(make_backbone("vit"), "mimi", sigma=5.0, target_sigma=None)
    sizes = deltatune.prune_adapters(model, 0.3)
    assert sum(sizes.values()) == 100
    local = deltatune.apply(make_backbone("vit"), "mimi", sigma=5.0, target_sigma=None)
    assert set(deltatune.prune_adapters(local, 0.3, scope="local").values()) == {8}  # floor(12 * 0.7) = floor(8.4)


def test_ssf_convnext_last_site_is_the_feature_map_before_pooling_as_official() -> None:
    model = deltatune.apply(make_backbone("convnext"), "ssf")
    perturb_deltas(model, std=0.3)
    assert not deltatune.core.is_delta(model.head.norm)  # the head's norm is not a site
    site = model.norm_pre
    x = make_input("convnext")
    with torch.no_grad():
        feats = model.stages(model.stem(x))  # (B, C, H, W), every inner site active
        scale, shift = site.ssf_scale.view(1, -1, 1, 1), site.ssf_shift.view(1, -1, 1, 1)
        pooled = (feats * scale + shift).mean((2, 3))  # official forward_features: SSF, then pool, then norm
        normed = nn.functional.layer_norm(pooled, pooled.shape[1:], model.head.norm.weight, model.head.norm.bias, 1e-6)
        expected = normed @ model.head.fc.weight.T + model.head.fc.bias
        assert rel_err(model(x), expected) <= 1e-5


def test_ssf_convnext_merge_keeps_only_the_feature_map_site_and_is_exact() -> None:
    model = deltatune.apply(make_backbone("convnext"), "ssf")
    perturb_deltas(model, std=0.3)
    x = make_input("convnext")
    with torch.no_grad():
        before = model(x)
        with pytest.warns(UserWarning, match=r"cannot be merged.*norm_pre \(ssf\)"):
            deltatune.merge(model)
        assert rel_err(model(x), before) <= 1e-5
    assert [n for n, _ in deltatune.core.delta_modules(model)] == ["norm_pre"]


def _bert_batch() -> dict[str, torch.Tensor]:
    batch = make_input("bert")
    types = torch.zeros_like(batch["input_ids"])
    types[:, 6:] = 1  # a second segment, so that the prompts' token type matters
    return {**batch, "token_type_ids": types}


def test_prompt_input_insertion_equals_peft_prompt_tuning() -> None:
    """peft PromptTuningConfig (SEQ_CLS): prompts prepended to the word embeddings, mask ones, token type 0; the
    prompts then get positions 0..p-1 and the embedding LayerNorm, and the pooler reads the first prompt."""
    import copy

    from peft import PromptTuningConfig, get_peft_model

    backbone = make_backbone("bert")
    reference = get_peft_model(copy.deepcopy(backbone), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))
    model = deltatune.apply(backbone, "prompt", num_tokens=5, insert="input")
    perturb_deltas(model, std=0.5)
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(model.bert.embeddings.prompt_tokens)
        reference.base_model.classifier.modules_to_save["default"].load_state_dict(model.classifier.state_dict())
        batch = _bert_batch()
        expected = reference(**batch).logits
        assert rel_err(model(**batch).logits, expected) <= 1e-6


def test_prompt_init_copies_word_embedding_rows_as_opendelta() -> None:
    backbone = make_backbone("bert")  # vocabulary 99
    words = backbone.bert.embeddings.word_embeddings.weight.detach().clone()
    model = deltatune.apply(backbone, "prompt", num_tokens=5)
    assert torch.equal(model.bert.embeddings.prompt_tokens, words[:5])  # OpenDelta: rows 0..p-1
    cycled = deltatune.apply(make_backbone("bert"), "prompt", num_tokens=120).bert.embeddings.prompt_tokens
    assert torch.equal(cycled, torch.cat([words, words[:21]]))  # more prompts than words: the rows again
    uniform = deltatune.apply(make_backbone("bert"), "prompt", num_tokens=5, init="uniform").bert.embeddings
    assert uniform.prompt_tokens.abs().max() <= 0.5 and not torch.equal(uniform.prompt_tokens, words[:5])


def test_vpt_swin_init_bound_uses_the_first_stage_width_for_every_stage() -> None:
    """Official: val = sqrt(6 / (3 * patch^2 + embed_dim)) with the first stage's embed_dim (16), patch 4."""
    torch.manual_seed(0)
    model = deltatune.apply(make_backbone("swin"), "vpt-deep", num_tokens=200)
    val = math.sqrt(6.0 / (3 * 4 * 4 + 16))
    prompts = [p for _, m in deltatune.core.delta_modules(model) for p in m.delta_parameters()]
    assert {p.shape[1] for p in prompts} == {16, 32}
    for p in prompts:  # U(-val, val): the max |value| of 3200+ draws lies within 1% of val
        assert val * 0.99 < p.abs().max().item() <= val
