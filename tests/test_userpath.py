"""The path a user walks after the demo: run folders, offline defaults and recipes, predict, tracking."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import tiny_config

import deltatune
from deltatune import _deltafile as fmt
from deltatune.cli import build_parser, config_from_args, main
from deltatune.demo import RECIPES, _config
from deltatune.errors import DeltaTuneError
from deltatune.train.config import TrainConfig
from deltatune.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def _quick(out: Path | None, **overrides) -> dict:
    cfg = tiny_config(out or "unused", **{"epochs": 1, **overrides})
    if out is None:
        cfg.pop("output_dir")
    return cfg


def test_each_run_gets_its_own_folder_and_a_used_one_is_refused(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    first, second = train(_quick(None)), train(_quick(None))
    a, b = Path(first["delta_path"]).parent, Path(second["delta_path"]).parent
    assert a != b and a.parent == b.parent == Path("runs") and a.name.startswith("ssf-")
    out = capsys.readouterr().out  # --no-progress still prints the result and where it went
    assert f"top-1 {first['top1']:.2f}%" in out and f"wrote {a}/" in out and f"wrote {b}/" in out
    with pytest.raises(DeltaTuneError, match="is not empty.*--resume.*--overwrite"):
        train(_quick(a))
    (a / "allocation.png").write_bytes(b"stale")  # a previous run's file that this run does not write
    train(_quick(a, overwrite=True))
    assert not (a / "allocation.png").exists() and (a / "delta.safetensors").exists()
    train(_quick(a, resume=True))  # continuing a run is allowed
    with pytest.raises(DeltaTuneError, match="--resume continues a run in its folder"):
        train(_quick(None, resume=True))


def test_offline_tasks_default_to_no_augmentation() -> None:
    """A flipped digit is another digit: offline tasks train on the images as they are, like the demo."""
    offline, other = TrainConfig(dataset="offline:digits"), TrainConfig(dataset="cifar100")
    assert (offline.train_transform, offline.eval_transform) == ("resize", "resize")
    assert (other.train_transform, other.eval_transform) == ("timm", "timm")
    assert TrainConfig(dataset="offline:digits", train_transform="none").train_transform == "none"  # not auto
    from deltatune.backbones import create_backbone, data_config
    from deltatune.data import make_transform

    model = create_backbone("deltatune_offline_vit", 10, pretrained=False)
    tf = make_transform(offline.train_transform, True, data_config(model))
    image = torch.rand(3, 32, 32)
    torch.manual_seed(0)
    for _ in range(5):  # no random op: every draw is the normalised image itself
        torch.testing.assert_close(tf(image), (image - 0.5) / 0.5)


@pytest.mark.parametrize("method", list(RECIPES))
def test_offline_digit_recipes_are_the_demos_settings(method: str, tmp_path: Path) -> None:
    recipe = ROOT / "recipes" / f"offline_digits_{method}.yaml"
    head = f"# Command:  deltatune train --config recipes/{recipe.name}\n# Expected: top-1"
    assert recipe.read_text().startswith(head)
    ns = build_parser().parse_args(shlex.split(f"train --config {recipe}"))
    mine = config_from_args(ns).to_dict()
    demo = _config(method, "digits", tmp_path, batch_size=32, seed=0).to_dict()  # run_demo's defaults
    bookkeeping = ("output_dir", "overwrite", "progress", "benchmark_seconds")
    assert {k: v for k, v in mine.items() if k not in bookkeeping} == {
        k: v for k, v in demo.items() if k not in bookkeeping
    }


def test_readme_stages_line_uses_ten_prompt_tokens() -> None:
    """The README's --stages line: its prompt has the 10 tokens of the MiniLM table, not the method's default 100."""
    line = (
        "train --stages prompt,bitfit,adapter --model hf:all-MiniLM-L6-v2 --dataset offline:topics-mixed"
        ' --method-options "{prompt: {num_tokens: 10}}"'
    )
    stages = config_from_args(build_parser().parse_args(shlex.split(line))).stage_configs()
    assert [[c.name for c in s] for s in stages] == [["prompt"], ["bitfit"], ["adapter"]]
    assert stages[0][0].num_tokens == 10


def test_summary_numbers_stages_from_one() -> None:
    model = deltatune.create_backbone("test_vit", 4, pretrained=False, patch_size=8, img_size=32)
    deltatune.apply(model, "ssf")
    deltatune.apply(model, "bitfit")
    rows = {line.split()[0]: line.split()[1] for line in deltatune.summary(model).splitlines()[3:5]}
    assert rows == {"ssf": "1", "bitfit": "2"}  # as the CLI prints "stage 2: bitfit"


def test_unpruned_adapter_run_draws_no_allocation_plot(tmp_path: Path) -> None:
    report = train(_quick(tmp_path / "run", method="adapter"))
    assert "adapter_sizes" not in report  # only a method that prunes (MiMi) reports sizes and plots them
    assert "allocation_plot" not in report and not (tmp_path / "run" / "allocation.png").exists()


def test_class_names_are_in_the_file_and_its_digest(tmp_path: Path) -> None:
    model = deltatune.create_backbone("test_vit", 2, pretrained=False, patch_size=8, img_size=32)
    deltatune.apply(model, "ssf")
    path = tmp_path / "d.safetensors"
    deltatune.save_delta(model, path, classes=["cat", "dog"])
    assert deltatune.read_metadata(path)["classes"] == ["cat", "dog"]
    data = path.read_bytes()
    assert data.count(b"cat") == 1
    path.write_bytes(data.replace(b"cat", b"cow"))  # same length: still a valid safetensors file
    with pytest.raises(DeltaTuneError, match="integrity"):
        fmt.read(path)
    with pytest.raises(DeltaTuneError, match="classes must be a list of names"):
        deltatune.save_delta(model, path, classes="cat,dog")


def _image_folder(root: Path, per_class: int = 4) -> Path:
    """ROOT/{train,val}/<colour>/*.png: noisy 32x32 images tinted by their class."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-epoch run on a folder of PNGs (classes blue, green, red): its run folder and the image root."""
    root = _image_folder(tmp_path_factory.mktemp("images"))
    out = tmp_path_factory.mktemp("run") / "ssf"
    train(_quick(out, dataset="folder", data_dir=str(root), batch_size=4, lr=0.1))
    return out, root


def _reference_logits(run: Path, files: list[Path]) -> torch.Tensor:
    """The tuned model called directly on hand-normalised pixels (the offline ViT's mean/std are timm's 0.5)."""
    torch.manual_seed(0)  # the run's random-init backbone: training seeds (seed 0) and then builds it
    model = deltatune.create_backbone("test_vit", 3, pretrained=False, patch_size=8, img_size=32)
    deltatune.load_delta(model, run / "delta.safetensors")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.pretrained_cfg["mean"], model.pretrained_cfg["std"]))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))) for f in files])
    x = (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        return model.eval()(x)


def test_predict_a_folder_matches_the_model_with_class_names(folder_run) -> None:
    run, root = folder_run
    assert deltatune.read_metadata(run / "delta.safetensors")["classes"] == sorted(COLOURS)
    files = sorted((root / "val" / "red").glob("*.png"))
    preds = deltatune.predict(run, root / "val" / "red", top_k=2)
    probs = _reference_logits(run, files).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert [p.input for p in preds] == [str(f) for f in files]
    assert [p.indices for p in preds] == top.indices.tolist()
    assert [p.labels for p in preds] == [[sorted(COLOURS)[i] for i in row] for row in top.indices.tolist()]
    np.testing.assert_allclose([p.scores for p in preds], top.values.numpy(), rtol=1e-5, atol=1e-6)


def test_predict_from_the_command_line(folder_run, capsys) -> None:
    run, root = folder_run
    image = root / "val" / "green" / "0.png"
    assert main(["predict", str(run), str(image), "--top-k", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    probs = _reference_logits(run, [image]).softmax(-1)[0]
    assert row["input"] == str(image) and sorted(row["labels"]) == sorted(COLOURS)
    assert row["indices"] == probs.argsort(descending=True).tolist()


def test_offline_vit_by_its_documented_name() -> None:
    """`import deltatune` registers the bundled ViT with timm (a fresh interpreter: nothing else imported it)."""
    code = "import timm, deltatune; m = timm.create_model('deltatune_offline_vit', pretrained=True, num_classes=3); "
    code += "print(type(m).__name__, m.head.out_features)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == ["VisionTransformer", "3"], done.stderr[-2000:]


def test_tensorboard_scalars_match_the_log(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    report = train(_quick(out, epochs=2, tensorboard=True))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    for key in ("train_loss", "lr", "eval_top1"):
        got = [(e.step, e.value) for e in events.Scalars(f"epoch/{key}")]
        want = [(r["epoch"], r[key]) for r in log if key in r]
        assert [s for s, _ in got] == [s for s, _ in want] and want
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    steps = events.Scalars("train/loss")
    assert [e.step for e in steps] == list(range(1, len(steps) + 1)) and len(steps) == 2 * (256 // 32)
    # The epoch's mean loss is the mean of its steps' losses (equal batches)
    assert np.mean([e.value for e in steps[: len(steps) // 2]]) == pytest.approx(log[0]["train_loss"], rel=1e-5)
    assert report["top1"] == log[-1]["eval_top1"]


def test_wandb_without_the_package_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, whether installed or not; no network
    with pytest.raises(DeltaTuneError, match="pip install wandb"):
        train(_quick(tmp_path / "run", wandb=True))
