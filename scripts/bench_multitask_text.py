"""Mixed-task text batches with prompts and prefixes: one mixed backbone pass against the grouped fallback.

    PYTHONPATH=. python scripts/bench_multitask_text.py --threads 1 --clock cpu --md benchmarks/multitask_text.md

Random-weight BERT / GPT-2 / Llama sequence classifiers (width 256, 4 layers, 4 heads), a batch of 16 texts of 64
tokens (padded rows included), rows taking the N tasks round-robin. Variants, timed round-robin (``bench.measure``):

- ``single``: task t0's own model on the whole batch (the reference every ratio divides by);
- ``mixed``: ``MultiTaskModel`` mixing the N tasks per row in one backbone pass (``serve/mixed_text.py``);
- ``grouped``: each task's rows through its own model (the fallback before mixed_text: N backbone passes).

Settings: ``same-p`` (every task the same method, 10 tokens: no padding), ``mixed-p`` (lengths from 20 (t0, the
reference) down to 4 spread over the tasks, and a LoRA task: rows padded to the longest, t0's). ``max_err``
compares the mixed rows with each task's file loaded into a fresh backbone (``load_delta``), run row by row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune
from deltatune.bench.measure import paired_ratio, round_robin
from deltatune.serve import MultiTaskModel

KINDS = {"bert": ("prompt", {"insert": "input"}), "bert-prefix": ("prefix", {"reparameterize": False}),
         "gpt2": ("prompt", {"insert": "input"}), "llama-prefix": ("prefix", {"reparameterize": False})}  # fmt: skip


def build(kind: str, seed: int = 0) -> nn.Module:
    """A random-weight sequence classifier (10 classes, pad token 0), the same weights for every seed of the head."""
    from transformers import AutoModelForSequenceClassification, BertConfig, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    arch = kind.split("-")[0]
    if arch == "bert":
        cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, max_position_embeddings=256)  # fmt: skip
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4, n_positions=256, bos_token_id=1,
                         eos_token_id=1)  # fmt: skip
    else:
        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=688, max_position_embeddings=256)  # fmt: skip
    cfg.num_labels, cfg.pad_token_id = 10, 0
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def task_files(kind: str, lengths: list[int], folder: Path, lora: bool) -> list[Path]:
    """One delta file per task (its prompt/prefix length from ``lengths``); with ``lora`` the last is a LoRA task."""
    method, options = KINDS[kind]
    paths = []
    for i, p in enumerate(lengths):
        model = build(kind)
        if lora and i == len(lengths) - 1:
            deltatune.apply(model, "lora")
        else:
            deltatune.apply(model, method, num_tokens=p, **options)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
        paths.append(folder / f"{kind}-{i}.safetensors")
        deltatune.save_delta(model, paths[-1])
    return paths


def texts(rows: int, length: int) -> dict[str, torch.Tensor]:
    """Token ids with right padding of different lengths per row."""
    g = torch.Generator().manual_seed(0)
    keep = torch.randint(length // 2, length + 1, (rows,), generator=g)
    mask = (torch.arange(length) < keep[:, None]).long()
    return {"input_ids": torch.randint(1, 1000, (rows, length), generator=g) * mask, "attention_mask": mask}


def measure(kind: str, tasks: int, setting: str, ns: argparse.Namespace) -> dict[str, Any]:
    spread = [4 + (16 * i) // max(tasks - 1, 1) for i in range(tasks)][::-1]  # 20 (t0) down to 4
    lengths = [10] * tasks if setting == "same-p" else spread
    with tempfile.TemporaryDirectory() as folder:
        paths = task_files(kind, lengths, Path(folder), lora=setting == "mixed-p" and tasks > 1)
        mt = MultiTaskModel(build(kind))
        for i, path in enumerate(paths):
            mt.add_task(f"t{i}", path)
        refs = [deltatune.load_delta(build(kind), path).eval() for path in paths]
    names = [f"t{i % tasks}" for i in range(ns.batch)]
    x = texts(ns.batch, ns.length)
    with torch.no_grad():
        out = mt(x, names, strict=True)
        err = max((out[i, :10] - refs[int(n[1:])](**{k: v[i : i + 1] for k, v in x.items()}).logits[0]).abs().max()
                  for i, n in enumerate(names)).item()  # fmt: skip
        fns = {"single": lambda: mt.task_model("t0")(**x), "mixed": lambda: mt(x, names),
               "grouped": lambda: mt(x, names, grouped=True)}  # fmt: skip
        times = round_robin(fns, ns.warmup, ns.steps, torch.device("cpu"), ns.clock)
    ms = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: paired_ratio(times[k], times["single"]) for k in ("mixed", "grouped")}
    return {"kind": kind, "tasks": tasks, "setting": setting, **ms, **{f"{k}/single": r for k, r in ratios.items()},
            "max_err": err}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--tasks", default="4,16", help="task counts N")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--md", help="also write the table to this file")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    head = "| model | method | N | setting "
    head += "| single ms | mixed ms | grouped ms | mixed/single | grouped/single | max err |"
    lines = [head, "|" + "---|" * 10]
    print("\n".join(lines), flush=True)
    for kind in ns.kinds:
        for tasks in (int(t) for t in ns.tasks.split(",")):
            for setting in ("same-p", "mixed-p"):
                r = measure(kind, tasks, setting, ns)
                lines.append(f"| {kind.split('-')[0]} | {KINDS[kind][0]} | {tasks} | {setting} | {r['single']:.1f} | "
                             f"{r['mixed']:.1f} | {r['grouped']:.1f} | {r['mixed/single']:.2f} | "
                             f"{r['grouped/single']:.2f} | {r['max_err']:.1e} |")  # fmt: skip
                print(lines[-1], flush=True)
    if ns.md:
        command = " ".join(["PYTHONPATH=. python scripts/bench_multitask_text.py", *sys.argv[1:]])
        Path(ns.md).write_text(f"`{command}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
