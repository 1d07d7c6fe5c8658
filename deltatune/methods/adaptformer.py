"""AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition (Chen et al., NeurIPS 2022).
https://arxiv.org/abs/2205.13535

A bottleneck branch runs in parallel with every block's MLP and its scaled output is added to the MLP's::

    x = x + attn(norm1(x));   x = x + MLP(norm2(x)) + s * W_up dropout(ReLU(W_down x))        s = 0.1, hidden 64

W_down (h, d) and W_up (d, h) have biases; W_down is kaiming-uniform (the official "lora" init), W_up and the biases
are zeros, so the model's output is unchanged at init. Not mergeable: a ReLU sits between the two matrices.

Where the branch reads its input, by backbone:

- HF BERT: the wrapper sits on the FFN's output module (``BertOutput``), which receives the FFN input
  ``x`` as ``input_tensor``; the branch reads that ``x`` (un-normalised, the official default) and its output joins
  before the residual add (and before BERT's post-LayerNorm), exactly as in the paper's figure.
- timm ViT / Swin / Mixer and HF ViT: the wrapper sits on the MLP and the branch reads the block's residual stream
  ``x``, the input of the MLP's sibling norm (``norm2``; HF ViT ``layernorm_after``), as the official code does
  (``ffn_adapter_layernorm_option="none"``). A forward pre-hook on that norm hands its input to the wrapper, so the
  wrapper stays a leaf and other methods can still target the layers inside the block. The branch's output joins
  the MLP's, so it passes through the block's layer scale and drop-path (identity in plain ViT/Swin at inference;
  the official code adds the branch after the drop-path).
- ConvNeXt ``mlp`` (beyond the paper): there is no residual stream at the MLP's input, so the branch reads the MLP's
  input (the block's normalised depth-wise conv output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.registry import register, require
from deltatune.targeting import Targets, config_sites, family, get_module, innermost, set_module

PRESETS: dict[str, Targets] = {
    "vit": ["mlp"],
    "swin": ["mlp"],
    "convnext": ["mlp"],
    "mixer": ["mlp_channels"],
    "bert": r".*layer\.\d+\.output",
    "hf-vit": r".*layers\.\d+\.mlp",  # transformers 5.x ViT: a timm-like mlp (fc1, fc2)
}
HF_FAMILIES = ("bert",)  # families whose FFN output module takes (intermediate_output, input_tensor)
STREAM_NORMS = ("norm2", "layernorm_after")  # the MLP's sibling norm, whose input is the block's residual stream


@register("adaptformer")
@dataclass
class AdaptFormerConfig:
    """Parallel scaled bottleneck beside every block's MLP (AdaptFormer)."""

    hidden: int = 64
    """Bottleneck width (the paper's default 64 for ViT-B)."""

    families: ClassVar[frozenset[str] | None] = frozenset(PRESETS)
    scale: float = 0.1
    """Fixed scale s of the branch's output."""
    dropout: float = 0.1
    """Dropout on the bottleneck activation (official default 0.1)."""
    target_modules: Targets | None = None
    """MLP modules (timm) or FFN output modules (HF) to wrap. Default: every block's."""
    exclude_modules: Targets | None = None
    """Sites to leave out (wins over target_modules)."""

    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]

    def __post_init__(self) -> None:
        require(self, self.hidden >= 1, "hidden", ">= 1")
        require(self, 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps every MLP (timm) or FFN output module (HF) in an ``AdaptFormer``."""
        sites = config_sites(model, self, PRESETS, (nn.Module,), skip)
        hf = family(model) in HF_FAMILIES
        for name, module in sites:
            wrapper = AdaptFormer(module, _width(name, innermost(module)), self, hf)
            norm = None if hf else _stream_norm(model, name)
            if norm is not None:
                wrapper.tap(norm)
            set_module(model, name, wrapper)
        return Applied([n for n, _ in sites])


def _stream_norm(model: nn.Module, name: str) -> nn.Module | None:
    """The plain norm beside the MLP at ``name`` whose input is the residual stream, or None (e.g. ConvNeXt)."""
    norm = stream_norm_name(model, name)
    # the plain norm: its input is the same whatever wraps it, and it outlives merges
    return None if norm is None else innermost(get_module(model, norm))


def stream_norm_name(model: nn.Module, name: str) -> str | None:
    """The name of the norm beside the MLP at ``name`` whose input is the residual stream, or None."""
    parent_name = name.rpartition(".")[0]
    parent = get_module(model, parent_name) if "." in name else model
    for attr in STREAM_NORMS:
        if isinstance(getattr(parent, attr, None), nn.Module):
            return f"{parent_name}.{attr}" if parent_name else attr
    return None


def _width(name: str, layer: nn.Module) -> int:
    """Channels of the MLP's input/output: its fc2 (timm) or dense (HF) output features."""
    for attr in ("fc2", "dense"):
        sub = getattr(layer, attr, None)
        if isinstance(sub, nn.Module):
            out = innermost(sub)
            if isinstance(out, nn.Linear):
                return out.out_features
    raise DeltaTuneError(f"adaptformer: {name} ({type(layer).__name__}) has no fc2/dense Linear; target MLP modules")


class AdaptFormer(nn.Module):
    """Wraps an MLP (or an HF FFN output module): adds ``s * up(dropout(relu(down(x))))`` of the residual stream."""

    delta_method = "adaptformer"

    def __init__(self, base: nn.Module, d: int, cfg: AdaptFormerConfig, hf_output: bool):
        super().__init__()
        self.base, self.delta_stage = base, None
        self.scale, self.hf_output = cfg.scale, hf_output
        self.tapped, self._stream = False, None  # tapped: the branch reads the input its norm hook hands over
        ref = next(innermost(base).parameters())
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.adaptformer_down = nn.Linear(d, cfg.hidden, **kw)
        self.adaptformer_act = nn.ReLU()
        self.adaptformer_dropout = nn.Dropout(cfg.dropout)
        self.adaptformer_up = nn.Linear(cfg.hidden, d, **kw)
        nn.init.kaiming_uniform_(self.adaptformer_down.weight, a=math.sqrt(5))
        for t in (self.adaptformer_down.bias, self.adaptformer_up.weight, self.adaptformer_up.bias):
            nn.init.zeros_(t)
        self.train(base.training)  # take the mode of the module it replaces

    def branch(self, x: Tensor) -> Tensor:
        """The scaled parallel branch: (..., d) -> (..., d)."""
        h = self.adaptformer_dropout(self.adaptformer_act(self.adaptformer_down(x)))  # (..., hidden)
        return self.adaptformer_up(h) * self.scale

    def tap(self, norm: nn.Module) -> None:
        """Hooks the block's norm so that the branch reads the norm's input, the residual stream."""
        # A bound method (not a closure), so that copy.deepcopy of the model hooks the copied wrapper.
        norm.register_forward_pre_hook(self._take_stream)
        self.tapped = True

    def _take_stream(self, _norm: nn.Module, args: tuple) -> None:
        self._stream = args[0]

    def _branch_input(self, mlp_input: Tensor) -> Tensor:
        if not self.tapped:
            return mlp_input
        x, self._stream = self._stream, None  # consumed: the wrapper keeps no activation after the forward
        if x is None:
            raise DeltaTuneError(
                "adaptformer: the MLP ran without its block's norm2 (the branch reads the norm's input); "
                "call the whole block, or set target_modules to MLPs without a sibling norm2"
            )
        return x

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.hf_output:
            x = self._branch_input(hidden_states)  # the residual stream (un-normalised), as the official code
            return self.base(hidden_states, *args, **kwargs) + self.branch(x)
        # HF FFN output module: forward(intermediate_output, input_tensor) -> [LN](dense(h) + input_tensor)
        if args:
            x, rest = args[0], args[1:]
            return self.base(hidden_states, x + self.branch(x), *rest, **kwargs)
        x = kwargs.pop("input_tensor")
        return self.base(hidden_states, input_tensor=x + self.branch(x), **kwargs)

    def delta_parameters(self) -> list[nn.Parameter]:
        return [*self.adaptformer_down.parameters(), *self.adaptformer_up.parameters()]
