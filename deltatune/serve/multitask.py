"""Many tasks on one frozen backbone: delta files attach under task names, and one forward mixes tasks per row.

    mt = MultiTaskModel(timm.create_model("vit_base_patch16_224", pretrained=True))
    mt.add_task("birds", "runs/birds/delta.safetensors")     # any method or combination, its own head
    mt.add_task("cars", "runs/cars/delta.safetensors")
    logits = mt(images, tasks=["birds", "cars", "birds"])    # (B, max classes), -inf beyond a row's classes
    mt.split(logits, ["birds", "cars", "birds"])             # per-row logits of each task's class count

Each task is a structural copy of the backbone (``share_copy``) whose frozen tensors are the backbone's own, so a
task costs its delta tensors (and its head) only; adding, removing and switching tasks never copies or reloads the
backbone. ``deltatune.load_delta`` loads each file into its copy, so every file gets all of its checks (integrity,
backbone class, shapes and the frozen values' hashes). A mixed batch runs in one pass through the backbone where
every task's deltas have a per-row kernel (SSF, BitFit biases, LoRA on Linear layers, FacT, IA3, adapters,
AdaptFormer; ``mixed.py``; on timm ViTs VPT shallow/deep and prefixes with any prompt counts: each row's
prompt/prefix slots, padding masked, ``mixed_tokens.py``; prompts and prefixes on HF text models, ``mixed_text.py``);
a batch holding a task with other methods (Swin VPT, compacter, ...) runs each task's rows through its own model
instead (exact, one backbone pass per task: slower; ``strict=True`` refuses).
Rows must be independent, which holds for transformers; a BatchNorm backbone in train mode always groups.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune import _deltafile as fmt
from deltatune import checkpoint
from deltatune.checkpoint import load_delta
from deltatune.core import merge, state_of
from deltatune.errors import DeltaTuneError
from deltatune.serve import mixed
from deltatune.serve._share import share_copy
from deltatune.targeting import set_module

Inputs = Tensor | dict[str, Tensor]


@dataclass
class Task:
    """One attached task: its name, file, single-task model (sharing the backbone) and what the file holds."""

    name: str
    path: Path
    model: nn.Module
    methods: list[str]
    num_classes: int
    file_bytes: int
    delta_params: int
    plan: mixed.Plan | None = None
    why_grouped: str = ""
    info: dict[str, Any] = field(default_factory=dict)


class MultiTaskModel(nn.Module):
    """One frozen backbone, any number of tasks (delta files), mixed-task batches."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if state_of(backbone) is not None:
            raise DeltaTuneError("MultiTaskModel: pass the plain backbone, not a model with deltas applied")
        self.backbone = backbone.requires_grad_(False)
        self.task_models = nn.ModuleDict()
        self._tasks: dict[str, Task] = {}
        self._mixed: nn.Module | None = None
        self._lock = threading.RLock()

    def tasks(self) -> list[str]:
        """The task names, in the order they were added."""
        return list(self._tasks)

    def task(self, name: str) -> Task:
        """The attached task ``name``; an unknown name raises DeltaTuneError listing the known ones."""
        if name not in self._tasks:
            raise DeltaTuneError(f"unknown task {name!r}; known tasks: {', '.join(self._tasks) or '(none)'}")
        return self._tasks[name]

    def task_model(self, name: str) -> nn.Module:
        """The single-task model of ``name`` (shares the backbone's tensors): switching tasks is a lookup."""
        return self.task(name).model

    def add_task(self, name: str, path: str | os.PathLike, check_backbone: str = "values") -> Task:
        """Attaches the delta file ``path`` as task ``name`` after all of ``load_delta``'s checks."""
        if not name or not isinstance(name, str) or "." in name:
            raise DeltaTuneError(f"add_task: task name must be a non-empty string without dots, got {name!r}")
        if name in self._tasks:
            raise DeltaTuneError(f"add_task: task {name!r} exists; remove_task({name!r}) first to replace it")
        path = Path(path)
        meta, tensors = fmt.read(path)
        model = share_copy(self.backbone)
        head = _fit_head(model, meta, path)
        stages = checkpoint._stages(meta, path)
        checkpoint._check_shapes(model, meta, path)
        trained = checkpoint._dry_run(model, stages, meta.get("head") or False, meta.get("bn_stats", "delta"),
                                      tensors, path)
        model = share_copy(model, own=trained)  # what the file trains (BitFit biases, ...) is the task's own
        load_delta(model, path, check_backbone=check_backbone)
        model.train(self.backbone.training)
        num_classes = _num_classes(model, head)
        task = Task(name, path, model, [s["method"] for s in stages], num_classes, path.stat().st_size,
                    sum(t.numel() for t in tensors.values()))
        task.plan, task.why_grouped = mixed.plan(model, self.backbone)
        with self._lock:
            self._tasks[name] = task
            self.task_models[name] = model
            self._mixed = None
        return task

    def remove_task(self, name: str) -> None:
        """Detaches task ``name``; its tensors are freed once nothing else holds them."""
        self.task(name)
        with self._lock:
            del self._tasks[name], self.task_models[name]
            self._mixed = None

    def forward(self, x: Inputs, tasks: str | list[str], grouped: bool = False, strict: bool = False) -> Tensor:
        """Logits of each row under its task: (B, max classes), -inf past a row's own class count (softmax and
        cross-entropy work on it as they are). ``grouped=True`` runs each task's rows through its own model;
        ``strict=True`` raises DeltaTuneError unless the batch mixes per row in one backbone pass."""
        names = [tasks] * _rows(x) if isinstance(tasks, str) else list(tasks)
        if len(names) != _rows(x):
            raise DeltaTuneError(f"forward: {len(names)} task names for a batch of {_rows(x)} rows; give one per row")
        order = [self.task(n) for n in dict.fromkeys(names)]
        width = max(t.num_classes for t in self._tasks.values())
        if len(order) == 1:
            return _pad(order[0].model(x) if isinstance(x, Tensor) else _logits(order[0].model, x), width)
        index = {t.name: i for i, t in enumerate(order)}
        rows = torch.tensor([index[n] for n in names])
        perm = torch.argsort(rows, stable=True)
        counts = torch.bincount(rows, minlength=len(order)).tolist()
        xs = _take(x, perm)
        if strict and not grouped:
            self._check_mixable(order)
        if grouped or not self._mixable(order):
            out = torch.cat([_pad(_logits(t.model, part), width) for t, part in zip(order, _split(xs, counts))])
        else:
            with self._lock:
                net = self.mixed_model()
                out = mixed.run(net, xs, [self._position(t.name) for t in order], counts, width)
        return out[torch.argsort(perm)]

    def split(self, logits: Tensor, tasks: list[str]) -> list[Tensor]:
        """Per-row logits cut to each row's task's class count."""
        return [row[: self.task(n).num_classes] for row, n in zip(logits, tasks)]

    def export(self, name: str, path: str | os.PathLike) -> int:
        """Writes task ``name`` as a plain merged backbone (safetensors, the backbone's own parameter names, loadable
        with ``load_state_dict(strict=True)`` into the architecture built with the task's class count); returns
        bytes. This one copies the backbone (the merge needs weights of its own); the shared one is untouched."""
        task = self.task(name)
        plain = copy.deepcopy(self.backbone)
        _fit_head(plain, fmt.read(task.path)[0], task.path)
        load_delta(plain, task.path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unmergeable delta is refused below, naming it
            merge(plain)
        left = [n for n, m in plain.named_modules() if hasattr(m, "delta_method")]
        if left:
            raise DeltaTuneError(
                f"export: task {name!r} uses {', '.join(task.methods)}, which cannot merge into the backbone's weights "
                f"({left[0]} stays a delta); serve it with deltatune serve, or train a mergeable method (SSF, LoRA, "
                f"BitFit)"
            )
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
        save_file(state, str(path), metadata={"num_classes": str(task.num_classes), "task": name})
        return Path(path).stat().st_size

    def _mixable(self, order: list[Task]) -> bool:
        bn_training = self.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                            for m in self.backbone.modules())
        return not bn_training and all(t.plan is not None for t in order)

    def _check_mixable(self, order: list[Task]) -> None:
        """Raises DeltaTuneError naming why the batch cannot mix per row (strict mixing was asked for)."""
        why = next((f"task {t.name!r}: {t.why_grouped}" for t in order if t.plan is None), None)
        if why is None and not self._mixable(order):
            why = "the backbone has BatchNorm layers in train mode (rows are not independent)"
        if why:
            raise DeltaTuneError(
                f"forward(strict=True): this batch cannot mix per row ({why}); call with strict=False to run "
                f"such tasks' rows through their own models (exact, one backbone pass per task), or retrain them "
                f"with SSF, BitFit, LoRA or adapters"
            )

    def _position(self, name: str) -> int:
        return [t for t in self._tasks.values() if t.plan is not None].index(self._tasks[name])

    def mixed_model(self) -> nn.Module:
        """The one network that mixes tasks per row (built on first use, rebuilt after add/remove_task); compile it
        in place with ``.compile()``."""
        if self._mixed is None:
            self._mixed = mixed.build(self.backbone, [t for t in self._tasks.values() if t.plan is not None])
        return self._mixed


