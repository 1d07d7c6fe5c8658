"""Prompt and prefix tuning on HF decoder LMs (GPT-2, Llama): one wrapper on the decoder stack (``transformer`` /
``model``), which is where a decoder exposes its input embeddings and its key/value cache.

- ``DecoderPrompt`` (Lester et al.; peft's PROMPT_TUNING): p vectors prepended to the input embeddings, p ones to
  the attention mask; the prompts take positions 0..p-1 and the tokens shift by p. The outputs at the prompt
  positions are dropped, so logits stay aligned with the input tokens (peft returns them; compare its [:, p:]).
- ``DecoderPrefix`` (Li & Liang; peft's PREFIX_TUNING): every layer's p key and value vectors fill the KV cache
  before the tokens arrive, and the mask gets p ones. As in Li & Liang's GPT-2 code (prefixes passed as
  ``past_key_values``) and peft, the tokens then take positions p..p+L-1; RoPE rotates queries and new keys, not
  the stored prefixes. Flat layout (as PrefixMLP's output and peft's ``prompt_embeddings``)::

      (p, L * 2 * w): per layer l, keys [2l w, (2l+1) w) then values, each w = kv_heads * head_dim (heads-major)

A cache that already holds tokens (generation after the first step) is left alone; the mask is padded with p ones
and given position ids are shifted by p always, so ``generate`` sees the positions a plain forward uses.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import DeltaTuneError
from deltatune.numerics import round_to

DECODERS = ("gpt2", "llama")


def decoder_stack(model: nn.Module) -> str:
    """Name of the HF decoder stack of a causal LM (GPT-2 ``transformer``, Llama ``model``)."""
    name = getattr(model, "base_model_prefix", "")
    if not isinstance(getattr(model, name, None), nn.Module) or not hasattr(model.config, "num_hidden_layers"):
        raise DeltaTuneError(f"{type(model).__name__} has no HF decoder stack (base_model_prefix) to prompt")
    return name


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's attention."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, heads, head_dim


class Delegating(nn.Module):
    """A wrapper whose missing attributes come from its ``base``: HF code reaches into the modules it wraps
    (get_input_embeddings, config, wte, ViT's patch_embeddings)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base, name)


class _DecoderWrapper(Delegating):
    """Shared plumbing: binds the stack's call to names, pads the 2-D mask, delegates attributes to the stack."""

    def __init__(self, base: nn.Module, p: int):
        super().__init__()
        self.base, self.delta_stage, self.p = base, None, p
        self.train(base.training)  # take the mode of the module it replaces

    def bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any], bool]:
        """The call's arguments by name, the mask padded; and whether the cache is empty (a sequence starts)."""
        bound = inspect.signature(self.base.forward).bind(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))
        mask = bound.get("attention_mask")
        if mask is not None:
            if mask.ndim != 2:
                raise DeltaTuneError(f"{self.delta_method}: expected a 2-D attention_mask, got {tuple(mask.shape)}")
            bound["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.p), mask], dim=1)
        if bound.get("position_ids") is not None:  # the caller's positions count its own tokens: p come first
            bound["position_ids"] = bound["position_ids"] + self.p
        cache = bound.get("cache")
        return bound, cache is None or cache.get_seq_length() == 0

    @staticmethod
    def batch(bound: dict[str, Any]) -> int:
        x = bound.get("input_ids")
        return (x if x is not None else bound["inputs_embeds"]).shape[0]


class DecoderPrompt(_DecoderWrapper):
    """Wraps a decoder stack: p prompt vectors before the input embeddings; their outputs dropped."""

    delta_method = "prompt"

    def __init__(self, base: nn.Module, prompt: Tensor):
        super().__init__(base, prompt.shape[0])
        self.prompt_tokens = nn.Parameter(prompt)  # (p, d)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound, fresh = self.bind(args, kwargs)
        if not fresh:  # the cache holds the prompts already
            return self.base(**bound)
        if bound.get("token_type_ids") is not None:
            raise DeltaTuneError("prompt: decoder prompts have no token type; call without token_type_ids")
        positions = bound.get("position_ids")
        if positions is not None:  # the prompts take positions 0..p-1
            first = torch.arange(self.p, device=positions.device).expand(positions.shape[0], -1)
            bound["position_ids"] = torch.cat([first, positions], dim=1)
        ids, embeds = bound.pop("input_ids", None), bound.get("inputs_embeds")
        embeds = self.base.get_input_embeddings()(ids) if embeds is None else embeds  # (B, L, d)
        prompt = self.prompt_tokens.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)  # (B, p, d)
        bound["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, p + L, d)
        out = self.base(**bound)
        out.last_hidden_state = out.last_hidden_state[:, self.p :]  # (B, L, d): aligned with the tokens
        return out

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.prompt_tokens]


class DecoderPrefix(_DecoderWrapper):
    """Wraps a decoder stack: every layer's key/value prefixes in the KV cache before the tokens."""

    delta_method = "prefix"

    def __init__(self, base: nn.Module, p: int, shared: nn.Module | None, ref: Tensor):
        super().__init__(base, p)
        self.layers, self.heads, self.head_dim = kv_shape(base.config)
        if shared is not None:
            self.prefix_mlp = shared  # PrefixMLP: E -> (p, L * 2 * w)
        else:
            shape = (p, self.layers * 2 * self.heads * self.head_dim)
            self.prefix_kv = nn.Parameter(torch.randn(shape, device=ref.device, dtype=ref.dtype))

    def prefixes(self) -> Tensor:
        """Every layer's keys and values, flat: (p, L * 2 * w)."""
        if hasattr(self, "prefix_kv"):
            return self.prefix_kv
        return self.prefix_mlp.rows(0, self.prefix_mlp.prefix_out.out_features)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if (
            self.training
            and torch.is_grad_enabled()
            and any(getattr(m, "gradient_checkpointing", False) for m in self.base.modules())
        ):
            raise DeltaTuneError(
                "prefix on a decoder LM keeps its prefixes in the KV cache, which transformers' layers drop under "
                "gradient checkpointing in training; train prefix without gradient checkpointing (--grad-"
                "checkpointing), or use prompt (insert='input'), which checkpoints"
            )
        bound, fresh = self.bind(args, kwargs)
        if fresh:
            from transformers import DynamicCache

            cache = bound.get("cache")
            cache = DynamicCache(config=self.base.config) if cache is None else cache
            b, ref = self.batch(bound), next(self.base.parameters())
            kv = self.prefixes().to(ref.dtype).view(self.p, self.layers * 2, self.heads, self.head_dim)
            kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, b, -1, -1, -1)  # (2L, B, heads, p, head_dim)
            for layer in range(self.layers):
                cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
            bound["cache"] = cache
        return self.base(**bound)

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.prefix_kv] if hasattr(self, "prefix_kv") else list(self.prefix_mlp.parameters())

    @torch.no_grad()
    def merge(self) -> nn.Module | None:
        """Folds the reparameterising MLP into fixed prefixes (float64, rounded once); the wrapper stays (None)."""
        if hasattr(self, "prefix_mlp"):
            mlp = self.prefix_mlp
            kv = round_to(mlp.exact_rows(0, mlp.prefix_out.out_features), mlp.prefix_embed.dtype)
            del self.prefix_mlp
            self.prefix_kv = nn.Parameter(kv.contiguous(), requires_grad=False)
        return None
