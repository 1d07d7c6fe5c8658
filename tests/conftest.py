"""Tiny backbones for the tests: timm ViT, Swin, ConvNeXt, MLP-Mixer, a BatchNorm ResNet, an HF BERT and three
decoder/seq2seq language models (GPT-2, Llama, T5; 2 layers, width 32) whose output is their LM logits."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer
from tiny_run import tiny_bert_config
from torch import nn

torch.set_num_threads(2)


def _vit() -> nn.Module:
    return timm.create_model("test_vit", num_classes=5, img_size=32)


def _swin() -> nn.Module:
    kw = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), img_size=32, window_size=4, num_classes=5)
    return timm.create_model("swin_tiny_patch4_window7_224", **kw)


def _convnext() -> nn.Module:
    return timm.create_model("test_convnext", num_classes=5)


def _mixer() -> nn.Module:
    return MlpMixer(embed_dim=32, num_blocks=2, img_size=32, patch_size=8, num_classes=5)


def _resnet() -> nn.Module:
    return timm.create_model("test_resnet", num_classes=5)


def _bert() -> nn.Module:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(tiny_bert_config(vocab_size=99, num_labels=3))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_inner=37, n_positions=64))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(vocab_size=99, num_hidden_layers=2, max_position_embeddings=64, **kw))


def _t5() -> nn.Module:
    """T5 encoder-decoder; its input is a token batch plus a short decoder prefix (``make_input``)."""
    from transformers import T5Config, T5ForConditionalGeneration

    kw = dict(d_model=32, d_kv=8, d_ff=37, num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5ForConditionalGeneration(T5Config(vocab_size=99, num_layers=2, num_decoder_layers=2, **kw))


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vit": _vit,
    "swin": _swin,
    "convnext": _convnext,
    "mixer": _mixer,
    "resnet": _resnet,
    "bert": _bert,
    "gpt2": _gpt2,
    "llama": _llama,
    "t5": _t5,
}
LANGUAGE_MODELS = ("gpt2", "llama", "t5")  # output: LM logits (no classification head)
ALL_BACKBONES = list(BUILDERS)  # the contract tests run every method on each
# those with presets for the block-based methods
BACKBONES = [k for k in ALL_BACKBONES if k not in ("resnet", *LANGUAGE_MODELS)]


def make_backbone(kind: str, seed: int = 0) -> nn.Module:
    """A tiny backbone in eval mode, with weights moved off timm's special inits so every delta shows (a fresh copy)."""
    prototype, rng = _prototype(kind, seed)
    torch.set_rng_state(rng)  # the generator as a fresh build leaves it, so later draws do not depend on the cache
    return copy.deepcopy(prototype)


@functools.cache
def _prototype(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Built once per session (timm's init costs more than a copy), with the generator state the build left."""
    torch.manual_seed(seed)
    model = BUILDERS[kind]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or "head" in name or "classifier" in name:
                p.normal_(0.0, 0.5)  # ConvNeXt layer scale (1e-6) and zero-init heads would hide deltas
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):  # off the identity: zero-init gammas, 0/1 stats
                module.weight.uniform_(0.5, 1.5)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model, torch.get_rng_state()


def make_input(kind: str, seed: int = 1) -> Any:
    """A fixed input batch for the backbone."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("bert", *LANGUAGE_MODELS):
        ids = torch.randint(1, 99, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        extra = {"decoder_input_ids": torch.randint(1, 99, (2, 5), generator=g)} if kind == "t5" else {}
        return {"input_ids": ids, "attention_mask": mask, **extra}
    size = 64 if kind == "convnext" else 32
    return torch.randn(2, 3, size, size, generator=g)


def run(model: nn.Module, x: Any) -> torch.Tensor:
    """Logits of a model on an input from ``make_input``."""
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def perturb_deltas(model: nn.Module, std: float = 0.1, seed: int = 2) -> None:
    """Moves every trainable tensor away from its init, so merges and loads are tested off the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the max magnitude."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(params=BACKBONES)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param
