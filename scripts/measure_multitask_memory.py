"""Memory and switching cost of many SSF tasks on one ViT-B/16 (random init; sizes do not depend on the weights).

    PYTHONPATH=. python scripts/measure_multitask_memory.py --tasks 8 --out benchmarks/multitask_memory.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import timm
import torch

import deltatune
from deltatune.serve import MultiTaskModel


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/multitask_memory.json")
    ns = parser.parse_args()
    torch.manual_seed(0)
    backbone = timm.create_model(ns.model, pretrained=False, num_classes=100).eval()
    ptrs = {n: p.data_ptr() for n, p in backbone.named_parameters()}
    base_bytes = nbytes(backbone.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        trained = timm.create_model(ns.model, pretrained=False, num_classes=100)
        trained.load_state_dict(backbone.state_dict())  # the same frozen weights as the shared backbone
        deltatune.apply(trained, "ssf")
        path = Path(tmp) / "ssf.safetensors"
        file_bytes = deltatune.save_delta(trained, path)
        mt, add_ms = MultiTaskModel(backbone), []
        for i in range(ns.tasks):
            start = time.perf_counter()
            mt.add_task(f"t{i}", path)
            add_ms.append(1000 * (time.perf_counter() - start))
        total = nbytes(mt.parameters())
        start = time.perf_counter()
        for i in range(1000):
            mt.task_model(f"t{i % ns.tasks}")
        switch_ms = (time.perf_counter() - start)  # 1000 switches, in seconds -> ms per switch
        start = time.perf_counter()
        mt.remove_task("t0")
        remove_ms = 1000 * (time.perf_counter() - start)
    result = {
        "model": ns.model, "tasks": ns.tasks, "backbone_bytes": base_bytes, "delta_file_bytes": file_bytes,
        "total_bytes_with_tasks": total, "bytes_per_task": (total - base_bytes) / ns.tasks,
        "add_task_ms_median": sorted(add_ms)[len(add_ms) // 2], "switch_ms": switch_ms, "remove_task_ms": remove_ms,
        "backbone_storage_unchanged": ptrs == {n: p.data_ptr() for n, p in backbone.named_parameters()},
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
