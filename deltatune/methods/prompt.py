"""Prompt tuning: "The Power of Scale for Parameter-Efficient Prompt Tuning" (Lester, Al-Rfou, Constant, EMNLP 2021).
https://arxiv.org/abs/2104.08691 (defaults as OpenDelta's soft prompt: 100 tokens, copies of word-embedding rows).

p learnable vectors P (p, d) join the encoder's input sequence, and the attention mask grows by p ones::

    [e_1, ..., e_L] -> [e_1, ..., e_{i-1}, P, e_i, ..., e_L]        mask -> [m_<i, 1...1, m_>=i]      p*d parameters

For HF transformers encoders with ``embeddings`` and ``encoder`` or ``layers`` (BERT, RoBERTa, ELECTRA, HF ViT), a
wrapper on ``embeddings`` inserts P at one of two points:

- ``insert="input"`` (OpenDelta, peft, Lester et al.): into the word embeddings, BEFORE the embedding layer adds
  positions and token types and applies its LayerNorm. The prompts get positions i..i+p-1 and token type 0, and the
  real tokens' positions shift by p. With ``insert_at=0`` (the default here) this is peft's prompt tuning exactly:
  a sequence classifier's pooler then reads the first PROMPT's output, not [CLS]'s. Text encoders only.
- ``insert="output"`` (the default): into the embedding layer's output, after the position embeddings and the
  LayerNorm, at ``insert_at`` (default 1, after [CLS], so BERT's pooler still reads [CLS]). The prompts carry no
  position, and the real tokens keep theirs.

HF decoder LMs (GPT-2, Llama) take ``insert="input"`` (at 0) only: one wrapper on the decoder stack prepends the
prompts to the input embeddings and drops their outputs (``methods._decoder``; peft's prompt tuning).

Init: ``init="vocab"`` (OpenDelta's default) copies word-embedding rows 0..p-1 (cycled if p exceeds the vocabulary;
models without a vocabulary, e.g. HF ViT, fall back to uniform); ``init="uniform"``: U(-init_range, init_range).
A forward pre-hook on the encoder model pads a 2-D ``attention_mask`` to match; the hook does nothing once the
wrapper is gone. The encoder's ``last_hidden_state`` has p more positions (a token-level head must drop positions
insert_at .. insert_at + p). Not mergeable.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.core import Applied
from deltatune.errors import DeltaTuneError
from deltatune.methods._decoder import DECODERS, DecoderPrompt, Delegating, decoder_stack
from deltatune.registry import register, require
from deltatune.targeting import family, is_delta, set_module

SUPPORTED = ("bert", "hf-vit")
INSERTS = ("output", "input")
INITS = ("vocab", "uniform")


@register("prompt")
@dataclass
class PromptConfig:
    """Soft prompt tokens at the input of an HF transformers encoder (prompt tuning)."""

    num_tokens: int = 100
    """Number of prompt tokens p (OpenDelta's default 100)."""
    init: str = "vocab"
    """vocab: copies of word-embedding rows 0..p-1 (OpenDelta; uniform where there is no vocabulary); uniform."""
    init_range: float = 0.5
    """With init="uniform": prompts start U(-init_range, init_range)."""
    insert: str = "output"
    """output: after the embedding layer (no positions, no LayerNorm); input: before it (peft, OpenDelta)."""
    insert_at: int | None = None
    """Position of the first prompt token; None: 0 for insert="input" (peft), 1 (after [CLS]) for "output"."""

    mergeable: ClassVar[bool] = False
    families: ClassVar[frozenset[str] | None] = frozenset({"bert", *DECODERS})  # HF text encoders and decoder LMs
    name: ClassVar[str]

    def __post_init__(self) -> None:
        require(self, self.num_tokens >= 1, "num_tokens", ">= 1")
        require(self, self.insert_at is None or self.insert_at >= 0, "insert_at", ">= 0")
        require(self, self.insert in INSERTS, "insert", f"one of {', '.join(INSERTS)}")
        require(self, self.init in INITS, "init", f"one of {', '.join(INITS)}")

    @property
    def position(self) -> int:
        """Where the first prompt token goes."""
        return self.insert_at if self.insert_at is not None else (0 if self.insert == "input" else 1)

    def applies_to(self, model: nn.Module) -> bool:
        """Decoder LMs take prompts only before their input embeddings, at 0: insert="input", insert_at 0."""
        return family(model) not in DECODERS or (self.insert == "input" and self.position == 0)

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps the encoder's ``embeddings`` in a ``SoftPrompt`` and hooks the encoder model to pad its mask."""
        if family(model) in DECODERS:
            return self._apply_decoder(model)
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
        words = [getattr(m.embeddings, "word_embeddings", None) for _, m in encoders]
        if self.insert == "input" and not all(isinstance(w, nn.Embedding) for w in words):
            raise DeltaTuneError("prompt: insert='input' needs word embeddings (text encoders); use insert='output'")
        sites = []
        for (name, encoder), word in zip(encoders, words):
            site = f"{name}.embeddings" if name else "embeddings"
            wrapper = SoftPrompt(encoder.embeddings, self._init(encoder, word), self.position, self.insert == "input")
            set_module(model, site, wrapper)
            wrapper.hook(encoder)
            sites.append(site)
        return Applied(sites)


    def _apply_decoder(self, model: nn.Module) -> Applied:
        """HF decoder LMs (GPT-2, Llama): one ``DecoderPrompt`` on the decoder stack (peft's prompt tuning)."""
        if not self.applies_to(model):
            raise DeltaTuneError(
                f"prompt: decoder LMs ({type(model).__name__}) take prompts before their input embeddings only; "
                f"apply with insert='input' (insert_at 0)"
            )
        site = decoder_stack(model)
        if is_delta(getattr(model, site)):
            raise DeltaTuneError("prompt: the decoder stack is wrapped already (prompt or prefix); one per decoder LM")
        stack = getattr(model, site)
        set_module(model, site, DecoderPrompt(stack, self._init(stack, stack.get_input_embeddings())))
        return Applied([site])

    def _init(self, encoder: nn.Module, word: nn.Module | None) -> Tensor:
        """(p, d) initial prompts: word-embedding rows 0..p-1 (cycled), or uniform."""
        if self.init == "vocab" and isinstance(word, nn.Embedding):
            rows = torch.arange(self.num_tokens, device=word.weight.device) % word.num_embeddings
            return word.weight.detach()[rows].clone()
        ref = next(encoder.parameters())
        prompt = torch.empty(self.num_tokens, encoder.config.hidden_size, device=ref.device, dtype=ref.dtype)
        return nn.init.uniform_(prompt, -self.init_range, self.init_range)


class SoftPrompt(Delegating):
    """Wraps an HF ``embeddings`` module: inserts the prompts into its input or output, (B, L, d) -> (B, L + p, d)."""

    delta_method = "prompt"

    def __init__(self, base: nn.Module, prompt: Tensor, insert_at: int, at_input: bool = False):
        super().__init__()
        self.base, self.delta_stage = base, None
        self.prompt_tokens = nn.Parameter(prompt)  # (p, d)
        self.insert_at, self.at_input = insert_at, at_input
        self.train(base.training)  # take the mode of the module it replaces

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.at_input:
            return self._forward_input(*args, **kwargs)
        return self._insert(self.base(*args, **kwargs))  # (B, L + p, d)

    def _insert(self, e: Tensor) -> Tensor:
        """(B, L, d) -> (B, L + p, d) with the prompts at insert_at."""
        i = min(self.insert_at, e.shape[1])
        prompt = self.prompt_tokens.to(e.dtype).unsqueeze(0).expand(e.shape[0], -1, -1)  # (B, p, d)
        return torch.cat([e[:, :i], prompt, e[:, i:]], dim=1)

    def _forward_input(self, *args: Any, **kwargs: Any) -> Tensor:
        """The prompts join the word embeddings; the embedding layer then adds positions, token types and its norm."""
        bound = inspect.signature(self.base.forward).bind(*args, **kwargs).arguments
        if bound.get("position_ids") is not None:
            raise DeltaTuneError("prompt: insert='input' shifts every position by p; call without position_ids")
        ids, embeds = bound.pop("input_ids", None), bound.get("inputs_embeds")
        embeds = self.base.word_embeddings(ids) if embeds is None else embeds  # (B, L, d)
        bound["inputs_embeds"] = self._insert(embeds)
        types = bound.get("token_type_ids")
        if types is not None:  # the prompts are segment 0, as in peft
            i, zeros = min(self.insert_at, types.shape[1]), types.new_zeros(types.shape[0], self.prompt_tokens.shape[0])
            bound["token_type_ids"] = torch.cat([types[:, :i], zeros, types[:, i:]], dim=1)
        return self.base(**bound)

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
        while module is not self and is_delta(module):
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
