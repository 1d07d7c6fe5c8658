"""A bfloat16 backbone with float32 deltas (``apply(..., delta_dtype=...)``, ``deltatune train --precision bf16``):
outputs against a float64 reference, float32 gradients, small updates kept, save/load/merge, and the CLI run."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from safetensors.torch import load_file
from tiny_run import tiny_config, train_until_first_checkpoint
from torch import nn

import deltatune
from deltatune.core import delta_modules, unwrap
from deltatune.numerics import round_to
from deltatune.train.loop import train

BF16 = torch.bfloat16
CASES = [(m, "vit") for m in ("lora", "ssf", "adapter", "ia3", "vpt-deep", "prefix", "bitfit", "fact-tt", "compacter")]
CASES += [(m, "llama") for m in ("lora", "ia3", "adapter", "layernorm")] + [("prompt", "bert"), ("bitfit", "gpt2")]
OPTIONS = {"phm-adapter": {"n": 4}}


def _cast_input(x: object, dtype: torch.dtype) -> object:
    return x.to(dtype) if isinstance(x, torch.Tensor) else x


def _pair(method: str, kind: str) -> tuple[nn.Module, nn.Module]:
    """A float32 tuned model with moved deltas, and the same on a bf16 backbone with float32 deltas (same values)."""
    reference = deltatune.apply(make_backbone(kind), method)
    perturb_deltas(reference, std=0.05)
    half = deltatune.apply(make_backbone(kind).to(BF16), method, delta_dtype="float32")
    half.load_state_dict(deltatune.delta_state_dict(reference), strict=False)
    return reference, half


@pytest.mark.parametrize("method,kind", CASES)
def test_float32_deltas_on_a_bf16_backbone_match_float64(method: str, kind: str) -> None:
    reference, half = _pair(method, kind)
    x = make_input(kind)
    with torch.no_grad():
        exact = run(copy.deepcopy(reference).double(), _cast_input(x, torch.float64))
        plain_bf16 = run(make_backbone(kind).to(BF16), _cast_input(x, BF16)).double()
        out = run(half, _cast_input(x, BF16))
    assert out.dtype == BF16
    bf16_scale = rel_err(plain_bf16, run(make_backbone(kind).double(), _cast_input(x, torch.float64)))
    assert rel_err(out.double(), exact) <= max(4 * bf16_scale, 2e-2)  # bf16 rounding, no more


@pytest.mark.parametrize("method,kind", CASES)
def test_delta_gradients_are_float32_and_the_backbone_stays_bf16(method: str, kind: str) -> None:
    _, half = _pair(method, kind)
    half.train()
    run(half, _cast_input(make_input(kind), BF16)).float().square().mean().backward()
    trained = [p for p in half.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trained)
    assert all(p.dtype == BF16 for p in half.parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.any() for p in trained)


def _ssf_scales(delta_dtype: str) -> tuple[nn.Module, list[nn.Parameter]]:
    model = deltatune.apply(make_backbone("vit").to(BF16), "ssf", head=False, delta_dtype=delta_dtype)
    scales = [p for n, p in model.named_parameters() if n.endswith("ssf_scale")]
    return model, scales


def test_bf16_deltas_lose_updates_below_half_an_ulp_float32_ones_keep_them() -> None:
    steps = {}
    for dtype in ("bf16", "float32"):
        model, scales = _ssf_scales(dtype)
        before = [p.detach().clone() for p in scales]
        run(model, make_input("vit").to(BF16)).float().square().mean().backward()
        grads = torch.cat([p.grad.float().flatten() for p in scales]).abs()
        half_ulp = torch.cat([2.0 ** (torch.floor(torch.log2(p.detach().float().abs())) - 8) for p in before]).flatten()
        lr = 0.5 * (half_ulp / grads.clamp_min(1e-30)).min().item()  # every update below half a bf16 ulp
        assert (lr * grads < half_ulp).all() and (grads > 0).sum() > len(grads) // 2
        torch.optim.SGD(scales, lr=lr).step()
        steps[dtype] = sum(int((p.detach() != b).sum()) for p, b in zip(scales, before))
    assert steps["bf16"] == 0  # every update rounded away
    assert steps["float32"] > 0


def test_save_load_and_merge_a_float32_delta_on_a_bf16_backbone(tmp_path: Path) -> None:
    _, half = _pair("lora", "llama")
    path = tmp_path / "delta.safetensors"
    deltatune.save_delta(half, path)
    assert all(t.dtype == torch.float32 for n, t in load_file(path).items() if "lora" in n)
    loaded = deltatune.load_delta(make_backbone("llama").to(BF16), path, delta_dtype="float32")
    x = make_input("llama")
    with torch.no_grad():
        assert torch.equal(run(loaded, x), run(half, x))
    expected = {}
    for name, w in delta_modules(loaded):
        a, b, weight = w.lora_a.detach().double(), w.lora_b[0].detach().double(), w.base.weight.detach().double()
        assert w.lora_a.dtype == torch.float32
        expected[name] = round_to(weight + w.scaling * b @ a, BF16)  # float64, rounded once
    deltatune.merge(loaded)
    for name, w in expected.items():
        merged = loaded.get_submodule(name).weight
        assert merged.dtype == BF16 and torch.equal(merged, w), name


def test_train_precision_bf16_keeps_float32_deltas(tmp_path: Path) -> None:
    report = train(tiny_config(tmp_path / "bf16", precision="bf16", method="lora", threads=1, epochs=1))
    saved = load_file(tmp_path / "bf16" / "delta.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values() if t.is_floating_point())
    assert report["top1"] >= 0
    kept = train(tiny_config(tmp_path / "bf16d", precision="bf16", delta_dtype="bf16", method="lora", threads=1,
                             epochs=1))  # fmt: skip
    saved = load_file(tmp_path / "bf16d" / "delta.safetensors")
    assert kept and all(t.dtype == BF16 for t in saved.values() if t.is_floating_point())


def test_bad_precision_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match="precision"):
        train(tiny_config(tmp_path, precision="fp8"))
    with pytest.raises(deltatune.DeltaTuneError, match="delta_dtype"):
        train(tiny_config(tmp_path, delta_dtype="int8"))
    with pytest.raises(deltatune.DeltaTuneError, match="delta_dtype"):
        deltatune.apply(make_backbone("vit"), "lora", delta_dtype="float8")


def test_mimi_pruning_keeps_float32_adapters_on_a_bf16_backbone(tmp_path: Path) -> None:
    """Pruning swaps in smaller adapter layers (and drops empty ones): they are still cast where used."""
    report = train(tiny_config(tmp_path, method="mimi", precision="bf16", target_sigma=16, epochs=1, threads=1))
    saved = load_file(tmp_path / "delta.safetensors")
    assert report["phases"] > 1 and all(t.dtype == torch.float32 for t in saved.values() if t.is_floating_point())


@pytest.mark.parametrize("method,kind", [("lora", "gpt2"), ("adapter", "vit"), ("prompt", "bert")])
def test_float32_deltas_with_gradient_checkpointing(method: str, kind: str) -> None:
    """Checkpointed blocks recompute their forward in backward: the casts are made again there, same gradients."""
    from test_grad_checkpointing import loss_and_grads

    from deltatune.train.memory import enable_grad_checkpointing

    _, half = _pair(method, kind)
    ckpt = enable_grad_checkpointing(copy.deepcopy(half))
    x = _cast_input(make_input(kind), BF16)
    loss, grads = loss_and_grads(half, x)
    loss_c, grads_c = loss_and_grads(ckpt, x)
    assert torch.equal(loss, loss_c) and grads.keys() == grads_c.keys()
    assert all(g.dtype == torch.float32 and torch.equal(g, grads_c[n]) for n, g in grads.items())


def test_bf16_run_resumes_exactly(tmp_path: Path) -> None:
    """A bf16-backbone run stopped after epoch 1 and resumed ends with the uninterrupted run's float32 deltas."""
    cfg = tiny_config(tmp_path / "killed", precision="bf16", method="lora", epochs=2, threads=1, max_train_samples=64)
    train_until_first_checkpoint(cfg)
    train({**cfg, "resume": True})
    train({**cfg, "output_dir": str(tmp_path / "straight")})
    resumed, straight = (load_file(tmp_path / d / "delta.safetensors") for d in ("killed", "straight"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[n], straight[n]) for n in straight)
    assert any(t.dtype == torch.float32 for t in straight.values())


