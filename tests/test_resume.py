"""Kill a run after its first checkpoint, resume it, and get exactly the tensors of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_run import tiny_config

from deltatune.train.config import TrainConfig
from deltatune.train.loop import train
from deltatune.train.state import digest, read_info

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


def _tiny(out: Path, **extra: object) -> dict:
    return tiny_config(out, epochs=2, max_train_samples=64, max_eval_samples=32, threads=1, **extra)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after epoch 1 of 2 (its checkpoint written by a 1-epoch run of the same options)."""
    out = tmp_path_factory.mktemp("one_epoch")
    with pytest.MonkeyPatch.context() as m:
        from deltatune.train import epochs as training

        real = training.checkpoint

        def checkpoint(*args: object) -> None:
            real(*args)
            raise KeyboardInterrupt

        m.setattr(training, "checkpoint", checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train(_tiny(out, ema_decay=0.9))
    return out


CHANGES = {
    "lr": 5e-3,
    "seed": 1,
    "epochs": 3,
    "batch_size": 16,
    "method_options": {"init_std": 0.1},
    "ema_decay": 0.5,
    "warmup_epochs": 0.0,
    "max_train_samples": 32,
    "model_kwargs": {"patch_size": 8, "drop_path_rate": 0.1},
}


@pytest.mark.parametrize(("option", "value"), CHANGES.items(), ids=list(CHANGES))
def test_resume_refuses_changed_options(option: str, value: object, one_epoch: Path, tmp_path: Path) -> None:
    from deltatune import DeltaTuneError

    copy = tmp_path / "run"
    shutil.copytree(one_epoch, copy)
    old = _tiny(copy, ema_decay=0.9).get(option, TrainConfig().to_dict()[option])
    with pytest.raises(DeltaTuneError, match=re.escape(f"{option}: {old!r} -> {value!r}")):
        train({**_tiny(copy, ema_decay=0.9), option: value, "resume": True})
    assert yaml.safe_load((copy / "config.yaml").read_text())[option] == old  # config.yaml keeps the run's own


def test_resume_allows_the_options_that_change_nothing_trained(one_epoch: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(one_epoch, copy)
    report = train(
        {
            **_tiny(copy, ema_decay=0.9),
            "progress": True,
            "checkpoint_every": 2,
            "benchmark_seconds": 0.01,
            "resume": True,
        }
    )
    assert [h["epoch"] for h in report["history"]] == [1, 2]


def _rewrite(path: Path, edit_meta: Any = None, edit_tensors: Any = None, redigest: bool = True) -> None:
    """Edits a checkpoint's metadata and tensors; ``redigest``: as a careful editor would, with a fresh digest."""
    with safe_open(str(path), framework="pt") as f:
        raw, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw["deltatune"])
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    text = json.dumps(meta)
    save_file(
        tensors, path, metadata={"deltatune": text, "digest": digest(text, tensors) if redigest else raw["digest"]}
    )


def _drop_optimizer_state(t: dict) -> None:
    for k in [k for k in t if k.startswith("optim/0/")]:
        del t[k]


def _first_param(t: dict) -> str:
    return next(k for k in t if k.startswith("model/param/"))


EDITS = {
    "flipped-bit": (
        {"edit_tensors": lambda t: t[_first_param(t)].view(-1)[:1].add_(1e-3), "redigest": False},
        "digest",
    ),
    "edited-lr": ({"edit_meta": lambda m: m["optimizer_groups"][0].update(lr=1.0), "redigest": False}, "digest"),
    "missing-key": ({"edit_tensors": lambda t: t.pop(_first_param(t))}, "does not fit this model"),
    "epoch-out-of-range": ({"edit_meta": lambda m: m["info"].update(epoch=7)}, "records epoch 7"),
    "epoch-not-a-number": ({"edit_meta": lambda m: m["info"].update(epoch="1")}, "no valid epoch"),
    "no-optimizer-state": ({"edit_tensors": _drop_optimizer_state}, "lacks part of the optimizer state"),
    "no-scheduler": ({"edit_meta": lambda m: m.pop("scheduler")}, "cannot be restored"),
    "nan-value": ({"edit_tensors": lambda t: t[_first_param(t)].view(-1)[:1].fill_(float("nan"))}, "NaN/inf"),
}


@pytest.mark.parametrize(("edit", "message"), EDITS.values(), ids=list(EDITS))
def test_edited_checkpoint_is_refused(edit: dict, message: str, one_epoch: Path, tmp_path: Path) -> None:
    from deltatune import DeltaTuneError

    copy = tmp_path / "run"
    shutil.copytree(one_epoch, copy)
    _rewrite(copy / "checkpoint.safetensors", **edit)
    with pytest.raises(DeltaTuneError, match=message):
        train({**_tiny(copy, ema_decay=0.9), "resume": True})


def test_non_finite_weights_are_never_saved_and_the_command_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's one step leaves an inf in the weights (its loss and gradient were finite): nothing is saved."""
    from deltatune.cli import main
    from deltatune.train import setup as training

    real = training.make_optimizer

    def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        opt = real(model, lr, weight_decay)
        step = opt.step

        def overflowing_step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            result = step(*args, **kwargs)
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
            return result

        opt.step = types.MethodType(overflowing_step, opt)  # type: ignore[method-assign]
        return opt

    monkeypatch.setattr(training, "make_optimizer", make_optimizer)
    cfg = tiny_config(tmp_path, epochs=1, max_train_samples=32, threads=1)
    assert main(_cli_args(cfg)) == 2
    assert not (tmp_path / "checkpoint.safetensors").exists() and not (tmp_path / "delta.safetensors").exists()


def test_leftovers_cleaned_permissions_follow_the_umask_and_symlinks_are_replaced(tmp_path: Path) -> None:
    out, outside = tmp_path / "run", tmp_path / "outside.yaml"
    out.mkdir()
    leftover = out / ".checkpoint.safetensors.x1y2.tmp"
    leftover.write_bytes(b"half a checkpoint")
    outside.write_text("keep me\n")
    (out / "config.yaml").symlink_to(outside)
    old = os.umask(0o027)
    try:
        train(tiny_config(out, epochs=1, max_train_samples=32, threads=1, resume=True))  # a used folder: resume
    finally:
        os.umask(old)
    assert not leftover.exists() and outside.read_text() == "keep me\n"
    assert not (out / "config.yaml").is_symlink()
    for name in ("checkpoint.safetensors", "config.yaml", "report.json"):  # delta files: checkpoint.py's
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
