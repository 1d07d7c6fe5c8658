"""Mixed batches with token deltas (VPT, timm prefix) and AdaptFormer on HF FFN outputs: one backbone pass, row i
equal to its task's own single-task model (loaded separately from its file), gradients too."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import make_backbone, perturb_deltas, run
from test_multitask import _paths, _save, _single
from torch import nn

import deltatune
from deltatune import DeltaTuneError
from deltatune.serve import MultiTaskModel, mixed_tokens

SMALL_MLP = {"embed_dim": 16, "mid_dim": 16}  # prefix's reparameterising MLP, kept small
# (task name, methods, options, classes): prompt counts differ, shallow and deep, with and without other deltas
TOKEN_SPECS = [
    ("deep3", "vpt-deep", {"num_tokens": 3}, 3),
    ("shallow5", "vpt-shallow", {"num_tokens": 5}, 4),
    ("shallow3", "vpt-shallow", {"num_tokens": 3}, 2),
    ("vpt_lora", [deltatune.VPTDeepConfig(num_tokens=2), deltatune.LoRAConfig(target_modules=["attn.qkv"])], {}, 5),
    ("ssf_vpt", [deltatune.SSFConfig(), deltatune.VPTDeepConfig(num_tokens=4)], {}, 3),  # both on every norm1
    ("vpt_ssf", [deltatune.VPTShallowConfig(num_tokens=1), deltatune.SSFConfig()], {}, 2),  # SSF over VPT's wrappers
    ("prefix2", "prefix", {"num_tokens": 2, **SMALL_MLP}, 4),  # through the MLP
    ("prefix4", "prefix", {"num_tokens": 4, "reparameterize": False}, 2),  # direct prefixes
    ("prefix_b0", "prefix", {"num_tokens": 3, "reparameterize": False, "target_modules": ["blocks.0.attn"]}, 3),
    ("prefix_vpt", [deltatune.PrefixConfig(num_tokens=1, reparameterize=False),
                    deltatune.VPTShallowConfig(num_tokens=2)], {}, 6),
]  # fmt: skip
CLASSES = {n: c for n, _, _, c in TOKEN_SPECS} | {"ssf": 3, "bitfit": 4, "lora": 5, "vpt": 3}  # test_multitask's


@functools.cache
def _token_paths(folder: str) -> dict[str, str]:
    Path(folder).mkdir(parents=True, exist_ok=True)
    return {n: _save(Path(folder), n, m, o, c, 20 + i) for i, (n, m, o, c) in enumerate(TOKEN_SPECS)}


def _all_paths(tmp_path) -> dict[str, str]:
    root = tmp_path.parent.parent
    old = {n: p for n, p in _paths(str(root / "multitask_files")).items() if n in ("ssf", "bitfit", "lora", "vpt")}
    return {**_token_paths(str(root / "multitask_token_files")), **old}


def _setup(tmp_path, names: list[str] | None = None) -> tuple[MultiTaskModel, dict[str, str]]:
    paths = _all_paths(tmp_path)
    mt = MultiTaskModel(make_backbone("vit"))
    for name in names or list(paths):
        mt.add_task(name, paths[name])
    return mt, paths


def _want(paths: dict[str, str], names: list[str], x: torch.Tensor, width: int) -> torch.Tensor:
    """Each row through its task's separately loaded model, padded with -inf to ``width``."""
    rows = [_single(paths[n], CLASSES[n])(x[i : i + 1])[0] for i, n in enumerate(names)]
    return torch.stack([nn.functional.pad(r, (0, width - len(r)), value=float("-inf")) for r in rows])


def test_vpt_and_prefix_rows_equal_single_task_models(tmp_path):
    mt, paths = _setup(tmp_path)
    assert all(mt.task(n).plan is not None for n in mt.tasks()), [mt.task(n).why_grouped for n in mt.tasks()]
    names = ["deep3", "ssf", "shallow5", "vpt", "prefix2", "lora", "vpt_lora", "ssf_vpt", "bitfit", "prefix4",
             "shallow3", "prefix_b0", "prefix_vpt", "deep3", "prefix2", "vpt_ssf"]  # fmt: skip
    x = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        out = mt(x, names, strict=True)  # strict: refuses unless the batch mixes per row in one pass
        want = _want(paths, names, x, out.shape[1])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("names", [
    ["deep3", "shallow3", "deep3"],  # one prompt count: no mask
    ["prefix2", "ssf", "prefix4", "prefix_b0"],  # prefixes only: no VPT mask, a prefix mask per layer
    ["vpt", "shallow5", "bitfit"],  # p = 10 and 5 and none
])  # fmt: skip
def test_smaller_mixes_equal_single_task_models(tmp_path, names):
    mt, paths = _setup(tmp_path, list(dict.fromkeys(names)))
    x = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        out = mt(x, names, strict=True)
        torch.testing.assert_close(out, _want(paths, names, x, out.shape[1]), atol=1e-5, rtol=1e-5)


