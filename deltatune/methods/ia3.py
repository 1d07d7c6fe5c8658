"""IA3: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning (Liu et al.,
NeurIPS 2022). https://arxiv.org/abs/2205.05638

Learned vectors, initialised to ones, rescale the keys, the values and the FFN's intermediate activation::

    k = l_k * (x W_k^T + b_k)       v = l_v * (x W_v^T + b_v)       y = (l_ff * h) W_2^T + b_2

so they merge exactly into those linears: the k and v projections' output rows (weight and bias) are scaled,
``W_k'[i] = l_k[i] W_k[i]``, ``b_k' = l_k * b_k``; the FFN's second linear gets its input columns scaled,
``W_2'[:, j] = l_ff[j] W_2[:, j]``. On a fused qkv projection (timm's ``attn.qkv``) only the k and v thirds are
scaled: the q rows keep a fixed scale of one and store no vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from deltatune._layers import features, linear_types, out_in
from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.numerics import round_to
from deltatune.registry import register
from deltatune.targeting import Targets, candidates, family, find_sites, innermost, is_delta, matches, set_module


@dataclass(frozen=True)
class Preset:
    """A family's IA3 sites: all of them, which are FFN second linears, which are fused qkv, which to leave out."""

    targets: Targets
    feedforward: Targets = ()
    fused_qkv: Targets = ()
    exclude: Targets | None = None


