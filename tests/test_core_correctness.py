"""Core behaviours checked against the plain model: train/eval mode, tied weights, output layers, BatchNorm
statistics, HF ViT wrappers and torch.compile'd models (issue 12 items 1, 3, 4, 8, 9)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from torch import nn

import deltatune
from deltatune.core import delta_modules

warnings.filterwarnings("ignore", message=".*(bos|eos)_token_id.*")


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _llama(tied: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=24, num_labels=3)  # fmt: skip
    return ViTForImageClassification(cfg).eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.arange(1, 13).view(2, 6) % 50


# --- 1. train/eval mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [None, ["layer1.0.conv1", "layer2.0.conv2"]])
def test_lora_dropout_is_off_in_an_eval_model(target) -> None:
    kind = "vit" if target is None else "resnet"  # LoRALinear on the ViT's qkv, LoRAConv on the ResNet's convs
    model = deltatune.apply(make_backbone(kind), "lora", dropout=0.5, target_modules=target)
    perturb_deltas(model)
    x = make_input(kind)
    with torch.no_grad():
        assert torch.equal(run(model, x), run(model, x))
    assert not any(m.training for m in model.modules())
    model.train()
    with torch.no_grad():
        assert not torch.equal(run(model, x), run(model, x))  # the dropout is real: it acts in train mode


# --- 3. tied weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build,embedding", [(_gpt2, "transformer.wte"), (_llama, "model.embed_tokens")])
def test_a_site_tied_to_another_module_is_refused(build, embedding) -> None:
    model = build()
    with pytest.raises(deltatune.DeltaTuneError, match=rf"'lm_head'.*{embedding}.*exclude_modules|untie"):
        deltatune.apply(model, "lora", target_modules=["lm_head"])
    assert not delta_modules(model) and "_deltatune" not in model.__dict__


def test_an_untied_output_layer_can_be_named_and_merges_exactly() -> None:
    model = _llama(tied=False)
    embedding = model.model.embed_tokens.weight.clone()
    deltatune.apply(model, "lora", target_modules=["lm_head"])
    perturb_deltas(model)
    before = _logits(model, IDS)
    deltatune.merge(model)
    assert rel_err(_logits(model, IDS), before) <= 1e-5
    assert torch.equal(model.model.embed_tokens.weight, embedding)


@pytest.mark.parametrize("build,method", [(_gpt2, "ssf"), (_llama, "ssf"), (_llama, "lora")])
def test_merge_never_changes_a_tied_embedding(build, method) -> None:
    model = build()
    embedding = model.get_input_embeddings().weight.clone()
    options = {"target_modules": "all-linear"} if method == "lora" else {}
    deltatune.apply(model, method, **options)
    perturb_deltas(model)
    before = _logits(model, IDS)
    deltatune.merge(model)
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # bit for bit
    assert rel_err(_logits(model, IDS), before) <= 1e-5


# --- 4. output layers and heads -----------------------------------------------------------------------------


@pytest.mark.parametrize("build", [_gpt2, _llama])
@pytest.mark.parametrize("method,options", [("lora", {"target_modules": "all-linear"}), ("ssf", {})])
def test_output_embedding_is_never_a_default_or_all_linear_site(build, method, options) -> None:
    model = build()
    deltatune.apply(model, method, **options)  # on GPT-2 all-linear finds the Conv1D projections, never lm_head
    sites = {n for n, _ in delta_modules(model)}
    assert sites and "lm_head" not in sites


def test_all_linear_never_wraps_the_head_of_a_timm_vit() -> None:
    model = deltatune.apply(make_backbone("vit"), "lora", target_modules="all-linear", head=False)
    sites = {n for n, _ in delta_modules(model)}
    assert "blocks.0.mlp.fc1" in sites and "head" not in sites


# --- 8. BatchNorm running statistics ------------------------------------------------------------------------


def _train_steps(model: nn.Module, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=g) * 2 + 0.5, torch.randint(0, 5, (4,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", ["ssf", "bitfit"])
@pytest.mark.parametrize("bn_stats", [None, "frozen"])
def test_a_trained_batchnorm_cnn_reloads_exactly(method: str, bn_stats: str | None, tmp_path) -> None:
    stats = {n: b.clone() for n, b in make_backbone("resnet").named_buffers()}
    model = deltatune.apply(make_backbone("resnet"), method, bn_stats=bn_stats)
    _train_steps(model)
    changed = any(not torch.equal(b, stats[n.replace(".base.", ".")]) for n, b in model.named_buffers())
    assert changed == (bn_stats is None)  # train mode updates the statistics unless they are frozen
    deltatune.save_delta(model, tmp_path / "d.safetensors")
    fresh = deltatune.load_delta(make_backbone("resnet"), tmp_path / "d.safetensors")
    x = make_input("resnet")
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(model, x))
    fresh.train()
    assert any(m.training for m in fresh.modules())
    frozen = [m.training for m in fresh.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(frozen) if bn_stats == "frozen" else all(frozen)  # the loaded model keeps the choice


def test_frozen_batchnorm_normalises_with_the_running_statistics_in_train_mode() -> None:
    model = deltatune.apply(make_backbone("resnet"), "ssf", bn_stats="frozen").train()
    bn = model.bn1.base if hasattr(model.bn1, "base") else model.bn1
    x = torch.randn(4, bn.num_features, 5, 5)
    expected = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    expected = expected * bn.weight[:, None, None] + bn.bias[:, None, None]
    with torch.no_grad():
        assert rel_err(bn(x), expected) <= 1e-6
    deltatune.core.unwrap(model)
    model.train()
    assert bn.training  # unwrap gives back an ordinary BatchNorm


def test_bn_stats_must_be_known() -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="bn_stats"):
        deltatune.apply(make_backbone("resnet"), "ssf", bn_stats="ema")


# --- 9a. HF ViT: code that reads a wrapped layer's weight ---------------------------------------------------


@pytest.mark.parametrize("method", ["ssf", "lora", "bitfit", "adapter"])
def test_hf_vit_runs_and_merges_exactly(method: str) -> None:
    model = _hf_vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    options = {"target_modules": r".*(query|value|projection)"} if method == "lora" else {}
    deltatune.apply(model, method, **options)
    perturb_deltas(model)
    with torch.no_grad():
        before = model(x).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # adapters do not merge, and say so
            deltatune.merge(model)
        assert rel_err(model(x).logits, before) <= 1e-5


def test_a_wrapper_reads_as_its_base_layer() -> None:
    model = deltatune.apply(make_backbone("vit"), "lora")
    wrapper = model.blocks[0].attn.qkv
    assert wrapper.weight is wrapper.base.weight and wrapper.bias is wrapper.base.bias
    with pytest.raises(AttributeError):
        wrapper.weight = torch.zeros(1)


# --- 9b. torch.compile'd models -----------------------------------------------------------------------------


def test_apply_to_a_compiled_model_saves_for_a_plain_backbone(tmp_path) -> None:
    compiled = torch.compile(make_backbone("vit"), backend="eager")
    assert deltatune.apply(compiled, "ssf") is compiled
    perturb_deltas(compiled)
    assert deltatune.trainable_parameters(compiled) > 0 and "ssf" in deltatune.summary(compiled)
    assert not any(k.startswith("_orig_mod.") for k in deltatune.delta_state_dict(compiled))
    deltatune.save_delta(compiled, tmp_path / "d.safetensors")
    plain = deltatune.load_delta(make_backbone("vit"), tmp_path / "d.safetensors")
    x = make_input("vit")
    with torch.no_grad():
        assert torch.equal(plain(x), compiled(x))
        before = plain(x)
        deltatune.merge(compiled)
        assert rel_err(compiled(x), before) <= 1e-5


def test_a_delta_from_a_plain_model_loads_into_a_compiled_one(tmp_path) -> None:
    model = deltatune.apply(make_backbone("vit"), "lora")
    perturb_deltas(model)
    deltatune.save_delta(model, tmp_path / "d.safetensors")
    compiled = torch.compile(make_backbone("vit"), backend="eager")
    assert deltatune.load_delta(compiled, tmp_path / "d.safetensors") is compiled
    x = make_input("vit")
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= 1e-6
