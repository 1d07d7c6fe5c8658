"""A bfloat16 backbone with float32 deltas against float32 weights and against bf16 deltas, on the offline digits
task (the demo's SSF and LoRA recipes, same seed); also the saved-activation bytes of one training step with and
without gradient checkpointing.

    python scripts/precision_compare.py --out benchmarks/precision_bf16.json    # about 10 CPU-minutes, 1 thread

Each run reports top-1, eval loss, process CPU seconds (``--threads 1``: the run's own work, not the machine's
load) and the bytes of the frozen backbone weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from deltatune.bench.measure import SavedBytes
from deltatune.train.config import TrainConfig
from deltatune.train.loop import train
from deltatune.train.memory import enable_grad_checkpointing
from deltatune.train.setup import build_model

SETTINGS = {
    "fp32 weights, fp32 deltas": {"precision": "fp32"},
    "bf16 weights, fp32 deltas": {"precision": "bf16"},
    "bf16 weights, bf16 deltas": {"precision": "bf16", "delta_dtype": "bf16"},
}


def run(recipe: str, setting: dict[str, Any], out: Path) -> dict[str, Any]:
    """One training run of ``recipe`` with ``setting``; its accuracy, loss, CPU time and weight bytes."""
    cfg = TrainConfig.from_yaml(recipe, {**setting, "threads": 1, "progress": False, "benchmark_seconds": 0.0,
                                         "output_dir": str(out), "overwrite": True})  # fmt: skip
    start = time.process_time()
    report = train(cfg)
    model = build_model(cfg, 10)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"top1": report["top1"], "eval_loss": round(report["eval_loss"], 4),
            "cpu_s": round(time.process_time() - start, 1), "frozen_weight_bytes": frozen}  # fmt: skip


def saved_bytes(method: str = "lora", batch: int = 32) -> dict[str, int]:
    """Activation bytes one training forward of the offline ViT keeps for backward, without and with checkpointing."""
    cfg = TrainConfig.from_dict({"method": method, "progress": False})
    model = build_model(cfg, 10).train()
    x = torch.randn(batch, 3, *model.default_cfg["input_size"][1:])  # (B, 3, H, W)
    out = {}
    for name, m in (("without", model), ("with", enable_grad_checkpointing(copy.deepcopy(model)))):
        with SavedBytes([*m.parameters(), *m.buffers()]) as counter:
            m(x).sum().backward()
        out[f"{method}_batch{batch}_{name}_checkpointing"] = counter.bytes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/precision_bf16.json")
    parser.add_argument("--methods", default="ssf,lora")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"saved_activation_bytes": saved_bytes()}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            recipe = f"recipes/offline_digits_{method}.yaml"
            for i, (label, setting) in enumerate(SETTINGS.items()):
                results[f"{method}: {label}"] = run(recipe, setting, Path(tmp) / f"{method}{i}")
                print(method, label, results[f"{method}: {label}"], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
