"""The training loop: every method learns, the report's numbers hold, NaN stops cleanly, text models train."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from tiny_run import save_word_bert, tiny_config

import deltatune
from deltatune.backbones import create_backbone
from deltatune.data import Data, TensorImages, load_data
from deltatune.train.loop import cosine_lr, make_optimizer, train
from deltatune.train.report import count_gflops, format_table
from deltatune.train.state import read_info


def _plain_test_vit(num_classes: int = 4) -> torch.nn.Module:
    return timm.create_model("test_vit", pretrained=False, num_classes=num_classes, img_size=32, patch_size=8)


# method -> the tiny backbones its loss test trains on: "vit" is tiny_config's random-init test_vit, "bert" the
# text_model fixture. "linear" trains only the head, which the loss test freezes: test_linear_trains_only_the_head
# covers it. "full" trains every weight, the head included, by definition. Prompt tuning on BERT (and prefix tuning and
# adapters there) do not move this keyword task's loss through a frozen classifier in 8 epochs (they passed before only
# because the head trained); their frozen-head loss test is test_family's test_trains_then_save_load_reproduces_outputs
# on the wider-weight BERT.
LOSS_BACKBONES: dict[str, tuple[str, ...]] = {
    "adapter": ("vit",),
    "adaptformer": ("vit",),
    "attn-only": ("vit",),
    "bitfit": ("vit",),
    "compacter": ("vit",),
    "fact-tk": ("vit",),
    "fact-tt": ("vit",),
    "full": ("vit",),
    "ia3": ("vit",),
    "layernorm": ("vit",),
    "lora": ("vit", "bert"),
    "mimi": ("vit",),
    "mlp-only": ("vit",),
    "phm-adapter": ("vit",),
    "prefix": ("vit",),
    "ssf": ("vit", "bert"),
    "vpt-deep": ("vit",),
    "vpt-shallow": ("vit",),
}


LOSS_OPTIONS: dict[str, dict] = {"phm-adapter": {"n": 4}}  # the official n = 12 divides no tiny width


def test_every_method_has_a_loss_test() -> None:
    assert set(LOSS_BACKBONES) | {"linear", "prompt"} == set(deltatune.methods())


@pytest.fixture
def wide_frozen_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """train() builds timm backbones whose fresh head is N(0, 0.5), as conftest.make_backbone does: a frozen head at
    timm's 0.02 scale passes so little signal back that bitfit or VPT cannot move the loss in a few steps."""
    from deltatune.train import setup as training

    def create(*args: object, **kwargs: object) -> torch.nn.Module:
        model = create_backbone(*args, **kwargs)
        if not hasattr(model, "get_classifier"):  # the text model: its trained classifier stays as it is
            return model
        head = model.get_classifier()
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        return model

    monkeypatch.setattr(training, "create_backbone", create)


