"""``torchrun --nproc_per_node 2 ... train --fsdp`` (FSDP2, gloo, CPU): the deltas of a DDP run, resumable, and each
rank holds half the backbone."""

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
from test_ddp import _free_port
from test_resume import _cli_args
from tiny_run import tiny_config

from deltatune import DeltaTuneError, load_delta
from deltatune.backbones import create_backbone
from deltatune.train.config import TrainConfig
from deltatune.train.loop import build_model, train
from deltatune.train.state import read_info

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# LoRA, no dropout or augmentation (see test_ddp): DDP and FSDP differ only in how gradients are reduced.
RUN = {"method": "lora", "epochs": 2, "lr": 5e-3, "threads": 1, "grad_clip": 1.0, "batch_size": 8}


def _torchrun(cfg: dict, wait: bool = True) -> subprocess.Popen:
    """``deltatune train`` with ``cfg`` in two gloo processes; waits for it (and checks it succeeded) if ``wait``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "deltatune.cli", *_cli_args(cfg)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if wait:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    return proc


def _descendants(pid: int) -> list[int]:
    """The process ids of every child, grandchild, ... of ``pid`` (Linux /proc), deepest first."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            out += [*_descendants(child), child]
    return out


def _max_diff(a: Path, b: Path) -> float:
    one, two = load_file(a), load_file(b)
    assert one.keys() == two.keys() and len(one) > 10
    return max((one[k] - two[k]).abs().max().item() for k in one)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run under DDP and under FSDP."""
    tmp = tmp_path_factory.mktemp("fsdp")
    _torchrun(tiny_config(tmp / "ddp", **RUN))
    _torchrun(tiny_config(tmp / "fsdp", fsdp=True, **RUN))
    return {"ddp": tmp / "ddp", "fsdp": tmp / "fsdp"}


def test_fsdp_trains_the_deltas_of_ddp(runs: dict[str, Path]) -> None:
    ddp, fsdp = (json.loads((runs[k] / "report.json").read_text()) for k in ("ddp", "fsdp"))
    assert fsdp["world_size"] == 2 and fsdp["global_batch_size"] == 16 == ddp["global_batch_size"]
    assert _max_diff(runs["ddp"] / "delta.safetensors", runs["fsdp"] / "delta.safetensors") < 1e-5
    init = build_model(TrainConfig.from_dict(tiny_config(runs["fsdp"], **RUN)), 4).state_dict()
    trained = load_file(runs["fsdp"] / "delta.safetensors")
    assert max((trained[k] - init[k]).abs().max().item() for k in trained) > 1e-3  # training really moved them
    losses = [[h["train_loss"] for h in r["history"]] for r in (fsdp, ddp)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert fsdp["top1"] == ddp["top1"] and fsdp["trainable_params"] == ddp["trainable_params"]


def test_fsdp_delta_file_loads_onto_the_plain_backbone(runs: dict[str, Path]) -> None:
    """The file written from sharded state records the full backbone (its values are checked on load)."""
    models = []
    for run in ("fsdp", "ddp"):
        torch.manual_seed(0)  # build_model's seed: the same random backbone
        backbone = create_backbone("test_vit", 4, False, None, 32, patch_size=8)
        models.append(load_delta(backbone, runs[run] / "delta.safetensors").eval())
    x = torch.randn(2, 3, 32, 32)
    model, ddp = models
    assert torch.allclose(model(x), ddp(x), atol=1e-5)


def test_fsdp_resume_after_kill_matches_an_uninterrupted_run(runs: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "killed", fsdp=True, **RUN)
    proc = _torchrun(cfg, wait=False)
    ckpt = tmp_path / "killed" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in [*_descendants(proc.pid), proc.pid]:  # torchrun starts its workers in sessions of their own
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert ckpt.exists(), err.decode()[-2000:]
    assert read_info(ckpt)["info"]["epoch"] == 1 and not (tmp_path / "killed" / "report.json").exists()
    _torchrun({**cfg, "resume": True})
    assert _max_diff(tmp_path / "killed" / "delta.safetensors", runs["fsdp"] / "delta.safetensors") < 1e-6


def test_fsdp_halves_the_backbone_per_rank() -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "fsdp_memory.py"), "--model", "test_vit", "--json"]
    cmd += ["--model-kwargs", '{"patch_size": 8}', "--img-size", "32"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    one = sizes["1"][0]["backbone_bytes"]
    plain = sum(p.numel() * 4 for p in build_model(TrainConfig.from_dict(tiny_config("x", **RUN)), 10).parameters())
    assert one == plain - sizes["1"][0]["delta_bytes"]  # world size 1: the whole frozen backbone
    assert len(sizes["2"]) == 2 and all(r["backbone_bytes"] <= 0.55 * one for r in sizes["2"])


def test_fsdp_bf16_backbone_with_float32_deltas_trains_as_ddp(runs: dict[str, Path], tmp_path: Path) -> None:
    """``--precision bf16 --delta-dtype float32`` under FSDP: FSDP's mixed-precision all-gather casts the float32
    deltas to bf16 (the cast-at-use hooks would cast the shards and crashed); the deltas stay float32 in the file
    and equal the DDP run's to bf16 accuracy, and differ from the float32 run's (bf16 really computed)."""
    bf16 = {**RUN, "precision": "bf16", "delta_dtype": "float32"}
    _torchrun(tiny_config(tmp_path / "ddp", **bf16))
    _torchrun(tiny_config(tmp_path / "fsdp", fsdp=True, **bf16))
    ddp, fsdp = (load_file(tmp_path / k / "delta.safetensors") for k in ("ddp", "fsdp"))
    assert all(t.dtype == torch.float32 for t in fsdp.values())
    scale = max(t.abs().max().item() for t in ddp.values())
    assert _max_diff(tmp_path / "ddp" / "delta.safetensors", tmp_path / "fsdp" / "delta.safetensors") < 1e-2 * scale
    assert _max_diff(tmp_path / "fsdp" / "delta.safetensors", runs["fsdp"] / "delta.safetensors") > 1e-5
    losses = [[h["train_loss"] for h in json.loads((tmp_path / k / "report.json").read_text())["history"]]
              for k in ("ddp", "fsdp")]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)


@pytest.mark.parametrize("option", [{"ema_decay": 0.9}, {"stages": ["bitfit", "lora"]}], ids=["ema", "stages"])
def test_fsdp_refuses_what_it_does_not_shard(option: dict, tmp_path: Path) -> None:
    with pytest.raises(DeltaTuneError, match="--fsdp"):
        train(tiny_config(tmp_path, **{**RUN, "fsdp": True, **option}))
