"""The public API: apply methods to a backbone, count and list what trains, and merge deltas into the weights.

A tuned model keeps a small record in ``model._deltatune`` (a ``DeltaState``): the configs applied, in stages,
the existing parameters they selected (BitFit's biases, ...), the head, and a fingerprint of the plain
backbone. Added parameters live in wrapper modules that declare them (``delta_parameters()``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from deltatune.errors import DeltaTuneError
from deltatune.registry import make_config
from deltatune.targeting import find_head, innermost, is_delta, set_module


@dataclass
class Applied:
    """What one method's ``apply`` did: the sites it touched and the existing parameters it selected."""

    sites: list[str]
    selected: list[nn.Parameter] = field(default_factory=list)


@dataclass
class Entry:
    """One applied config: its stage (sequential combinations) and what it touched."""

    config: Any
    stage: int
    head: bool
    sites: list[str]
    selected: list[nn.Parameter]


@dataclass
class DeltaState:
    """deltatune's record on a tuned model."""

    fingerprint: str
    shapes: dict[str, list[int]]
    backbone_class: str
    backbone_params: int
    head: str | None
    entries: list[Entry] = field(default_factory=list)
    merged: bool = False


def state_of(model: nn.Module) -> DeltaState | None:
    """The model's DeltaState, or None for a plain backbone."""
    return model.__dict__.get("_deltatune")


def fingerprint(model: nn.Module) -> tuple[str, dict[str, list[int]]]:
    """A short hash of the backbone's class, parameter names and shapes, and those shapes."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    payload = json.dumps([type(model).__name__, sorted(shapes.items())])
    return hashlib.sha256(payload.encode()).hexdigest()[:16], shapes


_APPLY_LOCK = threading.RLock()  # two threads applying to one model would both take the same stage number


def _serialised(fn: Any) -> Any:
    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _APPLY_LOCK:
            return fn(*args, **kwargs)

    return locked


@_serialised
def apply(model: nn.Module, method: Any, head: bool | str = True, **options: Any) -> nn.Module:
    """Applies a method (name, config, or list of them trained together) in place and freezes all but its deltas.

    Calling ``apply`` again on a tuned model adds a new stage (sequential combination): the earlier stages'
    deltas stay frozen. ``head`` keeps the classification head trainable (True), frozen (False), or names it.
    """
    methods = method if isinstance(method, list | tuple) else [method]
    if not methods:
        raise DeltaTuneError("apply: empty method list; name at least one of deltatune.methods()")
    if len(methods) > 1 and options:
        raise DeltaTuneError("apply: options go with a single method; pass config objects to combine methods")
    configs = [make_config(m, **options) for m in methods]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise DeltaTuneError(f"apply: method listed twice in {names}; give each method once")
    state = state_of(model)
    if state is None:
        fp, shapes = fingerprint(model)
        n_params = sum(p.numel() for p in model.parameters())
        head_name = find_head(model, head if isinstance(head, str) else True)  # head=False: frozen, still not a site
        state = DeltaState(fp, shapes, type(model).__name__, n_params, head_name)
        model.__dict__["_deltatune"] = state
    elif state.merged:
        raise DeltaTuneError("apply: this model was merged; apply methods to a fresh backbone instead")
    elif isinstance(head, str) and head != state.head:
        raise DeltaTuneError(f"apply: head={head!r} differs from the head chosen earlier ({state.head!r})")
    stage = 1 + max((e.stage for e in state.entries), default=-1)
    skip = (state.head,) if state.head else ()
    try:
        for config in configs:
            applied = config.apply(model, skip)
            for _, module in delta_modules(model):
                if module.delta_stage is None:
                    module.delta_stage = stage
            state.entries.append(Entry(config, stage, bool(head), applied.sites, applied.selected))
    except Exception:
        _rollback(model, state, stage)
        raise
    _set_trainable(model, state, stage)
    return model


def _rollback(model: nn.Module, state: DeltaState, stage: int) -> None:
    """Undoes a failed ``apply``: removes this stage's wrappers and entries, so nothing is half-applied."""
    for name, module in reversed(delta_modules(model)):
        if module.delta_stage in (None, stage):
            set_module(model, name, module.base)
    state.entries = [e for e in state.entries if e.stage != stage]
    if not state.entries:
        model.__dict__.pop("_deltatune", None)


