"""Gradient checkpointing through the delta wrappers: with it on (HF non-reentrant and reentrant, timm's), every
method gives the same loss and delta gradients as without, in train mode with dropout, on ViT, BERT, GPT-2, Llama."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from conftest import make_backbone, make_input, perturb_deltas, run
from safetensors.torch import load_file
from test_training import text_model  # noqa: F401  (fixture)
from tiny_run import tiny_config
from torch import nn

import deltatune
from deltatune import kernels
from deltatune.bench.measure import SavedBytes
from deltatune.cli import main
from deltatune.registry import make_config
from deltatune.targeting import supports
from deltatune.train.loop import train
from deltatune.train.memory import enable_grad_checkpointing

KINDS = ("vit", "bert", "gpt2", "llama")
OPTIONS = {"phm-adapter": {"n": 4}}
MODES = {"vit": ("timm",), **{k: ("plain", "reentrant") for k in ("bert", "gpt2", "llama")}}


def _cases() -> list[tuple[str, str, str]]:
    """(method, backbone, checkpointing mode) for every method a backbone supports."""
    models = {k: make_backbone(k) for k in KINDS}
    out = []
    for method in deltatune.methods():
        config = make_config(method, **OPTIONS.get(method, {}))
        out += [(method, k, mode) for k in KINDS if supports(config, models[k]) for mode in MODES[k]]
    return out


@pytest.fixture
def timm_reentrant() -> Iterator[None]:
    """timm's checkpoint_seq with re-entrant autograd (its global switch), put back after the test."""
    before = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(True)
    yield
    timm.layers.set_reentrant_ckpt(before)


def enable_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpointing through deltatune: timm's own, or HF's with or without re-entrant autograd."""
    enable_grad_checkpointing(model, use_reentrant=mode == "reentrant")


def loss_and_grads(model: nn.Module, x: Any, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A train-mode loss (dropout on, drawn from ``seed``) and every trainable tensor's gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = run(model, x).float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _tuned(method: str, kind: str) -> nn.Module:
    model = deltatune.apply(make_backbone(kind), method, **OPTIONS.get(method, {}))
    perturb_deltas(model, std=0.05)
    return model


def _saved_bytes(model: nn.Module, x: Any) -> int:
    """Activation bytes a train-mode forward keeps for backward (weights left out)."""
    model.train()
    with SavedBytes([*model.parameters(), *model.buffers()]) as counter:
        run(model, x)
    return counter.bytes


def _compare(plain: nn.Module, mode: str, x: Any, engaged: bool = True) -> None:
    ckpt = copy.deepcopy(plain)
    enable_checkpointing(ckpt, mode)
    if engaged:  # checkpointing is on: the blocks' activations are not kept (else the comparison proves nothing)
        assert _saved_bytes(ckpt, x) < 0.5 * _saved_bytes(plain, x)
    loss, grads = loss_and_grads(plain, x)
    loss_c, grads_c = loss_and_grads(ckpt, x)
    assert torch.allclose(loss_c, loss, rtol=1e-5, atol=1e-7)
    assert grads_c.keys() == grads.keys()
    for name, g in grads.items():
        assert torch.allclose(grads_c[name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item()), name


DROPS_CACHE = {("prefix", "gpt2"), ("prefix", "llama")}  # decoder prefixes live in the KV cache


@pytest.mark.parametrize("method,kind,mode", [c for c in _cases() if c[:2] not in DROPS_CACHE])
def test_checkpointing_gives_the_same_loss_and_gradients(method: str, kind: str, mode: str) -> None:
    _compare(_tuned(method, kind), mode, make_input(kind), engaged=method != "linear")  # linear: nothing to keep


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_prefix_under_checkpointing_is_refused_not_silently_dropped(kind: str) -> None:
    """transformers' layers drop the KV cache (the decoder prefixes) when checkpointing in training: refused."""
    model = _tuned("prefix", kind)
    enable_checkpointing(model, "plain")
    model.train()
    with pytest.raises(deltatune.DeltaTuneError, match="without gradient checkpointing"):
        run(model, make_input(kind))
    model.eval()  # no checkpointing in eval: the prefixes work
    with torch.no_grad():
        assert torch.isfinite(run(model, make_input(kind))).all()


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("kind,mode", [("vit", "timm"), ("gpt2", "plain"), ("gpt2", "reentrant")])
def test_lora_input_recompute_under_checkpointing(kind: str, mode: str, recompute: bool) -> None:
    with kernels.recompute_inputs(recompute):
        _compare(_tuned("lora", kind), mode, make_input(kind))


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "vpt-deep", "ssf"])
def test_timm_reentrant_checkpointing_still_trains_the_deltas(method: str, timm_reentrant: None) -> None:
    """Re-entrant blocks pass gradients only if their input requires grad: timm's frozen stem output is made to."""
    _compare(_tuned(method, "vit"), "timm", make_input("vit"))


def test_reentrant_timm_without_deltatune_loses_the_gradients(timm_reentrant: None) -> None:
    """Why the stem hook exists: timm's own switch alone leaves LoRA inside the blocks without gradients."""
    model = _tuned("lora", "vit")
    model.set_grad_checkpointing(True)
    with pytest.warns(UserWarning, match="requires_grad"):
        _, grads = loss_and_grads_or_none(model, make_input("vit"))
    assert any(g is None for g in grads.values())


def loss_and_grads_or_none(model: nn.Module, x: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.train()
    loss = run(model, x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_refuses_a_model_without_it() -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="gradient checkpointing"):
        enable_grad_checkpointing(nn.Sequential(nn.Linear(2, 2)))


def _trained_deltas(cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    train(cfg)
    return load_file(Path(cfg["output_dir"]) / "delta.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("method", ["lora", "vpt-deep"])
def test_train_grad_checkpointing_gives_the_same_deltas_timm(method: str, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "plain", method=method, epochs=1, max_train_samples=96, threads=1)
    plain = _trained_deltas(cfg)
    args = ["train", "--grad-checkpointing", "--output-dir", str(tmp_path / "ckpt")]
    for key, value in cfg.items():
        if key != "output_dir":
            flag = "--" + key.replace("_", "-")
            args += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, json.dumps(value)]
    assert main([a.strip('"') for a in args]) == 0
    _same(load_file(tmp_path / "ckpt" / "delta.safetensors"), plain)


def test_train_grad_checkpointing_gives_the_same_deltas_hf(tmp_path: Path, text_model: dict) -> None:  # noqa: F811
    cfg = tiny_config(tmp_path / "plain", **text_model, method="lora", epochs=1, threads=1, max_train_samples=64)
    plain = _trained_deltas(cfg)
    _same(_trained_deltas({**cfg, "output_dir": str(tmp_path / "ckpt"), "grad_checkpointing": True}), plain)
