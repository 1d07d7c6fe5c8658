"""Delta files: integrity digest, byte-identical saves, the right backbone, bounded loading, file modes, threads."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, rel_err, run
from safetensors import safe_open
from safetensors.torch import save_file

import deltatune
from deltatune import DeltaTuneError
from deltatune import _deltafile as fmt
from deltatune.core import delta_modules


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fails the test instead of hanging if the block runs longer than ``seconds``."""

    def expire(*_: object) -> None:
        raise TimeoutError(f"took over {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def resign(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Rewrites a file with a valid digest: what a careful forger (or a bug in a writer) would produce."""
    fmt.write(path, tensors, {k: v for k, v in meta.items() if k != "digest"})


def edit_stage(path: Path, edit) -> None:
    meta, tensors = read_raw(path)
    stages = json.loads(meta["stages"])
    edit(stages[0])
    resign(path, {**meta, "stages": json.dumps(stages)}, tensors)


def assert_plain(model: torch.nn.Module, kind: str = "vit") -> None:
    plain = make_backbone(kind)
    assert not delta_modules(model) and "_deltatune" not in model.__dict__
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def refused(path: Path, match: str, kind: str = "vit", **kw) -> None:
    model = make_backbone(kind)
    with deadline(10):
        start = time.perf_counter()
        with pytest.raises(DeltaTuneError, match=match):
            deltatune.load_delta(model, path, **kw)
        assert time.perf_counter() - start < 3.0  # about 0.1 s; a shared CPU can be slower, a hang is minutes
    assert_plain(model, kind)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = deltatune.apply(make_backbone("vit"), "lora", r=2)
    perturb_deltas(model)
    path = tmp_path / "lora.safetensors"
    deltatune.save_delta(model, path)
    return model, path


# ---- integrity ----


def test_flipped_data_bit_is_refused(saved) -> None:
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    refused(path, "fails its integrity check")


def test_edited_alpha_is_refused(saved) -> None:
    _, path = saved
    meta, tensors = read_raw(path)
    stages = json.loads(meta["stages"])
    stages[0]["options"]["alpha"] = 32.0
    save_file(tensors, path, metadata={**meta, "stages": json.dumps(stages)})  # digest left as it was
    refused(path, "fails its integrity check")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float8_e4m3fn])
def test_non_float_tensors_are_refused(saved, dtype: torch.dtype) -> None:
    _, path = saved
    meta, tensors = read_raw(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].to(dtype)
    resign(path, meta, tensors)
    refused(path, f"{name} is stored as {dtype}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(saved, value: float) -> None:
    _, path = saved
    meta, tensors = read_raw(path)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    resign(path, meta, tensors)
    refused(path, f"{name} holds NaN or infinite values")


def test_saving_twice_gives_identical_bytes(saved, tmp_path: Path) -> None:
    model, path = saved
    for i in range(3):
        deltatune.save_delta(model, tmp_path / f"again{i}.safetensors")
        assert (tmp_path / f"again{i}.safetensors").read_bytes() == path.read_bytes()
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_file_written_the_old_way_still_loads(saved, tmp_path: Path) -> None:
    """deltatune 0.1.0's writer: safetensors' save_file, format version 1, the user's patterns, no digest."""
    model, path = saved
    meta, tensors = read_raw(path)
    stages = json.loads(meta["stages"])
    stages[0]["options"]["target_modules"] = None  # 0.1.0 stored the config as given
    old = {k: meta[k] for k in ("format", "deltatune_version", "head", "fingerprint", "backbone_class")}
    old.update(format_version="1", stages=json.dumps(stages), backbone_shapes=meta["backbone_shapes"])
    save_file(tensors, tmp_path / "old.safetensors", metadata=old)
    fresh = deltatune.load_delta(make_backbone("vit"), tmp_path / "old.safetensors")
    x = make_input("vit")
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(model, x))


# ---- the right backbone ----


def test_other_weights_of_the_same_architecture_are_refused(saved) -> None:
    model, path = saved
    other = make_backbone("vit", seed=1)  # same architecture, other weights (as DeiT-tiny vs ViT-tiny)
    with pytest.raises(DeltaTuneError, match=r"cls_token differs \(file: .*; model: .*check_backbone='shapes'"):
        deltatune.load_delta(other, path)
    deltatune.load_delta(other, path, check_backbone="shapes")  # the explicit opt-out
    assert len(delta_modules(other)) == len(delta_modules(model))