def _fit_head(model: nn.Module, meta: dict[str, str], path: Path) -> str | None:
    """Gives the copy a head of the file's shape (tasks differ in class count); returns the head's name."""
    head = meta.get("head") or None
    shapes = fmt.decode(meta, "backbone_shapes", path)
    if not head or not isinstance(shapes, dict) or f"{head}.weight" not in shapes:
        return head
    layer = model.get_submodule(head)
    want = shapes[f"{head}.weight"]
    if isinstance(layer, nn.Linear) and list(layer.weight.shape) != want and len(want) == 2:
        ref = layer.weight
        new = nn.Linear(want[1], want[0], bias=f"{head}.bias" in shapes, device=ref.device, dtype=ref.dtype)
        set_module(model, head, new.requires_grad_(False))
    return head


def _num_classes(model: nn.Module, head: str | None) -> int:
    layer = model.get_submodule(head) if head else None
    weight = getattr(layer, "weight", None)
    if weight is None:
        raise DeltaTuneError("MultiTaskModel: the backbone has no classification head (Linear) to count classes by")
    return int(weight.shape[0])


def _rows(x: Inputs) -> int:
    return x.shape[0] if isinstance(x, Tensor) else next(iter(x.values())).shape[0]


def _take(x: Inputs, perm: Tensor) -> Inputs:
    return x[perm] if isinstance(x, Tensor) else {k: v[perm] for k, v in x.items()}


def _split(x: Inputs, counts: list[int]) -> list[Inputs]:
    if isinstance(x, Tensor):
        return list(x.split(counts))
    parts = {k: v.split(counts) for k, v in x.items()}
    return [{k: parts[k][i] for k in x} for i in range(len(counts))]


def _logits(model: nn.Module, x: Inputs) -> Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _pad(logits: Tensor, width: int) -> Tensor:
    """(B, C) -> (B, width), -inf in the extra columns."""
    if logits.shape[-1] == width:
        return logits
    return torch.nn.functional.pad(logits, (0, width - logits.shape[-1]), value=float("-inf"))
