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

import torch
from torch import Tensor, nn

from deltatune._precision import as_dtype, keep_in_dtype, settle
from deltatune.errors import DeltaTuneError
from deltatune.protocols import DeltaModule, Mergeable
from deltatune.registry import make_config
from deltatune.targeting import find_head, innermost, is_delta, set_module, shared_tensor_error

BN_STATS = ("delta", "frozen")


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
    bn_stats: str = "delta"


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``d model wraps (its ``_orig_mod``), else the model: deltas live on that module."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def state_of(model: nn.Module) -> DeltaState | None:
    """The model's DeltaState, or None for a plain backbone."""
    return uncompiled(model).__dict__.get("_deltatune")


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
def apply(
    model: nn.Module,
    method: Any,
    head: bool | str = True,
    bn_stats: str | None = None,
    delta_dtype: torch.dtype | str | None = None,
    **options: Any,
) -> nn.Module:
    """Applies a method (name, config, or list of them trained together) in place and freezes all but its deltas.

    Calling ``apply`` again on a tuned model adds a new stage (sequential combination): the earlier stages'
    deltas stay frozen. ``head`` keeps the classification head trainable (True), frozen (False), or names it.
    ``bn_stats`` says what the backbone's BatchNorm running statistics do in train mode: ``"delta"`` (default) they
    update and are saved with the delta; ``"frozen"`` the layers normalise with the backbone's statistics, which
    never change. ``delta_dtype`` (e.g. ``torch.float32`` on a bfloat16 backbone) stores this stage's trainable
    tensors in that dtype, cast to the activations' dtype where they are used (default: the backbone's dtype).
    New wrappers take their base layer's train/eval mode. A ``torch.compile``d model is tuned through the module it
    wraps.
    """
    outer, model = model, uncompiled(model)
    keep_dtype = as_dtype(delta_dtype)
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
        state = DeltaState(fp, shapes, type(model).__name__, n_params, head_name, bn_stats=_bn_option(bn_stats))
        model.__dict__["_deltatune"] = state
    elif state.merged:
        raise DeltaTuneError("apply: this model was merged; apply methods to a fresh backbone instead")
    elif isinstance(head, str) and head != state.head:
        raise DeltaTuneError(f"apply: head={head!r} differs from the head chosen earlier ({state.head!r})")
    elif bn_stats is not None and bn_stats != state.bn_stats:
        raise DeltaTuneError(f"apply: bn_stats={bn_stats!r} differs from the first stage's ({state.bn_stats!r})")
    stage = 1 + max((e.stage for e in state.entries), default=-1)
    skip = (state.head,) if state.head else ()
    try:
        for config in configs:
            applied = config.apply(model, skip)
            new = [(n, m) for n, m in delta_modules(model) if m.delta_stage is None]
            for _, module in new:
                _adopt(module, stage)
            if config.mergeable:
                _refuse_shared(model, config.name, [n for n, _ in new])
            state.entries.append(Entry(config, stage, bool(head), applied.sites, applied.selected))
    except Exception:
        _rollback(model, state, stage)
        raise
    _set_trainable(model, state, stage)
    if keep_dtype is not None:
        keep_in_dtype(model, [p for p in model.parameters() if p.requires_grad], keep_dtype)
    freeze_batchnorm(model, state.bn_stats == "frozen")
    return outer


def _bn_option(bn_stats: str | None) -> str:
    if bn_stats is None:
        return "delta"
    if bn_stats not in BN_STATS:
        raise DeltaTuneError(f"apply: bn_stats must be one of {', '.join(map(repr, BN_STATS))}, got {bn_stats!r}")
    return bn_stats


def _adopt(wrapper: DeltaModule, stage: int) -> None:
    """A new wrapper joins ``stage`` and follows its base layer: the base's train/eval mode, its ``weight``/``bias``.

    Its own submodules (dropouts, adapter layers) take the base's mode; the base's subtree is left as it is. Code
    that reads a wrapped layer's tensors (HF reads ``projection.weight.dtype``) sees the innermost base's.
    """
    wrapper.delta_stage = stage
    base = innermost(wrapper)
    wrapper.training = base.training
    for child in wrapper.children():
        if child is not wrapper.base:
            child.train(base.training)
    cls = type(wrapper)
    for attr in ("weight", "bias"):
        if not hasattr(cls, attr):
            setattr(cls, attr, property(lambda self, a=attr: getattr(innermost(self), a, None), doc=f"base's {attr}"))


