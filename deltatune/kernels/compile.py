"""``deltatune.compile``: ``torch.compile`` whose partitioner may recompute what a frozen backbone keeps anyway.

Under torch.compile, AOTAutograd's min-cut partitioner decides what the forward keeps for the backward. With torch's
defaults it never recomputes an op outside its allowlist (timm's fused qkv ``unbind``) nor a value whose inputs
were made far apart (the residual stream), so a compiled SSF keeps its pre-affine outputs beside q, k, v and the
residual stream: 1.48x the compiled floor's saved activations on vit_small@112. Lifting those two bans while the
graphs are partitioned brings it to 1.03x (``deltatune bench --compile``; ``--partitioner torch`` for the
defaults). The setting is applied inside the compiler backend, around each graph's compilation only: nothing
global changes, and the model compiles and runs as under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LEAN: dict[str, bool] = {"ban_recompute_not_in_allowlist": False, "ban_recompute_used_far_apart": False}


def lean_backend(backend: str | Callable[..., Any] = "inductor") -> Callable[..., Any]:
    """A dynamo backend: ``backend`` with the partitioner's two recompute bans lifted while it compiles a graph."""
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(backend) if isinstance(backend, str) else backend

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        with torch._functorch.config.patch(**LEAN):  # the joint graph is partitioned inside this call
            return inner(gm, example_inputs)

    return compile_graph


def compile(model: nn.Module, backend: str | Callable[..., Any] = "inductor", **options: Any) -> nn.Module:
    """``torch.compile(model, **options)`` with the lean partitioner (see the module's docstring): the compiled
    model deltatune's benchmarks measure. ``backend`` names a dynamo backend (inductor by default)."""
    return torch.compile(model, backend=lean_backend(backend), **options)
