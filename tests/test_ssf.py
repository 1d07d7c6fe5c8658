"""SSF: the paper's parameter counts (closed forms), the fold formula, sites on every backbone, and the LayerNorm
after a residual add that keeps the addends (``kernels/residual.py``)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from test_fast import _frozen, _grads, _perturbed
from torch import Tensor, nn

import deltatune
from deltatune import kernels
from deltatune.bench.measure import count_saved
from deltatune.methods.ssf import SSF, fold


def ssf_vit(c: int, depth: int, mlp: int) -> int:
    """norm1, qkv (3C), proj, norm2, fc1 (mlp), fc2 per block; patch embed; final norm: 2 params a channel."""
    return 2 * (depth * (c + 3 * c + c + c + mlp + c) + c + c)


def ssf_swin(c: int, depths: tuple[int, ...]) -> int:
    """Blocks (11C each), patch embed proj + norm, patch-merging norms (4C), final norm."""
    dims = [c * 2**i for i in range(len(depths))]
    blocks = sum(d * 11 * dim for d, dim in zip(depths, dims))
    merging = sum(4 * dim for dim in dims[:-1])
    return 2 * (blocks + 2 * c + merging + dims[-1])


def ssf_convnext(dims: tuple[int, ...], depths: tuple[int, ...]) -> int:
    """Blocks (conv_dw, norm, fc1 4C, fc2: 7C), stem conv + norm, downsample norm + conv, head norm."""
    blocks = sum(d * 7 * dim for d, dim in zip(depths, dims))
    down = sum(a + b for a, b in zip(dims[:-1], dims[1:]))
    return 2 * (blocks + 2 * dims[0] + down + dims[-1])


def ssf_count(model: nn.Module) -> int:
    deltatune.apply(model, "ssf", head=False)
    return deltatune.trainable_parameters(model)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("vit_base_patch16_224", 205_824),
        ("swin_base_patch4_window7_224", 274_432),
        ("convnext_base", 260_608),
    ],
)
def test_paper_counts_on_base_models(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert ssf_count(model) == expected


def test_vit_b16_with_100_class_head_and_file_size(tmp_path) -> None:
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", num_classes=100)
    deltatune.apply(model, "ssf")
    assert deltatune.trainable_parameters(model) == 282_724
    model.to_empty(device="cpu")
    assert deltatune.save_delta(model, tmp_path / "ssf.safetensors") < 1.2e6


@pytest.mark.parametrize(
    "name,kw,formula",
    [
        ("vit_small_patch16_224", {}, lambda: ssf_vit(384, 12, 1536)),
        ("swin_tiny_patch4_window7_224", {}, lambda: ssf_swin(96, (2, 2, 6, 2))),
        ("convnext_tiny", {}, lambda: ssf_convnext((96, 192, 384, 768), (3, 3, 9, 3))),
    ],
)
def test_closed_forms_on_other_sizes(name: str, kw: dict, formula) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, **kw)
    assert ssf_count(model) == formula()


def test_mixer_sites_every_linear_and_norm() -> None:
    model = make_backbone("mixer")  # 2 blocks, C=32, 16 patches, token MLP 16, channel MLP 128
    tokens_hidden, patches, c = 16, 16, 32
    per_block = c + tokens_hidden + patches + c + 4 * c + c
    assert ssf_count(model) == 2 * (2 * per_block + c + c)


def test_sites_on_tiny_backbones_are_all_linear_conv_norm_but_head() -> None:
    model = deltatune.apply(make_backbone("swin"), "ssf")
    wrapped = {n for n, m in model.named_modules() if isinstance(m, SSF)}
    assert "head.fc" not in wrapped and "layers.1.downsample.reduction" not in wrapped
    assert {"patch_embed.proj", "patch_embed.norm", "layers.1.downsample.norm", "norm"} <= wrapped
    assert "layers.0.blocks.1.attn.qkv" in wrapped


def test_init_distribution_and_identity_with_zero_std() -> None:
    torch.manual_seed(0)
    with torch.device("meta"):
        pass
    model = deltatune.apply(make_backbone("vit"), "ssf")
    scales = torch.cat([m.ssf_scale for m in model.modules() if isinstance(m, SSF)])
    shifts = torch.cat([m.ssf_shift for m in model.modules() if isinstance(m, SSF)])
    assert abs(scales.mean().item() - 1) < 0.005 and abs(scales.std().item() - 0.02) < 0.003
    assert abs(shifts.mean().item()) < 0.005 and abs(shifts.std().item() - 0.02) < 0.003
    x = make_input("vit")
    plain = make_backbone("vit")
    tuned = deltatune.apply(make_backbone("vit"), "ssf", init_std=0.0)
    with torch.no_grad():
        assert torch.equal(run(tuned, x), run(plain, x))


@pytest.mark.parametrize(
    "layer,x",
    [
        (nn.Linear(6, 5), torch.randn(3, 4, 6)),
        (nn.Linear(6, 5, bias=False), torch.randn(3, 6)),
        (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)),
        (nn.Conv2d(6, 6, 3, groups=6, padding=1), torch.randn(2, 6, 5, 5)),  # depthwise
        (nn.LayerNorm(6), torch.randn(3, 6)),
        (nn.LayerNorm(6, elementwise_affine=False), torch.randn(3, 6)),
        (nn.BatchNorm2d(6).eval(), torch.randn(2, 6, 3, 3)),
        (nn.GroupNorm(2, 6), torch.randn(2, 6, 3, 3)),
        (timm.layers.LayerNorm2d(6), torch.randn(2, 6, 3, 3)),
    ],
)
def test_fold_against_float64_reference(layer: nn.Module, x: torch.Tensor) -> None:
    """The merged layer equals y * scale + shift computed in float64 from the unmerged layer."""
    torch.manual_seed(0)
    wrapped = SSF(layer, init_std=0.3)
    with torch.no_grad():
        dim = wrapped.dim % x.ndim
        shape = [-1 if i == dim else 1 for i in range(x.ndim)]
        ref = layer.double()(x.double()) * wrapped.ssf_scale.double().view(shape) + wrapped.ssf_shift.double().view(
            shape
        )
        layer.float()
        merged = wrapped.merge()
        assert merged is layer
        assert rel_err(merged(x).double(), ref) < 1e-6


def test_fold_rounds_once_from_float64() -> None:
    layer = nn.Linear(4, 3).to(torch.bfloat16)
    w64, b64 = layer.weight.double().clone(), layer.bias.double().clone()
    scale, shift = torch.tensor([1.1, 0.9, 1.3]), torch.tensor([0.1, -0.2, 0.3])
    fold(layer, scale, shift)
    assert torch.equal(layer.weight, (w64 * scale.double()[:, None]).to(torch.bfloat16))
    assert torch.equal(layer.bias, (b64 * scale.double() + shift.double()).to(torch.bfloat16))


NORM_ACT = [  # (layer, input, its norm written out, channel dim)
    (
        timm.layers.BatchNormAct2d(6, act_layer=nn.ReLU),
        torch.randn(2, 6, 3, 3),
        lambda m, x: F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps),
    ),
    (
        timm.layers.GroupNormAct(6, 2, act_layer=nn.SiLU),
        torch.randn(2, 6, 3, 3),
        lambda m, x: F.group_norm(x, 2, m.weight, m.bias, m.eps),
    ),
    (
        timm.layers.LayerNormAct(6, act_layer=nn.GELU),
        torch.randn(3, 4, 6),
        lambda m, x: F.layer_norm(x, (6,), m.weight, m.bias, m.eps),
    ),
    (
        timm.layers.LayerNormAct2d(6, act_layer=nn.GELU),
        torch.randn(2, 6, 3, 3),
        lambda m, x: F.layer_norm(x.permute(0, 2, 3, 1), (6,), m.weight, m.bias, m.eps).permute(0, 3, 1, 2),
    ),
]


@pytest.mark.parametrize("layer,x,norm", NORM_ACT, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_norm_act_layers_scale_between_norm_and_act(layer: nn.Module, x: torch.Tensor, norm) -> None:
    """On a norm with a built-in activation SSF is act(norm(x) * scale + shift), and the merge equals it."""
    torch.manual_seed(0)
    layer.eval()
    with torch.no_grad():
        for p in [*layer.parameters(), *layer.buffers()]:
            if p.is_floating_point():
                p.uniform_(0.5, 1.5)
    wrapped = SSF(layer, init_std=0.3)
    shape = [-1 if i == wrapped.dim % x.ndim else 1 for i in range(x.ndim)]
    with torch.no_grad():
        want = layer.act(norm(layer, x) * wrapped.ssf_scale.view(shape) + wrapped.ssf_shift.view(shape))
        assert rel_err(wrapped(x), want) < 1e-6
        assert rel_err(wrapped.merge()(x), want) < 1e-5


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002"])
def test_merge_exact_on_norm_act_backbones(name: str) -> None:
    """EfficientNet, MobileNetV3 and RegNet put their activations inside BatchNormAct2d: merged == unmerged."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).eval()
    deltatune.apply(model, "ssf")
    assert any(m.norm_act for m in model.modules() if isinstance(m, SSF))
    perturb_deltas(model, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = run(model, x)
        got = run(deltatune.merge(model), x)
    assert rel_err(got, want) < 1e-5


class _PreNormBlock(nn.Module):
    """``t = x + proj(norm1(x)) * gain; norm2(t)``: a pre-norm residual add feeding a LayerNorm, all SSF-wrapped."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = SSF(_frozen(nn.LayerNorm(12))), SSF(_frozen(nn.LayerNorm(12)))
        self.proj, self.gain = SSF(_frozen(nn.Linear(12, 12))), gain

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(self.norm1(x))
        return self.norm2(x + y if self.gain == 1 else x + y * self.gain)


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_layer_norm_after_a_residual_add_keeps_the_addends(gain: float) -> None:
    """The second LayerNorm keeps x and the projection's output (kept anyway), not their sum; gradients as float64's.
    A scaled addend (gain 0.5, a layer scale) is no such sum: the plain LayerNorm runs."""
    block = _perturbed(_PreNormBlock(gain))
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(3)).requires_grad_()
    fused = type(block(x).grad_fn).__name__ == "ResidualLayerNormFnBackward"
    assert fused == (gain == 1.0) and type(block(x * 1).grad_fn).__name__ == type(block(x).grad_fn).__name__
    with kernels.disabled():
        ref, ref_grads = _grads(copy.deepcopy(block).double(), x.double())
    out, grads = _grads(block, x)
    assert rel_err(out.double(), ref) < 1e-5 and grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert rel_err(g.double(), ref_grads[n]) < 1e-5, n
    if fused:
        keeps = count_saved(block, x).bytes
        with kernels.disabled():
            assert keeps < count_saved(block, x).bytes


class _ResidualChain(nn.Module):
    """``x = x + proj_i(norm_i(x))`` five times, then a final norm: a chain of residual adds, all SSF-wrapped."""

    def __init__(self, depth: int = 5) -> None:
        super().__init__()
        self.norms = nn.ModuleList(SSF(_frozen(nn.LayerNorm(12))) for _ in range(depth + 1))
        self.projs = nn.ModuleList(SSF(_frozen(nn.Linear(12, 12))) for _ in range(depth))
        self.kept: list[int] = []  # parts each norm's input is kept as (0: the input itself)

    def forward(self, x: Tensor) -> Tensor:
        self.kept.clear()
        for norm, proj in zip(self.norms, self.projs):
            h = norm(x)
            self.kept.append(_parts(h))
            x = x + proj(h)
        out = self.norms[-1](x)
        self.kept.append(_parts(out))
        return out


def _parts(h: Tensor) -> int:
    node = h.grad_fn
    return len(node.saved_tensors) - 4 if type(node).__name__ == "ResidualLayerNormFnBackward" else 0


def test_residual_chain_keeps_the_stream_once_every_few_adds() -> None:
    """Each norm after a residual add keeps the earlier parts and the new addend, up to MAX_TERMS parts, then keeps
    its input and starts again; outputs and gradients as the plain formulas' in float64."""
    from deltatune.kernels import residual

    chain = _perturbed(_ResidualChain())
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(4)).requires_grad_()
    out, grads = _grads(chain, x)
    terms = residual.MAX_TERMS
    assert chain.kept == [0, *range(2, terms + 1), 0, 2][: len(chain.kept)], chain.kept
    with kernels.disabled():
        ref, ref_grads = _grads(copy.deepcopy(chain).double(), x.double())
    assert rel_err(out.double(), ref) < 1e-5 and grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert rel_err(g.double(), ref_grads[n]) < 1e-5, n