def _refuse_shared(model: nn.Module, method: str, wrappers: list[str]) -> None:
    """Raises if a new mergeable wrapper's base tensors are shared with a module outside it (tied weights)."""
    message = shared_tensor_error(model, wrappers, method) if wrappers else None
    if message:
        raise DeltaTuneError(message)


def _rollback(model: nn.Module, state: DeltaState, stage: int) -> None:
    """Undoes a failed ``apply``: removes this stage's wrappers and entries, so nothing is half-applied."""
    for name, module in reversed(delta_modules(model)):
        if module.delta_stage in (None, stage):
            set_module(model, name, module.base)
    state.entries = [e for e in state.entries if e.stage != stage]
    if not state.entries:
        model.__dict__.pop("_deltatune", None)
        freeze_batchnorm(model, False)


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
    model = uncompiled(model)
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def delta_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The delta and head tensors, by their names in the tuned model (what a delta file stores).

    With ``bn_stats="delta"`` (the default) it also holds the running statistics of every BatchNorm layer: training
    in train mode updates them, and the trained model is not reproduced without them.
    """
    model = uncompiled(model)
    state = _require_state(model, "delta_state_dict")
    wanted = {id(p) for e in state.entries for p in entry_parameters(model, e)}
    if _head_trained(state):
        wanted |= {id(p) for p in model.get_submodule(state.head).parameters()}
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in wanted:
            out[name] = p.detach()
    if state.bn_stats == "delta":
        out.update(batchnorm_statistics(model))
    return out


def batchnorm_statistics(model: nn.Module) -> dict[str, Tensor]:
    """The running statistics (mean, var, batches tracked) of every BatchNorm layer, by their names in the model."""
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                tensor = module._buffers.get(key)
                if tensor is not None:
                    out[f"{name}.{key}" if name else key] = tensor.detach()
    return out


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen BatchNorm layer: it stays in eval mode, normalising with its running statistics."""
    return nn.Module.train(self, False)


def freeze_batchnorm(model: nn.Module, frozen: bool) -> None:
    """Keeps every BatchNorm layer in eval mode whatever ``model.train()`` says (``frozen``), or undoes that."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if frozen:
                module.train = _eval_only.__get__(module)
                module.training = False
            elif "train" in module.__dict__:
                del module.train


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
    outer, model = model, uncompiled(model)
    unmerged: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            visit(child, name)
            if not is_delta(child):
                continue
            merged = child.merge() if isinstance(child, Mergeable) else None
            if merged is None:
                unmerged.append(f"{name} ({child.delta_method})")
            else:
                setattr(module, child_name, merged)

    visit(model, "")
    settle(model, {id(p) for _, m in delta_modules(model) for p in m.delta_parameters()})
    state = state_of(model)
    if state is not None:
        state.merged = True
    if unmerged:
        warnings.warn(
            f"merge: {len(unmerged)} delta(s) cannot be merged and stay in the model: {', '.join(unmerged[:4])}"
            + (" ..." if len(unmerged) > 4 else ""),
            stacklevel=2,
        )
    return outer


def unwrap(model: nn.Module) -> None:
    """Removes every delta wrapper (keeping its base layer) and the deltatune record: back to the plain backbone."""
    model = uncompiled(model)
    freeze_batchnorm(model, False)
    for name, module in reversed(delta_modules(model)):
        if name:
            set_module(model, name, innermost(module))
    settle(model, set())  # tensors kept in float32 beside a bf16 backbone: its dtype again
    model.__dict__.pop("_deltatune", None)


def summary(model: nn.Module) -> str:
    """A table of each applied method: stage (from 1, as the CLI counts), sites, parameters, % of the backbone and
    whether it merges."""
    model = uncompiled(model)
    state = _require_state(model, "summary")
    rows = [("method", "stage", "sites", "parameters", "% of backbone", "mergeable")]
    for e in state.entries:
        n = sum(p.numel() for p in entry_parameters(model, e))
        merge_word = "merged" if state.merged else ("yes" if e.config.mergeable else "no")
        rows.append((e.config.name, str(e.stage + 1), str(len(e.sites)), f"{n:,}", _pct(n, state), merge_word))
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
