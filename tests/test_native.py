"""The compiled LoRA kernel (``kernels/native.py``, ``lowrank.c``) against float64 products, its LayerNorm prologue
against the LayerNorm's own output, its place in the fast path, and its fallback where it cannot be built."""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import Tensor

import deltatune
from deltatune.kernels import lora as fast_lora
from deltatune.kernels import native


def _reference(dy: Tensor, x: Tensor, a: Tensor, b: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """dA and dB in float64 from the float32 inputs: the products' definition, computed independently."""
    dy, x, a, b = dy.double(), x.double(), a.double(), b[0].double()
    return s * (dy @ b).t() @ x, (s * dy.t() @ (x @ a.t())).unsqueeze(0)


def _close(got: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor]) -> None:
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32 and g.shape == r.shape and g.is_contiguous()
        assert (g.double() - r).abs().max() <= 2e-6 * r.abs().max() + 1e-12


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("rank", native.RANKS)
@pytest.mark.parametrize("n,inn,out", [(37, 40, 24), (64, 48, 80), (1, 16, 16), (5, 7, 19), (0, 16, 32)])
def test_kernel_matches_float64(rank: int, n: int, inn: int, out: int, threads: int) -> None:
    """Tail blocks (rows not a multiple of 16), tail columns, a strided dy (one chunk of a wider output), threads."""
    g = torch.Generator().manual_seed(n + inn + rank)
    wide = torch.randn(n, 3 * out, generator=g)
    dy = wide[:, out : 2 * out]  # row stride 3*out, as a q/k/v chunk of a fused qkv output
    x, a, b = (
        torch.randn(n, inn, generator=g),
        torch.randn(rank, inn, generator=g),
        torch.randn(1, out, rank, generator=g),
    )
    with torch.no_grad():
        got = native.lowrank_grads(dy, x, a, b, 0.5)
    assert got is not None
    _close(got, _reference(dy, x, a, b, 0.5))


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_layer_norm_prologue_matches_the_layer_norms_output(affine: str, threads: int) -> None:
    """x recomputed inside the kernel from the LayerNorm's input, mean and rstd, with a large common offset (where
    ``x rstd - mean rstd`` would cancel): the products equal float64 ones of the LayerNorm's own float32 output."""
    g = torch.Generator().manual_seed(3)
    n, c, out, r = 45, 48, 40, 8
    inp = torch.randn(n, c, generator=g) * 3 + 1000
    weight = torch.randn(c, generator=g) if affine in ("both", "weight") else None
    bias = torch.randn(c, generator=g) if affine in ("both", "bias") else None
    y, mean, rstd = torch.native_layer_norm(inp, (c,), weight, bias, 1e-6)
    dy, a, b = torch.randn(n, out, generator=g), torch.randn(r, c, generator=g), torch.randn(1, out, r, generator=g)
    with torch.no_grad():
        got = native.lowrank_grads(dy, None, a, b, 2.0, ("layer_norm", None, (inp, mean, rstd, weight, bias)))
    assert got is not None
    _close(got, _reference(dy, y, a, b, 2.0))


def _tiny_lora() -> tuple[torch.nn.Module, Tensor, list[Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32)
    deltatune.apply(model, "lora", r=8, target_modules="all-linear")
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)  # B starts at zero: move it so that every gradient shows
    return model, torch.randn(3, 3, 32, 32), [p for p in model.parameters() if p.requires_grad]


def _grads(model: torch.nn.Module, x: Tensor, params: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(F.cross_entropy(model(x), torch.tensor([0, 2, 4])), params))


