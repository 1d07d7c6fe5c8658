"""Structured pruning of adapter neurons (MiMi and its ablations), with real shrinking of the matrices.

``prune_adapters`` ranks every hidden neuron of every adapter by a score, removes the lowest ones (globally or
per adapter) so that a cumulative fraction of the ORIGINAL neurons is gone, shrinks W_down/W_up, removes
adapters left with no neuron, records the new sizes in the config (so delta files rebuild them) and, given the
optimizer, carries its state over to the surviving neurons.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune._plot import pyplot, save
from deltatune.core import delta_modules, state_of
from deltatune.errors import DeltaTuneError
from deltatune.methods.adapter import Adapter
from deltatune.targeting import set_module

SCORES = ("mimi", "l1", "random", "grad", "activation")
SCOPES = ("global", "local")


def adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    """(name in the model, adapter) for every adapter wrapper."""
    return [(n, m) for n, m in delta_modules(model) if isinstance(m, Adapter)]


def neuron_scores(adapter: Adapter, score: str, activations: Tensor | None = None, seed: int = 0) -> Tensor:
    """One score per hidden neuron of an adapter; higher means more important."""
    down, up = adapter.adapter_down.weight, adapter.adapter_up.weight  # (h, d_in), (d_out, h)
    if score in ("mimi", "l1"):
        s = down.detach().abs().sum(1) + up.detach().abs().sum(0)
        return s / (down.shape[1] + up.shape[0]) if score == "mimi" else s
    if score == "grad":
        if down.grad is None or up.grad is None:
            raise DeltaTuneError("prune_adapters: score='grad' needs gradients; run a backward pass first")
        return down.grad.abs().sum(1) + up.grad.abs().sum(0)
    if score == "activation":
        if activations is None:
            raise DeltaTuneError("prune_adapters: score='activation' needs inputs=... to measure activations")
        return activations
    if score == "random":
        # Independent per adapter and per call (sizes differ after each pruning), reproducible by seed.
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{adapter.site}/{adapter.hidden}".encode()))
        return torch.rand(adapter.hidden, generator=g)
    raise DeltaTuneError(f"prune_adapters: unknown score {score!r}; choose one of {', '.join(SCORES)}")


def activation_scores(
    found: list[tuple[str, Adapter]], run: Callable[[], Any], reduce: bool = False
) -> dict[str, Tensor]:
    """Mean |activation| of each hidden neuron over everything ``run`` (forward passes) feeds the adapters;
    ``reduce``: over all processes of the torch.distributed group, so that every process prunes alike."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, adapter in found:

        def hook(_m: nn.Module, _i: Any, out: Tensor, name: str = name) -> None:
            flat = out.detach().abs().flatten(0, -2).float()
            sums[name] = sums.get(name, 0) + flat.sum(0)
            counts[name] = counts.get(name, 0) + len(flat)

        hooks.append(adapter.adapter_act.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    if reduce and torch.distributed.is_initialized():
        for name in sums:
            n = torch.tensor([float(counts[name])], device=sums[name].device)
            torch.distributed.all_reduce(sums[name])
            torch.distributed.all_reduce(n)
            counts[name] = int(n.item())
    return {n: sums[n] / counts[n] for n in sums}


def _removed_sites(model: nn.Module) -> dict[str, int]:
    """Sites whose adapters pruning removed entirely (their configs record size 0), with their original sizes."""
    state = state_of(model)
    out = {}
    for entry in state.entries if state else []:
        for site, size in (getattr(entry.config, "hidden_sizes", None) or {}).items():
            if size == 0:
                out[site] = entry.config.original_size(model, model.get_submodule(site))
    return out


def _floor_keep(total: int, amount: float) -> int:
    """floor(total * (1 - amount)) as the official MiMi code counts, forgiving float error just below an integer."""
    return math.floor(total * (1 - amount) + 1e-9)


def _keep_counts(model: nn.Module, found: list, scores: dict[str, Tensor], amount: float, scope: str) -> dict:
    """How many neurons each adapter keeps."""
    if scope == "local":
        return {n: min(a.hidden, _floor_keep(a.original_hidden, amount)) for n, a in found}
    total = sum(a.original_hidden for _, a in found) + sum(_removed_sites(model).values())
    keep_total = min(sum(a.hidden for _, a in found), _floor_keep(total, amount))
    flat = torch.cat([scores[n] for n, _ in found])
    order = torch.argsort(flat, descending=True, stable=True)[:keep_total]
    owner = torch.cat([torch.full((a.hidden,), i) for i, (_, a) in enumerate(found)])
    counts = torch.bincount(owner[order], minlength=len(found))
    return {n: int(c) for (n, _), c in zip(found, counts)}


def prune_adapters(
    model: nn.Module,
    amount: float,
    score: str = "mimi",
    scope: str = "global",
    inputs: Callable[[], Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    activations: dict[str, Tensor] | None = None,
) -> dict[str, int]:
    """Prunes adapter neurons to a cumulative fraction ``amount`` of the original ones; returns the new sizes.

    Args:
        amount: fraction of the adapters' original neurons that is pruned after this call (0 <= amount <= 1).
        score: mimi (normalised L1 of the neuron's down row and up column), l1, random, grad or activation.
        scope: global (one ranking over all adapters) or local (the same fraction in every adapter).
        inputs: for score="activation", a callable that runs forward passes on calibration data.
        optimizer: if given, its parameters and state (e.g. Adam moments) follow the surviving neurons.
        seed: for score="random".
        activations: for score="activation", ready-made ``activation_scores`` (e.g. summed over processes).

    Returns:
        Each adapter site's new hidden size; 0 means the adapter was removed.
    """
    if not 0.0 <= amount <= 1.0:
        raise DeltaTuneError(f"prune_adapters: amount must be in [0, 1], got {amount}")
    if scope not in SCOPES:
        raise DeltaTuneError(f"prune_adapters: unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    found = adapters(model)
    if not found:
        raise DeltaTuneError("prune_adapters: the model has no adapters; apply 'adapter' or 'mimi' first")
    acts = activations or (activation_scores(found, inputs) if score == "activation" and inputs is not None else {})
    scores = {n: neuron_scores(a, score, acts.get(n), seed) for n, a in found}
    counts = _keep_counts(model, found, scores, amount, scope)
    sizes: dict[str, int] = {}
    for name, adapter in found:
        keep = torch.sort(torch.argsort(scores[name], descending=True, stable=True)[: counts[name]]).values
        old = _neuron_dims(adapter)
        if len(keep) == 0:
            set_module(model, name, adapter.base)
        elif len(keep) < adapter.hidden:
            adapter.resize(keep)
        if optimizer is not None:
            _follow(optimizer, old, _neuron_dims(adapter) if len(keep) else [], keep)
        sizes[adapter.site or name] = len(keep)
    _record_sizes(model, found, sizes)
    removed = {site: 0 for site in _removed_sites(model)}
    return {**removed, **sizes}


def adapter_sizes(model: nn.Module, original: bool = False) -> dict[str, int]:
    """Every adapter site's current hidden size, removed ones as 0 (what ``resize_adapters`` restores), in
    the model's order; ``original``: the sizes before any pruning."""
    removed = _removed_sites(model)
    live = {a.site or n: a.original_hidden if original else a.hidden for n, a in adapters(model)}
    sizes = {site: removed[site] if original else 0 for site in removed} | live
    order = [n for n, _ in model.named_modules()]
    return dict(sorted(sizes.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def resize_adapters(model: nn.Module, sizes: dict[str, int]) -> None:
    """Gives the adapters the hidden ``sizes`` (0: removed) by keeping their first neurons; for restoring a
    pruned checkpoint's shapes before its values are copied in."""
    found = adapters(model)
    unknown = set(sizes) - {a.site or n for n, a in found} - set(_removed_sites(model))
    if unknown:
        raise DeltaTuneError(f"resize_adapters: no adapter at {sorted(unknown)[:3]}")
    for name, adapter in found:
        size = sizes.get(adapter.site or name, adapter.hidden)
        if size == 0:
            set_module(model, name, adapter.base)
        elif size < adapter.hidden:
            adapter.resize(torch.arange(size))
        elif size > adapter.hidden:
            raise DeltaTuneError(f"resize_adapters: {name} has {adapter.hidden} neurons, cannot grow to {size}")
    _record_sizes(model, found, {a.site or n: sizes.get(a.site or n, a.hidden) for n, a in found})


def _record_sizes(model: nn.Module, found: list[tuple[str, Adapter]], sizes: dict[str, int]) -> None:
    """Writes the new sizes into the configs, so save_delta/load_delta rebuild the pruned shapes."""
    state = state_of(model)
    if state is None:
        return
    for entry in state.entries:
        mine = {a.site: sizes[a.site] for _, a in found if a.delta_stage == entry.stage and a.site in sizes}
        if mine and hasattr(entry.config, "hidden_sizes"):
            merged = {**(entry.config.hidden_sizes or {}), **mine}
            entry.config = dataclasses.replace(entry.config, hidden_sizes=merged)


def _neuron_dims(adapter: Adapter) -> list[tuple[nn.Parameter, int | None]]:
    """Each adapter parameter with the dim that indexes hidden neurons (None: not per neuron)."""
    down, up = adapter.adapter_down, adapter.adapter_up
    pairs: list[tuple[nn.Parameter, int | None]] = [(down.weight, 0), (up.weight, 1)]
    if down.bias is not None:
        pairs += [(down.bias, 0), (up.bias, None)]
    return pairs


def _follow(optimizer: torch.optim.Optimizer, old: list, new: list, keep: Tensor) -> None:
    """Replaces the ``old`` (param, dim) pairs by ``new`` in the optimizer, slicing their state to ``keep``."""
    swap = {id(p): (i, dim) for i, (p, dim) in enumerate(old)}
    for group in optimizer.param_groups:
        kept = []
        for p in group["params"]:
            if id(p) not in swap:
                kept.append(p)
                continue
            i, dim = swap[id(p)]
            state = optimizer.state.pop(p, {})
            if not new:
                continue  # the adapter was removed
            q = new[i][0]
            kept.append(q)
            optimizer.state[q] = {k: _slice(v, p, dim, keep) for k, v in state.items()}
        group["params"] = kept


def _slice(value: Any, param: Tensor, dim: int | None, keep: Tensor) -> Any:
    """The part of a per-parameter state tensor (e.g. Adam's moments) that belongs to the kept neurons."""
    if dim is None or not isinstance(value, Tensor) or value.shape != param.shape:
        return value  # not per neuron, or a scalar such as Adam's step
    return value.index_select(dim, keep.to(value.device)).clone()


def plot_allocation(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Saves a PNG of the hidden neurons left in each adapter, by layer (MiMi's allocation figure): one bar per
    adapter site in model order, coloured by site kind, over a pale bar of its size before pruning."""
    plt = pyplot()
    sizes, original = report["adapter_sizes"], report["adapter_sizes_original"]
    sites = list(sizes)
    kinds = sorted({".".join(s.split(".")[-2:]) for s in sites})
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(sites)), 4), dpi=120)
    x = range(len(sites))
    ax.bar(x, [original[s] for s in sites], color="0.88", label="before pruning")
    for kind in kinds:
        idx = [i for i, s in enumerate(sites) if s.endswith(kind)]
        ax.bar(idx, [sizes[sites[i]] for i in idx], color=colours[kind], label=f"after: {kind}")
    ax.set_xticks(list(x), [s.rsplit(".", 2)[0] for s in sites], rotation=90, fontsize=6)
    ax.set_ylabel("hidden neurons")
    kept, start = sum(sizes.values()), sum(original.values())
    removed = sum(1 for v in sizes.values() if v == 0)
    ax.set_title(f"{title} {kept:,}/{start:,} neurons kept, {removed} adapters removed".strip(), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    return save(fig, path)