@pytest.mark.parametrize(("method", "backbone"), [(m, b) for m, bs in LOSS_BACKBONES.items() for b in bs])
def test_every_method_reduces_the_loss(
    method: str, backbone: str, tmp_path: Path, text_model: dict, wide_frozen_head: None
) -> None:
    """With the head frozen (``train_head=False``) the loss can only fall through the method's own deltas."""
    cfg = tiny_config(tmp_path, method=method, epochs=4, max_train_samples=128, max_eval_samples=64, eval_every=0)
    cfg |= {"threads": 1, "checkpoint_every": 0, "train_head": False, "method_options": LOSS_OPTIONS.get(method, {})}
    if backbone == "bert":
        cfg |= {**text_model, "epochs": 8, "lr": 1e-2}
    report = train(cfg)
    losses = [h["train_loss"] for h in report["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    head = {k for k in load_file(report["delta_path"]) if k.startswith(("head.", "classifier."))}
    assert method == "full" or not head, f"the head was frozen but the delta file holds {sorted(head)}"


def test_linear_trains_only_the_head(tmp_path: Path) -> None:
    """The linear probe's loss falls through the head alone: the head (64 -> 4) is all that trains and is saved."""
    report = train(tiny_config(tmp_path, method="linear", epochs=3, max_train_samples=128, eval_every=0, threads=1))
    losses = [h["train_loss"] for h in report["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    saved = load_file(report["delta_path"])
    assert sorted(saved) == ["head.bias", "head.weight"] and report["trainable_params"] == 4 * 64 + 4


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_gflops_are_the_plain_backbone_plus_the_deltas_closed_form(method: str) -> None:
    """Unmerged GFLOPs = the plain backbone's + per site 2 * tokens * (d h + h d) (adapter) or 2 * tokens * r *
    (in + out) (LoRA). The fast paths hid FLOPs: the adapter's in-place up-projection was not counted at all."""
    x = torch.zeros(1, 3, 32, 32)
    plain = count_gflops(_plain_test_vit(), x) * 1e9
    options = {"hidden": 5} if method == "adapter" else {"r": 3, "target_modules": "all-linear"}
    model = deltatune.apply(_plain_test_vit(), method, **options)
    tokens = (32 // 8) ** 2 + 1  # patches and the class token, for one image
    extra = 0
    for module in model.modules():
        if hasattr(module, "adapter_down"):
            extra += 2 * tokens * 2 * module.adapter_down.in_features * module.adapter_down.out_features
        if hasattr(module, "lora_a"):
            r, n_in = module.lora_a.shape
            extra += 2 * tokens * r * (n_in + module.lora_b.shape[1])
    assert extra > 0
    assert count_gflops(model, x) * 1e9 == pytest.approx(plain + extra, rel=1e-12)


@pytest.mark.parametrize("method", ["ssf", "lora", "bitfit", "adapter"])
def test_report_numbers_are_consistent(method: str, tmp_path: Path) -> None:
    report = train(tiny_config(tmp_path, method=method, epochs=1, threads=1, benchmark_seconds=0.05))
    path = Path(report["delta_path"])
    assert report["delta_bytes"] == path.stat().st_size
    fresh = _plain_test_vit()
    backbone_params = sum(p.numel() for p in fresh.parameters())
    deltatune.load_delta(fresh, path, check_backbone="shapes")  # a random init, not the run's
    assert report["trainable_params"] == deltatune.trainable_parameters(fresh)
    assert report["backbone_params"] == backbone_params
    assert report["trainable_pct"] == pytest.approx(100 * report["trainable_params"] / backbone_params)
    plain_gflops = count_gflops(_plain_test_vit(), torch.zeros(1, 3, 32, 32))
    assert report["gflops_backbone"] == pytest.approx(plain_gflops, rel=1e-12)
    if method == "adapter":  # cannot merge: extra matmuls stay, and the report says so
        assert report["gflops_merged"] > plain_gflops and report["unmerged"]
    else:
        assert report["gflops_merged"] == pytest.approx(plain_gflops, rel=1e-12) and not report["unmerged"]
        assert report["merge_agreement"] == 1.0 and report["merge_max_logit_diff"] < 1e-4
    if method == "lora":  # the unmerged branch costs FLOPs (SSF's elementwise ops are not counted by torch)
        assert report["gflops"] > report["gflops_merged"]
    assert report["images_per_s"] > 0
    assert json.loads((tmp_path / "report.json").read_text())["delta_bytes"] == report["delta_bytes"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1] and log[0]["eval_top1"] == report["top1"]
    assert method in format_table([report])


def test_ema_tracks_the_weights(tmp_path: Path) -> None:
    report = train(tiny_config(tmp_path, method="ssf", epochs=2, ema_decay=0.5, threads=1))
    ema = load_file(tmp_path / "delta_ema.safetensors")
    raw = load_file(tmp_path / "delta.safetensors")
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert "ema_top1" in report  # its value is pinned against an uninterrupted run in test_resume


class _PoisonAfterOneEpoch(TensorImages):
    """Serves NaN images once every item has been read once (i.e. from the second epoch on)."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads = getattr(self, "reads", 0) + 1
        image, label = super().__getitem__(i)
        return (image * math.nan if self.reads > len(self) else image), label


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    clean = load_data("synthetic", image_size=32)
    poisoned = Data(_PoisonAfterOneEpoch(clean.train.images, clean.train.labels), clean.eval, clean.num_classes)
    with pytest.raises(deltatune.DeltaTuneError, match=r"diverged at epoch 2.*last good checkpoint"):
        train(tiny_config(tmp_path, epochs=3, threads=1), data=poisoned)
    ckpt = tmp_path / "checkpoint.safetensors"
    assert read_info(ckpt)["info"]["epoch"] == 1
    tensors = load_file(ckpt)
    assert all(torch.isfinite(t.float()).all() for k, t in tensors.items() if k.startswith("model/"))


def test_no_weight_decay_on_1d_parameters() -> None:
    model = deltatune.apply(_plain_test_vit(), ["ssf", "lora"])
    groups = make_optimizer(model, 1e-3, 0.05).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed and all(p.ndim > 1 for g in groups if g["weight_decay"] > 0 for p in g["params"])
    assert not any("ssf" in names[i] or names[i].endswith("bias") for i in decayed)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_cosine_schedule_with_warmup() -> None:
    lrs = [cosine_lr(s, 100, 10, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-5)
    assert lrs[55] == pytest.approx((1e-3 + 1e-5) / 2)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def _pretrain_tiny_bert(model: torch.nn.Module, good: int, bad: int, vocab: int, steps: int = 80) -> None:
    """A few full fine-tuning steps on "is 'good', 'bad' or neither in the sentence?": a backbone with features."""
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(bad + 1, vocab, (64, 8), generator=gen)
        labels = torch.randint(0, 3, (64,), generator=gen)
        pos = torch.randint(1, 7, (64,), generator=gen)
        ids[labels == 1, pos[labels == 1]] = good
        ids[labels == 2, pos[labels == 2]] = bad
        ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny BERT (briefly pretrained, then given a fresh 2-class head) with a word-level tokenizer saved to disk,
    and a keyword task: label 'pos' iff 'good' occurs in the sentence."""
    root = tmp_path_factory.mktemp("text")
    words = ["good", "bad", "movie", "plot", "actor", "scene", "long", "short", "film", "music", "the", "a"]
    model_dir = root / "bert"
    model = save_word_bert(model_dir, words, num_labels=3, max_positions=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and much faster on a busy machine
    _pretrain_tiny_bert(model, good=5, bad=6, vocab=len(words) + 5)
    torch.set_num_threads(threads)
    model.config.num_labels = 2
    model.num_labels, model.classifier = 2, torch.nn.Linear(32, 2)
    model.save_pretrained(model_dir)
    rng = random.Random(0)
    others = words[1:]
    for split, n in (("train", 192), ("test", 64)):
        rows = []
        for i in range(n):
            sentence = [rng.choice(others) for _ in range(6)]
            if i % 2:
                sentence[rng.randrange(6)] = "good"
            rows.append({"text": " ".join(sentence), "label": "pos" if i % 2 else "neg"})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model": f"hf:{model_dir}",
        "pretrained": True,
        "dataset": "text",
        "data_dir": str(root),
        "max_length": 16,
        "img_size": None,
        "model_kwargs": {},
        "lr": 5e-3,
    }


def test_text_model_trains_with_lora(tmp_path: Path, text_model: dict) -> None:
    report = train(tiny_config(tmp_path, **text_model, method="lora", epochs=6, threads=1, benchmark_seconds=0.05))
    assert report["top1"] >= 90.0, report["history"]
    assert report["gflops"] > report["gflops_merged"] == pytest.approx(report["gflops_backbone"])
    assert report["merge_agreement"] == 1.0


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("unpickled!",))


def test_local_checkpoint_loads_without_unpickling_objects(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from deltatune.backbones import create_backbone

    source = _plain_test_vit(num_classes=7)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = create_backbone("test_vit", 4, checkpoint=str(tmp_path / name), img_size=32, patch_size=8)
        assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
        assert model.head.weight.shape == (4, 64)  # a fresh head for the new task
    torch.save({"state_dict": source.state_dict(), "extra": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(deltatune.DeltaTuneError, match="weights_only"):
        create_backbone("test_vit", 4, checkpoint=str(tmp_path / "evil.pth"), img_size=32, patch_size=8)
    with pytest.raises(deltatune.DeltaTuneError, match="does not exist"):
        create_backbone("test_vit", 4, checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(deltatune.DeltaTuneError, match="unknown timm model 'vit_nonexistent'"):
        create_backbone("vit_nonexistent", 4)


def test_prefix_run_stores_the_folded_prefixes_not_the_training_mlp(tmp_path: Path) -> None:
    report = train(tiny_config(tmp_path, method="prefix", epochs=1, threads=1, ema_decay=0.9))
    for name in ("delta.safetensors", "delta_ema.safetensors"):
        tensors = load_file(tmp_path / name)
        prefix = [v.shape for k, v in tensors.items() if not k.startswith("head.")]
        assert prefix and set(prefix) == {(2, 6, 64)}, name  # test_vit: one (2, p, d) per block, no MLP
    stored = sum(v.numel() for v in load_file(tmp_path / "delta.safetensors").values())
    assert stored < report["trainable_params"] / 10  # the MLP (6 x 512 + 512 x 512 + ...) trains but is not kept
    fresh = _plain_test_vit()
    deltatune.load_delta(fresh, report["delta_path"], check_backbone="shapes")  # another random init
    assert deltatune.trainable_parameters(fresh) == stored


@pytest.mark.parametrize("bn_stats", ["frozen", "delta"])
def test_bn_stats_option_on_the_batchnorm_cnn(bn_stats: str, tmp_path: Path) -> None:
    """--bn-stats frozen: the running statistics after training are the backbone's and stay out of the delta file;
    delta: training moved them and the file holds the trained ones."""
    from deltatune.core import batchnorm_statistics
    from deltatune.train import loop as training
    from deltatune.train.config import TrainConfig
    from deltatune.train.setup import build_model

    cfg = tiny_config(tmp_path, model="test_resnet", model_kwargs={}, method="bitfit", epochs=1, threads=1)
    cfg |= {"bn_stats": bn_stats, "max_train_samples": 64, "img_size": None}
    backbone = batchnorm_statistics(build_model(TrainConfig.from_dict(cfg), 4))
    kept: dict = {}
    real = training._write_outputs
    with pytest.MonkeyPatch.context() as m:
        m.setattr(training, "_write_outputs", lambda p, *a: (kept.setdefault("model", p.model), real(p, *a)))
        train(cfg)
    after = batchnorm_statistics(kept["model"])
    saved = load_file(tmp_path / "delta.safetensors")
    stats = [n for n in after if n.endswith(("running_mean", "running_var"))]
    assert stats and after.keys() == backbone.keys()
    if bn_stats == "frozen":
        assert all(torch.equal(after[n], backbone[n]) for n in after)
        assert not any(n in saved for n in stats)
    else:
        assert all(not torch.equal(after[n], backbone[n]) for n in stats)
        assert all(torch.equal(saved[n], after[n]) for n in stats)
