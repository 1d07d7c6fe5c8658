"""What keeping BatchNorm statistics frozen costs: SSF and BitFit on a BatchNorm CNN, bn_stats="delta" vs "frozen".

    PYTHONPATH=$PWD python scripts/bn_stats_choice.py --epochs 5 --out benchmarks/bn_stats_choice.json

The backbone is timm's ``test_resnet`` pretrained for a few epochs on the offline ``digits-shift`` task (no weights
are downloaded), then tuned on ``digits``; the eval accuracy and whether save -> load reproduces the logits are
reported for each choice.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

import deltatune
from deltatune.offline import make_task


def fit(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    """AdamW on the trainable parameters, in train mode (BatchNorm layers see batches)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, torch.Tensor]:
    """Top-1 accuracy (%) and the logits of the whole split."""
    model.eval()
    logits = torch.cat([model(x) for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    return 100.0 * (logits.argmax(1) == labels).float().mean().item(), logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    pre_train, _, pre_classes = make_task("digits-shift", seed=1, image_size=32)
    backbone = timm.create_model("test_resnet", num_classes=pre_classes)
    fit(backbone, DataLoader(pre_train, batch_size=64, shuffle=True), args.pretrain_epochs, 3e-3)
    train, test, classes = make_task("digits", seed=0, image_size=32)
    backbone.reset_classifier(classes)
    results = []
    for method in ("ssf", "bitfit"):
        for bn_stats in ("delta", "frozen"):
            torch.manual_seed(0)
            model = deltatune.apply(copy.deepcopy(backbone), method, bn_stats=bn_stats)
            fit(model, DataLoader(train, batch_size=64, shuffle=True), args.epochs, 1e-2)
            acc, logits = evaluate(model, DataLoader(test, batch_size=256))
            with tempfile.TemporaryDirectory() as tmp:
                size = deltatune.save_delta(model, Path(tmp) / "d.safetensors")
                fresh = deltatune.load_delta(copy.deepcopy(backbone), Path(tmp) / "d.safetensors")
            _, reloaded = evaluate(fresh, DataLoader(test, batch_size=256))
            row = {"method": method, "bn_stats": bn_stats, "top1": round(acc, 2), "delta_bytes": size,
                   "reload_exact": torch.equal(reloaded, logits)}  # fmt: skip
            print(row, flush=True)
            results.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
