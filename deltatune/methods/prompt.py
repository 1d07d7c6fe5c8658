"""Prompt tuning: "The Power of Scale for Parameter-Efficient Prompt Tuning" (Lester, Al-Rfou, Constant, EMNLP 2021).
https://arxiv.org/abs/2104.08691 (defaults as OpenDelta's soft prompt: 100 tokens, U(-0.5, 0.5)).

p learnable vectors P (p, d) join the encoder's input sequence, and the attention mask grows by p ones::

    [e_1, ..., e_L] -> [e_1, ..., e_{i-1}, P, e_i, ..., e_L]        mask -> [m_<i, 1...1, m_>=i]      p*d parameters

For HF transformers encoders with ``embeddings`` and ``encoder`` or ``layers`` (BERT, RoBERTa, ELECTRA, HF ViT):
a wrapper on ``embeddings`` inserts P into its output (after the position embeddings and the embedding LayerNorm:
the prompts carry no position), at ``insert_at`` (default 1, after [CLS], so BERT's pooler still reads [CLS]; 0 puts
them first as in Lester et al. and OpenDelta). A forward pre-hook on the encoder model pads a 2-D
``attention_mask`` to match; the hook does nothing once the wrapper is gone. The encoder's ``last_hidden_state``
has p more positions (a token-level head must drop positions insert_at .. insert_at + p). Not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.registry import register, require
from deltatune.targeting import family, is_delta, set_module

SUPPORTED = ("bert", "hf-vit")


@register("prompt")
@dataclass
class PromptConfig:
    """Soft prompt tokens at the input of an HF transformers encoder (prompt tuning)."""

    num_tokens: int = 100
    """Number of prompt tokens p (OpenDelta's default 100)."""
    init_range: float = 0.5
    """Prompts start U(-init_range, init_range)."""
    insert_at: int = 1
    """Position of the first prompt token: 1 puts them after [CLS], 0 before every token."""

    mergeable: ClassVar[bool] = False
    name: ClassVar[str]

    def __post_init__(self) -> None:
        require(self, self.num_tokens >= 1, "num_tokens", ">= 1")
        require(self, self.insert_at >= 0, "insert_at", ">= 0")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps the encoder's ``embeddings`` in a ``SoftPrompt`` and hooks the encoder model to pad its mask."""
        encoders = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(getattr(m, "embeddings", None), nn.Module) and (hasattr(m, "encoder") or hasattr(m, "layers"))
        ]
        if family(model) not in SUPPORTED or not encoders:
            raise DeltaTuneError(
                f"prompt supports HF transformers encoders with .embeddings (BERT family, HF ViT), not "
                f"{type(model).__name__}; for timm ViTs use 'vpt-shallow'"
            )
        if any(isinstance(m.embeddings, SoftPrompt) for _, m in encoders):
            raise DeltaTuneError("prompt: the model already has soft prompts; apply 'prompt' once")
        sites = []
        for name, encoder in encoders:
            site = f"{name}.embeddings" if name else "embeddings"
            d = encoder.config.hidden_size
            ref = next(encoder.parameters())
            prompt = torch.empty(self.num_tokens, d, device=ref.device, dtype=ref.dtype)
            wrapper = SoftPrompt(
                encoder.embeddings, nn.init.uniform_(prompt, -self.init_range, self.init_range), self.insert_at
            )
            set_module(model, site, wrapper)
            wrapper.hook(encoder)
            sites.append(site)
        return Applied(sites)


class SoftPrompt(nn.Module):
    """Wraps an HF ``embeddings`` module: inserts the prompts into its output (B, L, d) -> (B, L + p, d)."""

    delta_method = "prompt"

    def __init__(self, base: nn.Module, prompt: Tensor, insert_at: int):
        super().__init__()
        self.base, self.delta_stage = base, None
        self.prompt_tokens = nn.Parameter(prompt)  # (p, d)
        self.insert_at = insert_at
        self.train(base.training)  # take the mode of the module it replaces

    def __getattr__(self, name: str) -> Any:
        # HF models reach into their embeddings (get_input_embeddings, ViT's patch_embeddings): delegate to the base.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        e = self.base(*args, **kwargs)  # (B, L, d)
        i = min(self.insert_at, e.shape[1])
        prompt = self.prompt_tokens.to(e.dtype).unsqueeze(0).expand(e.shape[0], -1, -1)  # (B, p, d)
        return torch.cat([e[:, :i], prompt, e[:, i:]], dim=1)  # (B, L + p, d)

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.prompt_tokens]

    def hook(self, encoder: nn.Module) -> None:
        """Pads the encoder model's 2-D attention mask before each forward while this wrapper is in place."""
        # A bound method (not a closure), so that copy.deepcopy of the model hooks the copied wrapper.
        encoder.register_forward_pre_hook(self._pad_hook, with_kwargs=True)

    def _pad_hook(self, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._installed(encoder):  # unwrapped or rolled back: the stale hook does nothing
            return None
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = self.pad(kwargs["attention_mask"])
        elif len(args) > 1:
            args = (args[0], self.pad(args[1]), *args[2:])
        return args, kwargs

    def _installed(self, encoder: nn.Module) -> bool:
        module = getattr(encoder, "embeddings", None)
        while module is not self and is_delta(module) and hasattr(module, "base"):
            module = module.base
        return module is self

    def pad(self, mask: Tensor | None) -> Tensor | None:
        """(B, L) -> (B, L + p) with ones at the prompt positions."""
        if mask is None:
            return None
        if mask.ndim != 2:
            raise DeltaTuneError(f"prompt: expected a 2-D (batch, length) attention_mask, got {tuple(mask.shape)}")
        i, p = min(self.insert_at, mask.shape[1]), self.prompt_tokens.shape[0]
        ones = mask.new_ones(mask.shape[0], p)
        return torch.cat([mask[:, :i], ones, mask[:, i:]], dim=1)
