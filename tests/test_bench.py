"""``deltatune bench`` on the tiny ViT for one step: the report's fields and that its numbers agree with each other."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from deltatune.bench import cases
from deltatune.bench import cli as bench

FIELDS = {
    "name", "trainable", "step_ms", "step_ms_all", "images_per_s", "step_x_full", "step_x_floor", "memory_kind",
    "step_x_floor_paired",
    "memory_bytes", "memory_x_floor", "infer_ms", "merged_infer_ms", "infer_x_plain", "merged_x_plain",
    "infer_ms_all", "merged_infer_ms_all", "step_x_floor_best", "merged_x_plain_best", "flops_x_plain",
    "infer_x_plain_flops", "step_x_floor_iqr",
}  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--model", "test_vit", "--img-size", "32", "--batch", "2", "--steps", "2"]
    methods = "floor-twin,bitfit,ssf,ssf-plain,lora,lora-plain,lora-keep,lora-ops,adapter,mimi,peft-lora"
    argv += ["--warmup", "0", "--methods", methods]
    argv += ["--json", str(out / "r.json"), "--md", str(out / "r.md")]
    assert bench.main(argv) == 0
    return json.loads((out / "r.json").read_text()), out


def test_json_has_every_configuration_and_field(report: tuple[dict, Path]) -> None:
    data, _ = report
    names = [r["name"] for r in data["results"]]
    assert names[:2] == ["floor", "full"]  # the two references always run
    assert {"bitfit", "ssf", "ssf-plain", "lora", "adapter"} <= set(names)
    for r in data["results"]:
        assert FIELDS <= r.keys(), r["name"]
        assert len(r["step_ms_all"]) == 2
    assert data["meta"]["command"].startswith("deltatune bench --device cpu")
    assert data["meta"]["model"] == "test_vit" and data["meta"]["batch"] == 2


def test_numbers_are_self_consistent(report: tuple[dict, Path]) -> None:
    data, _ = report
    rows = {r["name"]: r for r in data["results"]}
    full, floor = rows["full"], rows["floor"]
    for r in rows.values():
        assert math.isclose(r["step_ms"], sorted(r["step_ms_all"])[0] / 2 + sorted(r["step_ms_all"])[1] / 2)
        assert math.isclose(r["step_x_full"], r["step_ms"] / full["step_ms"])
        assert math.isclose(r["step_x_floor"], r["step_ms"] / floor["step_ms"])
        paired = [t / f for t, f in zip(r["step_ms_all"], floor["step_ms_all"])]
        assert math.isclose(r["step_x_floor_paired"], (paired[0] + paired[1]) / 2)
        assert r["step_x_floor_iqr"] == pytest.approx(np.percentile(paired, [25, 75]))  # linear interpolation
        assert math.isclose(r["step_x_floor_best"], min(r["step_ms_all"]) / min(floor["step_ms_all"]))
        assert math.isclose(r["images_per_s"], 2 * 1000 / r["step_ms"])
        assert math.isclose(r["memory_x_floor"], r["memory_bytes"] / floor["memory_bytes"])
        assert r["memory_kind"] == "saved_activations" and r["memory_bytes"] > 0
        plain = floor["infer_ms_all"]
        ratios = [t / p for t, p in zip(r["infer_ms_all"], plain)]  # each round's time over the plain model's
        assert math.isclose(r["infer_x_plain"], (ratios[0] + ratios[1]) / 2)
        if r["merged_x_plain"] is not None:
            ratios = [t / p for t, p in zip(r["merged_infer_ms_all"], plain)]
            assert math.isclose(r["merged_x_plain"], (ratios[0] + ratios[1]) / 2)
            assert math.isclose(r["merged_x_plain_best"], min(r["merged_infer_ms_all"]) / min(plain))
    twin = rows["floor-twin"]  # the same configuration as the floor: only noise tells them apart
    assert twin["trainable"] == 0 and twin["memory_bytes"] == floor["memory_bytes"]
    assert twin["infer_ms_all"] is not floor["infer_ms_all"]  # timed as its own model: its ratio is the noise
    assert twin["merged_infer_ms_all"] == twin["infer_ms_all"]  # nothing to merge
    assert floor["trainable"] == 0 and full["trainable"] > rows["lora"]["trainable"] > rows["ssf"]["trainable"]
    assert rows["ssf"]["memory_bytes"] < rows["ssf-plain"]["memory_bytes"]  # the folded SSF keeps less
    assert rows["lora"]["memory_bytes"] < rows["lora-plain"]["memory_bytes"]  # x from its LayerNorm/GELU
    assert rows["lora"]["memory_bytes"] < rows["lora-keep"]["memory_bytes"]  # recomputing is the default
    assert rows["lora-keep"]["memory_bytes"] <= rows["lora-plain"]["memory_bytes"]  # x, not also x A^T
    assert rows["lora-keep"]["trainable"] == rows["lora"]["trainable"]
    assert rows["lora-ops"]["memory_bytes"] == rows["lora"]["memory_bytes"]  # the kernel changes time, not bytes
    assert rows["ssf-plain"]["merged_infer_ms"] is None and rows["adapter"]["merged_infer_ms"] is not None
    for r in rows.values():
        assert math.isclose(r["infer_x_plain_flops"], r["infer_x_plain"] / r["flops_x_plain"])


def test_flops_allowance_counts_the_deltas_own_work(report: tuple[dict, Path]) -> None:
    """FLOPs x plain (the allowance unmerged inference is judged by): 1 for the plain architecture and for SSF
    (elementwise, uncounted); LoRA's equals HF peft's LoRA of the same config (an independent implementation);
    adapters add theirs, the MiMi-pruned ones less."""
    data, _ = report
    rows = {r["name"]: r for r in data["results"]}
    for name in ("floor", "full", "bitfit", "ssf"):
        assert rows[name]["flops_x_plain"] == 1.0, name
    assert rows["lora"]["flops_x_plain"] == pytest.approx(rows["peft-lora"]["flops_x_plain"], rel=1e-12)
    assert rows["lora"]["flops_x_plain"] > 1.0
    assert rows["adapter"]["flops_x_plain"] > rows["mimi"]["flops_x_plain"] > 1.0


def test_mimi_row_is_pruned_globally_to_an_eighth() -> None:
    """The bench's MiMi row: sigma-4 adapters halved three times by a global ranking (1/8 of the neurons kept)."""
    import timm

    import deltatune
    from deltatune.methods.pruning import adapter_sizes

    model = deltatune.apply(timm.create_model("test_vit", pretrained=False, num_classes=4), "mimi")
    start = sum(adapter_sizes(model).values())
    cases.prune_as_mimi(model)
    sizes = adapter_sizes(model)
    assert sum(sizes.values()) == start // 8 and len(set(sizes.values())) > 1  # unequal: one global ranking


