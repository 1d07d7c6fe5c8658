"""Bottleneck adapters (Houlsby et al., ICML 2019, https://arxiv.org/abs/1902.00751), placed as in MiMi
(Marouf et al., WACV 2024, https://arxiv.org/abs/2311.03873): after the attention output and after the MLP
output of every block, before each residual add::

    z -> z + W_up act(W_down z)        W_down (h, d), W_up (d, h), trunc-normal(0.02), no biases by default

The hidden size is ``hidden`` or ``d / sigma`` (Swin: ``4d / sigma``, as MiMi). ``Adapter.resize`` keeps a
subset of hidden neurons, so MiMi pruning really shrinks the matrices; an adapter with no neuron left is
removed. Adapters are not mergeable: a nonlinearity sits between the two matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from deltatune._layers import features, is_conv1d, linear_types
from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.kernels import adapter as fast_adapter
from deltatune.registry import register, require
from deltatune.targeting import Targets, config_sites, family, innermost, set_module

PRESETS: dict[str, Targets] = {
    "vit": ["attn.proj", "mlp.fc2"],
    "swin": ["attn.proj", "mlp.fc2"],
    "convnext": ["mlp.fc2"],
    "mixer": ["mlp_tokens.fc2", "mlp_channels.fc2"],
    "bert": r".*attention\.output\.dense|.*layer\.\d+\.output\.dense",
    "hf-vit": r".*attention\.output\.dense|.*layer\.\d+\.output\.dense|.*attention\.o_proj|.*layers\.\d+\.mlp\.fc2",
    "llama": ["self_attn.o_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "t5": ["SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"],
}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


@register("adapter")
@dataclass
class AdapterConfig:
    """Sequential bottleneck adapter on the attention and MLP outputs, before the residual adds."""

    hidden: int | None = None
    """Hidden size of every adapter; None: d / sigma."""
    sigma: float = 32.0
    """Compression ratio: hidden = d / sigma (Swin: 4d / sigma), at least 1. 32 gives ViT-B/16 hidden 24."""
    act: str = "gelu"
    """Activation between the two matrices: gelu, relu, silu, tanh or identity."""
    bias: bool = False
    """Whether the down and up projections have biases."""
    init_std: float = 0.02
    """Std of the truncated-normal init of both matrices."""
    zero_up: bool = False
    """Zero-initialise W_up so the adapter starts as the identity."""
    target_modules: Targets | None = None
    """Sites: layers whose output the adapter follows. Default: attention output and MLP output projections."""
    exclude_modules: Targets | None = None
    """Sites to leave out (wins over target_modules)."""
    hidden_sizes: dict[str, int] | None = None
    """Per-site hidden sizes after pruning (0: adapter removed); written by ``prune_adapters``."""

    mergeable: ClassVar[bool] = False
    name: ClassVar[str]

    @property
    def identity_at_init(self) -> bool:
        """Whether the model's output is unchanged right after apply: only with a zero-initialised W_up."""
        return self.zero_up

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise DeltaTuneError(f"adapter: unknown act {self.act!r}; choose one of {', '.join(ACTIVATIONS)}")
        require(self, self.hidden is None or self.hidden >= 1, "hidden", ">= 1")
        require(self, self.sigma > 0, "sigma", "> 0")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps every site in an ``Adapter`` (sites pruned to size 0 get none)."""
        sites = config_sites(model, self, PRESETS, (*linear_types(), nn.Conv2d), skip)
        applied = []
        for name, module in sites:
            original = self.original_size(model, module)
            hidden = (self.hidden_sizes or {}).get(name, original)
            if hidden > 0:
                adapter = Adapter(module, hidden, self.act, self.bias, self.init_std, self.zero_up)
                adapter.delta_method, adapter.site, adapter.original_hidden = self.name, name, original
                set_module(model, name, adapter)
                applied.append(name)
        return Applied(applied)

    def original_size(self, model: nn.Module, site: nn.Module) -> int:
        """Hidden size an adapter at ``site`` starts with: ``hidden``, or d / sigma (Swin: 4d / sigma)."""
        mult = 4 if family(model) == "swin" else 1
        return self.hidden or max(1, round(mult * _width(innermost(site)) / self.sigma))


def _width(layer: nn.Module) -> int:
    return features(layer)[1] if isinstance(layer, nn.Linear) or is_conv1d(layer) else layer.out_channels


class Adapter(nn.Module):
    """Wraps a layer: ``y = base(x); y + up(act(down(y)))`` over the channel dim."""

    delta_method = "adapter"

    def __init__(self, base: nn.Module, hidden: int, act: str, bias: bool, init_std: float, zero_up: bool = False):
        super().__init__()
        self.base, self.delta_stage = base, None
        self.site, self.original_hidden = "", hidden  # set by the config: where it sits, its size before pruning
        layer = innermost(base)
        d = _width(layer)
        self.channels_last = not isinstance(layer, nn.Conv2d)  # Linear, Conv1D: (..., d)
        kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        self.adapter_down = nn.Linear(d, hidden, bias=bias, **kw)
        self.adapter_act = ACTIVATIONS[act]()
        self.adapter_up = nn.Linear(hidden, d, bias=bias, **kw)
        for lin in (self.adapter_down, self.adapter_up):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            if bias:
                nn.init.zeros_(lin.bias)
        if zero_up:
            nn.init.zeros_(self.adapter_up.weight)

    @property
    def hidden(self) -> int:
        """Current number of hidden neurons."""
        return self.adapter_down.out_features

    def forward(self, x: Tensor) -> Tensor:
        out = self._infer(x) if self.channels_last else None
        if out is not None:  # inference on a frozen Linear: the up-projection adds into the base's output in place
            return out
        y = self.base(x)
        z = y if self.channels_last else y.movedim(1, -1)  # channels last: (..., d)
        h = fast_adapter.down(self.base, x, y, self.adapter_down) if self.channels_last else None
        h = self.adapter_down(z) if h is None else h  # the fast path keeps x's recipe instead of y
        z = z + self.adapter_up(self.adapter_act(h))
        return z if self.channels_last else z.movedim(-1, 1)

    def _infer(self, x: Tensor) -> Tensor | None:
        return fast_adapter.infer(self.base, x, self.adapter_down, self.adapter_act, self.adapter_up)

    def delta_parameters(self) -> list[nn.Parameter]:
        return [*self.adapter_down.parameters(), *self.adapter_up.parameters()]

    @torch.no_grad()
    def resize(self, keep: Tensor) -> None:
        """Keeps only the hidden neurons at indices ``keep`` (rows of W_down, columns of W_up); ``keep`` non-empty."""
        keep = keep.to(self.adapter_down.weight.device)
        down, up = self.adapter_down, self.adapter_up
        new_down = nn.Linear(down.in_features, len(keep), bias=down.bias is not None).to(down.weight)
        new_up = nn.Linear(len(keep), up.out_features, bias=up.bias is not None).to(up.weight)
        new_down.weight.copy_(down.weight[keep])
        new_up.weight.copy_(up.weight[:, keep])
        if down.bias is not None:
            new_down.bias.copy_(down.bias[keep])
            new_up.bias.copy_(up.bias)
        for new, old in ((new_down, down), (new_up, up)):
            new.requires_grad_(old.weight.requires_grad)
        self.adapter_down, self.adapter_up = new_down, new_up
