"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022). https://arxiv.org/abs/2203.12119

Learnable prompt tokens P (p, d) join the token sequence after the CLS (and any register/distillation) tokens and
before the patch tokens::

    shallow: [x_cls, P, E] -> L_1 -> ... -> L_N                 p*d parameters
    deep:    [x_cls, P_i, E_i] -> L_i, the prompt outputs of L_{i-1} dropped     N*p*d parameters

Init as the official code: U(-v, v) with v = sqrt(6 / (3 * patch_h * patch_w + d)), on Swin with the FIRST stage's
d for every stage; dropout on the prompts.
Output shapes are unchanged: on ViT the prompt outputs are removed before the final norm (the CLS token or an average
pool of the patches is read, as the official ViT code reads the CLS token); on Swin see below. Not mergeable; FLOPs
grow with p.

timm ViT/DeiT: the prompts are inserted by a wrapper on ``norm_pre`` (after the position embedding) and removed by
a wrapper on the final ``norm``. Deep prompts of block i > 0 are written over the prompt positions of the block's
``norm1`` input: the other tokens see prompts only through attention, and the prompt positions' residual values are
never read again, so the CLS and patch outputs equal VPT-deep's exactly, at the same FLOPs, while every wrapper
stays a leaf (other methods can still target the layers inside the blocks).

Swin (``vpt-deep`` only), as the official code (KMnP/vpt ``PromptedSwinTransformer``): the prompts are
residual-stream tokens, replaced before every block. Each block normalises them with its ``norm1`` and appends them
to every window (zero relative-position bias and shift mask for them); the window tokens' outputs are the official
ones. The prompt outputs of every block but the last are replaced before they are read again (patch merging
included), so only the last block computes them: their attention outputs (prompt queries over each window) are
averaged over the windows, added to the prompts, passed through the block's ``norm2`` and MLP and the final
``norm``, and the average pool covers prompts and patches (``pool_prompts=False``: patches only). Wrappers: every
``WindowAttention``, and ``head.global_pool``. Differences from the official code: its mean over windows reshapes
(windows * batch) rows in the wrong order, so with a batch of several images and several windows in the last stage
it mixes the images' prompt outputs; deltatune averages each image's own windows (the same whenever the batch holds
one image or the last stage has one window, as Swin-T/S/B at 224 with window 7). In train mode, stochastic depth
draws separate masks for an image's prompt and patch tokens (the official code keeps the backbone in eval mode while
training), and prompt dropout draws one mask for the whole batch (the official first block draws one per image). So
p * (sum over blocks of d_block) parameters. ``vpt-shallow`` has no Swin form: timm's Swin keeps tokens on a (B, H,
W, C) grid, so prompt tokens cannot travel from block to block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core import Applied, delta_modules
from deltatune.errors import DeltaTuneError
from deltatune.registry import register, require
from deltatune.targeting import family, get_module, innermost, set_module

VPT_METHODS = ("vpt-shallow", "vpt-deep")
VIT_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")  # not Eva: its RoPE assumes a patch-only grid