def _explicit(model: nn.Module) -> nn.Module:
    """timm's explicit attention path (scores, mask added, softmax) instead of the fused kernel."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def test_explicit_attention_path_mixes_too(tmp_path):
    paths = _all_paths(tmp_path)
    names = ["vpt", "prefix2", "ssf", "shallow5", "prefix_vpt", "prefix_b0"]
    mt = MultiTaskModel(_explicit(make_backbone("vit")))
    for name in dict.fromkeys(names):
        mt.add_task(name, paths[name])
    x = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        out = mt(x, names, strict=True)
        want = [_explicit(_single(paths[n], CLASSES[n]))(x[i : i + 1])[0] for i, n in enumerate(names)]
    assert not any(getattr(m, "fused_attn", False) for m in mt.mixed_model().modules())
    for row, w in zip(out, want):
        torch.testing.assert_close(row[: len(w)], w, atol=1e-5, rtol=1e-5)


def test_joint_training_gradients_equal_single_task_gradients(tmp_path):
    mt, paths = _setup(tmp_path)
    names = ["deep3", "ssf", "prefix2", "shallow5", "vpt_lora", "lora", "ssf_vpt", "prefix4", "prefix_vpt",
             "deep3", "prefix_b0", "bitfit", "vpt_ssf"]  # fmt: skip
    targets = torch.tensor([0, 2, 3, 1, 4, 3, 2, 1, 5, 2, 0, 3, 1])
    x = torch.randn(len(names), 3, 32, 32)
    mt.train()
    nn.functional.cross_entropy(mt(x, names, strict=True), targets, reduction="sum").backward()
    for name in dict.fromkeys(names):
        ref = _single(paths[name], CLASSES[name]).train()
        rows = [i for i, n in enumerate(names) if n == name]
        nn.functional.cross_entropy(ref(x[rows]), targets[rows], reduction="sum").backward()
        mine = dict(mt.task_model(name).named_parameters())
        grads = [(pname, p.grad) for pname, p in ref.named_parameters() if p.requires_grad]
        assert grads and all(g is not None for _, g in grads)
        for pname, grad in grads:
            torch.testing.assert_close(mine[pname].grad, grad, atol=1e-5, rtol=1e-4, msg=f"{name}: {pname}")


def test_a_batch_with_one_layout_builds_no_mask(tmp_path, monkeypatch):
    """No mask (and no prompt slots without VPT) when the batch's tasks share a layout: the speed of before."""
    mt, paths = _setup(tmp_path)
    mt.add_task("prefix2_again", paths["prefix2"])
    built: list[int] = []
    real = mixed_tokens.key_mask
    monkeypatch.setattr(mixed_tokens, "key_mask", lambda *a: built.append(1) or real(*a))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for names, masks, slots in ((["ssf", "lora", "bitfit", "ssf"], 0, 0),
                                    (["deep3", "shallow3", "deep3", "shallow3"], 0, 3),
                                    (["prefix2", "prefix2_again", "prefix2", "prefix2"], 0, 0),
                                    (["deep3", "ssf", "ssf", "ssf"], 1, 3)):  # fmt: skip
            built.clear()
            mt(x, names, strict=True)
            layout = mt.mixed_model().__dict__["_mixed_ctx"].tokens
            assert (len(built), layout.slots) == (masks, slots), names
            assert (layout.mask is None) == (masks == 0)


