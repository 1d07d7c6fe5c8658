"""HF peft adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``) in and out of deltatune.

peft's LoRA and IA3 are deltatune's ``lora`` and ``ia3`` with other tensor names::

    base_model.model.<site>.lora_A.weight (r, in)   ->  <site>.lora_a (r, in)
    base_model.model.<site>.lora_B.weight (out, r)  ->  <site>.lora_b (1, out, r)
    base_model.model.<site>.ia3_l (out, 1) | (1, in) ->  <site>.ia3_scale (out,) | (in,)  (in: feedforward sites)
    base_model.model.<head>.<param>                 ->  the trained head (peft's modules_to_save)

PROMPT_TUNING and PREFIX_TUNING are deltatune's ``prompt`` and ``prefix`` (``interop.peft_prompts``).

Per-site ranks come from the tensors themselves; ``alpha_pattern`` and ``use_rslora`` keep their meaning. Every
option deltatune cannot reproduce exactly (DoRA, LoRA biases, layer selection, other peft types, ...) is refused
before the model is touched. peft itself is never imported: json and safetensors only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deltatune._layers import is_conv1d
from deltatune.core import apply, delta_modules, state_of
from deltatune.errors import DeltaTuneError
from deltatune.interop.peft_prompts import (
    EMBEDDINGS,
    PROMPT_PREFIX,
    PROMPT_TYPES,
    check_prompt,
    export_prompt,
    load_prompt,
)
from deltatune.methods.ia3 import IA3, IA3Config
from deltatune.methods.lora import LoRAConfig, LoRAFusedQKV, LoRALinear
from deltatune.targeting import innermost

EXPORTED = ("lora", "ia3", "prompt", "prefix")
CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
_SITE_KEY = re.compile(rf"{re.escape(PREFIX)}(.*)\.(?:lora_[AB]\.weight|ia3_l)")
# peft options deltatune cannot reproduce: (option, what to do). Each must be absent, None, False, empty or default.
_REFUSED = {
    "use_dora": "DoRA's magnitude vector has no deltatune equivalent; merge it with peft (merge_and_unload)",
    "lora_bias": "deltatune's LoRA has no bias term; train without lora_bias or merge with peft",
    "layers_to_transform": "name the sites in target_modules instead of selecting layers by index",
    "layers_pattern": "name the sites in target_modules instead of selecting layers by index",
    "loftq_config": "LoftQ changes the base weights; merge with peft and load the merged model",
    "layer_replication": "layer replication changes the architecture; merge with peft first",
    "target_parameters": "LoRA on bare parameters (MoE experts) is not supported; target modules instead",
    "trainable_token_indices": "trainable tokens are not supported; merge with peft first",
    "use_qalora": "quantized bases are not supported; dequantize and merge with peft first",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "alora_invocation_tokens": "activated LoRA is not supported",
    "megatron_config": "Megatron-parallel layers are not supported",
    "arrow_config": "Arrow routing is not supported",
}


def load_peft(model: nn.Module, directory: str | Path) -> nn.Module:
    """Applies the peft LoRA, IA3, prompt- or prefix-tuning adapter saved in ``directory`` to a plain ``model`` (in
    place) and returns it; see ``interop.peft_prompts`` for the prompt-learning types."""
    cfg, tensors = _read(Path(directory))
    kind = cfg.get("peft_type")
    if kind in PROMPT_TYPES:  # prompt learning: head keys lack ".model."
        check_prompt(model, cfg, tensors)
        head = _head(model, cfg, tensors, PROMPT_PREFIX)
        _check_keys(tensors, head, PROMPT_PREFIX, lambda k: k == EMBEDDINGS)
        load_prompt(model, cfg, tensors, head)
        _copy_head(model, tensors, head, PROMPT_PREFIX)
        return model
    head = _head(model, cfg, tensors)
    _check_keys(tensors, head)
    sites = {m.group(1) for k in tensors if (m := _SITE_KEY.fullmatch(k))}
    if kind == "LORA":
        _check_lora(cfg, tensors)
        ranks = {re.escape(s): tensors[f"{PREFIX}{s}.lora_A.weight"].shape[0] for s in sorted(sites)}
        config = LoRAConfig(
            r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout", 0)),
            target_modules=sorted(sites), rslora=bool(cfg.get("use_rslora")), rank_pattern=ranks,
            alpha_pattern=cfg.get("alpha_pattern") or None,
        )  # fmt: skip
    elif kind == "IA3":
        ff = sorted(s for s in sites if tensors[f"{PREFIX}{s}.ia3_l"].shape[0] == 1)  # (1, in): input scaled
        config = IA3Config(target_modules=sorted(sites), feedforward_modules=ff, fused_qkv_modules=[])
    else:
        raise DeltaTuneError(
            f"load_peft: peft_type {kind!r} is not supported (LORA, IA3 and PROMPT_TUNING are); merge it with peft "
            f"(model.merge_and_unload()) or retrain it with deltatune"
        )
    apply(model, config, head=head or False)
    with torch.no_grad():
        for name, module in delta_modules(model):
            _copy_in(module, name, tensors)
    _copy_head(model, tensors, head)
    return model


def _copy_head(model: nn.Module, tensors: dict[str, Tensor], head: str | None, prefix: str = PREFIX) -> None:
    """The head's tensors (peft's modules_to_save) into the model."""
    with torch.no_grad():
        for key, tensor in tensors.items():
            if head and key.startswith(f"{prefix}{head}."):
                model.get_parameter(key[len(prefix) :]).copy_(tensor)


def save_peft(model: nn.Module, directory: str | Path) -> None:
    """Writes a model tuned with one deltatune ``lora``, ``ia3``, ``prompt`` or ``prefix`` config as a peft adapter
    directory."""
    state = state_of(model)
    if state is None or len(state.entries) != 1 or state.entries[0].config.name not in EXPORTED:
        raise DeltaTuneError(
            f"save_peft: needs a model tuned with one config of {', '.join(EXPORTED)} (one apply, one method)"
        )
    entry, tensors = state.entries[0], {}
    head = state.head if state.head and entry.head else None
    if entry.config.name in ("prompt", "prefix"):
        cfg, tensors = export_prompt(model, state)
        prefix = PROMPT_PREFIX
        cfg["task_type"] = cfg["task_type"] or ("SEQ_CLS" if head else "FEATURE_EXTRACTION")
    else:
        for name, module in delta_modules(model):
            tensors.update(_export(module, name))
        cfg = _lora_config(model, entry.config) if entry.config.name == "lora" else _ia3_config(model)
        prefix = PREFIX
        cfg["task_type"] = None
    if head:
        tensors.update({f"{prefix}{head}.{k}": v for k, v in model.get_submodule(head).state_dict().items()})
    cfg.update(modules_to_save=[head] if head else None, base_model_name_or_path=None)
    cfg.update(inference_mode=True, peft_version=None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(directory / WEIGHTS))


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The adapter's config and tensors."""
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise DeltaTuneError(f"load_peft: {str(directory)!r} needs {CONFIG} and {WEIGHTS} (peft's save_pretrained)")
    return json.loads((directory / CONFIG).read_text()), load_file(str(directory / WEIGHTS))


