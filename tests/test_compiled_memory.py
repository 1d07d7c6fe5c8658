"""Saved activations under torch.compile: what AOTAutograd's partitioner keeps for LoRA and SSF, with torch's
defaults and with ``deltatune.compile`` (the lean partitioner), against the compiled floor; gradients as float64's."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from conftest import make_input, perturb_deltas, rel_err
from test_fast import DEFAULTS, _grads
from torch import Tensor, nn

import deltatune
from deltatune import kernels
from deltatune.bench import cases as bench_cases
from deltatune.bench.measure import count_saved
from deltatune.kernels.compile import LEAN

# method -> (the bench's partitioner setting it is pinned under, the most saved bytes x the compiled floor)
COMPILED = {"lora-all": ("torch", 1.2), "ssf": ("lean", 1.1)}


@functools.cache
def _compiled_floor_bytes(partitioner: str) -> int:
    floor = _two_blocks().requires_grad_(False)
    return _compiled_saved(floor, make_input("vit").requires_grad_(), partitioner)[1]


def _two_blocks() -> nn.Module:
    """A two-block tiny ViT over 64 patches (activations outweigh the input, as in real ViTs), in train mode:
    compiled with the min-cut partitioner in seconds."""
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", num_classes=5, img_size=32, patch_size=4, depth=2).train()


def _compiled_saved(model: nn.Module, x: Tensor, partitioner: str, ref: nn.Module | None = None) -> tuple[dict, int]:
    """Compiled with AOTAutograd's min-cut partitioner (inductor's, without its code generation) under a bench
    partitioner setting: the gradients (of ``ref``'s parameters, the ones the compiled model trains) and the bytes
    one forward saves for backward."""
    torch._dynamo.reset()  # a same-shaped model compiled before (under another setting) must not be reused
    compile_model = bench_cases.PARTITIONERS[partitioner]  # deltatune.compile (lean) or torch.compile
    compiled = compile_model(model, backend="aot_eager_decomp_partition", fullgraph=True)
    _, grads = _grads(model, x, compiled)
    return grads, count_saved(compiled, x).bytes


@pytest.mark.parametrize("method", list(COMPILED))
def test_compiled_default_keeps_little_more_than_the_floor_and_matches_float64(method: str) -> None:
    """Under torch.compile the partitioner decides what is kept. LoRA's backward reads its input through a negation,
    so the partitioner recomputes it from its LayerNorm/GELU producer (with torch's defaults); SSF's pre-affine
    outputs replace q, k, v and the residual stream under the bench's lean partitioner. On the two-block ViT they
    keep 1.14 and 1.09x the compiled floor's bytes (before: 1.46 and 1.56; LoRA's rest is the attention projection's
    input, a reshaped copy of the attention output, kept); gradients as the float64 plain formulas'."""
    name, options = DEFAULTS[method]
    partitioner, most = COMPILED[method]
    model = deltatune.apply(_two_blocks(), name, **options)
    perturb_deltas(model)
    x = make_input("vit")
    reference = copy.deepcopy(model).double()
    with kernels.disabled():
        _, ref_grads = _grads(reference, x.double())
    grads, saved = _compiled_saved(model, x, partitioner)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert rel_err(g.double(), ref_grads[n]) < 1e-5, n
    assert saved / _compiled_floor_bytes(partitioner) <= most


def test_deltatune_compile_keeps_less_than_torch_compile_and_changes_no_global_setting() -> None:
    """deltatune.compile lifts the partitioner's two recompute bans inside its backend only: a compiled SSF keeps
    less than under torch.compile's defaults, and torch's settings are as before afterwards."""
    before = {k: getattr(torch._functorch.config, k) for k in LEAN}
    saved = {}
    for partitioner in ("lean", "torch"):
        model = deltatune.apply(_two_blocks(), "ssf")
        perturb_deltas(model)
        saved[partitioner] = _compiled_saved(model, make_input("vit"), partitioner)[1]
    assert saved["lean"] < 0.8 * saved["torch"]
    assert {k: getattr(torch._functorch.config, k) for k in before} == before
