"""The contracts every method meets, written as typing Protocols (structural: no base class to inherit).

A method is a config dataclass (``MethodConfig``) registered by name; its ``apply`` wraps layers in modules that
satisfy ``DeltaModule``. The trainer calls a config's optional training hooks (``PhasedMethod``, ``StoredForm``,
``ReportsExtras``, ``TrainState``) without knowing which method it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from torch import nn

if TYPE_CHECKING:
    from deltatune.core import Applied


@runtime_checkable
class DeltaModule(Protocol):
    """A wrapper that adds trainable deltas around a layer of the backbone."""

    delta_method: str
    """Registered name of the method that made it (e.g. ``"lora"``)."""
    delta_stage: int | None
    """Sequential stage it belongs to; None until ``deltatune.apply`` adopts it (set in ``core._adopt``)."""
    base: nn.Module
    """The wrapped layer (possibly another wrapper); its weights stay frozen."""

    def delta_parameters(self) -> list[nn.Parameter]:
        """The parameters it adds (what trains and what a delta file stores), never the base's."""
        ...


@runtime_checkable
class Mergeable(Protocol):
    """A ``DeltaModule`` that can fold itself into its base layer."""

    def merge(self) -> nn.Module | None:
        """The plain layer with the delta folded in (computed in float64, rounded once), or None if it cannot."""
        ...


@runtime_checkable
class MethodConfig(Protocol):
    """A method's config dataclass, registered with ``@register(name)``."""

    name: ClassVar[str]
    """Registered name (set by ``@register``)."""
    mergeable: bool
    """Whether ``deltatune.merge`` folds its deltas into the weights (shared weights are then refused)."""
    identity_at_init: bool
    """Whether the model's output is unchanged right after ``apply`` (the contract tests check it)."""

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps or selects the method's sites in ``model``, leaving the names in ``skip`` (the head) alone.

        Raises ``DeltaTuneError`` when the backbone has no site for it; the model is then left as it was.
        """
        ...


@runtime_checkable
class DeclaresFamilies(Protocol):
    """A config that states which backbone families it applies to (see ``targeting.family``).

    A config without ``families`` applies to every preset family (``targeting.FAMILIES``) and to no model of
    unknown family (a ResNet); the contract tests hold every method to what it declares.
    """

    families: ClassVar[frozenset[str] | None]
    """The families ``apply`` supports (None: any model); on any other it raises ``DeltaTuneError``."""


@runtime_checkable
class ChecksModel(Protocol):
    """A config whose applicability depends on the model itself, not only its family (BitFit needs biases)."""

    def applies_to(self, model: nn.Module) -> bool:
        """Whether ``apply`` works on ``model``; where this is False, ``apply`` raises ``DeltaTuneError``."""
        ...


@runtime_checkable
class TrainOptions(Protocol):
    """A config some of whose fields are also ``deltatune train`` options (flags and top-level recipe keys)."""

    cli_group: ClassVar[str]
    """Heading of the options in ``deltatune train --help`` (e.g. "MiMi pruning")."""
    cli_options: ClassVar[dict[str, str]]
    """Training option name -> the config field it sets (``prune_score`` -> ``score``)."""

    def with_options(self, **options: Any) -> Any:
        """This config with the given fields replaced (a copy)."""
        ...


@runtime_checkable
class StoredForm(Protocol):
    """A config whose delta file holds a different form than the trained model (prefix tuning's folded MLP)."""

    def stored_form(self, model: nn.Module) -> nn.Module | None:
        """A copy of ``model`` in the form to save (the model keeps training as it is), or None: the model itself."""
        ...


@runtime_checkable
class PhasedMethod(Protocol):
    """A config that changes the model between training phases (MiMi prunes its adapters)."""

    def phase_plan(self, model: nn.Module) -> list[float]:
        """One amount per transition between phases (MiMi: the cumulative pruned fraction); [] for one phase."""
        ...

    def describe_plan(self, model: nn.Module, amounts: list[float]) -> str:
        """A line for the log saying what happens between phases."""
        ...

    def between_phases(self, model: nn.Module, amount: float, context: PhaseContext) -> str:
        """Changes ``model`` before the next phase; returns what it did, for the log."""
        ...


@runtime_checkable
class TrainState(Protocol):
    """A config whose structure changes while training: checkpoints record it, resuming rebuilds it first."""

    def train_state(self, model: nn.Module) -> dict[str, Any]:
        """Entries (JSON-ready) for the checkpoint's info."""
        ...

    def restore_train_state(self, model: nn.Module, info: dict[str, Any]) -> None:
        """Gives a freshly built model the structure recorded in a checkpoint's ``info``."""
        ...


@runtime_checkable
class ReportsExtras(Protocol):
    """A config that adds entries to a finished run's report (MiMi: adapter sizes before and after pruning)."""

    def report_extras(self, model: nn.Module, output_dir: Path) -> dict[str, Any]:
        """JSON-ready entries for ``report.json`` (figures it draws go in ``output_dir``)."""
        ...


class PhaseContext(Protocol):
    """What the trainer offers a ``PhasedMethod`` between phases."""

    optimizer: Any
    """The optimizer, whose state should follow the parameters that survive."""
    ddp: nn.Module
    """The model as trained (a DistributedDataParallel wrapper under torchrun), for gradients."""
    seed: int
    """The run's seed."""

    def batches(self, n: int) -> Any:
        """Yields ``n`` training batches ``(inputs, targets)`` on the device, mixed as in training."""
        ...

    def loss(self, module: nn.Module, inputs: Any, targets: Any) -> Any:
        """The training loss of ``module`` on one batch (call ``backward`` for gradients)."""
        ...


def hooks(configs: list[Any], protocol: type) -> list[Any]:
    """The configs among ``configs`` that implement an optional hook ``protocol``."""
    return [c for c in configs if isinstance(c, protocol)]
