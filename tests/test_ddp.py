"""``torchrun --nproc_per_node 2`` (gloo, CPU) trains to the same deltas as one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_resume import _cli_args
from tiny_run import tiny_config

from deltatune import delta_state_dict
from deltatune.train.config import TrainConfig
from deltatune.train.loop import build_model, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# No dropout or augmentation: the only difference is who computes which half of each batch. LoRA, not SSF: the
# key part of SSF's qkv shift has an exactly-zero gradient (softmax ignores a shift shared by all keys), and
# Adam turns the float noise of that zero into steps of size lr, so those entries differ by run, not by bug.
# MiMi with the activation score: every process must rank the neurons on the activations of all processes.
RUNS = {
    "lora": {"method": "lora", "epochs": 2},
    "mimi-activation": {"method": "mimi", "epochs": 1, "target_sigma": 16, "prune_score": "activation"},
}


@pytest.mark.parametrize("run", RUNS.values(), ids=RUNS.keys())
def test_two_processes_match_one_with_the_same_global_batch(run: dict, tmp_path: Path) -> None:
    common = {**run, "lr": 5e-3, "threads": 1, "grad_clip": 1.0}
    single = train(tiny_config(tmp_path / "one", batch_size=16, **common))
    cfg = tiny_config(tmp_path / "two", batch_size=8, **common)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "deltatune.cli",
        *_cli_args(cfg),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["world_size"] == 2 and report["global_batch_size"] == 16 == single["global_batch_size"]
    one, two = load_file(tmp_path / "one" / "delta.safetensors"), load_file(tmp_path / "two" / "delta.safetensors")
    assert one.keys() == two.keys() and len(one) > 10
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    init = delta_state_dict(build_model(TrainConfig.from_dict(cfg), 4))
    same_shape = [k for k in one if one[k].shape == init[k].shape]  # (pruning shrinks adapters)
    assert max((one[k] - init[k]).abs().max().item() for k in same_shape) > 1e-3  # training really moved them
    assert abs(report["top1"] - single["top1"]) <= 100 / 128  # at most one of the 128 eval images flips
    losses = [[h["train_loss"] for h in r["history"]] for r in (report, single)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert report.get("adapter_sizes") == single.get("adapter_sizes")
