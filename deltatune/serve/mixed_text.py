"""Per-row prompts and prefixes on HF text models in one mixed-task backbone pass (``MultiTaskModel``).

Rows arrive sorted by task (``mixed.Context.groups``: each task's rows are one slice). Each task's rows get the
sequence its own single-task wrapper builds; the groups are then padded to the batch's common length with
positions masked out through the 2-D ``attention_mask`` (zeros: never attended) and placed where they change
nothing else, so every row sees what its single-task model sees (up to float summation order):

- BERT-family prompts (``SoftPrompt`` on ``embeddings``), width ``L + P`` (P: the batch's longest prompt): a row
  holds ``[tokens[:i], prompt, tokens[i:], pad]``, pads after the real tokens. ``insert="output"`` rows (and rows
  without prompts) take the embedding layer as called, their prompts after it; ``insert="input"`` rows take a
  second pass of the layer (only when the batch holds such tasks) with their prompts among the word embeddings
  (the layer's own positions ``0 .. L+p-1``, token type 0, as the single-task wrapper). A pre-hook on the encoder
  model pads the mask alike. The pooler reads position 0, the same token as in each task's own model.
- BERT-family prefixes (``PrefixAttention`` on ``attention.self``): every row attends over ``P`` prefix slots
  (its own p keys/values, then masked zeros) and the tokens; prefixes carry no position, so slot order is free.
- GPT-2 / Llama (``DecoderPrompt`` / ``DecoderPrefix`` on the decoder stack): a cache of ``P`` prefix slots (a row's
  p prefixes, the rest masked), then ``[prompt, tokens, pad]`` with explicit per-row positions
  ``p + [0 .. q+L-1]`` (q prompts, p prefixes: what the single-task wrapper gives, RoPE included); causal
  attention keeps the pads after the tokens out of every real token's view. Each row's prompt outputs are dropped,
  so the sequence classifier reads the same last non-padding token (found from ``input_ids``, or the last one).

A batch where no task has prompts or prefixes at a site runs that site's plain layer: no padding, nothing extra.
Generation (a cache that already holds tokens) is not a mixed-batch use and is refused.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import DeltaTuneError
from deltatune.methods._decoder import DecoderPrefix, DecoderPrompt, Delegating
from deltatune.methods.prefix import PrefixAttention, attention
from deltatune.methods.prompt import SoftPrompt
from deltatune.targeting import innermost, set_module

if TYPE_CHECKING:
    from deltatune.serve.mixed import Context

KINDS = ("text-prompt", "text-prefix", "text-decoder")  # distinct from mixed_tokens' timm "prefix"
Rows = list[tuple[Any, int, int]]  # (the task's wrapper or None, start row, end row) per group of the batch


def kind(module: nn.Module) -> str | None:
    """The mixed-text kind of a delta wrapper (None: not a text prompt/prefix wrapper this module mixes)."""
    if isinstance(module, SoftPrompt) and isinstance(getattr(module.base, "word_embeddings", None), nn.Embedding):
        return "text-prompt"
    if isinstance(module, PrefixAttention) and hasattr(innermost(module.base), "attention_head_size"):
        return "text-prefix"  # HF BERT-family self-attention (timm's Attention is another module's)
    if isinstance(module, (DecoderPrompt, DecoderPrefix)):
        return "text-decoder"
    return None


def is_text(ops: list[list[tuple[str, Any]]]) -> bool:
    """Whether a site's per-task ops are text prompt/prefix wrappers."""
    return any(k in KINDS for o in ops for k, _ in o)


