"""The bundled offline backbone: a small timm ViT pretrained on formula-driven fractals, loaded without network.

The weights (``deltatune/weights/offline_vit.safetensors``, fp16, no head) come from
``python scripts/pretrain_offline_vit.py --out deltatune/weights/offline_vit.safetensors``; the file's metadata
holds the architecture, normalisation, command, seed and pretraining accuracy. The model is registered with timm,
so ``timm.create_model("deltatune_offline_vit", pretrained=True, num_classes=10)`` works offline once
``deltatune.offline`` is imported.
"""

import json
from pathlib import Path
from typing import Any

import timm
from safetensors import safe_open
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from deltatune.errors import DeltaTuneError

WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "weights" / "offline_vit.safetensors"
# The pretraining script builds its model from these; the shipped file's metadata records the values it used.
OFFLINE_VIT_ARCH: dict[str, Any] = dict(
    img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0, qkv_bias=True, class_token=True
)
OFFLINE_MEAN = (0.5, 0.5, 0.5)
OFFLINE_STD = (0.5, 0.5, 0.5)

default_cfgs = generate_default_cfgs(
    {
        "deltatune_offline_vit": dict(
            file=str(WEIGHTS_FILE),
            num_classes=0,  # shipped without a head: every task gets a fresh one
            input_size=(3, OFFLINE_VIT_ARCH["img_size"], OFFLINE_VIT_ARCH["img_size"]),
            fixed_input_size=True,
            crop_pct=1.0,
            interpolation="bilinear",
            mean=OFFLINE_MEAN,
            std=OFFLINE_STD,
            first_conv="patch_embed.proj",
            classifier="head",
            license="apache-2.0",
            description="ViT pretrained on FractalDB-style formula images, bundled with deltatune for offline use.",
            paper_ids="arXiv:2101.08515",
        )
    }
)


def read_weights_metadata(path: str | Path = WEIGHTS_FILE) -> dict[str, str]:
    """Returns the string metadata of a weight file (arch, mean, std, command, seed, accuracy, date).

    Raises:
        DeltaTuneError: If the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DeltaTuneError(
            f"Offline ViT weights not found at {path}. Reinstall deltatune (the file ships with the package) or "
            f"regenerate it with `python scripts/pretrain_offline_vit.py --out {path}`."
        )
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _filter_fn(state_dict: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """Adapts the file to the model like timm's ViT filter, then enforces a strict match for all but the head."""
    state_dict = checkpoint_filter_fn(state_dict, model)  # resamples pos/patch embeddings if img/patch size differ
    own = model.state_dict()
    expected = {k for k in own if not k.startswith("head.")}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    reshaped = sorted(k for k in expected & state_dict.keys() if state_dict[k].shape != own[k].shape)
    if missing or unexpected or reshaped:
        raise DeltaTuneError(
            f"Offline ViT weights do not match the model (missing {missing}, unexpected {unexpected}, other shape "
            f"{reshaped}); only the head may differ. Drop architecture overrides or regenerate the weight file."
        )
    # Keep the model's fresh head so that timm's strict load succeeds whatever num_classes is.
    state_dict.update({k: v for k, v in own.items() if k.startswith("head.")})
    return state_dict


@register_model
def deltatune_offline_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Builds the offline ViT with the architecture recorded in its weight file; ``pretrained`` loads that file.

    A ``pretrained_cfg_overlay=dict(file=...)`` points at another file made by the pretraining script.
    """
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    path = Path(overlay.get("file") or WEIGHTS_FILE)
    arch = dict(OFFLINE_VIT_ARCH)
    if pretrained or path.is_file():
        meta = read_weights_metadata(path)
        arch = json.loads(meta["arch"])
        size = arch["img_size"]
        recorded = dict(
            file=str(path),
            input_size=(3, size, size),
            mean=tuple(json.loads(meta["mean"])),
            std=tuple(json.loads(meta["std"])),
        )
        overlay = {**recorded, **overlay}
    return build_model_with_cfg(
        VisionTransformer,
        "deltatune_offline_vit",
        pretrained,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **{**arch, **kwargs},
    )


def create_offline_vit(num_classes: int, pretrained: bool = True, **overrides: Any) -> nn.Module:
    """Creates the bundled offline ViT with a fresh ``num_classes`` head (0 for no head), without any download.

    Args:
        num_classes: Size of the new classification head.
        pretrained: Load the shipped fractal-pretrained weights (all but the head, strictly).
        **overrides: Extra arguments for ``timm.create_model`` / ``VisionTransformer`` (e.g. ``drop_path_rate``).

    Raises:
        DeltaTuneError: If ``pretrained`` and the weight file is missing.
    """
    return timm.create_model("deltatune_offline_vit", pretrained=pretrained, num_classes=num_classes, **overrides)