def _set_trainable(model: nn.Module, state: DeltaState, stage: int) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    entries = [e for e in state.entries if e.stage == stage]
    for entry in entries:
        for p in entry_parameters(model, entry):
            p.requires_grad_(True)
    if state.head and entries[0].head:
        for p in model.get_submodule(state.head).parameters():
            p.requires_grad_(True)


def delta_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every delta wrapper, outermost first, nested ones included."""
    return [(n, m) for n, m in model.named_modules() if is_delta(m)]


def entry_parameters(model: nn.Module, entry: Entry) -> list[nn.Parameter]:
    """The parameters one applied config trains: those it selected plus its wrappers' own."""
    params = {id(p): p for p in entry.selected}
    for _, module in delta_modules(model):
        if module.delta_method == entry.config.name and module.delta_stage == entry.stage:
            params.update((id(p), p) for p in module.delta_parameters())
    return list(params.values())


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that require grad (each shared tensor counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def delta_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The delta and head tensors, by their names in the tuned model (what a delta file stores)."""
    state = _require_state(model, "delta_state_dict")
    wanted = {id(p) for e in state.entries for p in entry_parameters(model, e)}
    if _head_trained(state):
        wanted |= {id(p) for p in model.get_submodule(state.head).parameters()}
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in wanted:
            out[name] = p.detach()
    return out


def _head_trained(state: DeltaState) -> bool:
    return bool(state.head) and any(e.head for e in state.entries)


def _require_state(model: nn.Module, what: str) -> DeltaState:
    state = state_of(model)
    if state is None:
        raise DeltaTuneError(f"{what}: the model has no deltas; call deltatune.apply(model, method) first")
    return state


def merge(model: nn.Module) -> nn.Module:
    """Folds every mergeable delta into the backbone's weights and removes its wrapper; returns the model.

    Merges are computed in float64 and rounded once to the weights' dtype. Deltas that cannot be merged (e.g.
    adapters) stay in place and a warning names them. Merging twice changes nothing.
    """
    unmerged: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            visit(child, name)
            if not is_delta(child):
                continue
            merged = child.merge() if hasattr(child, "merge") else None
            if merged is None:
                unmerged.append(f"{name} ({child.delta_method})")
            else:
                setattr(module, child_name, merged)

    visit(model, "")
    state = state_of(model)
    if state is not None:
        state.merged = True
    if unmerged:
        warnings.warn(
            f"merge: {len(unmerged)} delta(s) cannot be merged and stay in the model: {', '.join(unmerged[:4])}"
            + (" ..." if len(unmerged) > 4 else ""),
            stacklevel=2,
        )
    return model


def unwrap(model: nn.Module) -> None:
    """Removes every delta wrapper (keeping its base layer) and the deltatune record: back to the plain backbone."""
    for name, module in reversed(delta_modules(model)):
        if name:
            set_module(model, name, innermost(module))
    model.__dict__.pop("_deltatune", None)


def summary(model: nn.Module) -> str:
    """A table of each applied method: stage, sites, parameters, % of the backbone and whether it merges."""
    state = _require_state(model, "summary")
    rows = [("method", "stage", "sites", "parameters", "% of backbone", "mergeable")]
    for e in state.entries:
        n = sum(p.numel() for p in entry_parameters(model, e))
        merge_word = "merged" if state.merged else ("yes" if e.config.mergeable else "no")
        rows.append((e.config.name, str(e.stage), str(len(e.sites)), f"{n:,}", _pct(n, state), merge_word))
    if _head_trained(state):
        n = sum(p.numel() for p in model.get_submodule(state.head).parameters())
        rows.append((f"head ({state.head})", "-", "1", f"{n:,}", _pct(n, state), "-"))
    n = trainable_parameters(model)
    rows.append(("trainable now", "", "", f"{n:,}", _pct(n, state), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    backbone = f"backbone: {state.backbone_class}, {state.backbone_params:,} parameters"
    return "\n".join([backbone, *lines])


def _pct(n: int, state: DeltaState) -> str:
    return f"{100 * n / max(state.backbone_params, 1):.3f}%"