def test_swin_vpt_deep_stays_grouped(tmp_path):
    """Swin's prompts join every window inside its attention: grouped (exact), and strict=True says why."""
    model = deltatune.apply(make_backbone("swin"), "vpt-deep", num_tokens=2)
    perturb_deltas(model)
    deltatune.save_delta(model, tmp_path / "swin.safetensors")
    mt = MultiTaskModel(make_backbone("swin"))
    mt.add_task("a", tmp_path / "swin.safetensors")
    mt.add_task("b", tmp_path / "swin.safetensors")
    assert mt.task("a").plan is None and "vpt-deep" in mt.task("a").why_grouped
    assert "inside the window attention" in mt.task("a").why_grouped
    x = torch.randn(2, 3, 32, 32)
    ref = deltatune.load_delta(make_backbone("swin"), tmp_path / "swin.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(mt(x, ["a", "b"]), ref(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(DeltaTuneError, match="cannot mix per row"):
        mt(x, ["a", "b"], strict=True)


def test_nested_sites_build_in_any_task_order(tmp_path):
    """A task wrapping a module (AdaptFormer on mlp, prefix on attn) added before a task wrapping a layer inside
    it (LoRA on mlp.fc1, attn.qkv): the mixed model replaces the inner site first (it failed with AttributeError);
    BitFit biases inside a wrapped module (AdaptFormer then BitFit: mlp.fc1.bias) are found through the wrapper
    (add_task failed with AttributeError)."""
    specs = [("af", "adaptformer", {"dropout": 0.0}), ("pre", "prefix", {"num_tokens": 2, **SMALL_MLP}),
             ("lora", "lora", {"target_modules": ["mlp.fc1", "attn.qkv"]}),
             ("af_bitfit", ["adaptformer", "bitfit"], {}),
             ("vpt_bitfit", [deltatune.VPTDeepConfig(num_tokens=2), deltatune.BitFitConfig()], {})]  # fmt: skip
    paths = {n: _save(tmp_path, n, m, o, 3, 40 + i) for i, (n, m, o) in enumerate(specs)}
    mt = MultiTaskModel(make_backbone("vit"))
    for name, path in paths.items():
        mt.add_task(name, path)
    names = ["lora", "af", "pre", "lora", "af_bitfit", "vpt_bitfit"]
    x = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        out = mt(x, names, strict=True)
        want = torch.stack([_single(paths[n], 3)(x[i : i + 1])[0] for i, n in enumerate(names)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def _bert_inputs(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 99, (rows, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, 8:] = 0  # padded rows
    return {"input_ids": ids, "attention_mask": mask}


def test_adaptformer_on_bert_ffn_outputs_mixes_per_row(tmp_path):
    specs = [("af8", "adaptformer", {"hidden": 8, "dropout": 0.0}), ("af4", "adaptformer", {"hidden": 4}),
             ("lora", "lora", {}), ("af_ssf", ["ssf", deltatune.AdaptFormerConfig(hidden=6, dropout=0.0)], {})]
    mt, refs = MultiTaskModel(make_backbone("bert")), {}
    for i, (name, method, options) in enumerate(specs):
        model = deltatune.apply(make_backbone("bert"), method, **options)
        perturb_deltas(model, seed=50 + i)
        deltatune.save_delta(model, tmp_path / f"{name}.safetensors")
        mt.add_task(name, tmp_path / f"{name}.safetensors")
        refs[name] = deltatune.load_delta(make_backbone("bert"), tmp_path / f"{name}.safetensors")
    assert "adaptformer-hf" in {k for ops in mt.task("af8").plan.sites.values() for k, _ in ops}
    names = ["af8", "lora", "af4", "af_ssf", "af8", "lora"]
    x = _bert_inputs(len(names))
    want = torch.stack([run(refs[n], x)[i] for i, n in enumerate(names)])  # eval mode: no dropout anywhere
    torch.testing.assert_close(mt(x, names, strict=True), want.detach(), atol=1e-5, rtol=1e-5)
    targets = torch.tensor([0, 2, 1, 1, 2, 0])
    nn.functional.cross_entropy(mt(x, names, strict=True), targets, reduction="sum").backward()
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        ref_x = {k: v[rows] for k, v in x.items()}
        nn.functional.cross_entropy(run(refs[name], ref_x), targets[rows], reduction="sum").backward()
        mine = dict(mt.task_model(name).named_parameters())
        for pname, p in refs[name].named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(mine[pname].grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{name}: {pname}")


def test_stacks_without_a_per_row_kernel_are_named():
    """Token kernels compose with per-token companions only; other stacks at their site run grouped, saying why."""
    assert mixed_tokens.check("norm_pre", ["ssf", "vpt-insert"]) == ""
    assert mixed_tokens.check("blocks.1.norm1", ["bias", "vpt-deep", "ssf"]) == ""
    assert "acts on VPT's inserted prompts" in mixed_tokens.check("norm_pre", ["vpt-insert", "ssf"])
    assert "wraps another delta" in mixed_tokens.check("blocks.0.attn", ["ssf", "prefix"])
    assert "shares its site with lora" in mixed_tokens.check("x", ["lora", "vpt-deep"])
