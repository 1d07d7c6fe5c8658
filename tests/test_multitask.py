"""MultiTaskModel: tasks share one backbone; a mixed batch's row i equals its task's own single-task model."""

from __future__ import annotations

import functools
from pathlib import Path

import timm
import torch
from conftest import make_backbone, perturb_deltas
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune import DeltaTuneError
from deltatune.serve import MultiTaskModel, mixed
from deltatune.serve._share import share_copy

# (task name, methods, options, classes): different class counts per task
SPECS = [
    ("ssf", "ssf", {}, 3),
    ("bitfit", "bitfit", {}, 4),
    ("lora", "lora", {"fused_qkv": "qv"}, 5),
    ("adapter", "adapter", {}, 6),
    ("combo", [deltatune.SSFConfig(), deltatune.LoRAConfig(target_modules=["attn.qkv", "mlp.fc1"])], {}, 2),
    ("vpt", "vpt-deep", {}, 3),  # mixes per row too (tests/test_multitask_tokens.py)
    ("compacter", "compacter", {}, 3),  # no per-row kernel: its rows run through its own model
    ("fact", "fact-tt", {"r": 4, "dropout": 0.0}, 4),  # no dropout: the joint-training gradients are exact
    ("ia3", "ia3", {}, 5),  # k/v thirds of the fused qkv (output) and fc2's input
    ("adaptformer", "adaptformer", {"dropout": 0.0}, 6),  # the branch reads norm2's input (the residual stream)
]


SPECS_3 = ("ssf", "bitfit", "lora")


def _fresh(classes: int) -> nn.Module:
    """The test backbone with a ``classes``-way head (a fresh model object, the same frozen weights)."""
    model = timm.create_model("test_vit", num_classes=classes, img_size=32).eval()
    state = {k: v for k, v in make_backbone("vit").state_dict().items() if not k.startswith("head")}
    model.load_state_dict(state, strict=False)
    return model


def _save(tmp_path, name: str, method, options: dict, classes: int, seed: int) -> str:
    model = _fresh(classes)
    deltatune.apply(model, method, **options)
    if name == "combo":  # a sequential stage on top: BitFit over SSF + LoRA
        deltatune.apply(model, "bitfit")
    perturb_deltas(model, seed=seed)
    path = str(tmp_path / f"{name}.safetensors")
    deltatune.save_delta(model, path)
    return path


@functools.cache
def _paths(folder: str) -> dict[str, str]:
    return {n: _save(Path(folder), n, m, o, c, i) for i, (n, m, o, c) in enumerate(SPECS)}


def _setup(tmp_path) -> tuple[MultiTaskModel, dict[str, str]]:
    paths = _paths(str(tmp_path.parent.parent / "multitask_files"))
    mt = MultiTaskModel(make_backbone("vit"))
    for name, path in paths.items():
        mt.add_task(name, path)
    return mt, paths


def _single(path: str, classes: int) -> nn.Module:
    """The independent reference: the file loaded by load_delta into a fresh backbone."""
    return deltatune.load_delta(_fresh(classes), path).eval()


def test_mixed_rows_equal_single_task_models(tmp_path):
    mt, paths = _setup(tmp_path)
    names = ["ssf", "lora", "bitfit", "ia3", "adapter", "combo", "ssf", "lora", "combo", "fact", "ia3", "adaptformer"]
    x = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        out = mt(x, names)
        refs = {n: _single(paths[n], c)(x) for n, _, _, c in SPECS if n in names}
    assert out.shape == (12, 6)
    for i, (name, row) in enumerate(zip(names, mt.split(out, names))):
        torch.testing.assert_close(row, refs[name][i], atol=1e-5, rtol=1e-5)
        assert torch.isinf(out[i, len(row) :]).all()
    assert all(mt.task(n).plan is not None for n in names)  # these ran through the per-row kernels
    backbone = make_backbone("vit")
    fact = deltatune.apply(share_copy(backbone), "fact-tt")  # with its default dropout (0.1): mixes per row too
    plan, why = mixed.plan(fact, backbone)
    assert plan is not None and why == "" and fact.blocks[0].attn.qkv.dropout.p == 0.1


