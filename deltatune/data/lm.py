"""Causal-LM data: ``--dataset lm:PATH``, a .txt file or a folder of them, tokenised and cut into fixed-length blocks.

The files (a folder's ``*.txt``, sorted by name, searched recursively) are tokenised with the model's tokenizer,
joined with its end-of-text token when it has one, and cut into ``--block-size`` token blocks (the remainder is
dropped, as in transformers' ``run_clm``). The held-out split is the last 10% of the blocks (at least one), a
contiguous stretch that no training block overlaps; ``--eval-split PATH`` evaluates on another file or folder
instead, and all of PATH trains. An item is ``({"input_ids": block}, block)``: the target of token t is token t+1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from deltatune.data.sources import Data, Request, register_source
from deltatune.data.text import load_tokenizer
from deltatune.errors import DeltaTuneError

CAUSAL_LM = "causal-lm"
EVAL_FRACTION = 0.1


class Blocks(Dataset):
    """Fixed-length token blocks: ``({"input_ids": (T,)}, (T,))``, the inputs are their own next-token targets."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks  # (N, T) int64

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor]:
        return {"input_ids": self.blocks[i]}, self.blocks[i]


def text_files(path: Path) -> list[Path]:
    """``path`` itself, or the ``.txt`` files under the folder ``path`` sorted by name; refuses anything else."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DeltaTuneError(f"lm:{path}: no such file or folder; give a .txt file or a folder of .txt files")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DeltaTuneError(f"lm:{path}: the folder holds no .txt files; put the training text in *.txt files")
    return files


def tokenize(files: list[Path], tok: Any) -> Tensor:
    """The token ids of ``files`` one after the other, each followed by the tokenizer's end-of-text token if any."""
    tok.model_max_length = 1 << 62  # a whole file is one sequence here: no truncation, no length warning
    ids: list[int] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DeltaTuneError(f"{str(path)!r} is not UTF-8 text ({e}); convert it or leave it out") from None
        ids += tok(text, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def to_blocks(ids: Tensor, block_size: int, where: str, least: int = 1) -> Tensor:
    """``ids`` cut into rows of ``block_size`` tokens (remainder dropped); at least ``least`` rows."""
    if block_size < 2:
        raise DeltaTuneError(f"{where}: block_size {block_size} leaves no next token to predict; use 2 or more")
    n = len(ids) // block_size
    if n < least:
        raise DeltaTuneError(
            f"{where}: {len(ids)} tokens make {n} block(s) of {block_size}, fewer than the {least} needed; "
            "lower --block-size or add text"
        )
    return ids[: n * block_size].view(n, block_size)  # (N, T)


@register_source("lm", shown="lm:PATH")
def _lm(arg: str, req: Request) -> Data:
    """A causal-LM text file or folder (``lm:PATH``); ``--eval-split PATH`` holds out another one."""
    if not arg:
        raise DeltaTuneError("dataset lm needs a path: --dataset lm:PATH (a .txt file or a folder of .txt files)")
    if req.train_split:
        raise DeltaTuneError(f"lm:{arg}: --train-split does not apply (PATH is the training text); drop it")
    opts = req.text_options
    return load_lm(Path(arg), opts.get("tokenizer"), opts.get("block_size", 128), req.eval_split)


def load_lm(path: Path, tokenizer: str | None, block_size: int, eval_path: str | None = None) -> Data:
    """Tokenised, blocked causal-LM train and eval sets of ``path`` (eval: ``eval_path``, else the last 10%)."""
    tok = load_tokenizer(tokenizer)
    where = f"lm:{path}"
    if eval_path:
        train = to_blocks(tokenize(text_files(path), tok), block_size, where)
        held = to_blocks(tokenize(text_files(Path(eval_path)), tok), block_size, f"eval split {eval_path}")
    else:
        blocks = to_blocks(tokenize(text_files(path), tok), block_size, where, least=2)
        cut = len(blocks) - max(1, round(EVAL_FRACTION * len(blocks)))
        train, held = blocks[:cut], blocks[cut:]
    return Data(Blocks(train), Blocks(held), len(tok), is_text=True, task=CAUSAL_LM)
