"""Kill a run after its first checkpoint, resume it, and get exactly the tensors of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import tiny_config

from deltatune.train_state import read_info
from deltatune.training import train

# Every source of randomness: drop path (torch), RandAugment and random erasing (Python's random), mixup (numpy).
RANDOM = {
    "epochs": 4,
    "max_train_samples": 128,
    "model_kwargs": {"patch_size": 8, "drop_path_rate": 0.1},
    "train_transform": "timm",
    "rand_augment": "rand-m9-mstd0.5-inc1",
    "reprob": 0.25,
    "hflip": 0.5,
    "mixup": 0.8,
    "cutmix": 1.0,
    "smoothing": 0.1,
    "ema_decay": 0.9,
    "grad_clip": 1.0,
    "threads": 1,
}


def _cli_args(cfg: dict) -> list[str]:
    args = ["train"]
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return args


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    cfg = tiny_config(killed_dir, **RANDOM)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltatune.cli", *_cli_args(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ckpt = killed_dir / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert ckpt.exists(), err.decode()[-2000:]
    stopped_after = read_info(ckpt)["info"]["epoch"]
    assert 1 <= stopped_after < cfg["epochs"] and not (killed_dir / "report.json").exists()

    resumed = train({**cfg, "resume": True})
    straight = train(tiny_config(straight_dir, **RANDOM))
    for name in ("delta.safetensors", "delta_ema.safetensors"):
        a, b = load_file(killed_dir / name), load_file(straight_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key, (a[key] - b[key]).abs().max())
    assert resumed["top1"] == straight["top1"] and resumed["ema_top1"] == straight["ema_top1"]
    losses = [[h["train_loss"] for h in r["history"]] for r in (resumed, straight)]
    assert losses[0] == losses[1] and len(losses[0]) == cfg["epochs"]
    log = [json.loads(line)["epoch"] for line in (killed_dir / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    train(tiny_config(tmp_path, method="ssf", epochs=1, threads=1))
    from deltatune import DeltaTuneError

    with pytest.raises(DeltaTuneError, match="epochs: 1 -> 2; method: 'ssf' -> 'lora'"):
        train(tiny_config(tmp_path, method="lora", epochs=2, threads=1, resume=True))