@dataclass
class _VPTOptions:
    """Options shared by ``vpt-shallow`` and ``vpt-deep``."""

    num_tokens: int = 10
    """Number of prompt tokens p (per block for deep). The paper tunes it per task in {1, 5, 10, 50, 100, 200}."""
    dropout: float = 0.0
    """Dropout on the prompt tokens (official default 0.0; 0.1 in some of its task configs)."""
    pool_prompts: bool = True
    """Swin only: the final average pool covers the last block's prompt outputs too, as the official code."""

    mergeable: ClassVar[bool] = False
    name: ClassVar[str]
    deep: ClassVar[bool]

    def __post_init__(self) -> None:
        require(self, self.num_tokens >= 1, "num_tokens", ">= 1")
        require(self, 0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")

    def apply(self, model: nn.Module, skip: tuple[str, ...]) -> Applied:
        """Adds the prompt wrappers for the model's family (timm ViT, or Swin for deep)."""
        if any(m.delta_method in VPT_METHODS for _, m in delta_modules(model)):
            raise DeltaTuneError(f"{self.name}: the model already has VPT prompts; apply one VPT method only")
        fam = family(model)
        if type(model).__name__ in VIT_CLASSES:
            return self._apply_vit(model)
        if fam == "swin" and self.deep:
            return self._apply_swin(model)
        hint = {
            "swin": "use vpt-deep (timm's Swin keeps tokens on a spatial grid)",
            "bert": "use 'prompt' (soft prompt tokens) for HF text encoders",
        }.get(fam or "", "")
        raise DeltaTuneError(
            f"{self.name} supports timm ViT/DeiT{' and Swin' if self.deep else ''}, not "
            f"{type(model).__name__}{'; ' + hint if hint else ''}"
        )

    def _init_val(self, model: nn.Module, d: int) -> float:
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
        return math.sqrt(6.0 / float(3 * math.prod(patch) + d))

    def _apply_vit(self, model: nn.Module) -> Applied:
        d, p, prefix = model.embed_dim, self.num_tokens, model.num_prefix_tokens
        val = self._init_val(model, d)
        ref = next(model.parameters())  # device and dtype (layers may already be wrapped by other deltas)
        sites = ["norm_pre", *(f"blocks.{i}.norm1" for i in range(1, len(model.blocks)) if self.deep), "norm"]
        for name in sites:
            module = get_module(model, name)
            if name == "norm":
                wrapper: nn.Module = VPTRemove(module, self.name, prefix, p)
            else:
                wrapper = VPTPrompt(
                    module, self.name, _prompt(p, d, val, ref), prefix, self.dropout, insert=name == "norm_pre"
                )
            set_module(model, name, wrapper)
        return Applied(sites)

    def _apply_swin(self, model: nn.Module) -> Applied:
        sites = [n for n, m in model.named_modules() if type(innermost(m)).__name__ == "WindowAttention"]
        sites = [n for n in sites if not any(n.startswith(s + ".") for s in sites)]
        if not sites:
            raise DeltaTuneError(f"{self.name}: no timm WindowAttention found in {type(model).__name__}")
        pool = _swin_pool_site(model, self.name) if self.pool_prompts else None
        # Official: one init bound for every stage, from the first stage's width (embed_dim).
        val = self._init_val(model, innermost(get_module(model, sites[0])).dim)
        for name in sites:
            attn = innermost(get_module(model, name))
            prompt = _prompt(self.num_tokens, attn.dim, val, attn.relative_position_bias_table)
            keep = pool is not None and name == sites[-1]
            block = name.rpartition(".")[0]
            wrapper = VPTWindowAttention(get_module(model, name), self.name, prompt, self.dropout, model, block, keep)
            set_module(model, name, wrapper)
        if pool is None:
            return Applied(sites)
        set_module(model, pool, VPTSwinPool(get_module(model, pool), self.name, model, sites[-1]))
        return Applied([*sites, pool])


def _swin_pool_site(model: nn.Module, method: str) -> str:
    """Name of the Swin head's average pool, which the prompt outputs join (official: prompts and patches pooled)."""
    pool = getattr(getattr(model, "head", None), "global_pool", None)
    if pool is None or getattr(innermost(pool), "pool_type", None) != "avg":
        raise DeltaTuneError(
            f"{method}: pool_prompts=True needs a Swin head with average pooling (head.global_pool, pool type 'avg'); "
            "pass pool_prompts=False to pool the patch tokens only"
        )
    return "head.global_pool"


@register("vpt-shallow")
@dataclass
class VPTShallowConfig(_VPTOptions):
    """Visual Prompt Tuning, shallow: p prompt tokens at the input of the first block (timm ViT/DeiT)."""

    families: ClassVar[frozenset[str] | None] = frozenset({"vit"})
    deep: ClassVar[bool] = False


@register("vpt-deep")
@dataclass
class VPTDeepConfig(_VPTOptions):
    """Visual Prompt Tuning, deep: a fresh set of p prompt tokens at every block's input (timm ViT/DeiT, Swin)."""

    families: ClassVar[frozenset[str] | None] = frozenset({"vit", "swin"})
    deep: ClassVar[bool] = True


def _prompt(p: int, d: int, val: float, ref: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(p, d, device=ref.device, dtype=ref.dtype).uniform_(-val, val))


class VPTPrompt(nn.Module):
    """Wraps ``norm_pre`` (inserts the prompts after the prefix tokens) or a block's ``norm1`` (overwrites them)."""

    delta_method: str  # "vpt-shallow" or "vpt-deep", set per instance

    def __init__(self, base: nn.Module, method: str, prompt: nn.Parameter, prefix: int, dropout: float, insert: bool):
        super().__init__()
        self.base, self.delta_stage, self.delta_method = base, None, method
        self.vpt_prompt = prompt  # (p, d)
        self.vpt_dropout = nn.Dropout(dropout)
        self.prefix, self.insert = prefix, insert
        self.train(base.training)  # take the mode of the module it replaces

    def forward(self, x: Tensor) -> Tensor:
        b, n = x.shape[0], self.prefix
        prompt = self.vpt_dropout(self.vpt_prompt).unsqueeze(0).expand(b, -1, -1)  # (B, p, d)
        if self.insert:
            y = self.base(x)
            return torch.cat([y[:, :n], prompt, y[:, n:]], dim=1)  # (B, prefix + p + N, d)
        p = prompt.shape[1]
        return self.base(torch.cat([x[:, :n], prompt, x[:, n + p :]], dim=1))

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.vpt_prompt]