def test_fast_path_uses_the_kernel_and_matches_the_matmuls() -> None:
    """LoRA on every linear of a ViT: the kernel serves qkv and fc1 from their LayerNorms (prologue), proj and fc2
    from x; the gradients equal those of the PyTorch matmuls (native off) and of the plain formulas."""
    model, x, params = _tiny_lora()
    calls = []
    real = native.lowrank_grads

    def spy(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)
        calls.append(("recipe" if len(args) > 5 and args[5] is not None else "x", out is not None))
        return out

    with mock.patch.object(native, "lowrank_grads", spy):
        fast = _grads(model, x, params)
    blocks = len(model.blocks)
    # qkv and fc1 from their LayerNorm, inside the kernel, but block 0's qkv: its LayerNorm's input needs no grad, so
    # the LayerNorm kept nothing to recompute from and LoRA kept x; proj (attention output) and fc2 from x, fc2's
    # after PyTorch recomputed it from the GELU (the kernel declines a GELU recipe first)
    assert calls.count(("recipe", True)) == 2 * blocks - 1
    assert calls.count(("x", True)) == 2 * blocks + 1
    assert calls.count(("recipe", False)) == blocks
    with deltatune.kernels.native_kernels(False):
        matmuls = _grads(model, x, params)
    with deltatune.kernels.disabled():
        plain = _grads(model, x, params)
    for f, m, p in zip(fast, matmuls, plain, strict=True):
        assert rel_err(f, m) < 2e-6 and rel_err(f, p) < 2e-5


def test_kernel_stays_out_of_graph_building_backwards() -> None:
    """The kernel is not differentiable: inside grad mode (create_graph=True) it declines, and the matmuls serve."""
    dy, x, a, b = torch.randn(20, 16), torch.randn(20, 16), torch.randn(8, 16), torch.randn(1, 16, 8)
    assert native.lowrank_grads(dy, x, a, b, 1.0) is None  # grad mode is on here
    with torch.no_grad():
        assert native.lowrank_grads(dy.double(), x.double(), a.double(), b.double(), 1.0) is None  # float64
        assert native.lowrank_grads(dy, x, torch.randn(3, 16), torch.randn(1, 16, 3), 1.0) is None  # rank 3
        assert native.lowrank_grads(dy, x, a, torch.randn(2, 8, 8), 1.0) is None  # two chunks
        with deltatune.kernels.native_kernels(False):
            assert native.lowrank_grads(dy, x, a, b, 1.0) is None


def test_build_is_cached_and_keyed(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built once into the cache (atomically), reused after; another rank is another file."""
    monkeypatch.setenv("DELTATUNE_KERNEL_CACHE", str(tmp_path))
    compiler = native.shutil.which("cc") or native.shutil.which("gcc")
    first = native._build(compiler, native.FLAG_SETS[0], 8)
    stamp = first.stat().st_mtime_ns
    assert native._build(compiler, native.FLAG_SETS[0], 8) == first and first.stat().st_mtime_ns == stamp
    assert native._build(compiler, native.FLAG_SETS[0], 4) != first
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".so", ".so"]  # no temporary files left behind


def test_without_a_compiler_the_matmuls_serve_with_a_warning(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.library.cache_clear()
    try:
        model, x, params = _tiny_lora()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fast = _grads(model, x, params)
        assert any("PyTorch matmuls" in str(w.message) for w in caught)
        assert native.library(8) is None
        with deltatune.kernels.disabled():
            plain = _grads(model, x, params)
        for f, p in zip(fast, plain, strict=True):
            assert rel_err(f, p) < 2e-5
    finally:
        native.library.cache_clear()


def test_the_kernel_builds_here() -> None:
    """This machine has a C compiler (CI's too: torch.compile's tests need one), so the kernel must build: a silent
    fallback would leave every LoRA test above on the matmuls."""
    assert all(native.library(r) is not None for r in native.RANKS)
    assert fast_lora.native is native


def test_compiled_graphs_keep_the_matmuls() -> None:
    """Under torch.compile the kernel stays out (as an operator it measured no faster than inductor's matmuls):
    the compiled backward never calls it and its gradients equal the eager ones."""
    model, x, params = _tiny_lora()
    eager = _grads(model, x, params)
    with mock.patch.object(native, "_run", side_effect=AssertionError("the kernel ran in a compiled graph")):
        got = _grads(deltatune.compile(model), x, params)
    for g, e in zip(got, eager, strict=True):
        assert rel_err(g, e) < 2e-5
