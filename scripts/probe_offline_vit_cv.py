"""The offline ViT's digits linear probe with the L2 strength chosen by 5-fold cross-validation (the README's claim).

The shipped file records a fixed-strength probe (C=1, ``deltatune/offline/probe.py``); here each backbone (the
shipped weights and 3 random inits of the same architecture) gets the C that 5-fold cross-validation on the
training split picks, then is scored once on the test split. Writes ``<out>.json`` and ``<out>.md``:

    python scripts/probe_offline_vit_cv.py --out benchmarks/offline_vit_probe_cv
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from timm.models.vision_transformer import VisionTransformer

from deltatune.offline import create_offline_vit
from deltatune.offline.backbone import OFFLINE_VIT_ARCH
from deltatune.offline.probe import features
from deltatune.offline.tasks import make_task

CS = np.logspace(-3, 2, 6)  # L2 strengths tried: 1e-3 .. 1e2, a decade apart (larger C: slow lbfgs, no gain)


def cv_probe(model: VisionTransformer, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Test accuracy on digits of a probe whose C is picked by ``folds``-fold CV on the train split, and that C."""
    train, test, _ = make_task("digits", seed=seed, image_size=model.patch_embed.img_size[0])
    lr = LogisticRegressionCV(Cs=CS, cv=folds, max_iter=2000)
    probe = make_pipeline(StandardScaler(), lr)
    probe.fit(features(model, train.images), train.labels.numpy())
    result = {"top1": float(probe.score(features(model, test.images), test.labels.numpy())), "C": float(lr.C_[0])}
    print(result, flush=True)
    return result


def main() -> None:
    """Probes the shipped weights and random inits (seeds 0, 1, 2) and writes the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/offline_vit_probe_cv", help="output path without extension")
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn's notices of future defaults
    start = time.perf_counter()
    pretrained = cv_probe(create_offline_vit(num_classes=0), args.folds)
    random_inits = []
    for s in (0, 1, 2):
        torch.manual_seed(s)
        random_inits.append(cv_probe(VisionTransformer(**OFFLINE_VIT_ARCH, num_classes=0), args.folds))
    mean_random = float(np.mean([r["top1"] for r in random_inits]))
    folds = f" --folds {args.folds}" if args.folds != 5 else ""
    result = {
        "command": f"python scripts/probe_offline_vit_cv.py --out {args.out}{folds}",
        "folds": args.folds,
        "Cs": CS.tolist(),
        "pretrained": pretrained,
        "random_inits": random_inits,
        "random_mean_top1": mean_random,
        "wall_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [f"| shipped weights | {100 * pretrained['top1']:.1f} | {pretrained['C']:.3g} |"]
    rows += [f"| random init, seed {s} | {100 * r['top1']:.1f} | {r['C']:.3g} |" for s, r in enumerate(random_inits)]
    md = [
        f"# Offline ViT: digits linear probe, L2 strength by {args.folds}-fold cross-validation",
        "",
        f"```\n{result['command']}\n```",
        "",
        "| backbone | test top-1 % | chosen C |",
        "|---|---:|---:|",
        *rows,
        "",
        f"Random inits, mean: {100 * mean_random:.1f}%. Wall time {result['wall_s']:.0f} s.",
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
