"""``TrainConfig``: every option of ``deltatune train``, one documented field each (the docstrings are the CLI help).

Precedence: the field defaults, then a YAML file (``--config``), then options given on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from deltatune._precision import as_dtype
from deltatune.core import BN_STATS
from deltatune.errors import DeltaTuneError
from deltatune.registry import make_config
from deltatune.train.memory import PRECISIONS
from deltatune.train.options import (
    check_choice,
    check_model_kwargs,
    coerce,
    flag,
    method_option_fields,
    method_options,
    method_sections,
    read_yaml,
    source_docs,
)

TRANSFORMS = ("timm", "resize", "none", "auto")


@dataclass
class _TrainConfig:
    """One training run: backbone, delta method, data, augmentation, optimisation and bookkeeping.

    ``TrainConfig`` adds the registered methods' training options (``protocols.TrainOptions``) as fields.
    """

    # Backbone and method
    model: str = "deltatune_offline_vit"
    """Backbone: a timm name (vit_base_patch16_224.augreg_in21k), deltatune_offline_vit (bundled, no download) or
    hf:NAME_OR_PATH for a Hugging Face text model (AutoModelForSequenceClassification; AutoModelForCausalLM on lm:)."""
    pretrained: bool = True
    """Load the backbone's pretrained weights (timm downloads them unless --checkpoint names a local file)."""
    checkpoint: str | None = None
    """Local weight file for a timm backbone (.safetensors, or a torch state dict read with weights_only=True)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments for timm.create_model, as YAML: "{drop_path_rate: 0.1, patch_size: 8}"."""
    img_size: int | None = None
    """Input resolution in pixels; default: the backbone's own."""
    method: str | list[str] = "ssf"
    """Delta-tuning method (see `deltatune.methods()`), or several trained together: "bitfit,adapter"."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Options of the method, as YAML: "{r: 4, alpha: 8}"; for several methods key them by method name."""
    train_head: bool = True
    """Train a fresh classification head along with the deltas. Causal-LM data (lm:) has no fresh head: the model's
    LM head stays frozen whatever this says (GPT-2 ties it to the token embedding, which it would change too)."""

    # Phases: sequential stages (a method's own options, e.g. MiMi's pruning, come from its config: cli_options)
    stages: list[str] | None = None
    """Sequential stages instead of --method: "prompt,bitfit,adapter" trains each method in turn for --epochs
    epochs while the earlier stages' deltas stay frozen ("bitfit+adapter" trains two together in one stage)."""

    # Data
    dataset: str = "offline:digits"
    """Dataset: a torchvision name (cifar100, flowers102, svhn, ...), offline:TASK (bundled, no download),
    folder (ImageFolder train/ + val/ or test/), vtab[:TASK] (VTAB-1k lists), fgvc[:NAME] (VPT json splits),
    text (train/test .csv or .jsonl with text,label), offline:topics / offline:topics-mixed (bundled text tasks, for
    hf: models), lm:PATH (a .txt file or folder of them: next-token loss, perplexity; hf: models) or synthetic (tiny
    generated images, for smoke tests)."""
    data_dir: str = "data"
    """Where the dataset lives (or is downloaded to)."""
    download: bool = True
    """Let torchvision download a missing dataset into data_dir."""
    train_split: str | None = None
    """Split to train on; default: the dataset's training split (VTAB-1k: train800val200, FGVC: trainval)."""
    eval_split: str | None = None
    """Split to evaluate on; default: test (use val200 / val to tune hyper-parameters)."""
    max_train_samples: int | None = None
    """Train on a seeded random subset of this many examples (quick experiments)."""
    max_eval_samples: int | None = None
    """Evaluate on a seeded random subset of this many examples."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the main process)."""
    tokenizer: str | None = None
    """Tokenizer path or name for text models; default: the model's own."""
    max_length: int = 128
    """Text: truncate sequences to this many tokens."""
    block_size: int = 128
    """Causal-LM data (lm:PATH): tokens per training and evaluation block."""

    # Augmentation and regularisation
    train_transform: str = "auto"
    """Training preprocessing: timm (random resized crop, flip, RandAugment, erasing), resize (direct resize, no
    augmentation: the VTAB-1k protocol), none (normalise only) or auto: resize for offline: tasks (no
    augmentation, as in the demo: a flipped digit is another digit), timm otherwise."""
    eval_transform: str = "auto"
    """Evaluation preprocessing: timm (resize and centre crop), resize (direct resize), none or auto: resize for
    offline: tasks, timm otherwise."""
    hflip: float = 0.5
    """Horizontal flip probability (timm training transform)."""
    rand_augment: str | None = None
    """timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment magnitude 9); none by default."""
    color_jitter: float = 0.0
    """Colour jitter strength (timm training transform, ignored with rand_augment)."""
    reprob: float = 0.0
    """Random erasing probability."""
    mixup: float = 0.0
    """Mixup alpha (0: off)."""
    cutmix: float = 0.0
    """CutMix alpha (0: off)."""
    smoothing: float = 0.0
    """Label smoothing."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.99992) and evaluate it too."""

    # Optimisation
    epochs: int = 10
    """Training epochs."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs (fractions allowed), then cosine decay to min_lr."""
    batch_size: int = 64
    """Batch size per process; the global batch is batch_size x number of processes."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine decay."""
    warmup_lr: float = 1e-6
    """Learning rate at the start of the warm-up."""
    weight_decay: float = 0.05
    """AdamW weight decay; never applied to 1-D parameters (SSF scale/shift, biases, norms)."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value."""
    amp: bool | None = None
    """bfloat16 autocast; default: on for CUDA, off on CPU."""
    precision: str = "fp32"
    """The backbone's weights: fp32, or bf16 (the frozen weights held in bfloat16: half their memory)."""
    delta_dtype: str | None = None
    """dtype of the trained tensors (deltas, head): float32 or bf16; default: float32, kept apart from a bf16
    backbone and cast where used (bf16 deltas lose updates below half a bfloat16 ulp)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (timm and HF backbones)."""
    bn_stats: str = "delta"
    """BatchNorm running statistics: delta (they update in training and are saved in the delta file) or frozen (the
    backbone's, never changed)."""

    # Run
    seed: int = 0
    """Seed for initialisation, data order and augmentation."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (the process's GPU if any)."""
    threads: int | None = None
    """CPU threads for torch in each process; default: torch's."""
    output_dir: str | None = None
    """Where the delta file, checkpoint, log.jsonl and report.json go; default: a new runs/<method>-<time>. An
    existing non-empty folder is refused unless --resume or --overwrite."""
    overwrite: bool = False
    """Start afresh in a non-empty --output-dir, replacing the previous run's files there."""
    resume: bool = False
    """Continue from output_dir/checkpoint.safetensors if it exists (same result as an uninterrupted run). The file's
    digest is checked, and every option but threads, num_workers, progress, checkpoint_every, benchmark_seconds,
    download and output_dir must be the run's own (a changed one is refused, listed as old -> new)."""
    checkpoint_every: int = 1
    """Save a resumable checkpoint every N epochs (0: never)."""
    eval_every: int = 1
    """Evaluate every N epochs (0: only after the last)."""
    progress: bool = True
    """Show tqdm progress bars."""
    benchmark_seconds: float = 1.0
    """Time spent measuring inference images/s for the report (0: skip)."""
    tensorboard: bool = False
    """Log loss, lr and accuracy per step and per epoch to output_dir/tb for TensorBoard (pip install tensorboard)."""
    wandb: bool = False
    """Log the same to Weights & Biases (pip install wandb; project deltatune, run named after output_dir)."""
    fsdp: bool = False
    """Under torchrun, shard the model over the processes with FSDP2 (fully_shard: one unit per block, then the
    root) instead of replicating it with DDP: each process holds 1/N of the backbone. One phase, no EMA."""

    def __post_init__(self) -> None:
        hints = _hints()
        for f in dataclasses.fields(self):  # one place: types from the annotations, then the ranges below
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        if isinstance(self.method, str) and "," in self.method:
            self.method = [m.strip() for m in self.method.split(",") if m.strip()]
        if self.stages:
            self.stages = [m.strip() for s in self.stages for m in s.split(",") if m.strip()]
        for name in ("train_transform", "eval_transform"):
            if getattr(self, name) == "auto":  # offline tasks are made at the offline ViT's size; digits must not flip
                setattr(self, name, "resize" if self.dataset.startswith("offline:") else "timm")
            if getattr(self, name) not in TRANSFORMS:
                raise DeltaTuneError(f"{name} must be one of {', '.join(TRANSFORMS)}, got {getattr(self, name)!r}")
        for name, limits in LIMITS.items():
            check_range(name, getattr(self, name), *limits)
        check_model_kwargs(self.model_kwargs)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("bn_stats", self.bn_stats, BN_STATS)
        as_dtype(self.delta_dtype)
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise DeltaTuneError(f"mixup/cutmix pair up images: batch_size must be even, got {self.batch_size}")
        self.method_configs()  # validates method names and options now, not after the data is loaded

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Builds a config from plain values (YAML, JSON, CLI), converting strings like "1e-3" to the field types."""
        if not isinstance(data, dict):
            raise DeltaTuneError(f"a training config is a mapping of option: value, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in fields]
        if unknown:
            hints = [
                f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, fields, 1)) else k for k in unknown
            ]
            raise DeltaTuneError(f"unknown training option(s): {', '.join(hints)}; see `deltatune train --help`")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Reads a YAML recipe; ``overrides`` (e.g. command-line options) win over the file."""
        return cls.from_dict({**read_yaml(path), **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON/YAML-ready)."""
        return dataclasses.asdict(self)

    def method_configs(self) -> list[Any]:
        """The method config objects this run applies, all stages together (one per method name)."""
        return [c for stage in self.stage_configs() for c in stage]

    def stage_configs(self) -> list[list[Any]]:
        """The method configs of each sequential stage (one stage unless --stages is given)."""
        if self.stages:
            stages = [[n.strip() for n in s.split("+") if n.strip()] for s in self.stages]
        else:
            stages = [self.method if isinstance(self.method, list) else [self.method]]
        names = [n for stage in stages for n in stage]
        if not names or not all(stages):
            raise DeltaTuneError("method/stages: name at least one method per stage; see `deltatune.methods()`")
        if len(set(names)) != len(names):
            raise DeltaTuneError(f"stages: each method may appear once, got {', '.join(names)}")
        if len(names) == 1:
            options = {names[0]: self.method_options}
        else:
            stray = [k for k in self.method_options if k not in names]
            if stray:
                raise DeltaTuneError(
                    f"method_options for several methods are keyed by method name ({', '.join(names)});"
                    f" got {', '.join(stray)}"
                )
            options = self.method_options
        self._check_train_options(names)
        configs = [[make_config(n, **(options.get(n) or {})) for n in stage] for stage in stages]
        return [[self._with_train_options(c) for c in stage] for stage in configs]

    def _with_train_options(self, config: Any) -> Any:
        """``config`` with the training options that set its fields (``cli_options``) applied."""
        given = {f: getattr(self, o) for o, (cls, f) in method_options().items() if type(config) is cls}
        given = {f: v for f, v in given.items() if v is not None}
        return config.with_options(**given) if given else config

    def _check_train_options(self, names: list[str]) -> None:
        """Refuses a method's training options (--rho, ...) when the run does not train that method."""
        for cls in {cls for cls, _ in method_options().values()}:
            given = [f for o, (c, f) in method_options().items() if c is cls and getattr(self, o) is not None]
            if given and cls.name not in names:
                raise DeltaTuneError(f"{', '.join(given)}: {cls.cli_group} options go with --method {cls.name}")


# field: (lowest, highest, strict); None is unbounded, strict excludes the bounds. None values skip the check.
LIMITS: dict[str, tuple[float | None, float | None, bool]] = {
    **dict.fromkeys(("epochs", "batch_size", "max_length", "block_size", "img_size", "threads"), (1, None, False)),
    **dict.fromkeys(("max_train_samples", "max_eval_samples"), (1, None, False)),
    **dict.fromkeys(("num_workers", "checkpoint_every", "eval_every", "warmup_epochs"), (0, None, False)),
    **dict.fromkeys(("lr", "min_lr", "warmup_lr"), (0, 1e4, False)),  # larger overflows AdamW's float32 step
    **dict.fromkeys(("weight_decay", "benchmark_seconds"), (0, None, False)),
    **dict.fromkeys(("color_jitter", "mixup", "cutmix"), (0, None, False)),
    **dict.fromkeys(("hflip", "reprob", "smoothing"), (0, 1, False)),
    **dict.fromkeys(("grad_clip",), (0, None, True)),
    **dict.fromkeys(("ema_decay",), (0, 1, True)),
}
# Options --resume may change: they do not alter what is trained (num_workers: with random augmentation keep it
# too, each worker draws its own augmentations). Every other option must match the checkpoint's.
RESUME_MAY_CHANGE = (
    "resume",
    "progress",
    "num_workers",
    "threads",
    "checkpoint_every",
    "benchmark_seconds",
    "download",
    "output_dir",
    "overwrite",
    "tensorboard",
    "wandb",
)


@cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def check_range(name: str, value: Any, low: float | None, high: float | None, strict: bool) -> None:
    """Refuses ``value`` outside [low, high] ((low, high) when ``strict``), naming the option and the range."""
    if value is None:
        return
    below = low is not None and (value <= low if strict else value < low)
    above = high is not None and (value >= high if strict else value > high)
    if below or above:
        lo = "" if low is None else f"{low} {'<' if strict else '<='} "
        hi = "" if high is None else f" {'<' if strict else '<='} {high}"
        none = " (or none)" if type(None) in typing.get_args(_hints()[name]) else ""
        raise DeltaTuneError(
            f"{name}: {value!r} is out of range; set {flag(name)} to a value with {lo}{name}{hi}{none}"
            f" ({field_docs().get(name, '')})"
        )


SECTIONS: dict[str, list[str]] = {
    "backbone and method": [
        "model",
        "pretrained",
        "checkpoint",
        "model_kwargs",
        "img_size",
        "method",
        "method_options",
        "train_head",
    ],
    "phases: sequential stages": ["stages"],
    **method_sections(),
    "data": [
        "dataset",
        "data_dir",
        "download",
        "train_split",
        "eval_split",
        "max_train_samples",
        "max_eval_samples",
        "num_workers",
        "tokenizer",
        "max_length",
        "block_size",
    ],
    "augmentation and regularisation": [
        "train_transform",
        "eval_transform",
        "hflip",
        "rand_augment",
        "color_jitter",
        "reprob",
        "mixup",
        "cutmix",
        "smoothing",
        "ema_decay",
    ],
    "optimisation": [
        "epochs",
        "warmup_epochs",
        "batch_size",
        "lr",
        "min_lr",
        "warmup_lr",
        "weight_decay",
        "grad_clip",
        "amp",
        "precision",
        "delta_dtype",
        "grad_checkpointing",
        "bn_stats",
    ],
    "run": [
        "seed",
        "device",
        "threads",
        "output_dir",
        "overwrite",
        "resume",
        "checkpoint_every",
        "eval_every",
        "progress",
        "benchmark_seconds",
        "tensorboard",
        "wandb",
        "fsdp",
    ],
}


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", method_option_fields(), bases=(_TrainConfig,), namespace={"__doc__": _TrainConfig.__doc__}
)
TrainConfig.__module__ = __name__


@cache
def field_docs() -> dict[str, str]:
    """The help text of every TrainConfig field: the docstring under it, or its method config field's."""
    docs = source_docs(_TrainConfig)
    docs.update({f.name: f.metadata["doc"] for f in dataclasses.fields(TrainConfig) if "doc" in f.metadata})
    return docs