@pytest.mark.parametrize("method", ["bitfit", "ssf", "adapter"])
def test_merge_returns_the_backbone_dtype_where_it_can(method: str) -> None:
    """Merged tensors and trained plain weights (biases, head) go back to bf16, each rounded once from float32;
    deltas that cannot merge (adapters) stay float32 and keep working."""
    _, half = _pair(method, "vit")
    trained = {n: p.detach().clone() for n, p in half.named_parameters() if p.requires_grad}
    x = make_input("vit").to(BF16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # adapters cannot merge: merge warns
        before = run(half, x)
        deltatune.merge(half)
        after = run(half, x)
    params = dict(half.named_parameters())
    kept = {n for n in trained if n in params and params[n].dtype == torch.float32}
    assert kept == ({n for n in trained if ".adapter_" in n} if method == "adapter" else set())
    for name in trained.keys() & params.keys() - kept:
        assert params[name].dtype == BF16 and torch.equal(params[name], trained[name].to(BF16)), name
    assert all(p.dtype == BF16 for n, p in params.items() if n not in kept)
    assert rel_err(after.double(), before.double()) < 2e-2


def test_unwrap_gives_back_a_backbone_in_one_dtype() -> None:
    _, half = _pair("bitfit", "vit")
    unwrap(half)
    assert {p.dtype for p in half.parameters()} == {BF16}
    with torch.no_grad():
        assert run(half, make_input("vit").to(BF16)).dtype == BF16