def test_markdown_starts_with_the_command(report: tuple[dict, Path]) -> None:
    data, out = report
    text = (out / "r.md").read_text()
    assert text.startswith("```\n" + data["meta"]["command"] + "\n```")
    assert "| config | step ms | x full | x floor |" in text
    assert text.count("\n| ") == len(data["results"]) + 2


def test_mounts_as_a_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="deltatune")
    bench.add_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", "--batch", "4", "--methods", "ssf"])
    assert ns.func is bench.run and ns.batch == 4 and ns.methods == "ssf"


def test_unknown_configuration_is_a_user_error() -> None:
    from deltatune.errors import DeltaTuneError

    with pytest.raises(DeltaTuneError, match="unknown configuration"):
        bench.main(["--model", "test_vit", "--img-size", "32", "--methods", "nope"])


@pytest.fixture(scope="module")
def multitask_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench_mt")
    argv = ["--device", "cpu", "--model", "test_vit", "--img-size", "32", "--batch", "4", "--steps", "1"]
    argv += ["--warmup", "0", "--multitask", "1,2", "--json", str(out / "m.json"), "--md", str(out / "m.md")]
    assert bench.main(argv) == 0
    return json.loads((out / "m.json").read_text()), out


def test_multitask_report_has_every_variant_and_consistent_ratios(multitask_report: tuple[dict, Path]) -> None:
    data, out = multitask_report
    rows = {(r["method"], r["tasks"], r["variant"]): r for r in data["results"]}
    for method in ("ssf", "bitfit", "lora", "ia3", "fact-tt", "adaptformer"):
        for n in (1, 2):
            variants = {"single", "mixed", "grouped"} | ({"peft"} if method == "lora" else set())
            variants |= set() if method == "adaptformer" else {"merged"}  # not mergeable: no merged deployment
            assert rows[method, n, "mixed"]["per_row"] is True  # one backbone pass, not grouped by task
            assert {v for m, k, v in rows if (m, k) == (method, n)} == variants
            single = rows[method, n, "single"]
            for v in variants:
                r = rows[method, n, v]
                assert len(r["ms_all"]) == 1 and r["ms"] == r["ms_all"][0] > 0
                assert math.isclose(r["x_single_paired"], r["ms"] / single["ms"])
                assert r["max_err"] < 1e-4, (method, n, v)  # against each task's file loaded by load_delta
    assert data["meta"]["multitask"] == "1,2"
    text = (out / "m.md").read_text()
    assert text.startswith("```\ndeltatune bench --device cpu") and "| lora | 2 |" in text


