"""Fast paths against the plain formulas: outputs and gradients (of x and every delta), saved bytes, compile."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import BACKBONES, make_backbone, make_input, perturb_deltas, rel_err, run
from torch import Tensor, nn

import deltatune
from deltatune import kernels
from deltatune.bench.measure import count_saved
from deltatune.kernels import lora as fast_lora
from deltatune.kernels import ssf as fast
from deltatune.methods.lora import LoRALinear
from deltatune.methods.ssf import SSF


def _frozen(layer: nn.Module) -> nn.Module:
    return layer.requires_grad_(False)


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "ssf-linear": lambda: SSF(_frozen(nn.Linear(12, 18))),
    "ssf-linear-nobias": lambda: SSF(_frozen(nn.Linear(12, 18, bias=False))),
    "ssf-layernorm": lambda: SSF(_frozen(nn.LayerNorm(12))),
    "ssf-layernorm-noaffine": lambda: SSF(nn.LayerNorm(12, elementwise_affine=False)),
    "ssf-timm-layernorm": lambda: SSF(_frozen(timm.layers.LayerNorm(12))),
    "lora-linear": lambda: LoRALinear(_frozen(nn.Linear(12, 18)), 3, 6.0, 0.0, ([0], 1)),
    "lora-qv": lambda: LoRALinear(_frozen(nn.Linear(12, 18)), 2, 4.0, 0.0, ([0, 2], 3)),
    "lora-k-nobias": lambda: LoRALinear(_frozen(nn.Linear(12, 18, bias=False)), 2, 2.0, 0.0, ([1], 3)),
}
FAST_NODES = {"ssf-linear": "SSFLinearFn", "ssf-layernorm": "LayerNorm", "ssf-timm": "LayerNorm", "lora": "LoRALinear"}


def _perturbed(layer: nn.Module) -> nn.Module:
    """Deltas moved off their init (LoRA's B starts at zero): SSF scales ~ N(1, 0.2), the rest ~ N(0, 0.2)."""
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if p.requires_grad:
                p.normal_(1.0 if n.endswith("scale") else 0.0, 0.2)
    return layer


def _layer(name: str, train_bias: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = _perturbed(LAYERS[name]())
    bias = getattr(layer.base, "bias", None)
    if train_bias and bias is not None:
        bias.requires_grad_(True)  # BitFit combined with the delta
    return layer


def _grads(model: nn.Module, x: Tensor | dict, call: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Output, and the gradients of x (if it requires grad) and of every trainable tensor, for a fixed loss."""
    for p in model.parameters():
        p.grad = None
    if isinstance(x, Tensor):
        x = x.detach().requires_grad_(x.requires_grad)
    out = run(call if call is not None else model, x)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(x, Tensor) and x.requires_grad:
        grads["x"] = x.grad
    return out.detach(), grads


def _compare(model: nn.Module, x: Tensor | dict, tol: float = 2e-5) -> None:
    """Fast vs plain: outputs and gradients within ``tol`` relative to each tensor's size (or to 1e-2 of the
    largest gradient, for gradients that are zero up to rounding, such as a shift before a mean over channels)."""
    out, grads = _grads(model, x)
    with kernels.disabled():
        ref, ref_grads = _grads(model, x)
    assert rel_err(out, ref) < tol
    assert grads.keys() == ref_grads.keys() and grads
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for name, g in grads.items():
        assert g is not None, name
        size = max(ref_grads[name].abs().max().item(), 1e-2 * largest)
        assert (g - ref_grads[name]).abs().max().item() < tol * size, name


@pytest.mark.parametrize("train_bias", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12)])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_fast_path_matches_plain(name: str, shape: tuple[int, ...], x_grad: bool, train_bias: bool) -> None:
    layer = _layer(name, train_bias)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).requires_grad_(x_grad)
    _compare(layer, x)
    node = layer(x).grad_fn.name()
    expected = next(v for k, v in FAST_NODES.items() if name.startswith(k))
    assert expected in node, node  # the fast path ran, not the fallback


@pytest.mark.parametrize("name", list(LAYERS))
def test_inference_path_matches_plain(name: str) -> None:
    layer = _layer(name, False)
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        out = layer(x)
        with kernels.disabled():
            assert rel_err(out, layer(x)) < 1e-5


def test_fallbacks_keep_the_plain_path() -> None:
    ssf = SSF(nn.Linear(12, 18))  # base weight trainable: no fold (its gradient needs the input)
    assert "Addcmul" in ssf(torch.randn(2, 12)).grad_fn.name()
    lora = LoRALinear(_frozen(nn.Linear(12, 18)), 2, 2.0, 0.5, ([0], 1)).train()  # dropout changes the input
    assert "LoRALinearFn" not in lora(torch.randn(2, 12)).grad_fn.name()
    nested = _perturbed(SSF(LoRALinear(_frozen(nn.Linear(12, 18)), 2, 2.0, 0.0, ([0], 1))))  # LoRA fast inside
    assert "Addcmul" in nested(torch.randn(2, 12)).grad_fn.name()
    _compare(nested, torch.randn(2, 3, 12))


METHODS = {"ssf": {}, "lora": {}, "lora-all": {"target_modules": "all-linear"}, "bitfit": {}, "adapter": {}}


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("method", list(METHODS))
def test_model_fast_path_matches_plain(method: str, kind: str) -> None:
    model = deltatune.apply(make_backbone(kind), method.split("-")[0], **METHODS[method])
    perturb_deltas(model)
    _compare(model, make_input(kind))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@torch.no_grad()  # as in a backward without create_graph
def test_column_sums_are_one_pass_and_exact(dtype: torch.dtype) -> None:
    """On CPU both column sums are one op (batch norm's backward reduction: no activation-sized temporary, 7% of an
    SSF step before), equal to float64 sums of the same values to float32 precision, accumulated in float32 for
    bf16/fp16 (float64 stays float64); strided and broadcast gradients (a sum's backward) are read right."""
    dy, y = torch.randn(1600, 1152).to(dtype), torch.randn(1600, 1152).to(dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dsum, dot = fast.column_sums(dy, y)
    free = {"aten::to", "aten::promote_types", "aten::slice", "aten::empty", "aten::t", "aten::zeros", "aten::ones"}
    ops = [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    assert [n for n in ops if n not in free] == ["aten::native_batch_norm_backward"], ops
    assert dsum.dtype == dot.dtype == torch.promote_types(dtype, torch.float32)
    assert rel_err(dsum.double(), dy.double().sum(0)) < 1e-5
    assert rel_err(dot.double(), (dy.double() * y.double()).sum(0)) < 1e-5
    assert fast.column_sums(dy, None)[1] is None
    small = torch.randn(50, 8)
    for grad in (torch.ones(1, 1).expand(50, 8), torch.randn(8, 50).t(), torch.randn(50, 16)[:, ::2]):
        dsum, dot = fast.column_sums(grad, small)
        assert rel_err(dot.double(), (grad.double() * small.double()).sum(0)) < 1e-6
        assert rel_err(dsum.double(), grad.double().sum(0)) < 1e-6
    empty = fast.column_sums(torch.randn(0, 8), torch.randn(0, 8))
    assert all(t.shape == (8,) and not t.any() for t in empty)


@torch.no_grad()  # as in a backward without create_graph
def test_column_sums_falls_back_when_it_cannot_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU (here: meta tensors) the compiled reduction runs; a compiler failure warns once, then plain sums."""

    def broken() -> Callable[..., Any]:
        def fail(*args: Any) -> Any:
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(fast, "_column_sums_compiled", broken)
    monkeypatch.setattr(fast, "_compile_failed", [])
    dy, y = torch.randn(6, 3), torch.randn(6, 3)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        dsum, dot = fast.column_sums(dy.to("meta"), y.to("meta"))
    assert dsum.shape == dot.shape == (3,) and fast._compile_failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        fast.column_sums(dy.to("meta"), y.to("meta"))


@pytest.mark.slow
def test_column_sums_compiled_helper() -> None:
    """The compiled reduction that CUDA uses in eager mode, checked on CPU."""
    dy, y = torch.randn(50, 8), torch.randn(50, 8)
    dsum, dot = fast._column_sums_compiled()(dy, y)
    assert rel_err(dsum, dy.sum(0)) < 1e-5 and rel_err(dot, (dy * y).sum(0)) < 1e-5


def test_folded_ssf_saves_less_than_the_obvious_one() -> None:
    """Activation bytes saved for backward, as ratios to the floor (all frozen, input grad), on the tiny ViT."""
    x = make_input("vit")
    floor = make_backbone("vit").requires_grad_(False)
    floor_bytes = count_saved(floor, x.clone().requires_grad_()).bytes
    model = deltatune.apply(make_backbone("vit"), "ssf")
    folded = count_saved(model, x).bytes / floor_bytes
    with kernels.disabled():
        obvious = count_saved(model, x).bytes / floor_bytes
    assert folded < 1.2 and obvious > 1.6  # measured 1.10 and 1.82
    lora = deltatune.apply(make_backbone("vit"), "lora", target_modules="all-linear")
    fused = count_saved(lora, x).bytes
    with kernels.disabled():
        assert fused <= count_saved(lora, x).bytes  # keeps x, not also x A^T


@pytest.mark.parametrize("kind", ["vit", "mixer", "bert"])
def test_lora_recomputing_its_input_matches_and_keeps_less(kind: str) -> None:
    """x recomputed from what its LayerNorm/GELU producer keeps: same gradients, fewer bytes kept."""
    model = deltatune.apply(make_backbone(kind), "lora", target_modules="all-linear")
    perturb_deltas(model)
    x = make_input(kind)
    args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
    with kernels.recompute_inputs(True):
        _compare(model, x)
        recomputed = count_saved(model, *args, **kwargs).bytes
    with kernels.recompute_inputs(False):
        kept = count_saved(model, *args, **kwargs).bytes
    assert recomputed < 0.9 * kept


def test_input_recipes() -> None:
    """Each recipe gives its producer's output again: every LayerNorm affine variant (weight and bias, one of them,
    none) and GELU, also for rows far from zero (a large common offset), where ``x rstd - mean rstd`` would cancel."""
    x = torch.randn(3, 8, requires_grad=True)
    far = (torch.randn(3, 8) + 1000.0).requires_grad_()
    affine = [nn.LayerNorm(8), nn.LayerNorm(8, bias=False)]
    for ln in affine:
        nn.init.normal_(ln.weight)
    outputs = [F.layer_norm(x, (8,), bias=torch.randn(8)), F.layer_norm(x, (8,)), nn.GELU(approximate="tanh")(x)]
    for y in [*(ln(v) for ln in affine for v in (x, far)), *outputs, F.layer_norm(far, (8,)), F.gelu(x)]:
        kind, arg, saved = fast_lora.input_recipe(y)
        for grad in (False, True):  # a backward's (in place) and a double backward's (differentiable)
            with torch.set_grad_enabled(grad):
                assert torch.allclose(fast_lora.recompute(kind, arg, tuple(saved)), y, atol=1e-6, rtol=0)
    assert fast_lora.input_recipe(x) is None and fast_lora.input_recipe(affine[0](x)[1:]) is None


@pytest.mark.parametrize("method", ["ssf", "lora-all", "adapter"])
def test_compiles_without_graph_breaks(method: str) -> None:
    model = deltatune.apply(make_backbone("vit"), method.split("-")[0], **METHODS[method])
    perturb_deltas(model)
    x = make_input("vit")
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # traces forward and backward
    out, grads = _grads(model, x, compiled)
    ref, ref_grads = _grads(model, x)
    assert rel_err(out, ref) < 1e-5
    assert all(rel_err(grads[n], ref_grads[n]) < 1e-5 for n in ref_grads)


def test_compiled_ssf_keeps_no_scaled_weights() -> None:
    """Traced, the folded SSF's backward scales dy, so no scaled copy of a weight is kept from the forward."""
    model = deltatune.apply(make_backbone("vit"), "ssf")
    x = make_input("vit")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    weights = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes: list[tuple[int, ...]] = []

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in params:  # the weights themselves are kept anyway
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compiled(x)
    assert shapes and not weights & set(shapes)


@pytest.mark.parametrize("name", ["ssf-linear", "lora-qv"])
def test_bf16_autocast_close_to_plain(name: str) -> None:
    layer = _layer(name, False)
    x = torch.randn(4, 6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(layer, x)
        with kernels.disabled():
            ref, ref_grads = _grads(layer, x)
    assert rel_err(out.float(), ref.float()) < 3e-2
    for n, g in grads.items():
        assert g.dtype == torch.float32 and rel_err(g, ref_grads[n]) < 5e-2, n


SCALES = [1.0, 1e-2, 1e-4, 1e-6, 0.0, "boundary"]  # boundary: |shift| = SAFE_SHIFT_RATIO * |scale|, still folded


def _ssf_case(scale: float | str) -> tuple[SSF, Tensor, Tensor]:
    """A frozen Linear under SSF with every scale near ``scale``, an input and an output gradient."""
    g = torch.Generator().manual_seed(0)
    wrapped = SSF(_frozen(nn.Linear(24, 16)))
    with torch.no_grad():
        value = 0.08 if scale == "boundary" else float(scale)
        wrapped.ssf_scale.copy_(value * (1 + 0.02 * torch.randn(16, generator=g)))
        wrapped.ssf_shift.copy_(0.02 * torch.randn(16, generator=g))
        if scale == "boundary":
            wrapped.ssf_shift.copy_(wrapped.ssf_scale.abs() * fast.SAFE_SHIFT_RATIO * wrapped.ssf_shift.sign())
    return wrapped, torch.randn(4, 32, 24, generator=g), torch.randn(4, 32, 16, generator=g)


def _float64_grads(wrapped: SSF, x: Tensor, dy: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Gradients of y = (x W^T + b) * scale + shift in float64, and each scale gradient's sum of |terms|."""
    lin = wrapped.base
    s, t = (p.detach().double().requires_grad_() for p in (wrapped.ssf_scale, wrapped.ssf_shift))
    x64 = x.double().requires_grad_()
    y0 = F.linear(x64, lin.weight.double(), lin.bias.double())
    (y0 * s + t).backward(dy.double())
    size = (dy.double() * y0).abs().sum((0, 1)).detach()  # the scale of sum(dy * y0): float32 errs relative to it
    return {"x": x64.grad, "scale": s.grad, "shift": t.grad}, size


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_ssf_gradients_exact_at_any_scale(scale: float | str, compiled: bool) -> None:
    """The folded SSF's gradients equal the plain formula's (float64 here) to float32 precision, scale -> 0 included."""
    wrapped, x, dy = _ssf_case(scale)
    ref, size = _float64_grads(wrapped, x, dy)
    call = torch.compile(wrapped, backend="aot_eager", fullgraph=True) if compiled else wrapped
    x = x.clone().requires_grad_()
    out = call(x)
    if not compiled and scale in (1.0, "boundary"):
        assert type(out.grad_fn).__name__ == "SSFLinearFnBackward"  # the fast path is what is checked here
    out.backward(dy)
    got = {"x": x.grad, "scale": wrapped.ssf_scale.grad, "shift": wrapped.ssf_shift.grad}
    assert ((got["scale"].double() - ref["scale"]).abs() <= 1e-5 * size).all()
    for name in ("x", "shift"):
        assert rel_err(got[name].double(), ref[name]) < 1e-5, name


def test_fast_path_switches_are_per_thread() -> None:
    """``kernels.disabled()`` and ``recompute_inputs`` in one thread leave another thread's fast paths as they were."""
    import threading

    seen: list[bool] = []
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait(5)
        seen.append(kernels.is_enabled())
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with kernels.disabled(), kernels.recompute_inputs(True):
        inside.set()
        done.wait(5)
        assert not kernels.is_enabled()
    thread.join()
    assert seen == [True] and kernels.is_enabled()


def _floor_ratio(model: nn.Module, x: Tensor) -> float:
    """Activation bytes one forward saves for backward, over the floor's (the backbone frozen, the input grad)."""
    floor = make_backbone("vit").requires_grad_(False)
    return count_saved(model, x).bytes / count_saved(floor, x.clone().requires_grad_()).bytes


DEFAULTS = {"ssf": ("ssf", {}), "lora-all": ("lora", {"target_modules": "all-linear"}), "adapter": ("adapter", {})}


@pytest.mark.parametrize("method", list(DEFAULTS))
def test_default_keeps_no_more_than_the_floor(method: str) -> None:
    """Default settings (the bench's): SSF's LayerNorms after residual adds keep the addends, LoRA recomputes its
    LayerNorm/GELU input, the adapter keeps the base's input instead of its output. On the tiny ViT they keep 0.97,
    0.87 and 0.82x the floor's bytes (before: 1.10, 1.31, 0.99)."""
    name, options = DEFAULTS[method]
    model = deltatune.apply(make_backbone("vit"), name, **options)
    x = make_input("vit")
    ratio = _floor_ratio(model, x)
    with kernels.disabled():
        plain = _floor_ratio(model, x)
    assert ratio <= 1.05 and ratio < 0.9 * plain, (ratio, plain)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("method", list(DEFAULTS))
def test_default_gradients_match_float64(method: str, amp: bool) -> None:
    """The default paths' outputs and gradients against the plain formulas run in float64 (and under bf16 autocast)."""
    name, options = DEFAULTS[method]
    model = deltatune.apply(make_backbone("vit"), name, **options)
    perturb_deltas(model)
    x = make_input("vit")
    reference = copy.deepcopy(model).double()
    with kernels.disabled():
        ref, ref_grads = _grads(reference, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out, grads = _grads(model, x)
    tol = 5e-2 if amp else 1e-5
    assert rel_err(out.double(), ref) < tol
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert g.dtype == torch.float32 and rel_err(g.double(), ref_grads[n]) < tol, n



@pytest.mark.parametrize("name", ["lora-linear", "lora-qv"])
def test_lora_input_gradient_is_contiguous(name: str) -> None:
    """dx reaches the producer's backward (GELU's, LayerNorm's) contiguous: a view with strided rows (dy B riding
    along dx's matmul as extra columns, before) halves their speed. Values as the float64 plain formula's."""
    layer = _layer(name, False)
    leaf = torch.randn(4, 6, 12, requires_grad=True)
    x = leaf * 1.0  # a producer whose gradient hook sees dx as LoRA hands it over
    seen: list[Tensor] = []
    x.register_hook(seen.append)
    layer(x).backward(torch.ones(4, 6, 18))
    assert seen[0].is_contiguous()
    reference = copy.deepcopy(layer).double()
    x64 = leaf.detach().double().requires_grad_()
    with kernels.disabled():
        reference(x64).backward(torch.ones(4, 6, 18, dtype=torch.float64))
    assert rel_err(leaf.grad.double(), x64.grad) < 1e-6