def install(net: nn.Module, text_sites: dict[str, list[list[tuple[str, Any]]]], ctx: Context) -> None:
    """Wraps each text site of the mixed network (after its inner sites are in place) in its mixed form."""
    for site, ops in text_sites.items():
        if any(len(o) > 1 or (o and o[0][0] not in KINDS) for o in ops):
            raise DeltaTuneError(f"mixed batch: {site} holds a prompt/prefix wrapper and other deltas; run grouped")
        per_task = [o[0][1] if o else None for o in ops]
        base = net.get_submodule(site)
        kinds = {o[0][0] for o in ops if o}
        if kinds == {"text-prompt"}:
            wrapper: nn.Module = MixedPrompt(base, per_task, ctx)
            parent = site.rpartition(".")[0]
            encoder = net.get_submodule(parent) if parent else net
            encoder.register_forward_pre_hook(wrapper.pad_mask_hook, with_kwargs=True)
        elif kinds == {"text-prefix"}:
            wrapper = MixedPrefix(base, per_task, ctx)
        else:
            wrapper = MixedDecoder(base, per_task, ctx)
        set_module(net, site, wrapper)


def _groups(per_task: list[Any], ctx: Context) -> Rows:
    """The batch's groups of rows with each one's task's wrapper at a site (None: the task has none there)."""
    return [(per_task[pos], start, end) for pos, start, end in ctx.groups]


def _pad(x: Tensor, total: int) -> Tensor:
    """Zeros after dim 1 up to ``total`` positions: (B, n, ...) -> (B, total, ...)."""
    extra = total - x.shape[1]
    return x if extra == 0 else F.pad(x, [0, 0] * (x.ndim - 2) + [0, extra])


def _splice(x: Tensor, block: Tensor, at: int) -> Tensor:
    """``block`` (B, p, ...) inserted into ``x`` (B, n, ...) at position ``min(at, n)`` along dim 1."""
    i = min(at, x.shape[1])
    return torch.cat([x[:, :i], block, x[:, i:]], dim=1)


def _rows_of(t: Tensor, rows: int) -> Tensor:
    """(p, ...) -> (rows, p, ...), a view."""
    return t.unsqueeze(0).expand(rows, *t.shape)


