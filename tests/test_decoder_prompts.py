"""Prompt and prefix tuning on decoder LMs (methods/_decoder.py): cached generation equals recomputing the whole
sequence without a cache, prompts train and reload like any delta, and the prefix forward equals a float64
hand-written GPT-2 attention over [prefix; keys] with the tokens at positions p..p+L-1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run

import deltatune
from deltatune.core import delta_modules

METHODS = {"prompt": {"insert": "input", "num_tokens": 3}, "prefix": {"num_tokens": 3, "embed_dim": 8, "mid_dim": 8}}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cached_generation_equals_recomputing_without_a_cache(kind: str, method: str) -> None:
    model = deltatune.apply(make_backbone(kind), method, **METHODS[method])
    perturb_deltas(model, std=0.5)
    ids = make_input(kind)["input_ids"][:1, :5]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        seq = out.sequences
        for step, scores in enumerate(out.scores):  # each step's logits, the whole prefix recomputed, no cache
            prefix = seq[:, : ids.shape[1] + step]
            full = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=False).logits[:, -1]
            assert rel_err(scores, full) < 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_prompts_train_alone_and_reload_exactly(kind: str, tmp_path) -> None:
    model = deltatune.apply(make_backbone(kind), "prompt", **METHODS["prompt"])
    perturb_deltas(model, std=0.5)
    x = make_input(kind)
    run(model, x).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    prompts = {f"{model.base_model_prefix}.prompt_tokens"}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad} == prompts
    deltatune.save_delta(model, tmp_path / "d.safetensors")
    fresh = deltatune.load_delta(make_backbone(kind), tmp_path / "d.safetensors")
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(model, x))
        assert run(model, x).shape == run(make_backbone(kind), x).shape  # the prompt positions are dropped


def test_gpt2_prefix_equals_a_float64_attention_over_prefixed_keys() -> None:
    """Hand-written GPT-2 (float64): each layer attends causally over [prefix; keys] / [prefix; values], padded
    tokens masked, positions p..p+L-1; the prefixes come from the (float64) reparameterising MLP."""
    model = deltatune.apply(make_backbone("gpt2"), "prefix", **METHODS["prefix"])
    perturb_deltas(model, std=0.5)
    x = make_input("gpt2")
    wrapper = dict(delta_modules(model))["transformer"]
    mlp, plain = wrapper.prefix_mlp, make_backbone("gpt2").double()
    embed = mlp.prefix_embed.double()
    kv = F.linear(torch.tanh(F.linear(embed, mlp.prefix_hidden.weight.double(), mlp.prefix_hidden.bias.double())),
                  mlp.prefix_out.weight.double(), mlp.prefix_out.bias.double())  # fmt: skip  (p, L * 2 * d)
    p, d, heads = 3, 32, 2
    ids, mask = x["input_ids"], x["attention_mask"].bool()
    t = plain.transformer
    h = t.wte(ids) + t.wpe(torch.arange(p, p + ids.shape[1]))  # (B, L, d)
    visible = torch.cat([torch.ones(2, p, dtype=torch.bool), mask], 1)[:, None, None, :]  # (B, 1, 1, p + L)
    causal = torch.ones(ids.shape[1], p + ids.shape[1], dtype=torch.bool).tril(p)  # (L, p + L)
    for layer, block in enumerate(t.h):
        q, k, v = block.attn.c_attn(block.ln_1(h)).split(d, dim=-1)
        k = torch.cat([kv[:, (2 * layer) * d : (2 * layer + 1) * d].expand(2, -1, -1), k], 1)
        v = torch.cat([kv[:, (2 * layer + 1) * d : (2 * layer + 2) * d].expand(2, -1, -1), v], 1)
        q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))  # (B, heads, *, d_h)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).masked_fill(~(visible & causal), float("-inf"))
        h = h + block.attn.c_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))
        h = h + block.mlp(block.ln_2(h))
    expected = plain.lm_head(t.ln_f(h))
    with torch.no_grad():
        got = run(model, x).double()
    rows = mask.unsqueeze(-1)  # padded rows attend to nothing real in the reference's masking; compare real tokens
    assert rel_err(got * rows, expected.detach() * rows) < 1e-5


def test_a_decoder_takes_one_of_prompt_and_prefix() -> None:
    for first, second in (("prompt", "prefix"), ("prefix", "prompt")):
        model = deltatune.apply(make_backbone("gpt2"), first, **METHODS[first])
        with pytest.raises(deltatune.DeltaTuneError, match="wrapped already"):
            deltatune.apply(model, second, **METHODS[second])
        assert [m.delta_method for _, m in delta_modules(model)] == [first]
