"""Specification-based baselines: full fine-tuning, linear probing and BitFit (Ben Zaken et al., ACL 2022,
https://arxiv.org/abs/2106.10199). They add nothing: they choose which existing parameters train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.registry import register
from deltatune.targeting import Targets, candidates, matches


@register("full")
@dataclass
class FullConfig:
    """Full fine-tuning: every parameter trains (the baseline every method is compared to)."""

    mergeable: ClassVar[bool] = True
    families: ClassVar[frozenset[str] | None] = None  # any model: it needs no preset
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        return Applied([""], list(model.parameters()))


@register("linear")
@dataclass
class LinearConfig:
    """Linear probe: only the classification head trains."""

    mergeable: ClassVar[bool] = True
    families: ClassVar[frozenset[str] | None] = None  # any model: it needs no preset
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        if not skip:
            raise DeltaTuneError("linear: the model has no classification head to train; name it with head='...'")
        return Applied([])


@register("bitfit")
@dataclass
class BitFitConfig:
    """BitFit: only the biases (and the head) train."""

    target_modules: Targets | None = None
    """Modules whose biases train (regex or list of names/suffixes). Default: every module with a bias."""

    mergeable: ClassVar[bool] = True
    families: ClassVar[frozenset[str] | None] = None  # any model: it needs no preset
    identity_at_init: ClassVar[bool] = True
    name: ClassVar[str]

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        sites, biases = [], []
        for name, module in model.named_modules():
            bias = module.__dict__.get("_parameters", {}).get("bias")
            if bias is None or any(name == s or name.startswith(s + ".") for s in skip):
                continue
            if self.target_modules is None or matches(name, self.target_modules):
                sites.append(name)
                biases.append(bias)
        if not biases:
            raise DeltaTuneError(
                f"bitfit: target_modules={self.target_modules!r} matched no module with a bias; "
                f"candidates: {candidates(model, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm))}"
            )
        return Applied(sites, biases)