def test_a_site_with_only_an_input_scaling_mixes(tmp_path):
    """fc2 holds nothing but IA3's input scale when every task is IA3: the site still runs its layer."""
    paths = _paths(str(tmp_path.parent.parent / "multitask_files"))
    mt = MultiTaskModel(make_backbone("vit"))
    mt.add_task("a", paths["ia3"])
    mt.add_task("b", paths["ia3"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mt(x, ["a", "b", "b", "a"], strict=True), _single(paths["ia3"], 5)(x))


def test_tasks_without_a_mixed_kernel_run_grouped(tmp_path):
    mt, paths = _setup(tmp_path)
    assert mt.task("compacter").plan is None and "compacter" in mt.task("compacter").why_grouped
    names = ["compacter", "ssf", "compacter", "bitfit"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = mt(x, names)
        grouped, ssf = _single(paths["compacter"], 3)(x), _single(paths["ssf"], 3)(x)
    torch.testing.assert_close(out[[0, 2], :3], grouped[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :3], ssf[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        strict = mt(x[[1, 3]], ["ssf", "bitfit"], strict=True)  # these mix: strict changes nothing
    torch.testing.assert_close(strict, out[[1, 3]], atol=1e-5, rtol=1e-5)
    try:
        mt(x, names, strict=True)
    except DeltaTuneError as e:
        assert all(w in str(e) for w in ("cannot mix per row", "'compacter'", "compacter at", "strict=False"))
    else:
        raise AssertionError("strict per-row mixing accepted a compacter task")


def test_tasks_share_the_backbone_storage(tmp_path):
    backbone = make_backbone("vit")
    ptrs = {n: p.data_ptr() for n, p in backbone.named_parameters()}
    mt = MultiTaskModel(backbone)
    paths = {n: p for n, p in _paths(str(tmp_path.parent.parent / "multitask_files")).items() if n in SPECS_3}
    for name, path in paths.items():
        mt.add_task(name, path)
    mt(torch.randn(3, 3, 32, 32), ["ssf", "bitfit", "lora"])
    mt.remove_task("bitfit")
    assert mt.tasks() == ["ssf", "lora"]
    assert {n: p.data_ptr() for n, p in backbone.named_parameters()} == ptrs
    qkv = mt.task_model("ssf").blocks[0].attn.qkv.base.weight
    assert qkv.data_ptr() == backbone.blocks[0].attn.qkv.weight.data_ptr()
    # BitFit's biases are the task's own: the backbone's stay as they were
    bias = load_file(paths["bitfit"])["blocks.0.attn.qkv.bias"]
    assert not torch.equal(backbone.blocks[0].attn.qkv.bias, bias)
    unique = {id(p): p for p in mt.parameters()}.values()
    extra = sum(p.numel() for p in unique) - sum(p.numel() for p in backbone.parameters())
    files = sum(t.delta_params for t in (mt.task("ssf"), mt.task("lora")))
    assert extra == files  # memory grows by the deltas (and heads) only


def test_joint_training_gradients_equal_single_task_gradients(tmp_path):
    mt, paths = _setup(tmp_path)
    names = ["ssf", "lora", "ssf", "adapter", "lora", "bitfit", "combo", "bitfit", "fact", "ia3", "ia3", "adaptformer"]
    targets = torch.tensor([0, 4, 2, 5, 1, 3, 1, 0, 3, 4, 2, 5])
    x = torch.randn(len(names), 3, 32, 32)
    mt.train()
    loss = nn.functional.cross_entropy(mt(x, names), targets, reduction="sum")
    loss.backward()
    for name, classes in [(n, c) for n, _, _, c in SPECS if n in names]:
        ref = _single(paths[name], classes)
        rows = [i for i, n in enumerate(names) if n == name]
        nn.functional.cross_entropy(ref(x[rows]), targets[rows], reduction="sum").backward()
        mine = dict(mt.task_model(name).named_parameters())
        for pname, p in ref.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(mine[pname].grad, p.grad, atol=1e-5, rtol=1e-4)


def test_export_loads_into_plain_timm(tmp_path):
    mt, _ = _setup(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    for name, classes in (("ssf", 3), ("combo", 2)):
        out = tmp_path / f"{name}_merged.safetensors"
        mt.export(name, out)
        plain = timm.create_model("test_vit", num_classes=classes, img_size=32).eval()
        plain.load_state_dict(load_file(out), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), mt.task_model(name)(x), atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem(tmp_path):
    mt, paths = _setup(tmp_path)
    for call, words in (
        (lambda: mt(torch.randn(1, 3, 32, 32), ["nope"]), "unknown task 'nope'"),
        (lambda: mt.add_task("ssf", paths["ssf"]), "exists"),
        (lambda: mt(torch.randn(2, 3, 32, 32), ["ssf"]), "one per row"),
        (lambda: mt.export("adapter", tmp_path / "a.safetensors"), "cannot merge"),
    ):
        try:
            call()
        except DeltaTuneError as e:
            assert words in str(e)
        else:
            raise AssertionError(f"no error for {words}")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(Path(paths["ssf"]).read_bytes()[:-7] + b"garbage")
    try:
        mt.add_task("bad", corrupt)
    except DeltaTuneError as e:
        assert "corrupt.safetensors" in str(e)
    else:
        raise AssertionError("corrupt file accepted")
    other = make_backbone("vit", seed=5)
    try:
        MultiTaskModel(other).add_task("ssf", paths["ssf"])
    except DeltaTuneError as e:
        assert "other backbone weights" in str(e)
    else:
        raise AssertionError("file accepted on other backbone weights")


def test_inference_tables_follow_changed_deltas(tmp_path):
    """The stacked tables cached between no-grad forwards are rebuilt once a task's delta changes in place."""
    mt, paths = _setup(tmp_path)
    ref = _single(paths["ssf"], 3)
    x, names = torch.randn(3, 3, 32, 32), ["ssf", "lora", "bitfit"]
    with torch.no_grad():
        mt(x, names)
        for model in (mt.task_model("ssf"), ref):
            model.blocks[0].norm1.ssf_scale.mul_(1.5)
        torch.testing.assert_close(mt(x, names)[0, :3], ref(x)[0], atol=1e-5, rtol=1e-5)


def test_channels_first_layernorm_mixes_per_row(tmp_path):
    """ConvNeXt's channels-first LayerNorm2d: BitFit and SSF rows equal their own models (with and without grad)."""
    specs = [("bitfit", "bitfit", 11), ("ssf", "ssf", 12), ("both", ["ssf", "bitfit"], 13)]
    mt, refs = MultiTaskModel(make_backbone("convnext").eval()), {}
    for name, method, seed in specs:
        model = deltatune.apply(make_backbone("convnext").eval(), method)
        perturb_deltas(model, seed=seed)
        deltatune.save_delta(model, tmp_path / f"{name}.safetensors")
        mt.add_task(name, tmp_path / f"{name}.safetensors")
        refs[name] = deltatune.load_delta(make_backbone("convnext").eval(), tmp_path / f"{name}.safetensors")
    assert all(mt.task(n).plan is not None for n, _, _ in specs)
    names = ["ssf", "bitfit", "both", "bitfit", "ssf"]
    x = torch.randn(len(names), 3, 32, 32)
    want = torch.stack([refs[n](x)[i] for i, n in enumerate(names)])
    with torch.no_grad():
        torch.testing.assert_close(mt(x, names), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mt(x, names), want, atol=1e-5, rtol=1e-5)
