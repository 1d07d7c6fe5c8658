"""IA3 against independent references: HF peft's IA3 (the oracle) on separate linears, and a float64 formula on
timm's fused qkv; identity at init, exact and idempotent merges, save/load, and where it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from torch import nn

import deltatune
from deltatune.core import delta_modules
from deltatune.methods.ia3 import IA3

peft = pytest.importorskip("peft")

BERT_KV = r".*\.(key|value)"
BERT_FFN = r".*\.layer\.\d+\.output\.dense"  # the FFN's second linear, not attention.output.dense


def backbone(kind: str) -> nn.Module:
    """A tiny backbone whose biases are random: HF and timm init them to zero, which would hide their merge."""
    model = make_backbone(kind)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def tiny_llama() -> nn.Module:
    """A 2-layer Llama with grouped-query attention (k and v narrower than q) and an odd MLP width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


def with_peft(model: nn.Module, **options) -> nn.Module:
    """peft's IA3 on a copy of ``model`` (vectors at ones until copied in)."""
    return peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**options))


def random_vectors(ours: nn.Module, seed: int = 3) -> None:
    """Sets every IA3 vector to random values around one, so scaling shows in outputs, gradients and merges."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in delta_modules(ours):
            m.ia3_scale.copy_(1.0 + 0.5 * torch.randn(m.ia3_scale.shape, generator=g))


def peft_vectors(theirs: nn.Module) -> dict[str, nn.Parameter]:
    """peft's IA3 vectors by the name of the layer they scale (as in the plain model)."""
    out = {}
    for name, module in theirs.named_modules():
        if hasattr(module, "ia3_l") and "default" in module.ia3_l:
            out[name.removeprefix("base_model.model.")] = module.ia3_l["default"]
    return out


def copy_into_peft(ours: nn.Module, theirs: nn.Module) -> dict[str, nn.Parameter]:
    """Copies our vectors into peft's (same sites, their (out, 1) / (1, in) shapes); returns peft's vectors."""
    vectors = peft_vectors(theirs)
    ours_sites = dict(delta_modules(ours))
    assert set(vectors) == set(ours_sites)
    with torch.no_grad():
        for name, vec in vectors.items():
            vec.copy_(ours_sites[name].ia3_scale.view_as(vec))
    return vectors


def loss(model: nn.Module, x) -> torch.Tensor:
    return run(model, x).double().square().sum()


def assert_matches_peft(ours: nn.Module, theirs: nn.Module, x) -> None:
    """Same outputs and vector gradients as peft to float32 precision, and the same merged weights bit for bit."""
    vectors = copy_into_peft(ours, theirs)
    loss(ours, x).backward()
    loss(theirs, x).backward()
    with torch.no_grad():
        assert rel_err(run(ours, x), run(theirs, x)) < 1e-6
    for name, module in delta_modules(ours):
        assert rel_err(module.ia3_scale.grad, vectors[name].grad.flatten()) < 1e-5, name
    merged_ours = deltatune.merge(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert set(merged_ours) == set(merged_theirs)
    # float32 x float32 is exact in float64, so our float64-then-round merge equals peft's float32 product
    assert all(torch.equal(merged_ours[k], merged_theirs[k]) for k in merged_ours)


def test_bert_matches_peft() -> None:
    model = backbone("bert")
    theirs = with_peft(model, target_modules=f"{BERT_KV}|{BERT_FFN}", feedforward_modules=BERT_FFN)
    ours = deltatune.apply(model, "ia3", head=False)
    sites = {n: m.mode for n, m in delta_modules(ours)}
    assert sites == {
        f"bert.encoder.layer.{i}.{s}": mode
        for i in range(2)
        for s, mode in [("attention.self.key", "output"), ("attention.self.value", "output"), ("output.dense", "input")]
    }
    random_vectors(ours)
    assert_matches_peft(ours, theirs, make_input("bert"))


def test_llama_matches_peft_defaults() -> None:
    model = tiny_llama()
    theirs = with_peft(model)  # peft's own llama sites: k_proj, v_proj, down_proj (feedforward)
    ours = deltatune.apply(model, "ia3", head=False)
    random_vectors(ours)
    x = {"input_ids": torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))}
    assert_matches_peft(ours, theirs, x)


def test_vit_mlp_matches_peft() -> None:
    model = backbone("vit")
    theirs = with_peft(model, target_modules=["mlp.fc2"], feedforward_modules=["mlp.fc2"])
    ours = deltatune.apply(model, "ia3", head=False, target_modules=["mlp.fc2"])
    random_vectors(ours)
    assert_matches_peft(ours, theirs, make_input("vit"))


def fused_qkv(seed: int = 0) -> tuple[IA3, nn.Linear]:
    """IA3 on a copy of the tiny ViT's first fused qkv, with random vectors; and the plain layer."""
    model = deltatune.apply(backbone("vit"), "ia3")
    random_vectors(model, seed)
    wrapper = model.blocks[0].attn.qkv
    plain = copy.deepcopy(wrapper.base)
    return wrapper, plain


