"""Choosing sites: module-name patterns, module types, per-backbone presets and the classification head.

Rules (as HF peft's): a string is a regular expression matched against the whole module name; a list matches
exact names or name suffixes (``"attn.qkv"`` matches ``"blocks.0.attn.qkv"``); exclusions win. Modules inside
an existing delta wrapper are never sites themselves; the wrapper stands for its base layer. The output embedding
(``get_output_embeddings()``, e.g. a causal LM's ``lm_head``) is a site only when a list names it: a regex (a
preset, ``"all-linear"``) never selects it, as peft leaves the output layer out. The classification head is never
a site (``skip``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from deltatune._layers import linear_types
from deltatune.errors import DeltaTuneError
from deltatune.protocols import ChecksModel, DeclaresFamilies, DeltaModule

Targets = str | list[str] | tuple[str, ...]

# Class names (timm and HF transformers) mapped to preset families.
_FAMILIES = {
    "VisionTransformer": "vit",
    "VisionTransformerDistilled": "vit",
    "Eva": "vit",
    "SwinTransformer": "swin",
    "ConvNeXt": "convnext",
    "MlpMixer": "mixer",
    "ResMlp": "mixer",
}
_HF_FAMILIES = {
    "bert": "bert",
    "roberta": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "vit": "hf-vit",
    # decoder LMs: q_proj, k_proj, v_proj, o_proj (self_attn) and gate_proj, up_proj, down_proj (mlp)
    "llama": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "mistral": "llama",
    "gpt2": "gpt2",  # Conv1D: attn.c_attn (fused qkv), attn.c_proj, mlp.c_fc, mlp.c_proj
    "t5": "t5",  # SelfAttention / EncDecAttention .q .k .v .o; DenseReluDense .wi (.wi_0, .wi_1) .wo
}
_HEAD_NAMES = ("classifier", "head.fc", "head", "fc", "score")


def family(model: nn.Module) -> str | None:
    """The preset family of a model (``vit``, ``swin``, ``convnext``, ``mixer``, ``bert``, ``hf-vit``, ``llama``,
    ``gpt2``, ``t5``) or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type in _HF_FAMILIES:
        return _HF_FAMILIES[model_type]
    return _FAMILIES.get(type(model).__name__)


FAMILIES = frozenset({*_FAMILIES.values(), *_HF_FAMILIES.values()})
"""The preset families; a config that declares no ``families`` supports these (not a model of unknown family)."""


def supports(config: Any, model: nn.Module) -> bool:
    """Whether ``config`` declares that it applies to ``model``: its family (``protocols.DeclaresFamilies``) and,
    for methods that need something no family implies (a head, biases), its own check (``protocols.ChecksModel``)."""
    families = config.families if isinstance(config, DeclaresFamilies) else FAMILIES
    if not (families is None or family(model) in families):
        return False
    return config.applies_to(model) if isinstance(config, ChecksModel) else True


def is_delta(module: nn.Module) -> bool:
    """True for deltatune's wrapper modules (they satisfy ``protocols.DeltaModule``).

    A runtime Protocol check costs ~15 us; plain layers (nearly every module, and every ``innermost`` call in a
    wrapper's forward) are turned away first by the one attribute every wrapper has."""
    return hasattr(module, "delta_method") and isinstance(module, DeltaModule)


def innermost(module: nn.Module) -> nn.Module:
    """The plain layer under any stack of delta wrappers."""
    while is_delta(module):
        module = module.base
    return module


def iter_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module, not descending into delta wrappers."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            yield name, child
            if not is_delta(child):
                yield from walk(child, name)

    yield from walk(model, "")


