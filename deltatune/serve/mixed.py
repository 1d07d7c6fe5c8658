"""Per-row kernels for mixed-task batches: every site any task changes becomes one ``MixedSite``.

Rows arrive sorted by task (``MultiTaskModel.forward`` sorts and unsorts), so each task's rows are one slice.
At a site, the base layer runs once for the whole batch, then each task's deltas act on its rows:

- the layer's own bias, BitFit's bias and a first SSF fold into one pass over the layer's bias-free output:
  ``bare(x) * s[task] + (s b + t)[task]`` (a gather of stacked per-task tables, ones/zeros for tasks without);
- SSF further out: ``y * scale[task] + shift[task]``, one gather and one addcmul;
- LoRA (Linear, fused-qkv parts included): ``y[rows] += s B A x[rows]`` per task slice (low rank, no weight copy);
  without autograd the matmul accumulates into y's rows itself (``addmm_``);
- FacT (TT and TK): ``y[rows] += s V M U^T x[rows]`` per task slice, like LoRA;
- IA3: ``y * l[task]`` on the output (a fused qkv's k and v thirds: ones on q), or ``x * l[task]`` on the input of
  the FFN's second linear (only as a task's innermost delta there);
- adapters: ``z + up(act(down(z)))`` per task slice;
- AdaptFormer (timm MLPs): ``mlp(x)[rows] + s up(relu(down(stream[rows])))``, the residual stream handed over by a
  pre-hook on the block's norm;
- VPT and prefixes (timm ViT), AdaptFormer on HF FFN outputs: ``mixed_tokens.py`` (prompt/prefix slots per row);
- prompts and prefixes on HF text models (BERT family, GPT-2, Llama): each task's rows get the sequence its own
  wrapper builds, padded to the batch's length with masked positions after the tokens (``mixed_text.py``).

A site keeps each task's own ordering of stacked deltas (SSF over LoRA differs from LoRA over SSF). With autograd
the tables are stacked from the tasks' own parameters at every forward, so gradients reach each task's deltas
(joint training); without it they are cached until a parameter changes (version counters) and applied in place.
Measured with ``deltatune bench --multitask`` (``deltatune.bench.multitask``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.checkpoint import plain_parameters
from deltatune.core import state_of
from deltatune.errors import DeltaTuneError
from deltatune.methods.adapter import Adapter
from deltatune.methods.adaptformer import AdaptFormer, stream_norm_name
from deltatune.methods.fact import FacTLinear
from deltatune.methods.ia3 import IA3
from deltatune.methods.lora import LoRALinear
from deltatune.methods.ssf import SSF, channel_dim
from deltatune.serve import mixed_text, mixed_tokens
from deltatune.serve._share import share_copy
from deltatune.targeting import innermost, is_delta, set_module

BIAS_LAYERS = (nn.Linear, nn.LayerNorm, nn.Conv2d)
_VERSION = operator.attrgetter("_version")
Op = tuple[str, Any]  # ("bias", Parameter) | ("ssf", SSF) | ("lora", LoRALinear) | ("adapter", Adapter)


@dataclass
class Plan:
    """What one task changes, per site (ops innermost first), and its head's name."""

    sites: dict[str, list[Op]] = field(default_factory=dict)
    head: str | None = None


def plan(model: nn.Module, backbone: nn.Module) -> tuple[Plan | None, str]:
    """A task model's per-site ops, or (None, why) when some delta has no per-row kernel."""
    state = state_of(model)
    result = Plan(head=state.head if state else None)
    accounted = {id(p) for p in backbone.parameters()}
    if result.head:
        accounted |= {id(p) for p in model.get_submodule(result.head).parameters()}
    for name, module in mixed_tokens.iter_sites(model):  # inside wrappers too (AdaptFormer over SSF)
        if not is_delta(module):
            continue
        ops, why = _chain(name, module)
        if ops is None:
            return None, why
        result.sites[name] = ops
        accounted |= {id(p) for _, m in ops for p in m.delta_parameters()}
    for pname, p in plain_parameters(model):
        if id(p) in accounted:
            continue
        site, _, leaf = pname.rpartition(".")
        layer = innermost(mixed_tokens.resolve(model, site))  # through wrappers (BitFit inside AdaptFormer)
        if leaf != "bias" or not isinstance(layer, BIAS_LAYERS):
            return None, f"{pname} is trained (only biases of Linear/LayerNorm/Conv2d layers mix per row)"
        result.sites.setdefault(site, []).insert(0, ("bias", p))
        accounted.add(id(p))
    left = [n for n, p in model.named_parameters() if id(p) not in accounted]
    if left:
        return None, f"{left[0]} has no per-row kernel"
    return result, ""