def _bind(fn: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name (its ``**kwargs`` flattened in)."""
    bound = inspect.signature(fn).bind(*args, **kwargs).arguments
    bound.update(bound.pop("kwargs", {}))
    return bound


class MixedPrompt(Delegating):
    """A BERT-family ``embeddings`` layer where each task's rows get its own soft prompt (or none)."""

    def __init__(self, base: nn.Module, prompts: list[SoftPrompt | None], ctx: Context) -> None:
        super().__init__()
        self.base, self.prompts, self.ctx = base, prompts, ctx  # the prompts: a plain list (the tasks' modules)
        self.train(base.training)  # the mode of the module it replaces (dropout)

    def _layout(self) -> tuple[Rows, int]:
        """Per group (SoftPrompt or None, rows) and the batch's longest prompt P."""
        rows = _groups(self.prompts, self.ctx)
        return rows, max((m.prompt_tokens.shape[0] for m, _, _ in rows if m is not None), default=0)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        rows, width = self._layout()
        if width == 0:  # no task of this batch has prompts: the plain layer
            return self.base(*args, **kwargs)
        # rows without prompts before the layer: the layer as called (its own positions, RoBERTa's included)
        plain = self.base(*args, **kwargs) if any(m is None or not m.at_input for m, _, _ in rows) else None
        at_input = any(m is not None and m.at_input for m, _, _ in rows)
        prompted, n = self._input_pass(rows, args, kwargs) if at_input else (None, plain.shape[1])
        parts = []
        for m, s, e in rows:
            if m is None:
                o = plain[s:e]
            elif m.at_input:
                o = prompted[s:e, : n + m.prompt_tokens.shape[0]]
            else:  # prompts after the embedding layer, as the single-task wrapper
                o = _splice(plain[s:e], _rows_of(m.prompt_tokens.to(plain.dtype), e - s), m.insert_at)
            parts.append(_pad(o, n + width))
        return torch.cat(parts)  # (B, L + P, d)

    def _input_pass(self, rows: Rows, args: tuple, kwargs: dict) -> tuple[Tensor, int]:
        """The layer over every row with the ``insert="input"`` tasks' prompts among their word embeddings (as
        their single-task wrapper: the layer's own positions 0..L+p-1, token type 0), pads after; and L."""
        bound = _bind(self.base.forward, args, kwargs)
        if bound.get("position_ids") is not None:
            raise DeltaTuneError("prompt: insert='input' shifts every position by p; call without position_ids")
        ids, embeds = bound.pop("input_ids", None), bound.pop("inputs_embeds", None)
        words = self.base.word_embeddings(ids) if embeds is None else embeds  # (B, L, d)
        types, n = bound.pop("token_type_ids", None), words.shape[1]
        inner = n + max(m.prompt_tokens.shape[0] for m, _, _ in rows if m is not None and m.at_input)
        seqs, kinds = [], []
        for m, s, e in rows:
            w, t = words[s:e], None if types is None else types.expand(words.shape[0], n)[s:e]
            if m is not None and m.at_input:
                w = _splice(w, _rows_of(m.prompt_tokens.to(w.dtype), e - s), m.insert_at)
                t = None if t is None else _splice(t, t.new_zeros(e - s, m.prompt_tokens.shape[0]), m.insert_at)
            seqs.append(_pad(w, inner)), kinds.append(None if t is None else _pad(t, inner))
        if types is not None:
            bound["token_type_ids"] = torch.cat(kinds)
        return self.base(inputs_embeds=torch.cat(seqs), **bound), n  # (B, L + P_in, d)

    def pad_mask_hook(self, encoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook on the encoder model: each row's 2-D mask as its task's, then zeros to ``L + P``."""
        rows, width = self._layout()
        if width == 0:
            return None
        positional = "attention_mask" not in kwargs and len(args) > 1
        mask = args[1] if positional else kwargs.get("attention_mask")
        if mask is None:
            ref = args[0] if args and args[0] is not None else kwargs.get("input_ids")
            ref = kwargs["inputs_embeds"] if ref is None else ref
            mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if mask.ndim != 2:
            raise DeltaTuneError(f"prompt: expected a 2-D (batch, length) attention_mask, got {tuple(mask.shape)}")
        n, parts = mask.shape[1], []
        for m, s, e in rows:
            part = mask[s:e]
            if m is not None:
                part = _splice(part, part.new_ones(e - s, m.prompt_tokens.shape[0]), m.insert_at)
            parts.append(_pad(part, n + width))
        if positional:
            return (args[0], torch.cat(parts), *args[2:]), kwargs
        return args, {**kwargs, "attention_mask": torch.cat(parts)}


class MixedPrefix(Delegating):
    """A BERT-family self-attention where each task's rows attend over its own key/value prefixes (or none)."""

    def __init__(self, base: nn.Module, prefixes: list[PrefixAttention | None], ctx: Context) -> None:
        super().__init__()
        self.base, self.prefixes, self.ctx = base, prefixes, ctx
        self.train(base.training)  # the mode of the module it replaces (dropout)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        rows = _groups(self.prefixes, self.ctx)
        lengths = [0 if m is None else m.p for m, _, _ in rows]
        width = max(lengths)
        if width == 0:
            return self.base(x, attention_mask, *args, **kwargs)
        a = self.base
        shape = (*x.shape[:-1], -1, a.attention_head_size)
        q, k, v = (layer(x).view(shape).transpose(1, 2) for layer in (a.query, a.key, a.value))  # (B, h, N, d_h)
        keys, values = [], []
        for m, s, e in rows:
            kv = _layer_prefixes(m, q, width)  # (2, h, P, d_h)
            keys.append(_rows_of(kv[0], e - s)), values.append(_rows_of(kv[1], e - s))
        k, v = torch.cat([torch.cat(keys), k], dim=2), torch.cat([torch.cat(values), v], dim=2)  # (B, h, P + N, d_h)
        valid = torch.cat([torch.arange(width, device=x.device).expand(e - s, -1) < p
                           for p, (_, s, e) in zip(lengths, rows)])  # (B, P)  # fmt: skip
        mask = _with_prefix(attention_mask, valid, x.shape[1], all(p == width for p in lengths))
        out = _attend(a, q, k, v, mask, self.training)
        return out.transpose(1, 2).reshape(*x.shape[:-1], -1), None  # (B, N, d_attn), no attention weights


def _layer_prefixes(m: PrefixAttention | None, q: Tensor, width: int) -> Tensor:
    """A task's keys and values at this layer, (2, h, P, d_h): its p prefixes, then zeros (masked) up to P."""
    h, d = q.shape[1], q.shape[-1]
    if m is None:
        return q.new_zeros(2, h, width, d)
    kv = m.prefixes().to(q.dtype).unflatten(-1, (h, -1)).permute(0, 2, 1, 3)  # (2, h, p, d_h)
    return F.pad(kv, (0, 0, 0, width - kv.shape[2]))


def _with_prefix(mask: Tensor | None, valid: Tensor, n: int, full: bool) -> Tensor | None:
    """The attention mask over ``[prefix slots; tokens]``: ``valid`` (B, P) slots visible, the tokens' as given."""
    if mask is None:
        if full:
            return None  # every slot used: as the single-task wrapper, no mask at all
        return torch.cat([valid, valid.new_ones(valid.shape[0], n)], dim=1)[:, None, None, :]  # (B, 1, 1, P + N)
    if mask.dtype == torch.bool:
        pre = valid
    else:
        pre = torch.zeros(valid.shape, dtype=mask.dtype, device=mask.device)
        pre = pre.masked_fill(~valid, torch.finfo(mask.dtype).min)  # additive, as HF's own float masks
    b = valid.shape[0]
    mask = mask.expand(b, *mask.shape[1:])
    pre = pre[:, None, None, :].expand(b, *mask.shape[1:-1], -1)
    return torch.cat([pre, mask], dim=-1)


def _attend(a: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, training: bool) -> Tensor:
    """The BERT self-attention's own path (fused SDPA, or the eager one) over the prefixed keys and values."""
    fused = a.config._attn_implementation != "eager"
    return attention(q, k, v, mask, a.dropout.p if training else 0.0, a.scaling, fused)


class MixedDecoder(Delegating):
    """A GPT-2 / Llama decoder stack where each task's rows get its own prompts or KV-cache prefixes (or none)."""

    def __init__(self, base: nn.Module, wrappers: list[DecoderPrompt | DecoderPrefix | None], ctx: Context) -> None:
        super().__init__()
        self.base, self.wrappers, self.ctx = base, wrappers, ctx
        self.train(base.training)  # the mode of the module it replaces (dropout)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        rows = _groups(self.wrappers, self.ctx)
        prompts = [w.p if isinstance(w, DecoderPrompt) else 0 for w, _, _ in rows]  # q per group
        prefixes = [w.p if isinstance(w, DecoderPrefix) else 0 for w, _, _ in rows]  # p per group
        wide, slots = max(prompts), max(prefixes)
        if wide == slots == 0:  # no task of this batch has prompts or prefixes: the plain stack
            return self.base(*args, **kwargs)
        if slots and self.training and torch.is_grad_enabled() and \
                any(getattr(m, "gradient_checkpointing", False) for m in self.base.modules()):  # fmt: skip
            raise DeltaTuneError(
                "mixed batch: decoder prefixes live in the KV cache, which transformers' layers drop under gradient "
                "checkpointing in training; train without gradient checkpointing (as single-task prefix tuning)"
            )
        bound = _bind(self.base.forward, args, kwargs)
        cache = bound.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            raise DeltaTuneError("mixed batch: prompts/prefixes mix per row on whole sequences, not in generation")
        if wide and bound.get("token_type_ids") is not None:
            raise DeltaTuneError("prompt: decoder prompts have no token type; call without token_type_ids")
        ids, embeds = bound.pop("input_ids", None), bound.pop("inputs_embeds", None)
        b, n = (ids if embeds is None else embeds).shape[:2]
        self._mask_and_positions(bound, rows, prompts, prefixes, ids if embeds is None else embeds)
        if wide:
            words = self.base.get_input_embeddings()(ids) if embeds is None else embeds  # (B, L, d)
            seqs = [words[s:e] if q == 0 else _splice(words[s:e], _rows_of(w.prompt_tokens.to(words.dtype), e - s), 0)
                    for (w, s, e), q in zip(rows, prompts)]  # fmt: skip
            bound["inputs_embeds"] = torch.cat([_pad(x, n + wide) for x in seqs])  # (B, Q + L, d)
        else:
            bound["input_ids" if embeds is None else "inputs_embeds"] = ids if embeds is None else embeds
        if slots:
            bound["cache"] = self._cache(rows, prefixes, slots, b, cache)
        out = self.base(**bound)
        if wide:  # each row's prompt outputs dropped: (B, L, d), aligned with the tokens
            hidden = out.last_hidden_state
            out.last_hidden_state = torch.cat([hidden[s:e, q : q + n] for (_, s, e), q in zip(rows, prompts)])
        return out

    @staticmethod
    def _mask_and_positions(bound: dict, rows: Rows, prompts: list[int], prefixes: list[int], like: Tensor) -> None:
        """Each row's 2-D mask over ``[P cache slots; Q + L sequence]`` and its positions ``p + [0 .. q+L-1]``, as
        its single-task wrapper gives them, then zeros (the masked pads after the tokens)."""
        (b, n), device, wide, slots = like.shape[:2], like.device, max(prompts), max(prefixes)
        mask, given = bound.get("attention_mask"), bound.get("position_ids")
        mask = torch.ones(b, n, dtype=torch.long, device=device) if mask is None else mask
        given = (torch.arange(n, device=device) if given is None else given).expand(b, n)
        masks, places = [], []
        for (_, s, e), q, p in zip(rows, prompts, prefixes):
            part = _pad(_splice(mask[s:e], mask.new_ones(e - s, q), 0), n + wide)  # (b, Q + L)
            cached = torch.arange(slots, device=device).expand(e - s, -1) < p  # (b, P): the row's p prefixes
            masks.append(torch.cat([cached.to(part.dtype), part], dim=1))
            first = p + torch.arange(q, device=device).expand(e - s, -1)  # the prompts' positions p..p+q-1
            places.append(_pad(torch.cat([first, given[s:e] + p + q], dim=1), n + wide))
        bound["attention_mask"], bound["position_ids"] = torch.cat(masks), torch.cat(places)

    def _cache(self, rows: Rows, prefixes: list[int], slots: int, b: int, cache: Any) -> Any:
        """A KV cache of ``slots`` positions per layer: each row's prefixes, then zeros (masked)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.base.config) if cache is None else cache
        ref = next(self.base.parameters())
        w0 = next(w for w, _, _ in rows if isinstance(w, DecoderPrefix))
        layers, heads, head_dim = w0.layers, w0.heads, w0.head_dim
        parts = []
        for (w, s, e), p in zip(rows, prefixes):
            kv = ref.new_zeros(2 * layers, heads, 0, head_dim) if p == 0 else \
                w.prefixes().to(ref.dtype).view(p, 2 * layers, heads, head_dim).permute(1, 2, 0, 3)  # fmt: skip
            kv = F.pad(kv, (0, 0, 0, slots - p))  # (2L, heads, P, head_dim)
            parts.append(kv.unsqueeze(1).expand(-1, e - s, -1, -1, -1))
        kv = torch.cat(parts, dim=1)  # (2L, B, heads, P, head_dim)
        for layer in range(layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache
