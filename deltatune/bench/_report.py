"""What every bench report records about its run, and its Markdown page: the command first, then the setting."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import time
from typing import Any

import timm
import torch


def meta(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The command, model, machine, settings and library versions of a bench run."""
    cuda = device.type == "cuda"
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "command": "deltatune bench " + shlex.join(args.argv),
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "img_size": args.img_size,
        "dtype": args.dtype,
        "compile": args.compile,
        "clock": args.clock,
        "steps": args.steps,
        "warmup": args.warmup,
        "infer_batch": args.infer_batch,
        "multitask": getattr(args, "multitask", None),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft_version,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def setting(m: dict[str, Any]) -> str:
    """The main bench's setting line."""
    memory = "CUDA peak" if m["device"].startswith("cuda") else "activations saved for backward (weights left out)"
    return (
        f"{m['model']}, {m['img_size']} px, batch {m['batch']}, {m['dtype']}, {m['device']} ({m['device_name']}, "
        f"{m['threads']} threads), {'torch.compile' if m['compile'] else 'eager'}; median of {m['steps']} steps "
        f"after {m['warmup']} warm-up rounds, stepped round-robin, {m['clock']} clock; MiB: {memory}; "
        "'paired' and 'merged x plain': medians of same-round ratios; 'best': fastest over fastest, as noise "
        "on a shared machine only ever adds time. "
        f"torch {m['torch']}, timm {m['timm']}, peft {m['peft']}, {m['date']}."
    )


def markdown(report: dict[str, Any], line: str, text: str) -> str:
    """The report as a Markdown page: the command in a code block, the setting line, the table."""
    return f"```\n{report['meta']['command']}\n```\n\n{line}\n\n{text}\n"
