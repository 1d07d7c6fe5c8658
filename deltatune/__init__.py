"""deltatune: parameter-efficient ("delta") tuning of pretrained vision and language transformers.

import deltatune
deltatune.apply(model, "ssf")          # freeze the backbone, add SSF, keep the head trainable
...train...
deltatune.save_delta(model, "ssf.safetensors")
deltatune.merge(model)                 # fold the deltas into the weights: zero inference cost
"""

__version__ = "0.1.0"

from deltatune import methods as _methods  # noqa: F401  (registers every method)
from deltatune.checkpoint import load_delta, read_metadata, save_delta
from deltatune.core import apply, delta_state_dict, merge, summary, trainable_parameters
from deltatune.errors import DeltaTuneError
from deltatune.methods.adapter import AdapterConfig
from deltatune.methods.lora import LoRAConfig
from deltatune.methods.mimi import MiMiConfig
from deltatune.methods.selection import BitFitConfig, FullConfig, LinearConfig
from deltatune.methods.ssf import SSFConfig
from deltatune.pruning import prune_adapters
from deltatune.registry import methods

__all__ = [
    "AdapterConfig",
    "BitFitConfig",
    "DeltaTuneError",
    "FullConfig",
    "LinearConfig",
    "LoRAConfig",
    "MiMiConfig",
    "SSFConfig",
    "apply",
    "delta_state_dict",
    "load_delta",
    "merge",
    "methods",
    "prune_adapters",
    "read_metadata",
    "save_delta",
    "summary",
    "trainable_parameters",
]
