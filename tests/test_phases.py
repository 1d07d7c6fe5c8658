"""Training in phases: MiMi's prune-between-phases schedule and sequential stages, with exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file
from tiny_run import tiny_config

import deltatune
from deltatune.methods.pruning import adapters
from deltatune.train.config import TrainConfig
from deltatune.train.loop import build_model, train
from deltatune.train.phases import Phase, plan
from deltatune.train.report import count_gflops

# test_vit: width 64, 6 blocks, 2 adapters each; sigma 4 -> 16 neurons each, 192 in all; target sigma 16 keeps 48.
MIMI = {"method": "mimi", "target_sigma": 16, "epochs": 1, "threads": 1, "lr": 3e-3}


def _fresh() -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32, patch_size=8)


def test_mimi_plan_prints_total_epochs_and_prunes_on_schedule(tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, **{**MIMI, "epochs": 2}))
    phases = plan(cfg, build_model(cfg, 4))
    assert phases == [Phase(0, 0, 2), Phase(1, 2, 2, prune=0.5), Phase(2, 4, 2, prune=0.75)]
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, **{**MIMI, "phases": 3, "target_sigma": 64}))
    amounts = [p.prune for p in plan(cfg, build_model(cfg, 4))]
    assert amounts[0] is None and amounts[1:] == pytest.approx([0.75, 0.9375])  # rho derived: 1 - (1/16)^(1/2)


def test_mimi_training_shrinks_to_the_target_and_reloads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = train(tiny_config(tmp_path, **MIMI, progress=True))
    out = capsys.readouterr().out
    assert "3 phase(s) x 1 epochs = 3 epochs" in out and "192 pruned to 96, 48 (global" in out
    assert report["phases"] == 3 and [h["phase"] for h in report["history"]] == [1, 2, 3]
    sizes = report["adapter_sizes"]
    assert len(sizes) == 12 and sum(sizes.values()) == 48 and set(report["adapter_sizes_original"].values()) == {16}
    # Closed form: each adapter with h neurons holds 2 * 64 * h weights; the head 64 * 4 + 4.
    assert report["trainable_params"] == 2 * 64 * 48 + 64 * 4 + 4
    assert Path(report["allocation_plot"]).read_bytes()[:4] == b"\x89PNG"
    # The delta file rebuilds the pruned shapes (removed adapters included); inference is cheaper than at the
    # start size and the report's GFLOPs are the pruned model's.
    fresh = _fresh()
    deltatune.load_delta(fresh, report["delta_path"], check_backbone="shapes")  # another random init
    assert deltatune.trainable_parameters(fresh) == report["trainable_params"]
    assert {a.site: a.hidden for _, a in adapters(fresh)} == {s: h for s, h in sizes.items() if h}
    full = build_model(TrainConfig.from_dict(tiny_config(tmp_path, **MIMI)), 4)
    x = torch.randn(1, 3, 32, 32)
    assert count_gflops(fresh, x) < count_gflops(full, x)
    assert report["gflops"] == pytest.approx(count_gflops(fresh, x))


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Makes training stop (as if killed) right after the checkpoint of ``epoch`` is written."""
    from deltatune.train import epochs as training

    real = training.checkpoint

    def checkpoint(p: Any, cfg: Any, rt: Any, history: list, phase: Any) -> None:
        real(p, cfg, rt, history, phase)
        if history[-1]["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "checkpoint", checkpoint)


@pytest.mark.parametrize(
    ("extra", "stop"),
    [
        ({**MIMI, "epochs": 2, "prune_score": "grad"}, 3),  # inside phase 2, after a pruning
        ({**MIMI, "prune_score": "activation"}, 1),  # at a phase's end: the pruning happens after resuming
        ({**MIMI, "epochs": 2, "prune_score": "grad", "max_train_samples": 128, "prune_batches": 2}, 2),
        ({"stages": "bitfit,adapter", "epochs": 2, "threads": 1}, 2),  # at a stage's end
    ],
    ids=["mimi-grad-mid-phase", "mimi-activation-phase-end", "mimi-grad-phase-end", "stages"],
)
def test_resume_across_phases_matches_an_uninterrupted_run(
    extra: dict, stop: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = train(tiny_config(tmp_path / "straight", **extra))
    with monkeypatch.context() as m:
        _interrupt_after(m, stop)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(tmp_path / "killed", **extra))
    resumed = train(tiny_config(tmp_path / "killed", **extra, resume=True))
    a, b = load_file(tmp_path / "killed" / "delta.safetensors"), load_file(tmp_path / "straight" / "delta.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]


def test_stages_freeze_earlier_deltas_and_save_in_one_file(tmp_path: Path) -> None:
    first = train(tiny_config(tmp_path / "one", stages="bitfit", epochs=2, threads=1))
    both = train(tiny_config(tmp_path / "two", stages="bitfit,adapter", epochs=2, threads=1))
    assert both["method"] == "bitfit > adapter" and both["epochs"] == 4 and both["phases"] == 2
    one = load_file(first["delta_path"])
    two = {k.replace(".base.", "."): v for k, v in load_file(both["delta_path"]).items()}  # adapters wrap layers
    biases = [k for k in one if not k.startswith("head.")]
    assert biases and all(torch.equal(one[k], two[k]) for k in biases)  # stage 1's deltas untouched by stage 2
    assert any("adapter_down" in k for k in two)
    assert not torch.equal(one["head.weight"], two["head.weight"])  # the head trains in every stage
    fresh = _fresh()
    deltatune.load_delta(fresh, both["delta_path"], check_backbone="shapes")  # another random init
    assert [(e.config.name, e.stage) for e in fresh.__dict__["_deltatune"].entries] == [("bitfit", 0), ("adapter", 1)]


def test_stages_cli_option_splits_and_combines() -> None:
    cfg = TrainConfig.from_dict({"stages": "prompt,bitfit+adapter", "model": "hf:x", "dataset": "text"})
    assert [[c.name for c in stage] for stage in cfg.stage_configs()] == [["prompt"], ["bitfit", "adapter"]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "ssf", "rho": 0.3}, "pruning options go with --method mimi"),
        ({"method": "mimi", "phases": 1}, "phases=1 leaves no pruning"),
        ({"method": "mimi", "prune_score": "magic"}, "unknown score"),
        ({"stages": "bitfit,mimi"}, "not as one of --stages"),
        ({"stages": "bitfit,bitfit"}, "each method may appear once"),
    ],
)
def test_bad_phase_options_raise(fields: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(deltatune.DeltaTuneError, match=message):
        cfg = TrainConfig.from_dict(tiny_config(tmp_path, **fields))
        plan(cfg, build_model(cfg, 4))


def test_resume_refuses_a_checkpoint_from_a_later_phase_than_the_run_has(tmp_path: Path) -> None:
    train(tiny_config(tmp_path, stages="bitfit,adapter", epochs=1, threads=1))
    with pytest.raises(deltatune.DeltaTuneError, match=r"stages: \['bitfit', 'adapter'\] -> \['bitfit'\]"):
        train(tiny_config(tmp_path, stages="bitfit", epochs=1, threads=1, resume=True))