_TIMM = Preset(["attn.qkv", "mlp.fc2"], ["mlp.fc2"], ["attn.qkv"])
# HF BERT-like: the FFN's second linear is `layer.N.output.dense`; `attention.output.dense` (the attention's
# output projection) also ends in "output.dense" and is not an IA3 site (peft's default list picks it up too).
_BERT = Preset(["key", "value", "output.dense"], ["output.dense"], exclude=["attention.output.dense"])
PRESETS: dict[str, Preset] = {
    "vit": _TIMM,
    "swin": _TIMM,
    "bert": _BERT,
    "hf-vit": Preset(  # transformers 4.x (key, value, output.dense) and 5.x (k_proj, v_proj, mlp.fc2) layouts
        ["key", "value", "output.dense", "attention.k_proj", "attention.v_proj", "mlp.fc2"],
        ["output.dense", "mlp.fc2"],
        exclude=["attention.output.dense"],
    ),
    "llama": Preset(["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": Preset(["attn.c_attn", "mlp.c_proj"], ["mlp.c_proj"], ["attn.c_attn"]),  # Conv1D; c_attn is fused qkv
    "t5": Preset(["k", "v", "wo"], ["wo"]),
}


@register("ia3")
@dataclass
class IA3Config:
    """IA3: learned vectors (ones at init) scale keys, values and the FFN's intermediate activation; merges."""

    target_modules: Targets | None = None
    """Sites: a regex over whole names, or a list of names/suffixes. Default: the family's k, v and FFN-out linears."""
    feedforward_modules: Targets | None = None
    """Sites whose input is scaled (the FFN's second linear); the others get their output scaled. Default: the
    family's (timm: mlp.fc2, BERT: output.dense, Llama: down_proj)."""
    fused_qkv_modules: Targets | None = None
    """Sites that are fused q/k/v projections: only their k and v thirds are scaled. Default: timm's attn.qkv."""
    exclude_modules: Targets | None = None
    """Sites to leave out (wins over target_modules). Default: the family's (BERT: attention.output.dense)."""

    mergeable: ClassVar[bool] = True
    families: ClassVar[frozenset[str] | None] = frozenset(PRESETS)
    name: ClassVar[str]

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps every site in an ``IA3`` module scaling its output, its k/v thirds, or its input."""
        preset = _preset(model)
        if self.target_modules is None and preset is None:
            raise DeltaTuneError(
                f"ia3: no preset for {type(model).__name__} (presets: {', '.join(sorted(PRESETS))}); IA3 scales the "
                f"keys, values and FFN inputs of attention blocks: pass target_modules=[...] and "
                f"feedforward_modules=[...] naming them, e.g. among {candidates(model, (nn.Linear,))}"
            )
        preset = preset or Preset(())
        targets = _or(self.target_modules, preset.targets)
        sites = find_sites(model, self.name, targets, linear_types(), _or(self.exclude_modules, preset.exclude), skip)
        feedforward = _or(self.feedforward_modules, preset.feedforward)
        fused = _or(self.fused_qkv_modules, preset.fused_qkv)
        for name, module in sites:
            set_module(model, name, IA3(module, _mode(name, innermost(module), feedforward, fused)))
        return Applied([n for n, _ in sites])


def _or(given: Targets | None, default: Targets | None) -> Targets | None:
    """The user's value if given, else the preset's."""
    return given if given is not None else default


def _preset(model: nn.Module) -> Preset | None:
    """The model's preset; HF models that targeting groups in no family (Llama) are looked up by model_type."""
    key = family(model) or getattr(getattr(model, "config", None), "model_type", None)
    return PRESETS.get(key) if isinstance(key, str) else None


def _mode(name: str, layer: nn.Module, feedforward: Targets, fused: Targets) -> str:
    """What the site scales: "input" (FFN), "kv" (fused qkv: k and v thirds of the output) or "output"."""
    is_ff, is_fused = matches(name, feedforward), matches(name, fused)
    if is_ff and is_fused:
        raise DeltaTuneError(f"ia3: {name} is both a feedforward and a fused qkv module; name it in only one")
    if is_fused and features(layer)[1] % 3:
        raise DeltaTuneError(
            f"ia3: fused_qkv_modules needs fused qkv layers (out_features divisible by 3); {name} has "
            f"{features(layer)[1]}; leave it out of fused_qkv_modules"
        )
    return "input" if is_ff else "kv" if is_fused else "output"


class IA3(nn.Module):
    """Wraps a Linear or Conv1D: a learned vector scales its input (FFN), its output, or a fused qkv's k and v."""

    delta_method = "ia3"

    def __init__(self, base: nn.Module, mode: str):
        super().__init__()
        self.base, self.delta_stage, self.mode, self.merged = base, None, mode, False
        layer = innermost(base)
        n_in, out = features(layer)
        size = {"input": n_in, "output": out, "kv": 2 * out // 3}[mode]
        w = layer.weight
        self.ia3_scale = nn.Parameter(torch.ones(size, device=w.device, dtype=w.dtype))

    def scale(self) -> Tensor:
        """The full scale vector over the scaled dim: ones on the q third of a fused qkv."""
        if self.mode != "kv":
            return self.ia3_scale
        return torch.cat([self.ia3_scale.new_ones(self.ia3_scale.numel() // 2), self.ia3_scale])

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if self.mode == "input":
            return self.base(x * self.ia3_scale)  # (..., in)
        return self.base(x) * self.scale()  # (..., out)

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.ia3_scale]

    @torch.no_grad()
    def merge(self) -> nn.Module | None:
        """Folds the scale into the base layer once (float64, rounded once) and returns it; a repeat is a no-op."""
        if is_delta(self.base):
            return None
        if not self.merged:
            layer, scale, weight = self.base, self.scale().detach(), out_in(self.base)  # (out, in); Conv1D: a view
            if self.mode == "input":
                weight.copy_(scaled(weight, scale, dim=1))  # input columns; the bias is unchanged
            else:
                weight.copy_(scaled(weight, scale, dim=0))  # output rows and their biases
                if layer.bias is not None:
                    layer.bias.copy_(scaled(layer.bias, scale, dim=0))
            self.merged = True
        return self.base


def scaled(tensor: Tensor, scale: Tensor, dim: int) -> Tensor:
    """``tensor * scale`` along ``dim``, computed in float64 and rounded once to the tensor's dtype."""
    shape = [1] * tensor.ndim
    shape[dim] = -1
    return round_to(tensor.double() * scale.double().view(shape), tensor.dtype)
