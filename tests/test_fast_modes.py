"""The fast paths under autograd's other modes: second-order gradients (create_graph), torch.func transforms
(vmap/grad: per-sample gradients) and forward-mode AD. The fast paths' Functions are backward-only, so these modes
run the plain formulas (or, for SSF's CPU reduction, its differentiable form); each is checked against the plain
formula computed by autograd, and forward AD also against a float64 central difference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_backbone, make_input, perturb_deltas, rel_err
from torch import Tensor, nn

import deltatune
from deltatune import kernels


def test_second_order_gradients_through_folded_ssf_equal_the_plain_formula() -> None:
    """create_graph=True (gradient penalties, meta-learning) through the folded SSF: the gradient of a penalty on the
    first-order gradients equals the plain formula's in float64 (the one-pass reduction has no such derivative)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)).double()
    model = deltatune.apply(model, "ssf", target_modules=["0", "2"])
    perturb_deltas(model)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)

    def second_order() -> tuple[Tensor, ...]:
        first = torch.autograd.grad(model(x).pow(2).sum(), [*params, x], create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in first), params)

    fast_grads = second_order()
    with kernels.disabled():
        plain_grads = second_order()
    for got, want in zip(fast_grads, plain_grads):
        assert rel_err(got, want) < 1e-12


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback for CPU attention
@pytest.mark.parametrize("method", ["ssf", "lora", "adapter"])
def test_per_sample_gradients_under_torch_func_equal_autograd(method: str) -> None:
    """torch.func's vmap(grad(...)) (per-sample gradients, as DP-SGD takes them) runs the plain formulas, since the fast
    paths' autograd Functions do not support functorch transforms (it raised before); each row equals that example's
    gradient from plain autograd."""
    from torch.func import functional_call, grad, vmap

    options = {"target_modules": "all-linear"} if method == "lora" else {}
    model = deltatune.apply(make_backbone("vit"), method, **options)
    perturb_deltas(model)
    x = make_input("vit")
    target = torch.arange(len(x)) % 4
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def loss(p: dict[str, Tensor], xi: Tensor, ti: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), ti[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    named = dict(model.named_parameters())
    for i in range(len(x)):
        with kernels.disabled():
            one = F.cross_entropy(model(x[i : i + 1]), target[i : i + 1])
        want = torch.autograd.grad(one, [named[k] for k in params])
        for (name, got), ref in zip(per_sample.items(), want):
            assert rel_err(got[i], ref) < 1e-5, (name, i)


@pytest.mark.parametrize("method", ["ssf", "lora", "adapter"])
def test_forward_mode_ad_equals_the_plain_formula(method: str) -> None:
    """Inside a forward-mode AD dual level (jvp without torch.func) the plain formulas run: the output's tangent equals
    the plain formula's (it raised NotImplementedError for the fast paths' backward-only Functions). The MLP-Mixer:
    torch's CPU attention has no forward AD of its own."""
    import torch.autograd.forward_ad as fw

    model = deltatune.apply(make_backbone("mixer"), method)
    perturb_deltas(model)
    x = make_input("mixer")
    tangent = torch.randn_like(x)
    with fw.dual_level():
        got = fw.unpack_dual(model(fw.make_dual(x, tangent))).tangent
    with kernels.disabled(), fw.dual_level():
        want = fw.unpack_dual(model(fw.make_dual(x, tangent))).tangent
    assert rel_err(got, want) < 1e-6
    eps = 1e-3  # and it is the directional derivative: a central difference in float64 agrees
    model64 = copy.deepcopy(model).double()
    with torch.no_grad(), kernels.disabled():
        diff = (model64(x.double() + eps * tangent.double()) - model64(x.double() - eps * tangent.double())) / (2 * eps)
    assert rel_err(got.double(), diff) < 1e-4
