"""deltatune: parameter-efficient ("delta") tuning of pretrained vision and language transformers.

import deltatune
deltatune.apply(model, "ssf")          # freeze the backbone, add SSF, keep the head trainable
...train...
deltatune.save_delta(model, "ssf.safetensors")
deltatune.merge(model)                 # fold the deltas into the weights: zero inference cost
deltatune.predict("runs/ssf-...", "photos/", top_k=5)   # a run folder (or backbone + delta file) on images
backbone = deltatune.create_backbone("deltatune_offline_vit", num_classes=10)   # bundled ViT, no download
"""

import os

# Spinning OpenMP threads starve each other on small shared CPUs (5 vs 26 img/s measured on 2 cores); a user's
# own setting wins. Must run before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from deltatune import methods as _methods  # noqa: F401  (registers every method)
from deltatune.backbones import create_backbone
from deltatune.checkpoint import load_delta, read_metadata, save_delta
from deltatune.core import apply, delta_state_dict, merge, summary, trainable_parameters
from deltatune.errors import DeltaTuneError
from deltatune.interop.official import load_official
from deltatune.interop.peft import load_peft, save_peft
from deltatune.kernels.compile import compile  # torch.compile with the lean partitioner
from deltatune.methods.pruning import prune_adapters
from deltatune.offline import backbone as _offline_backbone  # noqa: F401  (timm.create_model("deltatune_offline_vit"))
from deltatune.predict import Prediction, predict
from deltatune.registry import config_classes, methods

# Every registered method's config class (``deltatune.LoRAConfig``, ...): a new method needs no line here.
globals().update({cls.__name__: cls for cls in config_classes()})

__all__ = [
    "DeltaTuneError",
    "compile",
    "Prediction",
    "apply",
    "create_backbone",
    "delta_state_dict",
    "load_delta",
    "load_official",
    "load_peft",
    "merge",
    "methods",
    "predict",
    "prune_adapters",
    "read_metadata",
    "save_delta",
    "save_peft",
    "summary",
    "trainable_parameters",
    *(cls.__name__ for cls in config_classes()),
]