def _chain(name: str, module: nn.Module) -> tuple[list[Op] | None, str]:
    """The wrapper stack at a site, innermost first, if every wrapper has a per-row kernel."""
    ops: list[Op] = []
    while is_delta(module):
        if isinstance(module, SSF) and not module.norm_act and not module.merged:
            ops.append(("ssf", module))
        elif isinstance(module, LoRALinear) and isinstance(module.dropout, nn.Identity) and not module.merged:
            ops.append(("lora", module))
        elif isinstance(module, FacTLinear) and not module.merged:  # its dropout acts on each slice as on a batch
            ops.append(("fact", module))
        elif isinstance(module, Adapter):
            ops.append(("adapter", module))
        elif isinstance(module, AdaptFormer) and not module.hf_output:  # HF FFN outputs take two inputs: grouped
            ops.append(("adaptformer", module))
        elif isinstance(module, IA3) and not module.merged and (module.mode != "input" or not is_delta(module.base)):
            ops.append(("ia3-in" if module.mode == "input" else "ia3", module))  # input scaling: innermost only
        elif mixed_text.kind(module) and not ops and not is_delta(module.base):  # text prompts/prefixes: alone
            ops.append((mixed_text.kind(module), module))
        elif (kind := mixed_tokens.kind(module)) is not None:  # VPT, timm prefix, AdaptFormer on HF FFN outputs
            ops.append((kind, module))
        else:
            why = mixed_tokens.why_not(module)
            return None, f"{module.delta_method} at {name} {why} (its rows run through its own model)"
        module = module.base
    why = mixed_tokens.check(name, [k for k, _ in ops[::-1]])
    return (None, why) if why else (ops[::-1], "")


class Context:
    """The batch's per-row task positions and the slices of each task's rows, set before every forward."""

    idx: Tensor
    groups: list[tuple[int, int, int]]  # (task position, start row, end row)
    width: int  # the widest head's class count: every row's logits are padded to it
    tokens: mixed_tokens.Layout | None = None  # the batch's VPT prompt slots (mixed_tokens.install)


