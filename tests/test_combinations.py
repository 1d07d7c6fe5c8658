"""Simultaneous and sequential combinations: what trains, merge exactness, one file for all stages."""

from __future__ import annotations

import warnings

import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run

import deltatune
from deltatune.core import delta_modules


def test_simultaneous_ssf_and_lora_on_the_same_layer_merge_exactly(tmp_path) -> None:
    model = deltatune.apply(make_backbone("vit"), ["lora", "ssf"])
    qkv = model.blocks[0].attn.qkv
    assert qkv.delta_method == "ssf" and qkv.base.delta_method == "lora"
    lines = deltatune.summary(model).splitlines()
    assert any(line.startswith("lora ") for line in lines) and any(line.startswith("ssf ") for line in lines)
    perturb_deltas(model)
    x = make_input("vit")
    deltatune.save_delta(model, tmp_path / "combo.safetensors")
    with torch.no_grad():
        before = run(model, x)
        deltatune.merge(model)
        assert rel_err(run(model, x), before) <= 1e-5
    assert not delta_modules(model)
    loaded = deltatune.load_delta(make_backbone("vit"), tmp_path / "combo.safetensors")
    with torch.no_grad():
        assert torch.equal(run(loaded, x), before)


def test_sequential_stages_freeze_earlier_deltas(tmp_path) -> None:
    model = deltatune.apply(make_backbone("swin"), "bitfit")
    perturb_deltas(model)
    stage0 = {k: v.clone() for k, v in deltatune.delta_state_dict(model).items() if "head" not in k}
    deltatune.apply(model, "adapter")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter" in n or n.startswith("head") for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        run(model, make_input("swin")).square().mean().backward()
        opt.step()
    now = deltatune.delta_state_dict(model)
    renamed = {k.replace(".base.", "."): v for k, v in now.items()}
    assert all(torch.equal(renamed[k.replace(".base.", ".")], v) for k, v in stage0.items())
    path = tmp_path / "stages.safetensors"
    deltatune.save_delta(model, path)
    meta = deltatune.read_metadata(path)
    assert [(s["method"], s["stage"]) for s in meta["stages"]] == [("bitfit", 0), ("adapter", 1)]
    loaded = deltatune.load_delta(make_backbone("swin"), path)
    x = make_input("swin")
    with torch.no_grad():
        assert torch.equal(run(loaded, x), run(model, x))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deltatune.merge(loaded)
    assert "cannot be merged" in str(caught[0].message)


def test_head_false_freezes_head_but_keeps_it_out_of_sites() -> None:
    model = deltatune.apply(make_backbone("convnext"), "ssf", head=False)
    assert not model.head.fc.weight.requires_grad
    assert not any(n.startswith("head.fc") for n, _ in delta_modules(model))
    assert "head" not in deltatune.summary(model).split("trainable now")[0].split("\n", 2)[2]
