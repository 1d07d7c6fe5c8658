"""peft adapter directories: load_peft gives peft's outputs, save_peft gives files peft reads; peft is the oracle."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run

import deltatune
from deltatune.core import delta_modules

peft = pytest.importorskip("peft")


def _peft_model(kind: str, config: object) -> torch.nn.Module:
    """A peft model on a tiny backbone with every adapter weight (and saved module) moved off its init."""
    model = peft.get_peft_model(make_backbone(kind), config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


LORA_CASES = {
    "bert-head-patterns": ("bert", dict(r=2, lora_alpha=4, target_modules=["query", "value"],
                                        modules_to_save=["classifier"], alpha_pattern={"value": 3.0},
                                        rank_pattern={"layer.0.attention.self.query": 5})),
    "llama-rslora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                   use_rslora=True)),
    "gpt2-conv1d": ("gpt2", dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_load_peft_lora_gives_peft_outputs(case: str, tmp_path) -> None:
    kind, options = LORA_CASES[case]
    reference = _peft_model(kind, peft.LoraConfig(**options))
    reference.save_pretrained(tmp_path)
    model = deltatune.load_peft(make_backbone(kind), tmp_path)
    x = make_input(kind)
    with torch.no_grad():
        assert rel_err(run(model, x), run(reference, x)) < 1e-5
    assert delta_modules(model)


def test_load_peft_ia3_gives_peft_outputs(tmp_path) -> None:
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    reference = _peft_model("llama", config)
    reference.save_pretrained(tmp_path)
    model = deltatune.load_peft(make_backbone("llama"), tmp_path)
    x = make_input("llama")
    with torch.no_grad():
        assert rel_err(run(model, x), run(reference, x)) < 1e-5


@pytest.mark.parametrize("kind,method,options", [
    ("bert", "lora", dict(r=2, rank_pattern={"layer.1.attention.self.value": 3}, rslora=True)),
    ("gpt2", "lora", dict(target_modules="all-linear", alpha_pattern={"c_fc": 5.0})),
    ("llama", "ia3", {}),
])  # fmt: skip
def test_save_peft_is_read_by_peft_and_round_trips_exactly(kind: str, method: str, options: dict, tmp_path) -> None:
    model = deltatune.apply(make_backbone(kind), method, **options)
    perturb_deltas(model)
    deltatune.save_peft(model, tmp_path)
    x = make_input(kind)
    with torch.no_grad():
        ours = run(model, x)
        theirs = run(peft.PeftModel.from_pretrained(make_backbone(kind), tmp_path).eval(), x)
        again = run(deltatune.load_peft(make_backbone(kind), tmp_path), x)
    assert rel_err(theirs, ours) < 1e-5
    assert torch.equal(again, ours)


@pytest.mark.parametrize("option,value", [
    ("use_dora", True), ("bias", "all"), ("layers_to_transform", [0]), ("peft_type", "LOHA"), ("lora_bias", True),
])  # fmt: skip
def test_unsupported_peft_options_are_refused_before_anything_loads(option: str, value: object, tmp_path) -> None:
    _peft_model("bert", peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, option: value}))
    model = make_backbone("bert")
    with pytest.raises(deltatune.DeltaTuneError, match=option if option != "peft_type" else "LOHA"):
        deltatune.load_peft(model, tmp_path)
    assert not delta_modules(model) and "_deltatune" not in model.__dict__


def test_fused_qkv_lora_is_refused_by_save_peft(tmp_path) -> None:
    model = deltatune.apply(make_backbone("vit"), "lora", fused_qkv="qv")
    with pytest.raises(deltatune.DeltaTuneError, match="fused"):
        deltatune.save_peft(model, tmp_path)
