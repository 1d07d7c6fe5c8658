"""Every user error raises DeltaTuneError naming the problem, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, run
from safetensors.torch import save_file

import deltatune
from deltatune import DeltaTuneError
from deltatune.core import delta_modules


def test_error_is_a_value_error() -> None:
    assert issubclass(DeltaTuneError, ValueError)


@pytest.mark.parametrize(
    "method,options,fragment",
    [
        ("nope", {}, "unknown method 'nope'; registered methods: "),
        ("lora", {"rank": 4}, "unknown option(s) ['rank'] for method 'lora'"),
        ("lora", {"r": 0}, "r must be >= 1"),
        ("lora", {"fused_qkv": "qx"}, "fused_qkv takes letters of 'qkv'"),
        ("adapter", {"act": "swish"}, "unknown act 'swish'"),
        ("ssf", {"target_modules": ["nothing.here"]}, "matched no module of type Linear"),
        ("lora", {"target_modules": ["attn"]}, "matched blocks.0.attn (Attention), blocks.1.attn (Attention)"),
        ("lora", {"target_modules": ["attn.proj"], "fused_qkv": "qv"}, "fused_qkv needs a fused qkv layer"),
    ],
)
def test_bad_apply_arguments(method: str, options: dict, fragment: str) -> None:
    model = make_backbone("vit")
    with pytest.raises(DeltaTuneError) as info:
        deltatune.apply(model, method, **options)
    assert fragment in str(info.value)
    assert not delta_modules(model) and "_deltatune" not in model.__dict__


def test_no_match_lists_candidates() -> None:
    with pytest.raises(
        DeltaTuneError, match=r"candidates: patch_embed.proj, attn.qkv, attn.proj, mlp.fc1, mlp.fc2, head"
    ):
        deltatune.apply(make_backbone("vit"), "lora", target_modules=["q_proj"])


def test_unknown_model_family_needs_targets() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(DeltaTuneError, match=r"no preset for Sequential.*pass target_modules"):
        deltatune.apply(model, "lora")
    deltatune.apply(model, "lora", target_modules=["0"], r=2, head="2")
    assert deltatune.trainable_parameters(model) == 2 * 4 + 4 * 2 + 4 * 2 + 2


def test_failed_combination_rolls_back_everything() -> None:
    model = make_backbone("vit")
    bad = deltatune.LoRAConfig(target_modules=["missing"])
    with pytest.raises(DeltaTuneError):
        deltatune.apply(model, ["ssf", bad])
    assert not delta_modules(model) and "_deltatune" not in model.__dict__


def test_bad_head_name_and_bad_lists() -> None:
    with pytest.raises(DeltaTuneError, match="head='classifier' names no module"):
        deltatune.apply(make_backbone("vit"), "ssf", head="classifier")
    with pytest.raises(DeltaTuneError, match="listed twice"):
        deltatune.apply(make_backbone("vit"), ["ssf", "ssf"])
    with pytest.raises(DeltaTuneError, match="options go with a single method"):
        deltatune.apply(make_backbone("vit"), ["ssf", "lora"], r=2)
    with pytest.raises(DeltaTuneError, match="must be a registered name or a deltatune config"):
        deltatune.apply(make_backbone("vit"), 3)


def test_api_on_plain_model_and_after_merge(tmp_path) -> None:
    with pytest.raises(DeltaTuneError, match="call deltatune.apply"):
        deltatune.save_delta(make_backbone("vit"), tmp_path / "x.safetensors")
    model = deltatune.merge(deltatune.apply(make_backbone("vit"), "ssf"))
    with pytest.raises(DeltaTuneError, match="merge\\(\\) folded ssf into the backbone's weights"):
        deltatune.save_delta(model, tmp_path / "x.safetensors")
    with pytest.raises(DeltaTuneError, match="was merged"):
        deltatune.apply(model, "lora")


@pytest.fixture
def saved(tmp_path):
    model = deltatune.apply(make_backbone("vit"), "ssf")
    perturb_deltas(model)
    path = tmp_path / "ssf.safetensors"
    deltatune.save_delta(model, path)
    return model, path


def assert_untouched(model) -> None:
    plain = make_backbone("vit")
    assert not delta_modules(model) and "_deltatune" not in model.__dict__
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_load_into_other_backbone(saved) -> None:
    _, path = saved
    other = make_backbone("swin")
    with pytest.raises(DeltaTuneError, match=r"saved for a different backbone \(VisionTransformer\)"):
        deltatune.load_delta(other, path)
    import timm

    torch.manual_seed(0)
    other_head = timm.create_model("test_vit", num_classes=7, img_size=32)
    with pytest.raises(DeltaTuneError, match=r"head.weight: file \[5, 64\] vs model \[7, 64\]"):
        deltatune.load_delta(other_head, path)


def test_load_checks_expected_method(saved) -> None:
    _, path = saved
    model = make_backbone("vit")
    with pytest.raises(DeltaTuneError, match=r"holds method\(s\) \['ssf'\], not lora"):
        deltatune.load_delta(model, path, method="lora")
    assert_untouched(model)
    deltatune.load_delta(model, path, method="ssf")


def test_load_into_tuned_model(saved) -> None:
    model, path = saved
    with pytest.raises(DeltaTuneError, match="already has deltas; pass the plain backbone"):
        deltatune.load_delta(model, path)


@pytest.mark.parametrize("cut", [10, 200, -100])
def test_truncated_file(saved, cut: int) -> None:
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    model = make_backbone("vit")
    with pytest.raises(DeltaTuneError, match="corrupt or truncated"):
        deltatune.load_delta(model, path)
    assert_untouched(model)


def test_garbage_and_missing_and_foreign_files(tmp_path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DeltaTuneError, match="not a readable safetensors file"):
        deltatune.load_delta(make_backbone("vit"), tmp_path / "junk.safetensors")
    with pytest.raises(DeltaTuneError, match="does not exist"):
        deltatune.load_delta(make_backbone("vit"), tmp_path / "missing.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(DeltaTuneError, match="not a deltatune delta file"):
        deltatune.load_delta(make_backbone("vit"), tmp_path / "plain.safetensors")


def test_edited_tensors_are_rejected_before_any_copy(saved, tmp_path) -> None:
    model, path = saved
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop(next(iter(tensors)))
    tensors["blocks.0.extra"] = torch.zeros(3)
    save_file(tensors, tmp_path / "edited.safetensors", metadata=meta)
    fresh = make_backbone("vit")
    with pytest.raises(DeltaTuneError, match="fails its integrity check"):
        deltatune.load_delta(fresh, tmp_path / "edited.safetensors")
    assert_untouched(fresh)
    x = make_input("vit")
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(make_backbone("vit"), x))
