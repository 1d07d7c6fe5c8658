"""Specification-based baselines: full fine-tuning, linear probing and BitFit (Ben Zaken et al., ACL 2022,
https://arxiv.org/abs/2106.10199). They add nothing: they choose which existing parameters train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from deltatune._layers import linear_types
from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.registry import register
from deltatune.targeting import Targets, candidates, find_head, matches


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

    def applies_to(self, model: nn.Module) -> bool:
        """Only a model with a classification head (a causal LM has none) can be linearly probed."""
        return find_head(model, True) is not None

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

    def applies_to(self, model: nn.Module) -> bool:
        """Only a model with biases outside its head (Llama and T5 have none) can be bias-tuned."""
        head = find_head(model, True)
        return bool(self._biases(model, (head,) if head else ())[1])

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        sites, biases = self._biases(model, skip)
        if not biases:
            raise DeltaTuneError(
                f"bitfit: target_modules={self.target_modules!r} matched no module with a bias; "
                f"candidates: {candidates(model, (*linear_types(), nn.Conv1d, nn.Conv2d, nn.LayerNorm))}"
            )
        return Applied(sites, biases)

    def _biases(self, model: nn.Module, skip: tuple[str, ...]) -> tuple[list[str], list[nn.Parameter]]:
        """(names, biases) of the targeted modules that own a bias, outside ``skip``."""
        sites, biases = [], []
        for name, module in model.named_modules():
            bias = module.__dict__.get("_parameters", {}).get("bias")
            if bias is None or any(name == s or name.startswith(s + ".") for s in skip):
                continue
            if self.target_modules is None or matches(name, self.target_modules):
                sites.append(name)
                biases.append(bias)
        return sites, biases
