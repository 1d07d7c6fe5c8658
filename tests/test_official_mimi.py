"""Official MiMi checkpoints (IemProg/MiMi naming, pruned by masking) load as real, shrunk deltatune adapters whose
outputs equal the plain timm model run in float64 with the official adapter ``x + fc2(GELU(fc1(x)))`` (full,
masked matrices) hooked in where the official forward calls it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_backbone, make_input, rel_err
from torch import Tensor, nn

import deltatune
from deltatune import DeltaTuneError
from deltatune.core import delta_modules


def _official_adapter(x: Tensor, fc1: Tensor, fc2: Tensor) -> Tensor:
    """The official ParallelMlp, type "series", no biases: x + fc2(GELU(fc1(x)))."""
    return x + F.linear(F.gelu(F.linear(x, fc1)), fc2)


def _owners(kind: str, model: nn.Module) -> dict[str, str]:
    """Official block owner -> timm block, written out from the official model files."""
    if kind == "swin":
        return {f"layers.{i}.blocks.{j}": f"layers.{i}.blocks.{j}" for i, s in enumerate(model.layers)
                for j in range(len(s.blocks))}  # fmt: skip
    return {f"transformer.encoder.layer.{i}": f"blocks.{i}" for i in range(len(model.blocks))}


def _official(kind: str, model: nn.Module, masks: bool = False) -> tuple[dict[str, Tensor], dict[str, tuple]]:
    """A random official-style state dict: adapters with pruned (zeroed) neurons, one adapter pruned away entirely,
    the head, and a backbone key that must be ignored. Returns it and {timm site: (fc1, fc2)} the forward uses."""
    g = torch.Generator().manual_seed(5)
    sd: dict[str, Tensor] = {"transformer.embeddings.cls_token": torch.zeros(3)}
    used = {}
    for n, (owner, block) in enumerate(_owners(kind, model).items()):
        for k, site in (("1", "attn.proj"), ("2", "mlp.fc2")):
            d = model.get_submodule(f"{block}.{site}").out_features
            h = max(1, (4 * d if kind == "swin" else d) // 4)  # the official start size, sigma 4
            fc1, fc2 = 0.3 * torch.randn(h, d, generator=g), 0.3 * torch.randn(d, h, generator=g)
            alive = torch.rand(h, generator=g) < 0.5
            alive[0] = True  # at least one survivor, except in block 1's MLP adapter, which loses every neuron
            if n == 1 and k == "2":
                alive[:] = False
            mask = alive.float()
            prefix = f"{owner}.parallel_mlp{k}"
            if masks:  # torch.nn.utils.prune layout: the originals and neuron masks
                sd |= {f"{prefix}.fc1.weight_orig": fc1, f"{prefix}.fc1.weight_mask": mask[:, None].expand(h, d)}
                sd[f"{prefix}.fc2.weight"] = fc2
            else:  # the official masking leaves zero rows of fc1 (some pruned neurons only a zero column of fc2)
                sd[f"{prefix}.fc1.weight"] = fc1 * mask[:, None] if n % 2 == 0 else fc1
                sd[f"{prefix}.fc2.weight"] = fc2 if n % 2 == 0 else fc2 * mask
            if kind == "swin" or k == "2":  # the official ViT forward never calls parallel_mlp1
                used[f"{block}.{site}"] = (fc1 * mask[:, None], fc2 * mask, int(alive.sum()))
    head = model.get_classifier()
    sd["head.weight"] = torch.randn(head.weight.shape, generator=g)
    sd["head.bias"] = torch.randn(head.bias.shape, generator=g)
    return sd, used


def _reference(kind: str, sd: dict[str, Tensor], used: dict[str, tuple]) -> Tensor:
    """The plain model in float64 with the official head and the official adapters (unshrunk) hooked in."""
    model = make_backbone(kind).double()
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(sd["head.weight"])
        head.bias.copy_(sd["head.bias"])
    for site, (fc1, fc2, _) in used.items():
        a, b = fc1.double(), fc2.double()
        model.get_submodule(site).register_forward_hook(lambda m, i, o, a=a, b=b: _official_adapter(o, a, b))
    with torch.no_grad():
        return model(make_input(kind).double())


@pytest.mark.parametrize("kind,masks", [("swin", False), ("vit", False), ("swin", True)])
def test_official_mimi_checkpoint_gives_the_official_forward_with_shrunk_adapters(
    kind: str, masks: bool, tmp_path: Path
) -> None:
    model = make_backbone(kind)
    sd, used = _official(kind, model, masks)
    expected = _reference(kind, sd, used)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "mimi.pth")
    tuned = deltatune.load_official(model, tmp_path / "mimi.pth").eval()
    x = make_input(kind)
    sizes = {n: m.hidden for n, m in delta_modules(tuned)}
    assert sizes == {s: n for s, (_, _, n) in used.items() if n}  # survivors only; the empty adapter is gone
    assert len(sizes) < len(used)
    with torch.no_grad():
        assert rel_err(tuned(x).double(), expected) < 1e-5
        deltatune.save_delta(tuned, tmp_path / "delta.safetensors")
        reloaded = deltatune.load_delta(make_backbone(kind), tmp_path / "delta.safetensors").eval()
        assert torch.equal(reloaded(x), tuned(x))
        with pytest.warns(UserWarning, match="cannot be merged"):  # adapters stay (a GELU between the matrices)
            assert rel_err(deltatune.merge(tuned)(x).double(), expected) < 1e-5


def test_official_mimi_parallel_types_biases_and_shapes_are_refused_untouched() -> None:
    model = make_backbone("swin")
    sd, _ = _official("swin", model)
    bad = {
        "norm3": {**sd, "layers.0.blocks.0.norm3.weight": torch.ones(16)},
        "mlp_bias": {**sd, "layers.0.blocks.0.parallel_mlp1.fc1.bias": torch.ones(16)},
        "do not fit": {**sd, "layers.0.blocks.0.parallel_mlp1.fc1.weight": torch.ones(4, 7)},
        "not a MiMi": {"head.bias": torch.ones(5)},
        "num_classes=7": {**sd, "head.weight": torch.ones(7, model.num_features)},
    }
    for message, state in bad.items():
        with pytest.raises(DeltaTuneError, match=message):
            deltatune.load_official(model, state, method="mimi")
        assert not delta_modules(model) and "_deltatune" not in model.__dict__