def test_trained_backbone_tensors_are_not_fingerprinted(tmp_path: Path) -> None:
    """full fine-tuning stores every tensor: any same-shaped init rebuilds the trained model exactly."""
    model = deltatune.apply(make_backbone("vit"), "full")
    perturb_deltas(model)
    deltatune.save_delta(model, tmp_path / "full.safetensors")
    fresh = deltatune.load_delta(make_backbone("vit", seed=3), tmp_path / "full.safetensors")
    x = make_input("vit")
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(model, x))


def test_deit_delta_into_vit_names_both_tags(tmp_path: Path) -> None:
    import timm

    kw = dict(img_size=32, patch_size=16, num_classes=5, depth=1)
    torch.manual_seed(0)
    deit = deltatune.apply(timm.create_model("deit_tiny_patch16_224", **kw), "ssf")
    deltatune.save_delta(deit, tmp_path / "deit.safetensors")
    torch.manual_seed(1)  # other weights, as the pretrained DeiT and ViT checkpoints
    vit = timm.create_model("vit_tiny_patch16_224", **kw)
    with pytest.raises(DeltaTuneError, match=r"file: timm/deit_tiny_patch16_224.fb_in1k; model: timm/vit_tiny"):
        deltatune.load_delta(vit, tmp_path / "deit.safetensors")
    assert not delta_modules(vit)


# ---- a file cannot hang or exhaust the loader ----


def test_catastrophic_regex_in_a_file_is_refused_fast(saved) -> None:
    _, path = saved
    edit_stage(path, lambda s: s["options"].update(target_modules="((.+)+)+Z"))
    refused(path, "target_modules")


def test_catastrophic_regex_in_an_old_file_is_refused_fast(saved, tmp_path: Path) -> None:
    _, path = saved
    meta, tensors = read_raw(path)
    stages = json.loads(meta["stages"])
    stages[0]["options"]["target_modules"] = "((.+)+)+Z"
    old = {**{k: v for k, v in meta.items() if k != "digest"}, "format_version": "1", "stages": json.dumps(stages)}
    save_file(tensors, tmp_path / "old.safetensors", metadata=old)
    refused(tmp_path / "old.safetensors", "nests repeats")


def test_catastrophic_regex_in_the_api_is_refused_fast() -> None:
    with deadline(5), pytest.raises(DeltaTuneError, match="nests repeats"):
        deltatune.apply(make_backbone("vit"), "lora", target_modules="((.+)+)+Z")


@pytest.mark.parametrize(
    "method,option,value", [("lora", "r", 1_000_000), ("adapter", "hidden", 10**7), ("prefix", "num_tokens", 10**8)]
)
def test_huge_sizes_in_a_file_allocate_nothing(tmp_path: Path, method: str, option: str, value: int) -> None:
    path = tmp_path / "d.safetensors"
    deltatune.save_delta(deltatune.apply(make_backbone("vit"), method), path)
    edit_stage(path, lambda s: s["options"].update({option: value}))
    refused(path, "does not match the deltas its own metadata describes")


# ---- one error type ----


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"r": 8.0}, "option r must be an integer, got 8.0"),
        ({"r": "8"}, "option r must be an integer, got '8'"),
        ({"r": True}, "option r must be an integer, got True"),
        ({"alpha": "16"}, "option alpha must be a number"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"target_modules": 5}, "target_modules must be a string or a list of strings or None"),
        ({"target_modules": "("}, "is not a valid regular expression"),
    ],
)
def test_wrong_option_types_are_delta_tune_errors(options: dict, fragment: str) -> None:
    model = make_backbone("vit")
    with pytest.raises(DeltaTuneError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        deltatune.apply(model, "lora", **options)
    with pytest.raises(DeltaTuneError):
        deltatune.LoRAConfig(**options)
    assert_plain(model)


def test_int_is_accepted_for_float() -> None:
    assert deltatune.LoRAConfig(alpha=16) == deltatune.LoRAConfig(alpha=16.0)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.pop("options"),
        lambda s: s.pop("method"),
        lambda s: s.update(stage="0"),
        lambda s: s["options"].update(r=8.5),
        lambda s: s["options"].update(dropout="0.1"),
        lambda s: s["options"].update(target_modules=5),
        lambda s: s["options"].update(unknown=1),
        lambda s: s.update(options=[[[[[]]]]]),
    ],
)
def test_bad_metadata_is_a_delta_tune_error(saved, edit) -> None:
    _, path = saved
    edit_stage(path, edit)
    refused(path, "")


