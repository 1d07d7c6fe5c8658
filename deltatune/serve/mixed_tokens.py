"""Per-row kernels for deltas that change the token sequence or a layer's second input, in mixed-task batches.

- VPT on timm ViT (shallow and deep): every row gets P prompt slots, P the largest prompt count among the batch's
  tasks, after the prefix (CLS) tokens and before the patches: ``[cls, P slots, patches]``. A row of task t holds
  its p_t prompts in the first slots; its other P - p_t slots (all P for a task without VPT) are padding that no
  token attends to: a key-padding mask (0 / -inf, added to the scores) that a pre-hook hands every block as
  ``attn_mask``, so masked keys get exactly zero weight and the other tokens' outputs are the single-task model's
  (up to float summation order). Deep prompts overwrite the row's first p_t slots at each ``norm1`` input, and the
  final ``norm`` drops all P slots, so pooling (CLS or the patches' average) reads exactly the single-task tokens.
  When every task of the batch has the same p, no mask is built (the layout needs none).
- Prefix tuning on timm ``Attention``: each row's keys and values get its task's (p_t, d) prefixes, padded to the
  batch's largest p at that layer and masked beyond p_t (no mask when all tasks of the batch share p there).
- AdaptFormer on HF FFN output modules (BERT ``output(hidden, input_tensor)``): each task's branch of its rows'
  ``input_tensor``, then the module once for the whole batch.

A site holding one of these may also hold BitFit biases and SSF of any task (they act on each token alone, so they
commute with inserting, overwriting or dropping tokens); other stacks there run grouped. Swin vpt-deep stays
grouped: its prompts join every window inside ``WindowAttention`` and the last block's prompt outputs join the
pool, a different kernel per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import DeltaTuneError
from deltatune.methods.adaptformer import AdaptFormer
from deltatune.methods.prefix import PrefixAttention, attention, timm_attention
from deltatune.methods.vpt import VPTPrompt, VPTRemove, VPTSwinPool, VPTWindowAttention
from deltatune.targeting import innermost

TOKEN_KINDS = ("vpt-insert", "vpt-deep", "vpt-remove", "prefix", "adaptformer-hf")
COMPANIONS = ("bias", "ssf")  # per-token, per-channel: they commute with the token kernels above
Groups = list[tuple[int, int, int]]  # (task position, start row, end row)


def kind(module: nn.Module) -> str | None:
    """The token kernel for a delta wrapper, or None when it has none here."""
    if isinstance(module, VPTPrompt):
        return "vpt-insert" if module.insert else "vpt-deep"
    if isinstance(module, VPTRemove):
        return "vpt-remove"
    if isinstance(module, PrefixAttention) and hasattr(innermost(module.base), "qkv"):  # timm Attention only
        return "prefix"
    if isinstance(module, AdaptFormer) and module.hf_output:
        return "adaptformer-hf"
    return None


def why_not(module: nn.Module) -> str:
    """Why a delta wrapper has no per-row kernel."""
    if isinstance(module, (VPTWindowAttention, VPTSwinPool)):
        return "has no per-row kernel on Swin (its prompts join every window inside the window attention)"
    return "has no per-row kernel"


def iter_sites(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module, inside wrapped modules too, named as in the plain model (SSF on the dense
    layer of an AdaptFormer-wrapped HF FFN output, LoRA on the qkv of a prefixed attention)."""
    for child_name, child in innermost(module).named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        yield from iter_sites(child, name)


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The module at a plain name (as ``iter_sites`` and ``plain_parameters`` name them), through any wrappers."""
    for part in name.split(".") if name else []:
        model = innermost(model).get_submodule(part)
    return model


def check(name: str, kinds: list[str]) -> str:
    """Why a task's stack at a site (innermost first) cannot mix per row, or "" when it can."""
    tokens = [k for k in kinds if k in TOKEN_KINDS]
    if not tokens:
        return ""
    other = next((k for k in kinds if k not in TOKEN_KINDS and k not in COMPANIONS), None)
    if other is not None or len(tokens) > 1:
        return f"{tokens[0]} at {name} shares its site with {other or tokens[1]} (no per-row kernel for that stack)"
    if tokens[0] == "prefix" and kinds[0] != "prefix":
        return f"prefix at {name} wraps another delta (it recomputes the attention from the plain layer)"
    if tokens[0] == "vpt-insert" and kinds[-1] != "vpt-insert":
        return f"a delta at {name} acts on VPT's inserted prompts (no per-row kernel for that stack)"
    return ""