def test_fused_qkv_scales_k_and_v_only_like_the_float64_formula() -> None:
    wrapper, plain = fused_qkv()
    c = plain.in_features
    assert wrapper.ia3_scale.shape == (2 * c,)  # no vector on the q third
    l_k, l_v = wrapper.ia3_scale.detach().double().split(c)
    x = torch.randn(2, 5, c)
    g = torch.randn(2, 5, 3 * c)  # dL/dy for L = sum(y * g)
    y64 = x.double() @ plain.weight.double().T + plain.bias.double()  # (B, N, 3C)
    q, k, v = y64.split(c, -1)
    ref = torch.cat([q, k * l_k, v * l_v], -1)
    y = wrapper(x)
    (y * g).sum().backward()
    assert rel_err(y.double(), ref) < 1e-6
    g_q, g_k, g_v = g.double().split(c, -1)
    ref_grad = torch.cat([(k * g_k).sum((0, 1)), (v * g_v).sum((0, 1))])
    assert rel_err(wrapper.ia3_scale.grad.double(), ref_grad) < 1e-5

    merged = wrapper.merge()
    scale = torch.cat([torch.ones(c, dtype=torch.float64), l_k, l_v])
    assert torch.equal(merged.weight[:c], plain.weight[:c]) and torch.equal(merged.bias[:c], plain.bias[:c])
    assert torch.equal(merged.weight, (plain.weight.double() * scale[:, None]).float())
    assert torch.equal(merged.bias, (plain.bias.double() * scale).float())


@pytest.mark.parametrize("kind", ["vit", "swin", "bert"])
def test_identity_at_init(kind: str) -> None:
    x = make_input(kind)
    with torch.no_grad():
        plain = run(make_backbone(kind), x)
        tuned = run(deltatune.apply(make_backbone(kind), "ia3"), x)
    assert torch.equal(tuned, plain)


def test_module_merge_is_idempotent_and_stops_scaling() -> None:
    wrapper, _ = fused_qkv()
    x = torch.randn(2, 5, wrapper.base.in_features)
    with torch.no_grad():
        before = wrapper(x)
        weight = wrapper.merge().weight.clone()
        wrapper.merge()
        assert torch.equal(wrapper.base.weight, weight)  # merging twice changes nothing
        assert rel_err(wrapper(x), before) < 1e-6  # the merged wrapper no longer scales on top


@pytest.mark.parametrize("kind", ["vit", "swin", "bert"])
def test_merge_equals_unmerged(kind: str) -> None:
    model = deltatune.apply(backbone(kind), "ia3")
    random_vectors(model)
    x = make_input(kind)
    with torch.no_grad():
        before = run(model, x)
        after = run(deltatune.merge(model), x)
    assert rel_err(after, before) < 1e-5
    assert not delta_modules(model)


def test_save_load_round_trip(tmp_path) -> None:
    model = deltatune.apply(make_backbone("swin"), "ia3")
    perturb_deltas(model, std=0.3)
    deltatune.save_delta(model, tmp_path / "ia3.safetensors")
    fresh = deltatune.load_delta(make_backbone("swin"), tmp_path / "ia3.safetensors")
    x = make_input("swin")
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(model, x))
        assert not torch.equal(run(fresh, x), run(make_backbone("swin"), x))


def test_vit_parameter_count() -> None:
    """Per block: one vector over k and v (2C) and one over the FFN's hidden width; none on q."""
    model = make_backbone("vit")
    c, hidden, depth = model.embed_dim, model.blocks[0].mlp.fc2.in_features, len(model.blocks)
    deltatune.apply(model, "ia3", head=False)
    assert deltatune.trainable_parameters(model) == depth * (2 * c + hidden)


@pytest.mark.parametrize("kind", ["convnext", "mixer"])
def test_no_attention_raises_and_leaves_model_plain(kind: str) -> None:
    model = make_backbone(kind)
    with pytest.raises(deltatune.DeltaTuneError, match="target_modules"):
        deltatune.apply(model, "ia3")
    assert not delta_modules(model) and "_deltatune" not in model.__dict__


def test_bad_site_options_raise() -> None:
    assert make_backbone("vit").embed_dim % 3  # attn.proj is then no fused qkv
    with pytest.raises(deltatune.DeltaTuneError, match="both a feedforward and a fused"):
        deltatune.apply(make_backbone("vit"), "ia3", feedforward_modules=["mlp.fc2", "attn.qkv"])
    with pytest.raises(deltatune.DeltaTuneError, match="divisible by 3"):
        deltatune.apply(make_backbone("vit"), "ia3", target_modules=["attn.proj"], fused_qkv_modules=["attn.proj"])