def _check_lora(cfg: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Refuses what deltatune's LoRA cannot reproduce, naming the option and what to do."""
    for option, fix in _REFUSED.items():
        if cfg.get(option) not in (None, False, {}, [], "megatron.core"):
            raise DeltaTuneError(f"load_peft: {option}={cfg[option]!r} is not supported: {fix}")
    if cfg.get("bias", "none") != "none":
        raise DeltaTuneError(f"load_peft: bias={cfg['bias']!r} is not supported (bias='none' only); use BitFit apart")
    odd = [k for k in tensors if ".lora_" in k and not re.search(r"\.lora_[AB]\.weight$", k)]
    odd += [k for k in tensors if k.endswith(".lora_A.weight") and tensors[k].ndim != 2]
    if odd:
        raise DeltaTuneError(f"load_peft: {odd[0]} is not a Linear/Conv1D LoRA (embedding or conv LoRA unsupported)")


def _head(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, Tensor], prefix: str = PREFIX) -> str | None:
    """The one module peft saved whole (modules_to_save), which deltatune trains as the head; None if none."""
    wanted = cfg.get("modules_to_save") or []
    saved = sorted(
        n
        for n, _ in model.named_modules()
        if any(n == m or n.endswith("." + m) for m in wanted) and any(k.startswith(f"{prefix}{n}.") for k in tensors)
    )
    if len(saved) > 1 or (wanted and not saved):
        raise DeltaTuneError(
            f"load_peft: modules_to_save={wanted} must name exactly one module of the model whose weights the "
            f"file holds (found {saved}); deltatune trains a single head"
        )
    return saved[0] if saved else None


