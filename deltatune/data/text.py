"""Text datasets: bundled offline text tasks, and text classification from a folder: ``train`` and ``test``
(or ``val``) files in CSV or JSONL, tokenised up front.

Each row has a ``text`` column (and optionally ``text_pair``) and a ``label`` (integers, or names mapped to ids in
sorted order). The tokenizer comes from a local path or name (``--tokenizer``, default the model's own).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from deltatune.backbones import hf_name, missing_hint
from deltatune.data.sources import Data, Request, add_source, fixed, num_classes, register_source
from deltatune.errors import DeltaTuneError
from deltatune.offline.text_tasks import TEXT_TASKS, make_text_task


class TokenizedText(Dataset):
    """Tokenised examples: ``(dict of 1-D token tensors, int label)``."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int]) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], int]:
        return {k: torch.tensor(v[i]) for k, v in self.encodings.items()}, self.labels[i]


def _find(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for ext in (".csv", ".jsonl"):
            if (root / f"{name}{ext}").is_file():
                return root / f"{name}{ext}"
    raise DeltaTuneError(
        f"text folder {str(root)!r} has no {' or '.join(names)} file (.csv with a header, or "
        ".jsonl); each row needs 'text' and 'label' (optionally 'text_pair')"
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV (with header) or JSONL file, checked for the text and label columns."""
    try:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise DeltaTuneError(f"cannot parse {str(path)!r}: {e}") from None
    if not rows:
        raise DeltaTuneError(f"{str(path)!r} holds no examples")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise DeltaTuneError(f"{str(path)!r} row {n}: needs 'text' and 'label' fields, got {row!r:.120}")
    return rows


@register_source("text")
def _text_folder(arg: str, req: Request) -> Data:
    """A text-classification folder: ``--data-dir`` with train and test (or val) files."""
    opts = req.text_options
    return load_text(
        Path(req.data_dir), req.train_split, req.eval_split, opts.get("tokenizer"), opts.get("max_length", 128)
    )


def offline_text(task: str, req: Request) -> Data:
    """A bundled offline text task, tokenised with the run's tokenizer."""
    tok = load_tokenizer(req.text_options.get("tokenizer"))
    train, test, _ = make_text_task(task.lower(), req.seed)
    return text_data(train, test, tok, req.text_options.get("max_length", 128))


for _task in TEXT_TASKS:
    add_source(_task, fixed(offline_text, _task), shown="")


def is_text_dataset(name: str) -> bool:
    """Whether the dataset ``name`` is text (a text folder, an offline text task, lm:PATH): it needs a text model."""
    kind, _, arg = name.lower().partition(":")
    return name.lower() == "text" or kind == "lm" or (arg if kind == "offline" else kind) in TEXT_TASKS


def load_text(
    root: Path,
    train_split: str | None = None,
    eval_split: str | None = None,
    tokenizer: str | None = None,
    max_length: int = 128,
) -> Data:
    """Reads, label-maps and tokenises a text-classification folder."""
    tok = load_tokenizer(tokenizer)
    train_rows = read_rows(_find(root, (train_split,) if train_split else ("train",)))
    eval_rows = read_rows(_find(root, (eval_split,) if eval_split else ("test", "val", "validation")))
    return text_data(train_rows, eval_rows, tok, max_length)


def text_data(
    train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]], tok: Any, max_length: int = 128
) -> Data:
    """Label-maps rows of ``text`` (optionally ``text_pair``) and ``label`` and tokenises them with ``tok``."""
    from transformers import DataCollatorWithPadding  # optional dependency: the text extra

    raw = [r["label"] for r in train_rows + eval_rows]
    if all(isinstance(v, int) or str(v).lstrip("-").isdigit() for v in raw):  # negative ones are refused below
        ids = {v: int(v) for v in raw}
    else:
        ids = {v: i for i, v in enumerate(sorted({str(v) for v in raw}))}
        ids = {v: ids[str(v)] for v in raw}

    def encode(rows: list[dict[str, Any]]) -> TokenizedText:
        pair = [r["text_pair"] for r in rows] if all("text_pair" in r for r in rows) else None
        enc = tok([str(r["text"]) for r in rows], pair, truncation=True, max_length=max_length)
        return TokenizedText(dict(enc), [ids[r["label"]] for r in rows])

    collator = DataCollatorWithPadding(tok)

    def collate(batch: list[tuple[dict[str, Tensor], int]]) -> tuple[dict[str, Tensor], Tensor]:
        inputs = collator([{k: v.tolist() for k, v in x.items()} for x, _ in batch])
        return dict(inputs), torch.tensor([y for _, y in batch])

    classes = num_classes(list(ids.values()), "text labels")
    train = encode(train_rows)
    names = {i: str(v) for v, i in ids.items()}
    train.classes = [names.get(i, str(i)) for i in range(classes)]  # recorded in the delta file
    return Data(train, encode(eval_rows), classes, collate=collate, is_text=True)


def load_tokenizer(name: str | None) -> Any:
    """The transformers tokenizer at a local path or hub name, ``hf:`` optional (all-MiniLM-L6-v2: the minilm
    extra's copy)."""
    if name is None:
        raise DeltaTuneError("text data needs a tokenizer: pass --tokenizer PATH (or use an hf: model)")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise DeltaTuneError("text data needs transformers: pip install 'deltatune[text]'") from e
    path = hf_name(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DeltaTuneError(f"cannot load the tokenizer {path!r}: {str(e).rstrip('. ')}.{missing_hint(path)}") from e
