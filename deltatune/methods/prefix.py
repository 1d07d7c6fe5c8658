"""Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, ACL 2021).
https://arxiv.org/abs/2101.00190 (defaults as OpenDelta: 6 tokens, reparameterising MLP of width 512).

Every attention layer l gets p learned key and value vectors, prepended to its own keys and values (the queries
are unchanged, so output shapes are too)::

    head_i = softmax(q_i [K_l^p; K_i]^T / sqrt(d_h)) [V_l^p; V_i]               K_l^p, V_l^p (p, d_attn)

They are trained through a reparameterisation shared by all layers (as Li & Liang and OpenDelta)::

    [K_1^p V_1^p ... K_L^p V_L^p] = W_2 tanh(W_1 E + b_1) + b_2        E (p, e), W_1 (m, e), W_2 (2 L d_attn, m)

``merge()`` folds the MLP away: each layer keeps only its computed (2, p, d_attn) prefix (outputs identical,
2 L p d_attn parameters instead of p e + m e + m + 2 L d_attn (m + 1)). The prefixes stay in the model: prefix
tuning is not mergeable into the backbone's weights, so ``deltatune.merge`` still warns about it.

Sites: timm ViT ``attn`` (``Attention``) and HF BERT-family ``attention.self``; on HF decoder LMs (GPT-2, Llama)
one ``DecoderPrefix`` fills every layer's KV cache instead (``methods._decoder``, peft's PREFIX_TUNING form). The
attention wrapper recomputes the attention from the wrapped module's own layers (qkv/query/key/value, q/k norms,
proj), so methods on those inner layers must be applied before ``prefix`` (in an earlier stage or the same list).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core import Applied, delta_modules, state_of
from deltatune.errors import DeltaTuneError
from deltatune.methods._decoder import DECODERS, DecoderPrefix, decoder_stack, kv_shape
from deltatune.numerics import round_to
from deltatune.registry import register
from deltatune.targeting import Targets, config_sites, family, innermost, is_delta, matches, set_module

PRESETS: dict[str, Targets] = {"vit": ["attn"], "bert": r".*attention\.self"}


@register("prefix")
@dataclass
class PrefixConfig:
    """Learned key/value prefixes in every attention layer, trained through a shared reparameterising MLP."""

    num_tokens: int = 6
    """Number of prefix tokens p per layer (OpenDelta's default 6)."""
    reparameterize: bool = True
    """Train the prefixes through the MLP (folded away by merge); False: train them directly."""
    embed_dim: int = 512
    """Width e of the prefix embeddings E fed to the MLP."""
    mid_dim: int = 512
    """Hidden width m of the reparameterising MLP."""
    target_modules: Targets | None = None
    """Attention modules to give prefixes. Default: every block's self-attention."""
    exclude_modules: Targets | None = None
    """Sites to leave out (wins over target_modules)."""

    mergeable: ClassVar[bool] = False
    families: ClassVar[frozenset[str] | None] = frozenset({*PRESETS, *DECODERS})
    name: ClassVar[str]

    def __post_init__(self) -> None:
        if min(self.num_tokens, self.embed_dim, self.mid_dim) < 1:
            raise DeltaTuneError("prefix: num_tokens, embed_dim and mid_dim must be >= 1")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Wraps every attention module in a ``PrefixAttention``; one ``PrefixMLP`` serves them all."""
        if family(model) in DECODERS:
            return self._apply_decoder(model)
        if family(model) not in PRESETS and self.target_modules is None:
            raise DeltaTuneError(
                f"prefix supports timm ViT/DeiT and HF BERT-family encoders, not {type(model).__name__}"
                + (" (its window attention has no prefix form here; use vpt-deep)" if family(model) == "swin" else "")
            )
        sites = config_sites(model, self, PRESETS, (nn.Module,), skip)
        widths = [_attn_dim(name, innermost(m)) for name, m in sites]
        ref = next(innermost(sites[0][1]).parameters())
        shared = PrefixMLP(self, sum(2 * w for w in widths), ref) if self.reparameterize else None
        offset = 0
        for (name, module), width in zip(sites, widths):
            set_module(model, name, PrefixAttention(module, self.num_tokens, width, shared, offset, ref))
            offset += 2 * width
        return Applied([n for n, _ in sites])

    def _apply_decoder(self, model: nn.Module) -> Applied:
        """HF decoder LMs: one ``DecoderPrefix`` on the decoder stack fills every layer's KV cache."""
        site = decoder_stack(model)
        if not matches(site, self.target_modules or [site]) or matches(site, self.exclude_modules or []):
            raise DeltaTuneError(f"prefix: on decoder LMs the prefixes fill every layer's cache; target {site!r} only")
        base = getattr(model, site)
        if is_delta(base):
            raise DeltaTuneError("prefix: the decoder stack is wrapped already (prompt or prefix); one per decoder LM")
        ref = next(base.parameters())
        layers, heads, head_dim = kv_shape(base.config)
        shared = PrefixMLP(self, layers * 2 * heads * head_dim, ref) if self.reparameterize else None
        set_module(model, site, DecoderPrefix(base, self.num_tokens, shared, ref))
        return Applied([site])

    def stored_form(self, model: nn.Module) -> nn.Module | None:
        """Training hook: a delta file holds the prefixes with the reparameterising MLP folded away (a copy; the
        model keeps training through the MLP), else the model itself (None)."""
        return fold_prefixes(copy.deepcopy(model)) if self.reparameterize else None


def _attn_dim(name: str, attn: nn.Module) -> int:
    """Width of the keys/values (all heads) of a supported attention module."""
    if type(attn).__name__ == "Attention" and hasattr(attn, "qkv"):  # timm's plain Attention (not RoPE variants)
        return attn.num_heads * attn.head_dim
    if all(hasattr(attn, a) for a in ("query", "key", "value", "attention_head_size")):  # HF BERT self-attention
        return attn.num_attention_heads * attn.attention_head_size
    raise DeltaTuneError(
        f"prefix: {name} ({type(attn).__name__}) is not a timm Attention or an HF BERT "
        f"self-attention; target those modules"
    )


class PrefixMLP(nn.Module):
    """E (p, e) -> tanh MLP -> every layer's keys and values (p, sum_l 2 d_l)."""

    def __init__(self, cfg: PrefixConfig, out: int, ref: Tensor):
        super().__init__()
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.prefix_embed = nn.Parameter(torch.randn(cfg.num_tokens, cfg.embed_dim, **kw))  # as nn.Embedding
        self.prefix_hidden = nn.Linear(cfg.embed_dim, cfg.mid_dim, **kw)
        self.prefix_out = nn.Linear(cfg.mid_dim, out, **kw)

    def rows(self, start: int, stop: int) -> Tensor:
        """Columns ``start:stop`` of the MLP's output, computing only those: (p, stop - start)."""
        h = torch.tanh(self.prefix_hidden(self.prefix_embed))  # (p, m)
        return F.linear(h, self.prefix_out.weight[start:stop], self.prefix_out.bias[start:stop])

    def exact_rows(self, start: int, stop: int) -> Tensor:
        """``rows`` computed in float64 (for folding the MLP away: round once, afterwards)."""
        h = torch.tanh(F.linear(self.prefix_embed.double(), self.prefix_hidden.weight.double(),
                                self.prefix_hidden.bias.double()))  # fmt: skip
        return F.linear(h, self.prefix_out.weight[start:stop].double(), self.prefix_out.bias[start:stop].double())


class PrefixAttention(nn.Module):
    """Wraps a timm ``Attention`` or an HF self-attention: its keys and values get p learned prefix vectors."""

    delta_method = "prefix"

    def __init__(self, base: nn.Module, p: int, width: int, shared: PrefixMLP | None, offset: int, ref: Tensor):
        super().__init__()
        self.base, self.delta_stage = base, None
        self.p, self.width, self.offset = p, width, offset
        if shared is not None:
            self.prefix_mlp = shared  # shared by every layer
        else:
            self.prefix_kv = nn.Parameter(torch.randn(2, p, width, device=ref.device, dtype=ref.dtype))
        self.train(base.training)  # take the mode of the module it replaces

    def prefixes(self) -> Tensor:
        """This layer's keys and values (2, p, width)."""
        if hasattr(self, "prefix_kv"):
            return self.prefix_kv
        return self.prefix_mlp.rows(self.offset, self.offset + 2 * self.width).unflatten(-1, (2, -1)).transpose(0, 1)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, scale: float, fused: bool
    ) -> Tensor:
        """Attention over [prefix; k] and [prefix; v]; q, k, v (B, h, N, d_h); mask broadcastable to (B, h, N, N)."""
        b, h = q.shape[:2]
        kv = self.prefixes().to(q.dtype).unflatten(-1, (h, -1)).permute(0, 2, 1, 3)  # (2, h, p, d_h)
        k = torch.cat([kv[0].expand(b, -1, -1, -1), k], dim=2)  # (B, h, p + N, d_h)
        v = torch.cat([kv[1].expand(b, -1, -1, -1), v], dim=2)
        if mask is not None:  # prefixes are visible from every query
            mask = F.pad(mask, (self.p, 0), value=True if mask.dtype == torch.bool else 0.0)
        return attention(q, k, v, mask, dropout, scale, fused)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        a = innermost(self.base)
        if hasattr(a, "qkv"):
            return self._timm(a, x, *args, **kwargs)
        return self._hf(a, x, *args, **kwargs)

    def _timm(self, a: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return timm_attention(a, x, lambda q, k, v, dropout: self.attend(q, k, v, attn_mask, dropout, a.scale,
                                                                        a.fused_attn), self.training, is_causal)

    def _hf(self, a: nn.Module, x: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        shape = (*x.shape[:-1], -1, a.attention_head_size)
        q, k, v = (layer(x).view(shape).transpose(1, 2) for layer in (a.query, a.key, a.value))  # (B, h, N, d_h)
        dropout = a.dropout.p if self.training else 0.0
        fused = a.config._attn_implementation != "eager"
        out = self.attend(q, k, v, attention_mask, dropout, a.scaling, fused)
        return out.transpose(1, 2).reshape(*x.shape[:-1], -1), None  # (B, N, d_attn), no attention weights

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.prefix_kv] if hasattr(self, "prefix_kv") else list(self.prefix_mlp.parameters())

    @torch.no_grad()
    def merge(self) -> nn.Module | None:
        """Folds the shared MLP into this layer's fixed prefixes (float64, rounded once); the wrapper stays.

        Returns None: prefixes cannot be merged into the backbone's weights.
        """
        if hasattr(self, "prefix_mlp"):
            mlp = self.prefix_mlp
            kv = mlp.exact_rows(self.offset, self.offset + 2 * self.width)
            kv = round_to(kv.unflatten(-1, (2, -1)).transpose(0, 1), mlp.prefix_embed.dtype)  # (2, p, width)
            del self.prefix_mlp
            self.prefix_kv = nn.Parameter(kv.contiguous(), requires_grad=False)
        return None


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, scale: float, fused: bool
) -> Tensor:
    """Softmax attention, fused or the explicit path (what FLOP counters see); a boolean or additive mask."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    scores = q * scale @ k.transpose(-2, -1)  # (B, h, N, keys)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return F.dropout(scores.softmax(-1), dropout, training=dropout > 0) @ v


def timm_attention(
    a: nn.Module, x: Tensor, core: Callable[[Tensor, Tensor, Tensor, float], Tensor], training: bool, is_causal: bool
) -> Tensor:
    """timm ``Attention.forward`` with its softmax step replaced by ``core(q, k, v, dropout)`` (q, k, v (B, h, N,
    d_h)): the prefixed attention recomputes the wrapped module's own layers around it."""
    if is_causal:
        raise DeltaTuneError("prefix: causal attention is not supported on timm models")
    b, n, _ = x.shape
    gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
    q, k, v = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    out = core(q, k, v, a.attn_drop.p if training else 0.0)
    out = a.norm(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, d_attn)
    return a.proj_drop(a.proj(out if gate is None else out * gate))


def fold_prefixes(model: nn.Module) -> nn.Module:
    """Folds a trained model's reparameterising MLP into each layer's prefixes, in place (outputs unchanged), and
    records ``reparameterize=False``: a delta file then stores p x 2d per layer instead of the MLP."""
    for _, module in delta_modules(model):
        if module.delta_method == "prefix":  # PrefixAttention, DecoderPrefix
            module.merge()
    for entry in state_of(model).entries if state_of(model) else []:
        if isinstance(entry.config, PrefixConfig) and entry.config.reparameterize:
            entry.config = dataclasses.replace(entry.config, reparameterize=False)
    return model
