"""Checkpoints of the official MiMi code (IemProg/MiMi) loaded as real, shrunk deltatune MiMi adapters.

The official adapter (``ParallelMlp``, type "series") is ``x + fc2(GELU(fc1(x)))`` with no biases, ``fc1.weight``
(h, d) and ``fc2.weight`` (d, h); ``parallel_mlp1`` follows the attention output and ``parallel_mlp2`` the MLP
output, each before its residual add: deltatune's adapter sites ``attn.proj`` and ``mlp.fc2``. The official code
prunes by masking: a pruned neuron is a zero row of ``fc1`` or a zero column of ``fc2`` (or a zero in a
``torch.nn.utils.prune`` ``weight_mask``). Only the surviving neurons are kept here, and an adapter with none left
is not built, so the loaded model has the official outputs with fewer parameters and FLOPs. Layouts::

    Swin (models/swin_adapters.py)  layers.i.blocks.j.parallel_mlp{1,2}  -> layers.i.blocks.j.{attn.proj, mlp.fc2}
    ViT  (models/vit_adapters.py)   transformer.encoder.layer.i.parallel_mlp2 -> blocks.i.mlp.fc2  (its forward never
                                    calls parallel_mlp1, so neither does the loaded model)
    timm-named ViT                  blocks.i.parallel_mlp{1,2}            -> blocks.i.{attn.proj, mlp.fc2}

The head (``head.weight``/``head.bias``) goes to timm's classifier; backbone keys are ignored (the frozen backbone
is the pretrained one the user's model holds). The official "parallel" adapter types (``norm3``/``norm4``) and
``adapt_scale`` have no deltatune form and are refused.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

from deltatune.core import apply, delta_modules
from deltatune.errors import DeltaTuneError
from deltatune.methods.mimi import MiMiConfig
from deltatune.targeting import family, matches

# official block owner -> (timm block, whether its forward calls parallel_mlp1)
OWNERS = [
    (re.compile(r"layers\.(\d+)\.blocks\.(\d+)"), lambda m: f"layers.{m[1]}.blocks.{m[2]}", True),
    (re.compile(r"transformer\.encoder\.layer\.(\d+)"), lambda m: f"blocks.{m[1]}", False),
    (re.compile(r"blocks\.(\d+)"), lambda m: f"blocks.{m[1]}", True),
]
KEY = re.compile(r"(?P<owner>.+)\.parallel_mlp(?P<k>[12])\.(?P<fc>fc[12])\.(?P<param>weight(?:_orig|_mask)?|bias)")
SITE = {"1": "attn.proj", "2": "mlp.fc2"}
REFUSED = re.compile(r"(^|\.)(norm3|norm4|adapt_scale)(\.|$)")


def is_mimi(sd: dict[str, Tensor]) -> bool:
    """Whether a state dict holds official MiMi adapters."""
    return any(".parallel_mlp" in k for k in sd)


def mimi_site(owner: str, k: str) -> str | None:
    """The timm module whose output the official ``{owner}.parallel_mlp{k}`` adapts; None: the official forward
    never calls it."""
    for pattern, block, calls_first in OWNERS:
        m = pattern.fullmatch(owner)
        if m:
            return None if k == "1" and not calls_first else f"{block(m)}.{SITE[k]}"
    raise DeltaTuneError(f"official MiMi key {owner}.parallel_mlp{k}: unknown block; is this an official MiMi file?")


def mimi_tensors(sd: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """The official adapters by timm site: ``{site: (fc1 (h, d), fc2 (d, h))}``, masks applied."""
    odd = [k for k in sd if REFUSED.search(k)]
    if odd:
        raise DeltaTuneError(
            f"official MiMi key {odd[0]}: the 'parallel' adapter types (norm3/norm4, adapt_scale) have no deltatune "
            f"form; only type_adapters='series' (series, series_attn, series_ffn) checkpoints load"
        )
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        m = KEY.fullmatch(key)
        if m:
            parts.setdefault((m["owner"], m["k"]), {})[f"{m['fc']}.{m['param']}"] = value
    if not parts:
        raise DeltaTuneError("the state dict holds no *.parallel_mlp{1,2}.fc{1,2} tensors: it is not a MiMi checkpoint")
    sites = {}
    for (owner, k), t in parts.items():
        if any(n.endswith("bias") for n in t):
            raise DeltaTuneError(f"official MiMi adapter {owner}.parallel_mlp{k} has biases (mlp_bias=True); "
                                 f"the official adapters have none and deltatune loads only those")  # fmt: skip
        site = mimi_site(owner, k)
        if site is not None:
            sites[site] = (_weight(t, "fc1", owner, k), _weight(t, "fc2", owner, k))
    return sites


def _weight(t: dict[str, Tensor], fc: str, owner: str, k: str) -> Tensor:
    """One matrix, a ``torch.nn.utils.prune`` mask applied (``weight_orig * weight_mask``)."""
    if f"{fc}.weight" in t:
        return t[f"{fc}.weight"] * t.get(f"{fc}.weight_mask", 1)
    if f"{fc}.weight_orig" in t:
        return t[f"{fc}.weight_orig"] * t.get(f"{fc}.weight_mask", 1)
    raise DeltaTuneError(f"official MiMi adapter {owner}.parallel_mlp{k} has no {fc} weight in the file")


def surviving(fc1: Tensor, fc2: Tensor) -> Tensor:
    """Indices of the hidden neurons that change the output: a nonzero row of fc1 AND a nonzero column of fc2
    (no bias: GELU(0) = 0, so a zero row or column contributes nothing)."""
    return torch.nonzero((fc1 != 0).any(1) & (fc2 != 0).any(0)).flatten()


def mimi_sites(model: nn.Module, sd: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """The checked official adapters by timm site (nothing touched): ``{site: (fc1 (h, d), fc2 (d, h))}``."""
    if family(model) not in ("vit", "swin"):
        raise DeltaTuneError(f"load_official: official MiMi checkpoints are for timm ViT and Swin, not {family(model)}")
    sites = mimi_tensors(sd)
    _check_shapes(model, sites)
    return sites


def load_mimi(model: nn.Module, sites: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    """Applies MiMi adapters shrunk to the surviving neurons of ``mimi_sites``' adapters and loads them (in place)."""
    keep = {site: surviving(fc1, fc2) for site, (fc1, fc2) in sites.items()}
    config = MiMiConfig(
        sigma=_sigma(model, sites), target_sigma=None, act="gelu", bias=False, target_modules=sorted(sites),
        exclude_modules=[n for n, _ in model.named_modules() if n and n not in sites and matches(n, sorted(sites))],
        hidden_sizes={site: len(k) for site, k in keep.items()},
    )  # fmt: skip
    apply(model, config, head=True)
    with torch.no_grad():
        for name, adapter in delta_modules(model):
            fc1, fc2 = sites[name]
            adapter.original_hidden = fc1.shape[0]
            adapter.adapter_down.weight.copy_(fc1[keep[name]])
            adapter.adapter_up.weight.copy_(fc2[:, keep[name]])
    return model