def test_deeply_nested_metadata_is_a_delta_tune_error(saved) -> None:
    _, path = saved
    meta, tensors = read_raw(path)
    resign(path, {**meta, "stages": "[" * 100_000 + "]" * 100_000}, tensors)
    refused(path, "corrupt deltatune metadata")


def test_directory_and_device_are_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(DeltaTuneError, match="is a directory"):
        deltatune.load_delta(make_backbone("vit"), tmp_path)
    with pytest.raises(DeltaTuneError, match="is not a regular file"):
        deltatune.load_delta(make_backbone("vit"), "/dev/null")


# ---- files and threads ----


def test_delta_files_follow_the_umask(saved, tmp_path: Path) -> None:
    model, _ = saved
    old = os.umask(0o027)
    try:
        deltatune.save_delta(model, tmp_path / "mode.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "mode.safetensors").stat().st_mode & 0o777 == 0o640


def test_saving_replaces_a_symlink_not_its_target(saved, tmp_path: Path) -> None:
    model, _ = saved
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    deltatune.save_delta(model, link)
    assert target.read_text() == "keep me" and not link.is_symlink()
    deltatune.load_delta(make_backbone("vit"), link)


def test_apply_from_two_threads_keeps_both_stages(monkeypatch) -> None:
    model = make_backbone("vit")
    slow = deltatune.SSFConfig.apply

    def slow_apply(self, *args):
        time.sleep(0.2)  # both threads would read the same state and stage without the lock
        return slow(self, *args)

    monkeypatch.setattr(deltatune.SSFConfig, "apply", slow_apply)
    threads = [threading.Thread(target=deltatune.apply, args=(model, m)) for m in ("ssf", "bitfit")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stages = sorted((e.config.name, e.stage) for e in model._deltatune.entries)
    assert [s for _, s in stages] in ([0, 1], [1, 0]) and {n for n, _ in stages} == {"ssf", "bitfit"}


# ---- save_delta from the Python API (issue 12 item 9) ----


def test_save_delta_stores_prefix_tuning_folded(tmp_path: Path) -> None:
    model = deltatune.apply(make_backbone("vit"), "prefix")
    perturb_deltas(model)
    deltatune.save_delta(model, tmp_path / "prefix.safetensors")
    _, tensors = read_raw(tmp_path / "prefix.safetensors")
    assert not any("prefix_mlp" in k for k in tensors)
    assert {tuple(v.shape) for k, v in tensors.items() if not k.startswith("head.")} == {(2, 6, 64)}
    fresh = deltatune.load_delta(make_backbone("vit"), tmp_path / "prefix.safetensors")
    x = make_input("vit")
    with torch.no_grad():
        assert rel_err(run(fresh, x), run(model, x)) < 1e-6  # the reference is the unfolded training model
    assert any("prefix_mlp" in n for n, _ in model.named_parameters())  # the caller's model keeps training as was


def test_save_after_merge_keeps_what_is_still_a_delta(tmp_path: Path) -> None:
    model = deltatune.apply(make_backbone("vit"), ["bitfit", "adapter"])
    perturb_deltas(model)
    with pytest.warns(UserWarning, match="cannot be merged"):
        deltatune.merge(model)
    deltatune.save_delta(model, tmp_path / "merged.safetensors")
    fresh = deltatune.load_delta(make_backbone("vit"), tmp_path / "merged.safetensors")
    x = make_input("vit")
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(model, x))
    lora = deltatune.merge(deltatune.apply(make_backbone("vit"), ["lora", "adapter"]))
    with pytest.raises(DeltaTuneError, match=r"merge\(\) folded lora into the backbone's weights"):
        deltatune.save_delta(lora, tmp_path / "x.safetensors")
