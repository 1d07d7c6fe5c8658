"""Every shipped recipe runs (on offline data and a tiny model, its own augmentation and method kept), and its
RandAugment never fails on an image."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import save_word_bert, tiny_config

from deltatune.data import make_transform, posterize
from deltatune.train.config import read_yaml
from deltatune.train.loop import train

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
# What a recipe may not keep on this machine: its backbone, dataset, size and length. Everything else is its own.
TINY = {"epochs": 1, "batch_size": 16, "max_train_samples": 32, "max_eval_samples": 16, "num_workers": 0}
TEXT_WORDS = ["good", "bad", "movie", "plot", "actor", "scene"]


def _text_task(root: Path) -> dict:
    """A tiny word-level BERT saved to ``root`` and a two-label text folder, as a recipe override."""
    save_word_bert(root / "bert", TEXT_WORDS, num_labels=2, max_positions=32)
    rng = random.Random(0)
    for split in ("train", "test"):
        rows = [{"text": " ".join(rng.choices(TEXT_WORDS, k=5)), "label": ["neg", "pos"][i % 2]} for i in range(32)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": f"hf:{root / 'bert'}", "dataset": "text", "data_dir": str(root), "max_length": 16}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_runs_a_few_steps_offline(recipe: Path, tmp_path: Path) -> None:
    own = read_yaml(recipe)
    if own["model"].startswith("hf:"):
        small = {**tiny_config(tmp_path / "out"), **_text_task(tmp_path), "img_size": None, "model_kwargs": {}}
        small["pretrained"] = True
    else:  # keep the recipe's transforms and augmentation (RandAugment, erasing, mixup): only the data is tiny
        small = tiny_config(tmp_path / "out", dataset="offline:digits")
        for key in ("train_transform", "eval_transform"):
            small.pop(key)
    cfg = {**own, **{k: v for k, v in small.items() if k != "method"}, **TINY, "threads": 1}
    report = train(cfg)
    assert report["method"] == own["method"]
    assert len(report["history"]) == report["epochs"] >= 1
    assert all(np.isfinite(h["train_loss"]) for h in report["history"])


def test_randaugment_of_the_cifar_recipe_never_raises() -> None:
    """rand-m9-mstd0.5-inc1 reaches PosterizeIncreasing with 0 bits about once in 700 images (Pillow 13 raises)."""
    policy = read_yaml(RECIPES[[r.name for r in RECIPES].index("ssf_cifar100.yaml")])["rand_augment"]
    cfg = {"input_size": (3, 16, 16), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    tf = make_transform("timm", True, cfg, auto_augment=policy)
    random.seed(0)
    torch.manual_seed(0)
    gen = np.random.default_rng(0)
    for _ in range(3000):
        image = Image.fromarray(gen.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        assert tf(image).shape == (3, 16, 16)


@pytest.mark.parametrize("bits", range(9))
def test_posterize_matches_the_masking_formula(bits: int) -> None:
    """Keeping ``bits`` high bits of each channel: x & ~(2^(8 - bits) - 1), 0 bits giving black (Pillow < 13)."""
    pixels = np.random.default_rng(bits).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    expected = pixels & np.uint8(~(2 ** (8 - bits) - 1) & 0xFF)
    assert np.array_equal(np.asarray(posterize(Image.fromarray(pixels), bits)), expected)
