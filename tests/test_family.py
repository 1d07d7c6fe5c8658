"""The method family of issue 5 (VPT, prompt, prefix, AdaptFormer, PHM-adapter, Compacter, FacT, partial tuning).

Parameter counts against closed forms, numerics against reference computations, merge exactness, training, save/load,
combinations and errors. Adding a method here is one ``Case`` line in ``CASES``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from torch import nn

import deltatune
from deltatune.checkpoint import stored_form
from deltatune.core import delta_modules

# Architecture of the tiny backbones in conftest.py (the closed forms below are written in these numbers).
VIT = dict(d=64, depth=6, mlp=192)  # test_vit: embed 64, 6 blocks, mlp_ratio 3, qkv bias
SWIN = dict(dims=(16, 32), depths=(2, 2), heads=(1, 2), window=4)  # patch-merging norm: 4 * 16
BERT = dict(d=32, layers=2, inter=37)


def _per_block(kind: str, f: Callable[[int], int]) -> int:
    """Sum of f(d) over the blocks of a tiny backbone (d: the block's width)."""
    if kind == "vit":
        return VIT["depth"] * f(VIT["d"])
    if kind == "swin":
        return sum(n * f(d) for d, n in zip(SWIN["dims"], SWIN["depths"]))
    return BERT["layers"] * f(BERT["d"])


def _prefix(layers: int, d: int, p: int = 6, e: int = 512, m: int = 512) -> int:
    return p * e + (e * m + m) + (m * 2 * layers * d + 2 * layers * d)


def _phm_layer(k: int, d: int, n: int, shared: bool) -> int:
    """One PHM layer k -> d (Mahabadi et al., eq. 3-5), counted from its factor shapes: n rules A_i (n, n), unless
    shared; n fast B_i (k/n, d/n), or for Compacter's low-rank B_i = s_i t_i^T (rank 1) s_i (k/n, 1) and t_i (1, d/n);
    and a bias (d)."""
    rules = 0 if shared else n * (n * n)
    fast = n * (k // n * 1 + 1 * d // n) if shared else n * ((k // n) * (d // n))
    return rules + fast + d


def _phm(kind: str, shared: bool, n: int = 4) -> int:
    # Hidden size 4 on every tiny backbone: d / sigma (Swin 4d / sigma) is 1, 2 or 4, raised to one multiple of n.
    h = 4

    def site(d: int) -> int:
        return _phm_layer(d, h, n, shared) + _phm_layer(h, d, n, shared)  # down and up

    return (n * n * n if shared else 0) + 2 * _per_block(kind, site)  # two adapters per block, one shared rule


def _fact(kind: str, tucker: bool) -> int:
    r = 32 if tucker else 8
    # d x d slices per block: qkv 3, proj 1, fc1 and fc2 mlp/d each (BERT: q, k, v, o 4, 37 -> 2 and 2).
    slices = {"vit": 4 + 2 * VIT["mlp"] // VIT["d"], "swin": 4 + 2 * 4, "bert": 4 + 2 * 2}[kind]
    widths = {"vit": [(VIT["d"], VIT["depth"])], "swin": list(zip(SWIN["dims"], SWIN["depths"]))}
    total = 0
    for d, blocks in widths.get(kind, [(BERT["d"], BERT["layers"])]):
        s = slices * blocks
        total += 2 * d * r + (r**3 + s * r if tucker else s * r * r)
    return total


def _attn(kind: str) -> int:
    if kind == "swin":
        w = SWIN["window"]
        return sum(
            n * (4 * d * d + 4 * d + (2 * w - 1) ** 2 * h)
            for d, n, h in zip(SWIN["dims"], SWIN["depths"], SWIN["heads"])
        )
    return _per_block(kind, lambda d: 4 * d * d + 4 * d)


def _mlp(kind: str) -> int:
    hidden = {"vit": lambda d: VIT["mlp"], "swin": lambda d: 4 * d, "bert": lambda d: BERT["inter"]}[kind]
    return _per_block(kind, lambda d: 2 * d * hidden(d) + hidden(d) + d)


def _norms(kind: str) -> int:
    if kind == "vit":
        return (2 * VIT["depth"] + 1) * 2 * VIT["d"]  # norm1, norm2 per block + final norm
    if kind == "swin":  # patch-embed norm, 2 per block, patch-merging norm (4 * 16), final norm
        return 2 * 16 + _per_block("swin", lambda d: 4 * d) + 2 * 4 * 16 + 2 * 32
    return (2 * BERT["layers"] + 1) * 2 * BERT["d"]  # embeddings + 2 per layer


@dataclass(frozen=True)
class Case:
    """One method: the tiny backbones it applies to and its closed-form parameter count on each."""

    method: str
    count: Callable[[str], int]
    kinds: tuple[str, ...] = ("vit", "swin", "bert")
    options: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-2  # Adam learning rate for the training test (prompts like large ones, full matrices small ones)


CASES = [
    Case("vpt-shallow", lambda k: 10 * VIT["d"], ("vit",)),
    Case("vpt-deep", lambda k: _per_block(k, lambda d: 10 * d), ("vit", "swin"), lr=0.1),
    Case("prompt", lambda k: 100 * BERT["d"], ("bert",)),
    Case(
        "prefix", lambda k: _prefix(VIT["depth"], VIT["d"]) if k == "vit" else _prefix(2, 32), ("vit", "bert"), lr=3e-3
    ),
    Case("adaptformer", lambda k: _per_block(k, lambda d: 2 * 64 * d + 64 + d)),
    Case("phm-adapter", lambda k: _phm(k, shared=False), options={"n": 4}),  # official n = 12 divides no tiny width
    Case("compacter", lambda k: _phm(k, shared=True)),
    Case("fact-tt", lambda k: _fact(k, tucker=False)),
    Case("fact-tk", lambda k: _fact(k, tucker=True)),
    Case("attn-only", _attn, lr=3e-3),
    Case("mlp-only", _mlp, lr=3e-3),
    Case("layernorm", _norms),
]
PAIRS = [(c, k) for c in CASES for k in c.kinds]
NOT_APPLICABLE = [(c.method, k) for c in CASES for k in ("vit", "swin", "bert") if k not in c.kinds]
IDS = [f"{c.method}-{k}" for c, k in PAIRS]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not spin against other jobs on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sensitive_backbone(kind: str) -> nn.Module:
    """The tiny backbone; BERT with N(0, 0.2) weights: at its own 0.02 init its logits barely depend on the input,
    so no method could move its loss in a few steps (wider weights stand in for pretrained ones)."""
    model = make_backbone(kind)
    if kind == "bert":
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and not name.startswith("classifier"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def added(model: nn.Module, method: str) -> int:
    """Parameters the method trains (added or selected), each shared tensor once."""
    entry = next(e for e in model.__dict__["_deltatune"].entries if e.config.name == method)
    return sum(p.numel() for p in deltatune.core.entry_parameters(model, entry))


def test_every_family_method_is_registered() -> None:
    assert {c.method for c in CASES} <= set(deltatune.methods())


@pytest.mark.parametrize("case,kind", PAIRS, ids=IDS)
def test_parameter_count_matches_closed_form(case: Case, kind: str) -> None:
    model = deltatune.apply(make_backbone(kind), case.method, head=False, **case.options)
    assert added(model, case.method) == case.count(kind)
    assert deltatune.trainable_parameters(model) == case.count(kind)


@pytest.mark.parametrize("case,kind", PAIRS, ids=IDS)
def test_trains_then_save_load_reproduces_outputs(case: Case, kind: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = deltatune.apply(sensitive_backbone(kind), case.method, head=False, **case.options)
    x, y = make_input(kind), torch.tensor([0, 2])
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=case.lr)

    def loss() -> torch.Tensor:
        return F.cross_entropy(run(model, x), y)

    with torch.no_grad():
        before = loss().item()
    model.train()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.95 * before
    assert all(not torch.equal(p, s) for p, s in zip(params, start))
    deltatune.save_delta(model, tmp_path / "d.safetensors")
    fresh = deltatune.load_delta(sensitive_backbone(kind), tmp_path / "d.safetensors", method=case.method)
    with torch.no_grad():  # the file holds the stored form (prefix tuning: its MLP folded into the prefixes)
        assert torch.equal(run(fresh, x), run(stored_form(model), x))


@pytest.mark.parametrize("method", ["fact-tt", "fact-tk"])
@pytest.mark.parametrize("kind", ["vit", "swin", "bert"])
def test_fact_merges_exactly(method: str, kind: str) -> None:
    model = deltatune.apply(make_backbone(kind), method)
    perturb_deltas(model)
    x = make_input(kind)
    with torch.no_grad():
        before = run(model, x)
        deltatune.merge(model)
        assert rel_err(run(model, x), before) <= 1e-5
    assert not delta_modules(model)


@pytest.mark.parametrize("tucker", [False, True])
def test_fact_update_is_the_papers_factorised_tensor(tucker: bool) -> None:
    model = deltatune.apply(make_backbone("vit"), "fact-tk" if tucker else "fact-tt")
    perturb_deltas(model)
    fc1 = model.blocks[2].mlp.fc1  # 64 -> 192: 3 slices; block 2 starts at slice offset 2 * 10
    f = fc1.fact_factors
    u, v = f.fact_u.detach().double(), f.fact_v.detach().double()
    if tucker:  # dW_j = V (C x_3 P_j) U^T over the whole tensor, then this layer's slices
        tensor = torch.einsum("vuk,sk->svu", f.fact_c.double(), f.fact_p.double())  # (S, r, r)
        cores = tensor[fc1.offset : fc1.offset + 3]
        assert fc1.offset == 2 * 10 + 4
    else:
        cores = fc1.fact_core.detach().double().reshape(3, 8, 8)
    expected = torch.cat([v @ c @ u for c in cores]) * fc1.scale  # (192, 64), slice j = rows 64j:64(j+1)
    assert torch.allclose(fc1.delta_weight(), expected, rtol=1e-12, atol=1e-14)
    w = fc1.base.weight.detach().double().clone()
    deltatune.merge(model)
    assert torch.allclose(model.blocks[2].mlp.fc1.weight, (w + expected).float(), rtol=0, atol=1e-7)



def test_adaptformer_bert_branch_joins_before_the_post_layernorm() -> None:
    # timm backbones: tests/test_fidelity.py (the branch reads the residual stream, as the official block)
    bert = deltatune.apply(make_backbone("bert"), "adaptformer")
    perturb_deltas(bert)
    out = bert.bert.encoder.layer[0].output
    h, res = torch.randn(2, 5, 37), torch.randn(2, 5, 32)
    with torch.no_grad():  # the branch reads the FFN input and joins before BERT's post-LayerNorm
        branch = 0.1 * out.adaptformer_up(torch.relu(out.adaptformer_down(res)))
        expected = out.base.LayerNorm(out.base.dense(h) + res + branch)
        assert torch.allclose(out(h, res), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["phm-adapter", "compacter"])
def test_phm_weight_is_a_sum_of_kronecker_products(method: str) -> None:
    model = deltatune.apply(make_backbone("vit"), method, n=4)
    down = model.blocks[0].attn.proj.phm_down
    fast = down.left @ down.right if method == "compacter" else down.fast  # (n, 64/4, 4/4)
    expected = sum(torch.kron(down.rule[i], fast[i]) for i in range(4))
    assert torch.allclose(down.weight(), expected)
    assert down.weight().shape == (64, 4)
    rules = {id(m.phm_down.rule) for m in model.modules() if hasattr(m, "phm_down")}
    assert len(rules) == (1 if method == "compacter" else 12)  # Compacter: one rule for the whole model


def test_partial_methods_select_exactly_their_modules() -> None:
    attn = deltatune.apply(make_backbone("vit"), "attn-only", head=False)
    assert {n.split(".", 2)[2] for n, p in attn.named_parameters() if p.requires_grad} == {
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
    }
    norm = deltatune.apply(make_backbone("bert"), "layernorm")
    trainable = {n for n, p in norm.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(norm.named_parameters()) if "LayerNorm" in n or n.startswith("classifier")}


def test_prompt_bitfit_adapter_train_save_load_and_merge_as_one_unit(tmp_path) -> None:
    model = deltatune.apply(make_backbone("bert"), ["prompt", "bitfit", "adapter"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("prompt_tokens" in n for n in names) and any("adapter_down" in n for n in names)
    assert any(n.endswith(".bias") and "adapter" not in n and "classifier" not in n for n in names)
    expected = 100 * 32 + sum(p.numel() for n, p in make_backbone("bert").named_parameters() if n.endswith("bias"))
    expected += 4 * 2 * 32 * 1 + sum(p.numel() for p in make_backbone("bert").classifier.parameters())
    expected -= make_backbone("bert").classifier.bias.numel()  # the head's bias is counted once, with the head
    assert deltatune.trainable_parameters(model) == expected
    x, y = make_input("bert"), torch.tensor([0, 2])
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(run(model, x), y).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])}
    assert changed == set(start)
    deltatune.save_delta(model, tmp_path / "combo.safetensors")
    fresh = deltatune.load_delta(make_backbone("bert"), tmp_path / "combo.safetensors")
    with torch.no_grad():
        out = run(model, x)
        assert torch.equal(run(fresh, x), out)
        with pytest.warns(UserWarning, match="cannot be merged"):
            deltatune.merge(fresh)
        assert rel_err(run(fresh, x), out) <= 1e-5
    assert {m.delta_method for _, m in delta_modules(fresh)} == {"prompt", "adapter"}


def test_vpt_and_fact_combine_and_fact_merges_around_the_prompts() -> None:
    model = deltatune.apply(make_backbone("vit"), ["vpt-deep", "fact-tt", "lora"])
    assert model.blocks[1].attn.qkv.delta_method == "lora"  # VPT wraps leaves only: qkv is still reachable
    perturb_deltas(model)
    x = make_input("vit")
    with torch.no_grad():
        before = run(model, x)
        with pytest.warns(UserWarning, match="cannot be merged"):
            deltatune.merge(model)
        assert rel_err(run(model, x), before) <= 1e-5
    assert {m.delta_method for _, m in delta_modules(model)} == {"vpt-deep"}


@pytest.mark.parametrize("method,kind", NOT_APPLICABLE)
def test_not_applicable_raises(method: str, kind: str) -> None:
    model = make_backbone(kind)
    with pytest.raises(deltatune.DeltaTuneError):
        deltatune.apply(model, method)
    assert not delta_modules(model) and "_deltatune" not in model.__dict__


@pytest.mark.parametrize(
    "method,options,fragment",
    [(c.method, {"bogus": 1}, "unknown option(s) ['bogus']") for c in CASES]
    + [
        ("vpt-deep", {"num_tokens": 0}, "num_tokens must be >= 1"),
        ("prompt", {"insert_at": -1}, "insert_at must be >= 0"),
        ("fact-tt", {"r": 0}, "r must be >= 1"),
        ("compacter", {"n": 3}, "not divisible by n=3"),
        ("phm-adapter", {"hidden": 6}, "multiple of n=12"),
        ("adaptformer", {"dropout": 1.0}, "dropout must be in [0, 1)"),
        ("attn-only", {"target_modules": ["nothing"]}, "matched no module"),
    ],
)
def test_bad_options_raise(method: str, options: dict, fragment: str) -> None:
    model = make_backbone("vit")
    with pytest.raises(deltatune.DeltaTuneError) as info:
        deltatune.apply(model, method, **options)
    assert fragment in str(info.value)
    assert not delta_modules(model) and "_deltatune" not in model.__dict__
