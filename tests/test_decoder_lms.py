"""Decoder LMs: GPT-2's Conv1D and RMSNorm sites against hand-written float64 formulas, and the family presets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from torch import nn

import deltatune
from deltatune.core import delta_modules
from deltatune.methods.ia3 import IA3
from deltatune.methods.lora import LoRALinear
from deltatune.methods.ssf import SSF
from deltatune.targeting import family


def _conv1d(n_in: int = 6, out: int = 9) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(out, n_in)  # weight (in, out)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer.requires_grad_(False)


def _x(n_in: int = 6) -> torch.Tensor:
    return torch.randn(4, n_in, generator=torch.Generator().manual_seed(1))


def test_lora_on_conv1d_is_x_w_plus_s_x_at_bt_and_merges_into_the_transpose() -> None:
    layer = _conv1d()
    w, b = layer.weight.double().clone(), layer.bias.double().clone()
    lora = LoRALinear(layer, r=2, alpha=3.0, dropout=0.0)
    nn.init.normal_(lora.lora_b)
    a_, b_ = lora.lora_a.double(), lora.lora_b[0].double()
    expected = _x().double() @ w + b + 1.5 * _x().double() @ a_.T @ b_.T  # Conv1D: y = x W + b, W (in, out)
    assert rel_err(lora(_x()).double(), expected) < 1e-6
    merged = lora.merge()
    assert torch.equal(merged.weight, (w + 1.5 * (b_ @ a_).T).float())


def test_lora_fused_qv_on_gpt2_c_attn_leaves_k_alone() -> None:
    model = deltatune.apply(make_backbone("gpt2"), "lora", fused_qkv="qv", r=2)
    site = model.transformer.h[0].attn.c_attn
    nn.init.normal_(site.lora_b)
    x = torch.randn(3, 32)
    c = 32
    w = site.base.weight.detach()  # (in, 3c)
    out, base = site(x), x @ w + site.base.bias
    a_q, a_v = site.lora_a.view(2, 2, c)
    assert torch.allclose(out[:, :c], base[:, :c] + x @ a_q.T @ site.lora_b[0].T * site.scaling, atol=1e-5)
    assert torch.equal(out[:, c : 2 * c], base[:, c : 2 * c])
    assert torch.allclose(out[:, 2 * c :], base[:, 2 * c :] + x @ a_v.T @ site.lora_b[1].T * site.scaling, atol=1e-5)


def test_ssf_on_conv1d_scales_output_columns_and_folds() -> None:
    layer = _conv1d()
    w, b = layer.weight.double().clone(), layer.bias.double().clone()
    ssf = SSF(layer)
    s, t = ssf.ssf_scale.double(), ssf.ssf_shift.double()
    expected = (_x().double() @ w + b) * s + t
    assert rel_err(ssf(_x()).double(), expected) < 1e-6
    ssf.merge()
    assert rel_err(layer(_x()).double(), expected) < 1e-6 and layer.weight.shape == (6, 9)


def test_ia3_on_conv1d_input_and_output_modes() -> None:
    for mode in ("input", "output"):
        layer = _conv1d()
        w, b = layer.weight.double().clone(), layer.bias.double().clone()
        ia3 = IA3(layer, mode)
        nn.init.normal_(ia3.ia3_scale)
        v, x = ia3.ia3_scale.double(), _x().double()
        expected = (x * v) @ w + b if mode == "input" else (x @ w + b) * v
        assert rel_err(ia3(_x()).double(), expected) < 1e-6
        ia3.merge()
        assert rel_err(layer(_x()).double(), expected) < 1e-6


def test_ssf_on_rmsnorm_is_scale_only_and_folds_exactly() -> None:
    model = deltatune.apply(make_backbone("llama"), "ssf")
    site = model.model.layers[0].input_layernorm
    assert isinstance(site, SSF) and site.ssf_shift is None
    perturb_deltas(model)
    h = torch.randn(2, 5, 32, dtype=torch.float64)
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + site.base.variance_epsilon)  # RMSNorm in float64
    expected = ref * site.base.weight.double() * site.ssf_scale.double()
    assert rel_err(site(h.float()).double(), expected) < 1e-6
    x = make_input("llama")
    with torch.no_grad():
        before = run(model, x)
        deltatune.merge(model)
        assert rel_err(run(model, x), before) < 1e-5
    assert not hasattr(model.model.layers[0].input_layernorm, "bias")  # the plain RMSNorm, no added bias


def test_layernorm_method_trains_rmsnorm_weights() -> None:
    for kind, norms in (("llama", 2 * 2 + 1), ("t5", 2 * 2 + 2 * 3 + 2)):
        model = deltatune.apply(make_backbone(kind), "layernorm")
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert len(trained) == norms and all("norm" in n for n in trained)


def test_all_linear_on_gpt2_finds_the_conv1d_projections() -> None:
    model = deltatune.apply(make_backbone("gpt2"), "lora", target_modules="all-linear")
    assert sorted(n.split("h.0.")[1] for n, _ in delta_modules(model) if ".h.0." in n) == [
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj",
    ]  # fmt: skip


def test_families_and_presets_of_decoder_lms() -> None:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
    qwen, mistral = Qwen2ForCausalLM(Qwen2Config(**kw)), MistralForCausalLM(MistralConfig(**kw))
    assert [family(m) for m in (qwen, mistral, make_backbone("gpt2"), make_backbone("t5"))] == [
        "llama", "llama", "gpt2", "t5",
    ]  # fmt: skip
    lora = deltatune.apply(qwen, "lora")
    assert {n.rsplit(".", 1)[1] for n, _ in delta_modules(lora)} == {"q_proj", "v_proj"}
    adapters = deltatune.apply(make_backbone("gpt2"), "adapter", zero_up=True)
    assert {n.split("h.0.")[1] for n, _ in delta_modules(adapters) if ".h.0." in n} == {"attn.c_proj", "mlp.c_proj"}
    x = make_input("gpt2")
    perturb_deltas(adapters)
    assert run(adapters, x).isfinite().all()
    assert F.mse_loss(run(adapters, x), run(make_backbone("gpt2"), x)) > 0  # adapters act on the Conv1D outputs