class VPTRemove(nn.Module):
    """Wraps the final ``norm``: drops the prompt positions, so everything after it sees the original tokens."""

    delta_method: str

    def __init__(self, base: nn.Module, method: str, prefix: int, p: int):
        super().__init__()
        self.base, self.delta_stage, self.delta_method = base, None, method
        self.prefix, self.p = prefix, p
        self.train(base.training)  # take the mode of the module it replaces

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, : self.prefix], x[:, self.prefix + self.p :]], dim=1)  # (B, prefix + N, d)
        return self.base(x)

    def delta_parameters(self) -> list[nn.Parameter]:
        return []


class VPTWindowAttention(nn.Module):
    """Wraps a timm Swin ``WindowAttention``: the block's ``norm1`` of the prompts joins every window as p tokens."""

    delta_method: str

    def __init__(
        self,
        base: nn.Module,
        method: str,
        prompt: nn.Parameter,
        dropout: float,
        root: nn.Module,
        block_name: str,
        keep: bool,
    ):
        super().__init__()
        self.base, self.delta_stage, self.delta_method = base, None, method
        self.vpt_prompt = prompt  # (p, C), in the residual stream
        self.vpt_dropout = nn.Dropout(dropout)
        self.keep = keep  # the last block: its prompt outputs are kept for the final pool
        self.block_name = block_name  # the timm SwinTransformerBlock holding this wrapper
        self.__dict__["_root"] = root  # not a submodule: the block's norm1 is looked up at call time (may be wrapped)
        self.__dict__["_kept"] = None  # (prompts, their attention outputs) for VPTSwinPool
        self.train(base.training)  # take the mode of the module it replaces

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        attn = innermost(self.base)
        b_, n, _ = x.shape
        h, p = attn.num_heads, self.vpt_prompt.shape[0]
        resid = self.vpt_dropout(self.vpt_prompt)  # (p, C)
        qkv = attn.qkv(x).reshape(b_, n, 3, h, -1).permute(2, 0, 3, 1, 4)  # (3, B_, h, N, hd)
        q, k, v = qkv.unbind(0)
        pqkv = attn.qkv(self._norm1()(resid)).reshape(p, 3, h, -1).permute(1, 2, 0, 3)  # (3, h, p, hd)
        k = torch.cat([pqkv[1].expand(b_, -1, -1, -1), k], dim=2)  # (B_, h, p + N, hd)
        v = torch.cat([pqkv[2].expand(b_, -1, -1, -1), v], dim=2)
        rows = p if self.keep else 0  # the prompts' own queries: only the last block's prompt outputs are read
        if rows:
            q = torch.cat([pqkv[0].expand(b_, -1, -1, -1), q], dim=2)  # (B_, h, p + N, hd)
        m = rows + n
        bias = F.pad(attn._get_rel_pos_bias(), (p, 0, rows, 0))  # (1, h, M, p + N): prompts get no position bias
        if mask is not None:
            nw = mask.shape[0]
            mask = F.pad(mask, (p, 0, rows, 0)).view(1, nw, 1, m, p + n)  # prompts see and are seen by every token
            bias = (bias.unsqueeze(1) + mask).expand(b_ // nw, -1, -1, -1, -1).reshape(-1, h, m, p + n)
        bias = bias.to(q.dtype)
        if attn.fused_attn:
            drop = attn.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=attn.scale)
        else:  # timm's explicit path (also what FLOP counters see)
            out = attn.attn_drop((q * attn.scale @ k.transpose(-2, -1) + bias).softmax(-1)) @ v  # (B_, h, M, hd)
        out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b_, m, -1)))  # (B_, M, C)
        if rows:
            self.__dict__["_kept"] = (resid, out[:, :rows])
        return out[:, rows:]

    def _norm1(self) -> nn.Module:
        """The enclosing block's ``norm1`` as it is now (another delta may have wrapped it)."""
        return self.block().norm1

    def block(self) -> nn.Module:
        """The timm ``SwinTransformerBlock`` holding this wrapper."""
        return get_module(self._root, self.block_name)

    def take_prompt_outputs(self) -> tuple[Tensor, Tensor]:
        """The last forward's prompts (p, C) and their attention outputs (B_, p, C), handed over once."""
        kept, self.__dict__["_kept"] = self._kept, None
        if kept is None:
            raise DeltaTuneError(
                f"{self.delta_method}: the Swin head pools the prompt outputs of the last block, but the backbone's "
                "blocks did not run since the last pool; call the model (or forward_features) first, or apply "
                "with pool_prompts=False"
            )
        return kept

    def delta_parameters(self) -> list[nn.Parameter]:
        return [self.vpt_prompt]


