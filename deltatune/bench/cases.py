"""The bench's configurations: each row's model, optimizer and merge, one training step, and its saved bytes.

``build_case`` makes a row from its name (``METHODS``: deltatune's methods with bench options, the floor, plain
formulas; ``PEFT_METHODS``: HF peft's LoRA and IA3 as the baseline), ``train_step`` steps it and
``measure_memory`` counts what it keeps for backward (CUDA: its peak).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deltatune
from deltatune import kernels
from deltatune.bench.measure import count_saved, cuda_peak, resident_bytes
from deltatune.kernels import native_kernels
from deltatune.methods.pruning import prune_adapters
from deltatune.targeting import find_head, is_delta

METHODS = (
    "floor", "floor-twin", "full", "linear", "bitfit", "ssf", "ssf-plain", "lora", "lora-plain", "lora-keep",
    "lora-ops", "adapter", "mimi",
)  # fmt: skip
FLOORS = ("floor", "floor-twin")  # the twin: a second, identical floor as its own row; its ratio is the run's noise
PEFT_METHODS = ("peft-lora", "peft-ia3")
OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {  # row -> (deltatune method, options)
    "full": ("full", {}),
    "linear": ("linear", {}),
    "bitfit": ("bitfit", {}),
    "ssf": ("ssf", {}),
    "lora": ("lora", {"r": 8, "alpha": 16.0, "target_modules": "all-linear"}),
    "adapter": ("adapter", {"hidden": 24}),
    "mimi": ("mimi", {}),  # sigma 4, then pruned to MIMI_KEEP of its neurons (``prune_as_mimi``)
}
MIMI_KEEP = 4 / 32  # MiMi's default end point: sigma-4 adapters pruned to the size sigma 32 gives
NUM_CLASSES = 100
# --partitioner lean: deltatune.compile (AOTAutograd's partitioner may recompute ops outside its allowlist, timm's
# qkv unbind, and values made far apart, the residual stream: kernels/compile.py); torch: torch.compile as it is.
# Every configuration alike, the floor's included.
PARTITIONERS: dict[str, Callable[[nn.Module], nn.Module]] = {"lean": deltatune.compile, "torch": torch.compile}


@dataclass
class Case:
    """One configuration: its model (maybe compiled), optimizer and how to merge it."""

    name: str
    raw: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: int
    plain: bool = False
    floor: bool = False
    recompute: bool | None = None
    merge: Callable[[nn.Module], nn.Module] | None = None
    native: bool = True
    result: dict[str, Any] = field(default_factory=dict)


def _peft_model(model: nn.Module, name: str) -> nn.Module | None:
    """HF peft's LoRA (r=8 on every Linear but the head) or IA3 (qkv and fc2), head trained; None without peft."""
    try:
        import peft
    except ImportError:
        return None
    head = find_head(model, True)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]
    saved = [head] if head else None
    if name == "peft-lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=linears, modules_to_save=saved)
    else:
        targets = [n for n in linears if n.endswith(("qkv", "fc2"))]
        if not targets:
            return None
        ff = [n for n in targets if n.endswith("fc2")]
        config = peft.IA3Config(target_modules=targets, feedforward_modules=ff, modules_to_save=saved)
    return peft.get_peft_model(model, config)


def build_case(
    name: str, make: Callable[[], nn.Module], compile_model: bool, fused: bool, partitioner: str = "lean"
) -> Case | None:
    """The configuration ``name`` on a fresh backbone (None: peft missing or not applicable)."""
    model = make()
    merge: Callable[[nn.Module], nn.Module] | None = None
    if name in FLOORS:
        model.requires_grad_(False)
    elif name in PEFT_METHODS:
        model = _peft_model(model, name)
        if model is None:
            return None
        merge = lambda m: m.merge_and_unload()  # noqa: E731
    else:
        method, options = OPTIONS[name.removesuffix("-plain").removesuffix("-keep").removesuffix("-ops")]
        deltatune.apply(model, method, **options)
        if method == "mimi":
            prune_as_mimi(model)
        if any(is_delta(m) for m in model.modules()):
            merge = deltatune.merge
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused) if params else None
    compiled = PARTITIONERS[partitioner](model) if compile_model else model
    trainable = sum(p.numel() for p in params)
    recompute = False if name.endswith("-keep") else None  # keep LoRA's inputs: the trade-off row
    plain, floor = name.endswith("-plain"), name in FLOORS
    native = not name.endswith("-ops")  # lora-ops: the rank-r products as PyTorch matmuls, not the compiled kernel
    return Case(name, model, compiled, optimizer, trainable, plain, floor, recompute, merge, native)


def prune_as_mimi(model: nn.Module) -> None:
    """MiMi's end state without its training: the adapters pruned globally by MiMi's score to ``MIMI_KEEP`` of their
    neurons in three halvings (its phases), so the sites end with unequal sizes as a global ranking leaves them."""
    for done in (0.5, 0.75, 1 - MIMI_KEEP):
        prune_adapters(model, done, score="mimi", scope="global")


def logits(out: Any) -> Tensor:
    """The logits of a timm model's output (a tensor) or of an HF model's (``.logits``)."""
    return out.logits if hasattr(out, "logits") else out


@contextlib.contextmanager
def mode(case: Case, amp: torch.dtype | None, device: torch.device) -> Iterator[None]:
    """The row's switches while it runs: LoRA's input recompute and compiled kernel, plain formulas, bf16 autocast."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernels.recompute_inputs(case.recompute))
        stack.enter_context(native_kernels(case.native))
        if case.plain:
            stack.enter_context(kernels.disabled())
        if amp is not None:
            stack.enter_context(torch.autocast(device.type, dtype=amp))
        yield


def train_step(case: Case, x: Tensor, target: Tensor, amp: torch.dtype | None) -> None:
    """Forward, loss, backward and optimizer step (the floor: forward and input-gradient backward only)."""
    inp = x.detach().requires_grad_() if case.floor else x
    with mode(case, amp, x.device):
        loss = F.cross_entropy(logits(case.model(inp)).float(), target)
    loss.backward()
    if case.optimizer is not None:
        case.optimizer.step()
        case.optimizer.zero_grad(set_to_none=True)


def _resident(case: Case) -> list[Tensor]:
    """The configuration's weights and optimizer state: resident for the whole run."""
    tensors = [*case.raw.parameters(), *case.raw.buffers()]
    if case.optimizer is not None:
        for state in case.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, Tensor)]
    return tensors


def measure_memory(case: Case, x: Tensor, target: Tensor, amp: torch.dtype | None) -> dict[str, Any]:
    """CUDA: the step's peak bytes as if it ran alone. CPU: activation bytes saved for backward, counted (of the
    compiled graph with --compile)."""
    if x.device.type == "cuda":
        peak = cuda_peak(lambda: train_step(case, x, target, amp), x.device) + resident_bytes(_resident(case))
        return {"memory_kind": "cuda_peak", "memory_bytes": peak}
    inp = x.detach().requires_grad_() if case.floor else x
    with mode(case, amp, x.device):
        counter = count_saved(case.model, inp)  # compiled: what the compiled graph keeps
    return {
        "memory_kind": "saved_activations",
        "memory_bytes": counter.bytes,
        "saved_with_weights": counter.total_bytes,
    }