class Layout:
    """The batch's VPT prompt slots: P, each task's prompt count and, when counts differ, the key-padding mask."""

    def __init__(self, counts: list[int], prefix: int) -> None:
        self.counts, self.prefix = counts, prefix  # per task position: its p (0: no VPT); the CLS/register tokens
        self.slots, self.ragged = 0, False
        self.mask: Tensor | None = None  # (B, 1, 1, L) additive, set by the insert; None: every slot is a prompt

    def prepare(self, groups: Groups) -> None:
        """Sets P for a batch (before its forward)."""
        counts = [self.counts[pos] for pos, _, _ in groups]
        self.slots, self.mask = max(counts), None
        self.ragged = any(c != self.slots for c in counts)

    def inject(self, _block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook on every block: passes the key-padding mask as ``attn_mask`` (nothing without one)."""
        if self.mask is None:
            return None
        return args, {**kwargs, "attn_mask": self.mask}

    def insert(self, y: Tensor, per_task: list[VPTPrompt | None], groups: Groups) -> Tensor:
        """``[prefix, P slots, rest]``: each row's task's prompts, zeros in its padding slots; builds the mask."""
        if not self.slots:
            return y
        block = _slot_rows(per_task, groups, (self.slots, y.shape[-1]), y, _prompt)  # (B, P, d)
        n = self.prefix
        out = torch.cat([y[:, :n], block, y[:, n:]], dim=1)  # (B, n + P + N, d)
        if self.ragged:
            self.mask = key_mask([self.counts[pos] for pos, _, _ in groups], groups, self.slots, out.shape[1], n, out)
        return out

    def overwrite(self, x: Tensor, per_task: list[VPTPrompt | None], groups: Groups) -> Tensor:
        """VPT-deep: each deep task's rows get its prompts in their first p slots (a copy; x is the residual)."""
        if not any(per_task[pos] is not None for pos, _, _ in groups):
            return x
        x, n = x.clone(), self.prefix
        for pos, start, end in groups:
            m = per_task[pos]
            if m is not None:
                x[start:end, n : n + m.vpt_prompt.shape[0]] = _prompt(m)
        return x

    def drop(self, x: Tensor) -> Tensor:
        """Removes the P slots before the final norm: every row is back to the single-task token layout."""
        n = self.prefix
        return torch.cat([x[:, :n], x[:, n + self.slots :]], dim=1) if self.slots else x


def _prompt(m: VPTPrompt) -> Tensor:
    """A task's prompts (p, d), through its prompt dropout."""
    return m.vpt_dropout(m.vpt_prompt)


def _slot_rows(per_task: list[Any], groups: Groups, blank: tuple[int, ...], like: Tensor,
               value: Callable[[Any], Tensor]) -> Tensor:
    """(B, *blank): ``value(module)`` of each row's task, padded with zeros to ``blank`` (slots along dim -2)."""
    parts, slots = [], blank[-2]
    for pos, start, end in groups:
        m = per_task[pos]
        v = value(m) if m is not None else like.new_zeros(blank)
        if v.shape[-2] < slots:
            v = F.pad(v, (0, 0, 0, slots - v.shape[-2]))
        parts.append(v.unsqueeze(0).expand(end - start, *v.shape))
    return torch.cat(parts)


def key_mask(counts: list[int], groups: Groups, slots: int, length: int, start: int, like: Tensor) -> Tensor:
    """(B, 1, 1, length) additive mask: -inf on the slots ``start + c .. start + slots`` of rows with count c."""
    mask = like.new_zeros(groups[-1][2], 1, 1, length)
    for c, (_, lo, hi) in zip(counts, groups):
        if c < slots:
            mask[lo:hi, ..., start + c : start + slots] = float("-inf")
    return mask


class PrefixMix(nn.Module):
    """A timm ``Attention`` whose keys and values get each row's task's prefixes (padded and masked to the batch's
    largest p here); rows of tasks without a prefix here attend over their own tokens only."""

    def __init__(self, attn: nn.Module, per_task: list[PrefixAttention | None], ctx: Any) -> None:
        super().__init__()
        self.attn, self.ctx = attn, ctx
        self.__dict__["per_task"] = per_task  # the tasks' own modules: not submodules of the mixed model

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        counts = [0 if self.per_task[pos] is None else self.per_task[pos].p for pos, _, _ in self.ctx.groups]
        if not max(counts):
            return self.attn(x, attn_mask=attn_mask, is_causal=is_causal)
        core = functools.partial(self._attend, counts=counts, attn_mask=attn_mask, like=x)
        return timm_attention(self.attn, x, core, self.training, is_causal)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, dropout: float, counts: list[int], attn_mask: Tensor | None,
                like: Tensor) -> Tensor:
        """Attention over each row's prefix slots and its tokens; q, k, v (B, h, N, d_h)."""
        a, groups, slots, n = self.attn, self.ctx.groups, max(counts), q.shape[2]
        blank = (2, slots, a.num_heads * a.head_dim)
        kv = _slot_rows(self.per_task, groups, blank, like, lambda m: m.prefixes().to(like.dtype))  # (B, 2, Q, d)
        kv = kv.unflatten(-1, (a.num_heads, -1)).permute(1, 0, 3, 2, 4)  # (2, B, h, Q, d_h)
        k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)  # (B, h, Q + N, d_h)
        if any(c != slots for c in counts) or attn_mask is not None:
            attn_mask = _join(key_mask(counts, groups, slots, slots, 0, q), attn_mask, n, q)
        return attention(q, k, v, attn_mask, dropout, a.scale, a.fused_attn)