def matches(name: str, targets: Targets) -> bool:
    """Whether a module name is selected by ``targets`` (regex string, or list of names/suffixes)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_targets(model: nn.Module, method: str, given: Targets | None, presets: dict[str, Targets]) -> Targets:
    """The user's ``target_modules`` if given, else the preset for the model's family."""
    if given is not None:
        return given
    fam = family(model)
    if fam in presets:
        return presets[fam]
    if "*" in presets:
        return presets["*"]
    raise DeltaTuneError(
        f"method {method!r} has no preset for {type(model).__name__} (presets: {', '.join(sorted(presets))}); "
        f"pass target_modules=[...] naming its sites, e.g. {candidates(model, linear_types())}"
    )


def find_sites(
    model: nn.Module,
    method: str,
    targets: Targets,
    supported: tuple[type, ...],
    exclude: Targets | None = None,
    skip: tuple[str, ...] = (),
) -> list[tuple[str, nn.Module]]:
    """Modules whose names match ``targets`` (minus ``exclude`` and ``skip`` subtrees), all of a supported type.

    Raises DeltaTuneError when nothing matches or a match is of an unsupported type.
    """
    found, bad, outputs = [], [], []
    output_names = output_layers(model)
    for name, module in iter_sites(model):
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if not matches(name, targets) or (exclude is not None and matches(name, exclude)):
            continue
        if name in output_names and isinstance(targets, str):
            outputs.append(name)
            continue
        if isinstance(innermost(module), supported):
            found.append((name, module))
        elif isinstance(targets, list | tuple) and not isinstance(innermost(module), nn.Identity | nn.Dropout):
            bad.append(f"{name} ({type(innermost(module)).__name__})")
    kinds = ", ".join(t.__name__ for t in supported)
    if bad:
        raise DeltaTuneError(
            f"method {method!r}: target_modules={targets!r} matched {', '.join(bad[:5])}, "
            f"but {method!r} supports only {kinds}; target layers of those types instead"
        )
    if not found:
        hint = f" (the output layer is a site only when a list names it: target_modules={outputs!r})" if outputs else ""
        raise DeltaTuneError(
            f"method {method!r}: target_modules={targets!r} matched no module of type {kinds} "
            f"in {type(model).__name__}; candidates: {candidates(model, supported)}{hint}"
        )
    return found


def output_layers(model: nn.Module) -> set[str]:
    """Names of the model's output embedding (HF ``get_output_embeddings()``, e.g. ``lm_head``), if any."""
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if not isinstance(module, nn.Module):
        return set()
    return {n for n, m in model.named_modules(remove_duplicate=False) if m is module or innermost(m) is module}


def shared_tensor_error(model: nn.Module, sites: list[str], method: str) -> str | None:
    """Why a wrapper at one of ``sites`` must not fold into its base's tensors, or None.

    A base whose weight or bias is also held by a module outside the wrapper (tied input and output embeddings,
    say) would change that module too when merged. Found by tensor identity over every path to every module.
    """
    holders: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for key, tensor in module._parameters.items():
            if tensor is not None:
                holders.setdefault(id(tensor), []).append((name, key))
    for site in sites:
        wrapper, base = get_module(model, site), innermost(get_module(model, site))
        inside = [n + "." for n, m in model.named_modules(remove_duplicate=False) if m is wrapper]
        for key in ("weight", "bias"):
            tensor = base._parameters.get(key)
            others = [n for n, _ in holders.get(id(tensor), []) if not n.startswith(tuple(inside))]
            if tensor is not None and others:
                return (
                    f"method {method!r}: site {site!r} shares its {key} with {others[0]!r} (tied weights), so "
                    f"merging would change {others[0]!r} too; leave the site out (exclude_modules=[{site!r}]) or "
                    f"untie the weights first (e.g. module.weight = nn.Parameter(module.weight.clone()))"
                )
    return None


def config_sites(
    model: nn.Module, config: Any, presets: dict[str, Targets], supported: tuple[type, ...], skip: tuple[str, ...]
) -> list[tuple[str, nn.Module]]:
    """The sites of a method config with ``target_modules`` (None: its preset) and ``exclude_modules``."""
    targets = resolve_targets(model, config.name, config.target_modules, presets)
    return find_sites(model, config.name, targets, supported, config.exclude_modules, skip)


def candidates(model: nn.Module, supported: tuple[type, ...], limit: int = 10) -> str:
    """Distinct name suffixes (after the last block index) of the supported modules: what a user would target."""
    names = [n for n, m in iter_sites(model) if isinstance(innermost(m), supported)]
    suffixes = list(dict.fromkeys(re.split(r"(?:^|\.)\d+\.", n)[-1] for n in names))
    more = f", ... ({len(suffixes)} in all)" if len(suffixes) > limit else ""
    return ", ".join(suffixes[:limit]) + more if suffixes else "(none)"


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path)."""
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces the submodule called ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)


def find_head(model: nn.Module, head: bool | str) -> str | None:
    """Name of the classification head: ``head`` if a string, else timm's ``get_classifier()`` or a usual name."""
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(head, str):
        if id(get_module_or_none(model, head)) not in names:
            raise DeltaTuneError(f"head={head!r} names no module; candidates: {', '.join(_headcandidates(model))}")
        return head
    if not head:
        return None
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        module = get_classifier()
        if isinstance(module, nn.Module) and id(module) in names and any(True for _ in module.parameters()):
            return names[id(module)]
    for candidate in _HEAD_NAMES:
        module = get_module_or_none(model, candidate)
        if isinstance(module, nn.Linear):
            return candidate
    return None


def get_module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule called ``name`` or None."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _headcandidates(model: nn.Module) -> list[str]:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-3:] or ["(no Linear layers)"]