def _check_shapes(model: nn.Module, sites: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Every site exists and its adapter matrices fit its width: refused before the model is touched."""
    names = dict(model.named_modules())
    for site, (fc1, fc2) in sites.items():
        layer = names.get(site)
        if layer is None:
            raise DeltaTuneError(f"official MiMi adapter for {site}: the {type(model).__name__} has no such module")
        d = layer.out_features
        if fc1.ndim != 2 or fc1.shape[1] != d or fc2.shape != (d, fc1.shape[0]):
            raise DeltaTuneError(
                f"official MiMi adapter at {site}: fc1 {tuple(fc1.shape)} / fc2 {tuple(fc2.shape)} do not fit width "
                f"{d} (expected (h, {d}) and ({d}, h)); was it trained on this architecture?"
            )


def _sigma(model: nn.Module, sites: dict[str, tuple[Tensor, Tensor]]) -> float:
    """The official size ratio (hidden = floor(d / sigma), Swin floor(4d / sigma)), so that the adapters' original
    sizes are the file's; 32 if the sizes follow no single integer ratio."""
    mult = 4 if family(model) == "swin" else 1
    sizes = [(mult * fc1.shape[1], fc1.shape[0]) for fc1, _ in sites.values()]
    d, h = sizes[0]
    sigma = float(max(1, d // h))
    return sigma if all(max(1, math.floor(w / sigma)) == n for w, n in sizes) else 32.0