def _join(prefix: Tensor, tokens: Tensor | None, n: int, like: Tensor) -> Tensor:
    """The prefix slots' mask (B, 1, 1, Q) before the tokens' (an additive or boolean mask, or None: all visible)."""
    if tokens is None:
        return F.pad(prefix, (0, n))
    if tokens.dtype == torch.bool:
        tokens = torch.zeros(tokens.shape, dtype=like.dtype, device=like.device).masked_fill(~tokens, float("-inf"))
    tokens = tokens.to(like.dtype)
    lead = torch.broadcast_shapes(prefix.shape[:-1], tokens.shape[:-1])
    return torch.cat([prefix.expand(*lead, -1), tokens.expand(*lead, -1)], dim=-1)


class Bound(nn.Module):
    """A layer called with the extra arguments its site received (MixedSite calls its base with one input)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor:
        args, kwargs, self.args, self.kwargs = self.args, self.kwargs, (), {}  # used once: no activation kept
        return self.layer(x, *args, **kwargs)


class TokenSite(nn.Module):
    """A site with a token kernel: VPT's per-row input steps, then the MixedSite (BitFit, SSF), then the insert."""

    def __init__(self, inner: nn.Module, tokens: dict[str, list[Any]], ctx: Any, bound: Bound | None) -> None:
        super().__init__()
        self.inner, self.ctx, self.bound = inner, ctx, bound
        self.__dict__["tokens"] = tokens  # kind -> each task's module (or None): the tasks' own modules

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        groups, layout, tokens = self.ctx.groups, self.ctx.tokens, self.tokens
        if "vpt-remove" in tokens:
            x = layout.drop(x)
        if "vpt-deep" in tokens:
            x = layout.overwrite(x, tokens["vpt-deep"], groups)
        if "adaptformer-hf" in tokens:
            args, kwargs = _add_branches(tokens["adaptformer-hf"], groups, args, kwargs)
        if self.bound is not None:
            self.bound.args, self.bound.kwargs = args, kwargs
        elif args or kwargs:
            raise DeltaTuneError(f"mixed batch: {type(self.inner.base).__name__} got extra inputs it does not take")
        y = self.inner(x)
        return layout.insert(y, tokens["vpt-insert"], groups) if "vpt-insert" in tokens else y


def _add_branches(per_task: list[AdaptFormer | None], groups: Groups, args: tuple, kwargs: dict) -> tuple:
    """HF FFN output: ``input_tensor`` plus each row's task's AdaptFormer branch of it (its second input)."""
    x = args[0] if args else kwargs["input_tensor"]
    parts = []
    for pos, start, end in groups:
        m, part = per_task[pos], x[start:end]
        parts.append(part if m is None else part + m.branch(part))
    x = torch.cat(parts)
    return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "input_tensor": x})


def site(base: nn.Module, columns: list[tuple[str, list[Any]]], ctx: Any, mixed: Callable[..., nn.Module]) -> nn.Module:
    """The mixed module for a site: ``mixed(base, columns, ctx)`` (a MixedSite), inside a TokenSite when any task
    has a token kernel here."""
    tokens = {k: per_task for k, per_task in columns if k in TOKEN_KINDS}
    if not tokens:
        return mixed(base, columns, ctx)
    rest = [(k, per_task) for k, per_task in columns if k not in TOKEN_KINDS]
    bound = None
    if "prefix" in tokens or "adaptformer-hf" in tokens:  # the layer takes more than one input
        bound = Bound(PrefixMix(base, tokens["prefix"], ctx) if "prefix" in tokens else base)
    inner = mixed(base if bound is None else bound, rest, ctx)
    inner.dim = -1 if bound is not None else inner.dim  # token sequences: channels last
    return TokenSite(inner, tokens, ctx, bound)


def install(net: nn.Module, tasks: list[Any], ctx: Any) -> None:
    """Sets the context's VPT layout and hooks every block to receive its mask (only when a task has VPT)."""
    counts, prefix = [], 0
    for t in tasks:
        prompts = [m for ops in t.plan.sites.values() for k, m in ops if k == "vpt-insert"]
        counts.append(prompts[0].vpt_prompt.shape[0] if prompts else 0)
        prefix = prompts[0].prefix if prompts else prefix
    ctx.tokens = Layout(counts, prefix) if any(counts) else None
    if ctx.tokens is not None:
        for block in net.blocks:
            block.register_forward_pre_hook(ctx.tokens.inject, with_kwargs=True)


def prepare(ctx: Any) -> None:
    """Before a mixed forward: the batch's prompt slots (none when no task has VPT)."""
    if ctx.tokens is not None:
        ctx.tokens.prepare(ctx.groups)
