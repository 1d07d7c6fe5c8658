"""A tiny, fast training config shared by the training tests: random-init timm ``test_vit`` on generated images."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_config(out: str | Path, **overrides: Any) -> dict[str, Any]:
    """TrainConfig fields for a run of about a second: 256 32x32 images, 4 classes, 17 tokens, no augmentation."""
    cfg: dict[str, Any] = {
        "model": "test_vit",
        "pretrained": False,
        "model_kwargs": {"patch_size": 8},
        "img_size": 32,
        "dataset": "synthetic",
        "method": "ssf",
        "epochs": 2,
        "batch_size": 32,
        "lr": 1e-2,
        "warmup_epochs": 0.5,
        "num_workers": 0,
        "train_transform": "none",
        "eval_transform": "none",
        "benchmark_seconds": 0.0,
        "progress": False,
        "output_dir": str(out),
    }
    cfg.update(overrides)
    return cfg


def tiny_bert_config(vocab_size: int, num_labels: int, max_positions: int = 64) -> Any:
    """The tests' tiny BERT: 2 layers, width 32, 2 heads, MLP 37 (odd on purpose: no width is a multiple of another)."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=num_labels,
        max_position_embeddings=max_positions,
    )


def save_word_bert(model_dir: Path, words: list[str], num_labels: int, max_positions: int = 64) -> Any:
    """Saves a word-level tokenizer over ``words`` and a seeded random tiny BERT to ``model_dir``; returns the model."""
    import torch
    from transformers import BertForSequenceClassification, BertTokenizerFast

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(str(model_dir / "vocab.txt")).save_pretrained(model_dir)  # positional: v4 and v5 name it apart
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(len(words) + 5, num_labels, max_positions))
    model.save_pretrained(model_dir)
    return model


def train_until_first_checkpoint(cfg: dict[str, Any]) -> None:
    """Runs ``cfg`` until its first checkpoint is written, then stops it as a kill would (for resume tests)."""
    import pytest

    from deltatune.train import epochs
    from deltatune.train.loop import train

    real = epochs.checkpoint

    def stop(*args: object) -> None:
        real(*args)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(epochs, "checkpoint", stop)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
