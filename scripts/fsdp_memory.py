"""Per-rank resident bytes of the backbone's parameters under FSDP2 (``deltatune train --fsdp``) at world size 1 and 2.

    python scripts/fsdp_memory.py --model vit_small_patch16_224 --method lora --img-size 112

Each world size runs as that many gloo processes on the CPU; every rank builds the tuned model, shards it exactly as
training does (``deltatune.train.fsdp.shard``) and counts the bytes of its local shards of the frozen parameters.
Expected: each rank at world size 2 holds about half of what the single rank holds at world size 1.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deltatune.backbones import create_backbone
from deltatune.core import apply
from deltatune.registry import make_config
from deltatune.train.distributed import Runtime
from deltatune.train.fsdp import local_bytes, shard


def _rank(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    """One process: join the group, build and shard the tuned model, write its local bytes."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        kwargs = json.loads(args.model_kwargs)
        model = apply(create_backbone(args.model, 10, False, None, args.img_size, **kwargs), [make_config(args.method)])
        shard(model, Runtime(torch.device("cpu"), rank, world))
        result = {"backbone_bytes": local_bytes(model), "delta_bytes": local_bytes(model, trainable=True)}
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> list[dict[str, int]]:
    """Each rank's local parameter bytes (backbone, deltas) with the model sharded over ``world`` processes."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), args, tmp), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, int]]]:
    """Measures world sizes 1 and 2, prints a table (or JSON) and returns the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="backbone (random init, nothing downloaded)")
    parser.add_argument("--model-kwargs", default="{}", help='timm.create_model arguments as JSON, e.g. {"depth": 2}')
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    results = {str(w): measure(w, args) for w in (1, 2)}
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{args.model} + {args.method}: backbone parameter bytes held per rank under FSDP2")
        for world, ranks in results.items():
            cells = ", ".join(f"rank {r}: {x['backbone_bytes'] / 2**20:.2f} MiB" for r, x in enumerate(ranks))
            print(f"  world size {world}: {cells}")
        ratio = max(x["backbone_bytes"] for x in results["2"]) / results["1"][0]["backbone_bytes"]
        print(f"  largest rank at world size 2 / world size 1: {ratio:.3f}")
    return results


if __name__ == "__main__":
    main()
