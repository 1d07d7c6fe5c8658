"""The ``deltatune`` command: help text from the config docstrings, option precedence, recipes, errors, demo."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tiny_run import tiny_config

from deltatune.cli import build_parser, config_from_args, main
from deltatune.train.config import SECTIONS, TrainConfig, field_docs

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def _config(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_train_help_lists_every_option_with_its_docstring(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert field_docs()[f.name][:60] in text, f.name
    assert "--no-pretrained" in text and "(default: 0.001)" in text and "optimisation:" in text


def test_every_field_is_documented_and_in_one_section() -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(n for section in SECTIONS.values() for n in section) == sorted(names)
    assert set(field_docs()) == set(names)


def test_precedence_defaults_then_file_then_command_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "# command: deltatune train --config r.yaml\nlr: 1e-2\nepochs: 3\nmethod: lora\n"
        "method_options: {r: 4}\npretrained: false\n"
    )
    cfg = _config(["--config", str(recipe), "--lr", "5e-4", "--method-options", "{r: 2, alpha: 4}"])
    assert (cfg.lr, cfg.epochs, cfg.method, cfg.method_options) == (5e-4, 3, "lora", {"r": 2, "alpha": 4})
    assert cfg.pretrained is False and cfg.batch_size == TrainConfig().batch_size  # file, then default
    assert _config(["--config", str(recipe), "--pretrained"]).pretrained is True
    assert _config(["--method", "bitfit,adapter"]).method == ["bitfit", "adapter"]
    assert _config(["--grad-clip", "none", "--img-size", "64"]).img_size == 64


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipes_parse_and_start_with_their_command(recipe: Path) -> None:
    lines = recipe.read_text().splitlines()
    assert lines[0].startswith("# Command:") and f"--config recipes/{recipe.name}" in lines[0]
    assert any(line.startswith("# Expected:") for line in lines[:6])
    cfg = TrainConfig.from_yaml(recipe)
    assert cfg.epochs >= (1 if recipe.name.startswith("offline_") else 10) and cfg.method_configs()


def test_user_errors_exit_2_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown training option(s): learning_rate" in capsys.readouterr().err
    assert main(["train", "--method", "ssff"]) == 2
    assert "unknown method 'ssff'" in capsys.readouterr().err
    assert main(["train", "--lr", "fast"]) == 2
    assert "lr: expected a number, got 'fast'" in capsys.readouterr().err
    assert main(["train", "--method", "lora", "--method-options", "{rank: 4}"]) == 2
    assert "unknown option(s) ['rank'] for method 'lora'" in capsys.readouterr().err
    assert main(["train", "--dataset", "cifar1000", "--no-pretrained", "--output-dir", str(tmp_path / "out")]) == 2
    assert "unknown dataset 'cifar1000'" in capsys.readouterr().err


def test_train_command_runs_and_writes_its_outputs(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, method="bitfit", epochs=1, threads=1)
    argv = [
        "train",
        "--model",
        cfg["model"],
        "--no-pretrained",
        "--model-kwargs",
        "{patch_size: 8}",
        "--img-size",
        "32",
        "--dataset",
        "synthetic",
        "--method",
        "bitfit",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--num-workers",
        "0",
        "--train-transform",
        "none",
        "--eval-transform",
        "none",
        "--no-progress",
        "--benchmark-seconds",
        "0",
        "--output-dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "bitfit" and report["delta_bytes"] == (tmp_path / "delta.safetensors").stat().st_size
    saved = TrainConfig.from_yaml(tmp_path / "config.yaml")
    assert saved.method == "bitfit" and saved.model_kwargs == {"patch_size": 8}


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.offline.backbone import WEIGHTS_FILE

    if not WEIGHTS_FILE.is_file():
        pytest.skip("the offline ViT weights are not built yet")
    out = tmp_path / "demo"
    argv = ["demo", "--methods", "linear,ssf,lora", "--epochs", "1", "--max-train-samples", "64"]
    argv += ["--max-eval-samples", "128", "--inference-rounds", "2", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "same class after merging" in text and "GFLOPs merged" in text
    result = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["linear", "ssf", "lora"]
    for row in result["rows"]:
        assert row["delta_bytes"] == Path(row["delta_path"]).stat().st_size
        assert Path(row["delta_path"]) == out / row["method"] / "delta.safetensors"  # one copy, no runs/ nesting
        assert isinstance(row["infer_x_plain"], float) and isinstance(row["infer_merged_x_plain"], float)
    for method in ("ssf", "lora"):
        check = result["merge_checks"][method]
        assert check["agreement"] == 1.0 and check["max_logit_diff"] < 1e-3 and check["images"] == 128
        row = next(r for r in result["rows"] if r["method"] == method)
        assert check["reloaded_top1"] == pytest.approx(row["top1"])
        assert row["gflops_merged"] == pytest.approx(row["gflops_backbone"])
    assert (out / "accuracy_vs_params.png").stat().st_size > 1000 and (out / "results.md").is_file()
    assert sorted(p.name for p in out.rglob("*.safetensors")) == ["delta.safetensors"] * 3


def test_trainer_and_cli_name_no_method() -> None:
    """train/ and the CLI neither test for a method's name nor import a method: the method's own config declares
    its training options and hooks (MiMi's --rho, --prune-score, phases; prefix's stored form)."""
    import ast

    import deltatune

    root = Path(deltatune.__file__).parent
    for path in [*sorted((root / "train").glob("*.py")), root / "cli.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):  # c.name == "mimi", "mimi" in names: a branch on a method
                named = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not set(named) & set(deltatune.methods()), f"{path.name} tests for the method {named}"
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("deltatune.methods"), f"{path.name} imports {node.module}"


def test_method_training_options_keep_their_flags() -> None:
    """MiMi's options stay `deltatune train` flags and recipe keys, and reach MiMi's config."""
    cfg = config_from_args(build_parser().parse_args(["train", "--method", "mimi", "--rho", "0.25",
                                                      "--prune-score", "l1", "--prune-batches", "3"]))  # fmt: skip
    (mimi,) = cfg.method_configs()
    assert (mimi.rho, mimi.score, mimi.prune_batches) == (0.25, "l1", 3)
    assert TrainConfig.from_dict({"method": "mimi", "target_params": 50}).method_configs()[0].target_sigma is None
