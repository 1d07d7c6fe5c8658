"""peft prompt and prefix tuning in and out of deltatune (peft is the oracle) on tiny BERT, GPT-2 and Llama: load_peft
gives peft's logits with padding and token types, save_peft gives files peft runs alike, the round trip is exact,
and what has no deltatune form is refused before the model is touched."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from safetensors.torch import load_file, save_file

import deltatune
from deltatune.core import delta_modules

peft = pytest.importorskip("peft")


def _batch() -> dict[str, torch.Tensor]:
    """The BERT batch (a padded row) with a second segment, so the prompts' token type and mask matter."""
    batch = make_input("bert")
    types = torch.zeros_like(batch["input_ids"])
    types[:, 6:] = 1
    return {**batch, "token_type_ids": types}


def _peft_model(kind: str, kind_of_peft: str = "prompt", **options: object) -> torch.nn.Module:
    """A peft prompt- or prefix-tuning model with its prompts (and head) moved off their init."""
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    cls = peft.PromptTuningConfig if kind_of_peft == "prompt" else peft.PrefixTuningConfig
    model = peft.get_peft_model(make_backbone(kind), cls(task_type=task, **options)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _theirs(reference: torch.nn.Module, kind: str, batch: dict, p: int, prompt: bool) -> torch.Tensor:
    """peft's logits; for decoder prompts without the p prompt positions, which deltatune drops."""
    out = run(reference, batch)
    return out[:, p:] if prompt and kind != "bert" else out


CASES = {
    "bert-prompt-1": ("bert", "prompt", dict(num_virtual_tokens=1)),
    "bert-prompt-4": ("bert", "prompt", dict(num_virtual_tokens=4)),
    "gpt2-prompt": ("gpt2", "prompt", dict(num_virtual_tokens=3)),
    "llama-prompt": ("llama", "prompt", dict(num_virtual_tokens=3)),
    "gpt2-prefix": ("gpt2", "prefix", dict(num_virtual_tokens=3)),
    "llama-prefix-projection": ("llama", "prefix", dict(num_virtual_tokens=2, prefix_projection=True,
                                                        encoder_hidden_size=24)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_peft_prompt_learning_gives_peft_logits(case: str, tmp_path) -> None:
    kind, method, options = CASES[case]
    reference = _peft_model(kind, method, **options)
    reference.save_pretrained(tmp_path)
    model = deltatune.load_peft(make_backbone(kind), tmp_path)
    batches = (_batch(), make_input("bert")) if kind == "bert" else (make_input(kind),)  # token types; a padded row
    p = options["num_virtual_tokens"]
    for batch in batches:
        with torch.no_grad():
            assert rel_err(run(model, batch), _theirs(reference, kind, batch, p, method == "prompt")) < 1e-5
    assert [m.delta_method for _, m in delta_modules(model)] == [method]


@pytest.mark.parametrize("kind,method", [("bert", "prompt"), ("gpt2", "prompt"), ("llama", "prefix"),
                                         ("gpt2", "prefix")])  # fmt: skip
def test_save_peft_prompt_learning_is_run_by_peft_and_round_trips_exactly(kind: str, method: str, tmp_path) -> None:
    options = {"insert": "input"} if method == "prompt" else {"embed_dim": 8, "mid_dim": 16}  # prefix: through an MLP
    model = deltatune.apply(make_backbone(kind), method, num_tokens=3, **options)
    perturb_deltas(model, std=0.5)
    deltatune.save_peft(model, tmp_path)
    batch = _batch() if kind == "bert" else make_input(kind)
    with torch.no_grad():
        ours = run(model, batch)
        reference = peft.PeftModel.from_pretrained(make_backbone(kind), tmp_path).eval()
        theirs = _theirs(reference, kind, batch, 3, method == "prompt")
        again = run(deltatune.load_peft(make_backbone(kind), tmp_path), batch)
    assert rel_err(theirs, ours) < 1e-5
    assert torch.equal(again, ours)


def test_save_peft_refuses_prompts_peft_does_not_place_alike(tmp_path) -> None:
    for options in ({"insert": "output"}, {"insert": "input", "insert_at": 1}):
        model = deltatune.apply(make_backbone("bert"), "prompt", num_tokens=2, **options)
        with pytest.raises(deltatune.DeltaTuneError, match="insert='input', insert_at=0"):
            deltatune.save_peft(model, tmp_path)
    with pytest.raises(deltatune.DeltaTuneError, match="decoder LMs only"):
        deltatune.save_peft(deltatune.apply(make_backbone("bert"), "prefix", num_tokens=2), tmp_path)


@pytest.mark.parametrize("case,match", [
    ("bert-prefix", "past_key_values"), ("submodules", "num_transformer_submodules"), ("t5", "T5ForConditional"),
    ("shape", "prompt_embeddings must be"), ("heads", "num_attention_heads=1"), ("p-tuning", "P_TUNING"),
])  # fmt: skip
def test_prompt_learning_without_a_deltatune_form_is_refused_untouched(case: str, match: str, tmp_path) -> None:
    kind = {"bert-prefix": "bert", "t5": "t5", "submodules": "bert"}.get(case, "gpt2")
    method = "prefix" if case in ("heads",) else "prompt"
    _peft_model("gpt2" if kind != "bert" else "bert", method, num_virtual_tokens=2).save_pretrained(tmp_path)
    path, weights = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    edits = {"bert-prefix": {"peft_type": "PREFIX_TUNING"}, "submodules": {"num_transformer_submodules": 2},
             "heads": {"num_attention_heads": 1}, "p-tuning": {"peft_type": "P_TUNING"}}  # fmt: skip
    path.write_text(json.dumps({**json.loads(path.read_text()), **edits.get(case, {})}))
    if case == "shape":
        save_file({**load_file(weights), "prompt_embeddings": torch.ones(2, 7)}, weights)
    model = make_backbone(kind)
    with pytest.raises(deltatune.DeltaTuneError, match=match):
        deltatune.load_peft(model, tmp_path)
    assert not delta_modules(model) and "_deltatune" not in model.__dict__