class MixedSite(nn.Module):
    """One backbone layer and, per task, the deltas there (None: the task leaves this site alone)."""

    def __init__(self, base: nn.Module, slots: list[tuple[str, list[Any]]], ctx: Context) -> None:
        super().__init__()
        self.pre = slots.pop(0)[1] if slots and slots[0][0] == "ia3-in" else None  # IA3 scaling the layer's input
        self.base, self.slots, self.ctx = base, slots, ctx
        self.stream: Tensor | None = None  # AdaptFormer's input: the residual stream its block's norm hands over
        self.dim = channel_dim(base)
        self._cache: dict[str, list[Any]] = {}  # key -> [parameters, inference?, their versions, value]
        lead = [k for k, _ in slots[:2]] or [None]
        self.fold = 2 if lead == ["bias", "ssf"] else 1 if lead[0] in ("bias", "ssf") else 0
        self.bare = _has_bare(base)
        if self.fold and not self.bare:
            self.fold = 0 if lead[0] == "ssf" else 1  # a layer without a bias-free form: base(x), then the tables

    def _table(self, key: str, params: Callable[[], list[Tensor]], build: Callable[[], Any]) -> Any:
        """``build()``; without autograd, reused until one of ``params()`` changes (their version counters). The
        parameter list is taken once: a site's per-task modules are fixed until the mixed model is rebuilt."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return build()
        entry = self._cache.get(key)
        if entry is None:
            ps = [p for p in params() if isinstance(p, nn.Parameter)]  # fillers (ones, zeros) are fixed
            entry = self._cache[key] = [ps, any(p.is_inference() for p in ps), None, None]
        if entry[1]:
            return build()  # inference tensors keep no version counter
        now = tuple(map(_VERSION, entry[0]))
        if now != entry[2]:
            entry[2], entry[3] = now, build()
        return entry[3]

    def forward(self, x: Tensor) -> Tensor:
        groups = self.ctx.groups
        if x.shape[0] != groups[-1][2]:
            raise DeltaTuneError(f"mixed batch: a site saw {x.shape[0]} rows, not the batch's {groups[-1][2]}")
        if self.pre is not None:  # IA3 on the input (the FFN's second linear): x * l[task], then the layer
            x = x * self._ia3("ia3-in", self.pre, x)
        y = self._affine(x, self.slots[: self.fold]) if self.fold else None
        for kind, per_task in self.slots[self.fold :]:
            y = self.base(x) if y is None else y
            if kind == "ssf":
                y = self._ssf(x, y, per_task)
            elif kind == "ia3":  # IA3 on the output (k and v, or the whole output): y * l[task]
                scale = self._ia3(f"ia3{id(per_task)}", per_task, y)
                y = y.mul_(scale) if _inplace(y, x) else y * scale
            elif kind in ("lora", "fact") and _inplace(y, x):
                y = self._add_inplace(x, y, per_task)
            else:
                y = self._sliced(x, y, kind, per_task)
        self.stream = None  # consumed: the site keeps no activation after the forward
        return self.base(x) if y is None else y  # only an input scaling here (IA3 on fc2)

    def take_stream(self, _norm: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the block's norm: its input is the residual stream AdaptFormer's branch reads."""
        self.stream = args[0]

    def _rows(self, table: Tensor, ndim: int) -> Tensor:
        """Row ``i`` of the result is ``table[task of row i]``, shaped to broadcast along the channel dim."""
        g = table.index_select(0, self.ctx.idx)  # (B, C)
        shape = [g.shape[0]] + [1] * (ndim - 1)
        shape[self.dim if self.dim >= 0 else ndim - 1] = g.shape[1]
        return g.view(shape)

    def _affine(self, x: Tensor, slots: list[tuple[str, list[Any]]]) -> Tensor:
        """The layer's own bias, each task's bias and its first SSF in one pass over the layer's bias-free output:
        ``bare(x) * s[task] + (s b + t)[task]`` (the tables folded and, without autograd, cached)."""
        cols = dict(slots)
        biases, ssfs = cols.get("bias"), cols.get("ssf")
        own = getattr(self.base, "bias", None)
        y = _bare(self.base, x) if self.bare else self.base(x)  # no bias-free form: its bias swapped for the task's

        def build() -> tuple[Tensor | None, Tensor]:
            bs = [own if b is None else b for b in biases] if biases else [own] * len(ssfs)
            if not self.bare and own is not None:
                bs = [b - own for b in bs]
            return _fold(bs, ssfs, y.shape[self.dim], y)

        scale, shift = self._table("affine", lambda: [*(biases or []), own, *_ssf_params(ssfs)], build)
        if scale is None:
            return y.add_(self._rows(shift, y.ndim)) if _inplace(y, x) else y + self._rows(shift, y.ndim)
        return torch.addcmul(self._rows(shift, y.ndim), y, self._rows(scale, y.ndim), out=y if _inplace(y, x) else None)

    def _ia3(self, key: str, per_task: list[IA3 | None], like: Tensor) -> Tensor:
        """Each row's IA3 scale over the last dim (ones for tasks without IA3 here), shaped to broadcast."""

        def build() -> Tensor:
            one = like.new_ones(like.shape[-1])
            return torch.stack([one if m is None else m.scale() for m in per_task])

        table = self._table(key, lambda: [m.ia3_scale for m in per_task if m is not None], build)
        return self._rows(table, like.ndim)

    def _ssf(self, x: Tensor, y: Tensor, per_task: list[SSF | None]) -> Tensor:
        c, key = y.shape[self.dim], f"ssf{id(per_task)}"
        scale, shift = self._table(key, lambda: _ssf_params(per_task), lambda: _fold(None, per_task, c, y))
        return torch.addcmul(self._rows(shift, y.ndim), y, self._rows(scale, y.ndim), out=y if _inplace(y, x) else None)

    def _add_inplace(self, x: Tensor, y: Tensor, per_task: list[LoRALinear | FacTLinear | None]) -> Tensor:
        """Without autograd: each task's update added into its rows of y (LoRA's ``s B (A x)`` by the matmul)."""
        out = y.shape[-1]
        for pos, start, end in self.ctx.groups:
            m = per_task[pos]
            if m is None:
                continue
            part = y[start:end]
            if isinstance(m, FacTLinear):
                part.add_(m.fact_delta(x[start:end], out))
                continue
            rows = getattr(m, "rows", None)  # a fused-qkv LoRA updates some output rows only
            if (rows is None or len(rows) == out) and m.lora_b.shape[0] == 1 and y.is_contiguous():
                h = F.linear(x[start:end], m.lora_a)  # (b, ..., r)
                part.view(-1, out).addmm_(h.reshape(-1, h.shape[-1]), m.lora_b[0].t(), alpha=m.scaling)
            elif rows is None or len(rows) == out:
                part.add_(m.lora_delta(x[start:end]))
            else:
                part.index_add_(-1, rows, m.lora_delta(x[start:end]))
        return y

    def _sliced(self, x: Tensor, y: Tensor, kind: str, per_task: list[Any]) -> Tensor:
        """LoRA, FacT and adapters: each task's module on its own slice of rows; other tasks' rows pass unchanged."""
        parts = []
        for pos, start, end in self.ctx.groups:
            m, part = per_task[pos], y[start:end]
            if m is not None and kind == "fact":
                part = part + m.fact_delta(x[start:end], part.shape[-1])
            elif m is not None and kind == "adaptformer":
                stream = x if self.stream is None else self.stream  # untapped (ConvNeXt): the MLP's own input
                part = part + m.branch(stream[start:end])
            elif m is not None and kind == "lora":
                delta = m.lora_delta(x[start:end])
                rows = getattr(m, "rows", None)  # a fused-qkv LoRA updates some output rows only
                part = part + delta if rows is None or len(rows) == part.shape[-1] else part.index_add(-1, rows, delta)
            elif m is not None:
                z = part if m.channels_last else part.movedim(1, -1)
                z = z + m.adapter_up(m.adapter_act(m.adapter_down(z)))
                part = z if m.channels_last else z.movedim(-1, 1)
            parts.append(part)
        return torch.cat(parts)


