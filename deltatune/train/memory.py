"""Training-memory options: gradient checkpointing through the delta wrappers, and a bfloat16 backbone.

Checkpointing recomputes each block's forward in backward instead of keeping its activations. The wrappers need
nothing special with non-reentrant autograd; with re-entrant checkpointing a block's gradients flow only if its
input requires grad, which a frozen stem's output does not: the deltas inside would silently get no gradient.
HF's ``gradient_checkpointing_enable`` makes its input embeddings' output require grad; timm does not, so
``enable_grad_checkpointing`` does the same on timm's stem, whatever ``timm.layers.set_reentrant_ckpt`` says.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core import uncompiled
from deltatune.errors import DeltaTuneError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def enable_grad_checkpointing(model: nn.Module, use_reentrant: bool = False) -> nn.Module:
    """Turns on the backbone's own gradient checkpointing (HF's or timm's) so that the deltas still get gradients.

    ``use_reentrant`` goes to HF's ``torch.utils.checkpoint`` calls; timm reads its global
    ``timm.layers.set_reentrant_ckpt`` setting, and either way works.
    """
    model = uncompiled(model)
    if hasattr(model, "gradient_checkpointing_enable"):
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise DeltaTuneError(f"{type(model).__name__} does not support gradient checkpointing; drop the option")
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5: the new name
        kwargs = {"use_reentrant": use_reentrant}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if enable is not None:
                enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model
    if not hasattr(model, "set_grad_checkpointing"):
        raise DeltaTuneError(
            f"{type(model).__name__} has no gradient checkpointing (neither HF's gradient_checkpointing_enable nor "
            "timm's set_grad_checkpointing); drop the option"
        )
    model.set_grad_checkpointing(True)
    stem = _stem(model)
    if not stem.__dict__.get("_deltatune_grad_output"):
        stem.register_forward_hook(_output_requires_grad)
        stem.__dict__["_deltatune_grad_output"] = True
    return model


def _stem(model: nn.Module) -> nn.Module:
    """The module that turns the input into the first block's tokens or feature map (timm names it so)."""
    for name in ("patch_embed", "stem", "conv1"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise DeltaTuneError(f"{type(model).__name__}: no patch_embed or stem found for gradient checkpointing")


def _output_requires_grad(module: nn.Module, args: Any, output: Any) -> None:
    """A frozen stem's output as a leaf that requires grad: re-entrant checkpointed blocks then pass gradients."""
    frozen = isinstance(output, Tensor) and output.is_floating_point() and not output.requires_grad
    if frozen and torch.is_grad_enabled():
        output.requires_grad_(True)


def backbone_to(model: nn.Module, precision: str) -> nn.Module:
    """The backbone's weights and buffers in ``precision`` (bf16 halves their memory), its floating inputs cast to
    that dtype on the way in (images come as float32); fp32 leaves the model as it is."""
    if precision not in PRECISIONS:
        raise DeltaTuneError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype != torch.float32:
        model.to(dtype)
        model.register_forward_pre_hook(functools.partial(_cast_inputs, dtype), with_kwargs=True)
    return model


def delta_dtype(precision: str, requested: str | None) -> str | None:
    """The trained tensors' dtype: the one asked for, else float32 beside a bf16 backbone (None: the backbone's)."""
    return requested or ("float32" if precision != "fp32" else None)


def _cast_inputs(dtype: torch.dtype, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(value: Any) -> Any:
        return value.to(dtype) if isinstance(value, Tensor) and value.is_floating_point() else value

    return tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}
