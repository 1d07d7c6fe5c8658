"""peft prompt tuning in and out of deltatune (peft is the oracle): load_peft gives peft's logits with padding and
token types, save_peft gives files peft runs alike, the round trip is exact, and what has no deltatune form is
refused before the model is touched."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run

import deltatune
from deltatune.core import delta_modules

peft = pytest.importorskip("peft")


def _batch() -> dict[str, torch.Tensor]:
    """The BERT batch (a padded row) with a second segment, so the prompts' token type and mask matter."""
    batch = make_input("bert")
    types = torch.zeros_like(batch["input_ids"])
    types[:, 6:] = 1
    return {**batch, "token_type_ids": types}


def _peft_prompts(kind: str = "bert", **options: object) -> torch.nn.Module:
    """A peft prompt-tuning model with its prompts (and head) moved off their init."""
    config = peft.PromptTuningConfig(task_type="SEQ_CLS" if kind == "bert" else "CAUSAL_LM", **options)
    model = peft.get_peft_model(make_backbone(kind), config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("tokens", [1, 4])
def test_load_peft_prompt_tuning_gives_peft_logits(tokens: int, tmp_path) -> None:
    reference = _peft_prompts(num_virtual_tokens=tokens)
    reference.save_pretrained(tmp_path)
    model = deltatune.load_peft(make_backbone("bert"), tmp_path)
    for batch in (_batch(), make_input("bert")):  # with and without token types; one row padded
        with torch.no_grad():
            assert rel_err(run(model, batch), run(reference, batch)) < 1e-5
    assert [n for n, _ in delta_modules(model)] == ["bert.embeddings"]


def test_save_peft_prompt_is_run_by_peft_and_round_trips_exactly(tmp_path) -> None:
    model = deltatune.apply(make_backbone("bert"), "prompt", num_tokens=3, insert="input")
    perturb_deltas(model, std=0.5)
    deltatune.save_peft(model, tmp_path)
    batch = _batch()
    with torch.no_grad():
        ours = run(model, batch)
        theirs = run(peft.PeftModel.from_pretrained(make_backbone("bert"), tmp_path).eval(), batch)
        again = run(deltatune.load_peft(make_backbone("bert"), tmp_path), batch)
    assert rel_err(theirs, ours) < 1e-5
    assert torch.equal(again, ours)


def test_save_peft_refuses_prompts_peft_does_not_place_alike(tmp_path) -> None:
    for options in ({"insert": "output"}, {"insert": "input", "insert_at": 1}):
        model = deltatune.apply(make_backbone("bert"), "prompt", num_tokens=2, **options)
        with pytest.raises(deltatune.DeltaTuneError, match="insert='input', insert_at=0"):
            deltatune.save_peft(model, tmp_path)


def _prefix_dir(tmp_path) -> object:
    """A peft PREFIX_TUNING adapter on the tiny GPT-2 (the models peft runs prefix tuning on)."""
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft.get_peft_model(make_backbone("gpt2"), config).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case,match", [
    ("prefix", "PREFIX_TUNING"), ("submodules", "num_transformer_submodules"), ("gpt2", "GPT2LMHeadModel"),
    ("shape", "prompt_embeddings must be"),
])  # fmt: skip
def test_prompt_learning_without_a_deltatune_form_is_refused_untouched(case: str, match: str, tmp_path) -> None:
    kind = "gpt2" if case in ("prefix", "gpt2") else "bert"
    if case == "prefix":
        _prefix_dir(tmp_path)
    else:
        _peft_prompts(kind, num_virtual_tokens=2).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    if case in ("submodules", "shape"):
        cfg = json.loads(path.read_text())
        edit = {"num_transformer_submodules": 2} if case == "submodules" else {}
        path.write_text(json.dumps({**cfg, **edit}))
        if case == "shape":
            from safetensors.torch import load_file, save_file

            weights = tmp_path / "adapter_model.safetensors"
            tensors = load_file(weights)
            save_file({**tensors, "prompt_embeddings": torch.ones(2, 7)}, weights)
    model = make_backbone(kind)
    with pytest.raises(deltatune.DeltaTuneError, match=match):
        deltatune.load_peft(model, tmp_path)
    assert not delta_modules(model) and "_deltatune" not in model.__dict__