def test_multitask_variants_equal_separately_loaded_task_models(tmp_path: Path) -> None:
    """Every variant's row i equals row i through its task's file loaded into a fresh timm model (peft included)."""
    import timm
    import torch

    import deltatune
    from deltatune.bench import multitask

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model("test_vit", num_classes=7, img_size=32)

    setup = multitask.Setup(make, "lora", 3, tmp_path, peft=True)
    x = torch.randn(5, 3, 32, 32)
    refs = [deltatune.load_delta(make(), p).eval()(x) for p in setup.paths]  # each task's model on the whole batch
    want = torch.stack([refs[i % 3][i] for i in range(5)])
    with torch.inference_mode():
        for name, fn in multitask.variants(setup, 3, x, compile_models=False).items():
            got = fn()
            if name == "single":
                torch.testing.assert_close(got, refs[0], atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_multitask_counts_are_checked() -> None:
    from deltatune.bench.multitask import parse_counts
    from deltatune.errors import DeltaTuneError

    assert parse_counts("1,4,16") == [1, 4, 16]
    for bad in ("", "0,2", "a"):
        with pytest.raises(DeltaTuneError, match="task counts"):
            parse_counts(bad)


def test_lora_pieces_are_timed_without_changing_the_step() -> None:
    """scripts/ablate_fast_paths.py --pieces: its clocks see every piece of LoRA's step and change no gradient."""
    path = Path(__file__).parents[1] / "scripts" / "ablate_fast_paths.py"
    spec = importlib.util.spec_from_file_location("ablate_fast_paths", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=32).train()

    case = cases.build_case("lora", make, False, False)
    x, target = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 3])
    params = [p for p in case.model.parameters() if p.requires_grad]

    def grads(timed: bool) -> list[torch.Tensor]:
        totals: dict[str, float] = defaultdict(float)
        with script.timed_pieces(totals) if timed else nullcontext():
            loss = torch.nn.functional.cross_entropy(case.model(x), target)
            out = torch.autograd.grad(loss, params)
        if timed:  # the LayerNorm recompute runs inside the compiled kernel (_from_recipe), not on its own
            assert set(totals) == set(script.PIECES) - {"recompute (layer_norm)"}
            assert all(ms > 0 for ms in totals.values())
        return list(out)

    for plain, timed in zip(grads(False), grads(True), strict=True):
        assert torch.equal(plain, timed)