class VPTSwinPool(nn.Module):
    """Wraps the Swin head's average pool: the last block's prompt outputs finish that block and join the pool."""

    delta_method: str

    def __init__(self, base: nn.Module, method: str, root: nn.Module, attn_name: str):
        super().__init__()
        self.base, self.delta_stage, self.delta_method = base, None, method
        self.attn_name = attn_name
        self.__dict__["_root"] = root  # not a submodule: the block and final norm are looked up at call time
        self.train(base.training)  # take the mode of the module it replaces

    def forward(self, x: Tensor) -> Tensor:
        b, hgt, wid, _ = x.shape  # (B, H, W, C): the final norm's output
        attn = get_module(self._root, self.attn_name)
        resid, out = attn.take_prompt_outputs()  # (p, C), (B * nW, p, C)
        p = resid.shape[0]
        block = attn.block()
        y = resid + block.drop_path1(out.reshape(b, -1, p, out.shape[-1]).mean(1))  # (B, p, C): mean over windows
        y = y + block.drop_path2(block.mlp(block.norm2(y)))
        y = self._root.norm(y)
        return (self.base(x) * (hgt * wid) + y.sum(1)) / (hgt * wid + p)  # (B, C): over patches and prompts

    def delta_parameters(self) -> list[nn.Parameter]:
        return []