def _inplace(y: Tensor, x: Tensor) -> bool:
    """Whether the site's output so far may be overwritten: no autograd or compiler to keep it, and not the site's
    input itself (a base that returns its input, like Identity)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def _has_bare(layer: nn.Module) -> bool:
    """Whether ``_bare`` can run the layer without its bias."""
    if isinstance(layer, nn.LayerNorm):
        return channel_dim(layer) == -1  # not timm's channels-first LayerNorm2d
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and type(layer).forward is nn.Conv2d.forward)


def _bare(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` without its bias. LayerNorm keeps its weight: without any affine it runs a slower kernel
    (2x on CPU)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, layer.weight, None, layer.eps)
    return layer._conv_forward(x, layer.weight, None)


def _ssf_params(ssfs: list[SSF | None] | None) -> list[Tensor]:
    return [p for m in ssfs or [] if m is not None for p in (m.ssf_scale, m.ssf_shift)]


def _fold(
    biases: list[Tensor | None] | None, ssfs: list[SSF | None] | None, c: int, like: Tensor
) -> tuple[Tensor | None, Tensor]:
    """Per-task (scale, shift) tables, (N, C): SSF's ``s`` and ``s b + t`` (scale None: no SSF, shift = b)."""
    zero = like.new_zeros(c)
    bs = [zero if b is None else b for b in biases] if biases is not None else [zero] * len(ssfs)
    if ssfs is None:
        return None, torch.stack(bs)
    one = like.new_ones(c)
    scales = [one if m is None else m.ssf_scale for m in ssfs]
    shift = torch.stack([b if m is None else torch.addcmul(m.ssf_shift, b, m.ssf_scale) for b, m in zip(bs, ssfs)])
    return torch.stack(scales), shift