def _check_keys(
    tensors: dict[str, Tensor], head: str | None, prefix: str = PREFIX, known: Callable[[str], bool] | None = None
) -> None:
    """Every tensor is the method's (LoRA/IA3 by default) or the head's: anything else would be left behind, so
    nothing loads."""
    known = known or (lambda k: bool(_SITE_KEY.fullmatch(k)))
    extra = [k for k in tensors if not known(k) and not (head and k.startswith(f"{prefix}{head}."))]
    if extra:
        raise DeltaTuneError(f"load_peft: the file holds tensors deltatune cannot place ({extra[:3]}); nothing loaded")


def _copy_in(module: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
    """Copies one site's peft tensors into its deltatune wrapper."""
    if isinstance(module, LoRALinear):
        module.lora_a.copy_(tensors[f"{PREFIX}{name}.lora_A.weight"])
        module.lora_b.copy_(tensors[f"{PREFIX}{name}.lora_B.weight"].unsqueeze(0))
    elif isinstance(module, IA3):
        module.ia3_scale.copy_(tensors[f"{PREFIX}{name}.ia3_l"].flatten())


def _export(module: nn.Module, name: str) -> dict[str, Tensor]:
    """One site's tensors under peft's names; refuses what peft cannot express."""
    if isinstance(module, LoRAFusedQKV) or (isinstance(module, IA3) and module.mode == "kv"):
        raise DeltaTuneError(
            f"save_peft: {name} holds a fused-qkv delta, which peft cannot express; apply without fused_qkv "
            f"(lora) or with fused_qkv_modules=[] (ia3) to export"
        )
    if isinstance(module, LoRALinear):
        return {f"{PREFIX}{name}.lora_A.weight": module.lora_a, f"{PREFIX}{name}.lora_B.weight": module.lora_b[0]}
    if isinstance(module, IA3):
        v = module.ia3_scale
        return {f"{PREFIX}{name}.ia3_l": v.view(1, -1) if module.mode == "input" else v.view(-1, 1)}
    raise DeltaTuneError(f"save_peft: {name} ({type(module).__name__}) has no peft form (Linear/Conv1D sites only)")


def _lora_config(model: nn.Module, config: LoRAConfig) -> dict[str, Any]:
    """peft's LoraConfig fields for a deltatune LoRA: every site's rank and alpha written out."""
    sites = dict(delta_modules(model))
    ranks = {n: m.lora_a.shape[0] for n, m in sites.items()}
    alphas = {n: m.scaling * (math.sqrt(ranks[n]) if config.rslora else ranks[n]) for n, m in sites.items()}
    return {
        "peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(sites), "use_rslora": config.rslora, "bias": "none", "use_dora": False,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != config.r},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != config.alpha},
        "fan_in_fan_out": bool(sites) and all(is_conv1d(innermost(m)) for m in sites.values()),
    }  # fmt: skip


def _ia3_config(model: nn.Module) -> dict[str, Any]:
    """peft's IA3Config fields: the sites, and which of them are feedforward (input-scaled)."""
    sites = dict(delta_modules(model))
    ff = sorted(n for n, m in sites.items() if m.mode == "input")
    fan = bool(sites) and all(is_conv1d(innermost(m)) for m in sites.values())
    return {"peft_type": "IA3", "target_modules": sorted(sites), "feedforward_modules": ff, "fan_in_fan_out": fan}