class MixedHead(nn.Module):
    """Each task's own head on its rows, padded with -inf to the widest head."""

    def __init__(self, heads: list[nn.Module], ctx: Context) -> None:
        super().__init__()
        self.heads, self.ctx = heads, ctx

    def forward(self, x: Tensor) -> Tensor:
        outs = [self.heads[pos](x[start:end]) for pos, start, end in self.ctx.groups]
        width = self.ctx.width
        return torch.cat([o if o.shape[-1] == width else F.pad(o, (0, width - o.shape[-1]), value=-math.inf)
                          for o in outs])


def _merge_order(sequences: list[list[str]]) -> list[str]:
    """A slot order in which every task's own order of kinds is a subsequence (greedy insertion)."""
    slots: list[str] = []
    for seq in sequences:
        pos = 0
        for kind in seq:
            found = next((i for i in range(pos, len(slots)) if slots[i] == kind), None)
            if found is None:
                slots.insert(pos, kind)
                found = pos
            pos = found + 1
    return slots


def _assign(slots: list[str], ops: list[Op]) -> list[Any]:
    """Each slot's module for one task (None where it has none), matching its ops in order."""
    out: list[Any] = [None] * len(slots)
    pos = 0
    for kind, obj in ops:
        pos = next(i for i in range(pos, len(slots)) if slots[i] == kind)
        out[pos] = obj
        pos += 1
    return out


def build(backbone: nn.Module, tasks: list[Any]) -> nn.Module:
    """A copy of the backbone (sharing its tensors) whose changed sites are MixedSites and head a MixedHead."""
    net, ctx = share_copy(backbone), Context()
    names = sorted(dict.fromkeys(s for t in tasks for s in t.plan.sites), key=lambda s: -s.count("."))  # inner first
    text: dict[str, list[list[Op]]] = {}
    for site in names:
        ops = [t.plan.sites.get(site, []) for t in tasks]
        if mixed_text.is_text(ops):  # wrapped last, around the per-row sites inside them (mixed_text.py)
            text[site] = ops
            continue
        slots = _merge_order([[k for k, _ in o if k != "bias"] for o in ops])
        if any(k == "bias" for o in ops for k, _ in o):
            slots.insert(0, "bias")  # the base layer's own bias comes before every wrapper
        if "ia3-in" in slots:  # acts on the layer's input: before everything (each task's innermost op)
            slots.remove("ia3-in")
            slots.insert(0, "ia3-in")
        per_task = [_assign(slots, o) for o in ops]
        columns = [(kind, [row[i] for row in per_task]) for i, kind in enumerate(slots)]
        set_module(net, site, mixed_tokens.site(innermost(net.get_submodule(site)), columns, ctx, MixedSite))
    for site in names:  # after every site is in place: the hook must sit on the module that will run
        taps = {stream_norm_name(net, site) for t in tasks for k, m in t.plan.sites.get(site, []) if
                k == "adaptformer" and m.tapped}  # fmt: skip
        for norm in taps - {None}:
            net.get_submodule(norm).register_forward_pre_hook(net.get_submodule(site).take_stream)
    mixed_text.install(net, text, ctx)
    mixed_tokens.install(net, tasks, ctx)
    head = tasks[0].plan.head if tasks else None
    if head:
        set_module(net, head, MixedHead([t.model.get_submodule(head) for t in tasks], ctx))
    net.__dict__["_mixed_ctx"] = ctx
    net.__dict__["_mixed_head"] = net.get_submodule(head) if head else None
    return net


def run(net: nn.Module, x: Any, positions: list[int], counts: list[int], width: int) -> Tensor:
    """Logits of a batch sorted by task (``counts`` rows of each task at ``positions``), padded to ``width``."""
    ctx: Context = net.__dict__["_mixed_ctx"]
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    ctx.groups = [(p, starts[i], starts[i + 1]) for i, p in enumerate(positions)]
    device = (x if isinstance(x, Tensor) else next(iter(x.values()))).device
    ctx.idx = torch.repeat_interleave(torch.tensor(positions), torch.tensor(counts)).to(device)
    head = net.__dict__["_mixed_head"]
    if head is None:
        raise DeltaTuneError("mixed batch: the tasks have no classification head")
    ctx.width = width
    mixed_tokens.prepare(ctx)
    out = net(**x) if isinstance(x, dict) else net(x)
    return out.logits if hasattr(out, "logits") else out
