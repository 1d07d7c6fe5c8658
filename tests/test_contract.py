"""Every registered method on every tiny backbone: what trains, gradients, merge exactness, save/load."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ALL_BACKBONES, make_backbone, make_input, perturb_deltas, rel_err, run

import deltatune
from deltatune.checkpoint import stored_form
from deltatune.core import delta_modules, delta_state_dict
from deltatune.registry import make_config
from deltatune.targeting import supports

OPTIONS = {"phm-adapter": {"n": 4}}  # the official n = 12 divides none of the tiny widths


def _not_applicable() -> set[tuple[str, str]]:
    """(method, backbone) pairs that the method declares it does not support: apply must raise DeltaTuneError."""
    models = {k: make_backbone(k) for k in ALL_BACKBONES}
    configs = {m: make_config(m, **OPTIONS.get(m, {})) for m in deltatune.methods()}
    return {(m, k) for m, c in configs.items() for k, model in models.items() if not supports(c, model)}


NOT_APPLICABLE = _not_applicable()
CASES = [(m, k) for m in deltatune.methods() for k in ALL_BACKBONES if (m, k) not in NOT_APPLICABLE]


def tuned(method: str, kind: str):
    return deltatune.apply(make_backbone(kind), method, **OPTIONS.get(method, {}))


def modes(model: torch.nn.Module) -> set[bool]:
    """The train/eval flags found on the model's modules."""
    return {m.training for m in model.modules()}


@pytest.mark.parametrize("method,kind", sorted(NOT_APPLICABLE))
def test_not_applicable_raises_and_leaves_model_plain(method: str, kind: str) -> None:
    model = make_backbone(kind)
    with pytest.raises(deltatune.DeltaTuneError):
        deltatune.apply(model, method)
    assert not delta_modules(model) and "_deltatune" not in model.__dict__


@pytest.mark.parametrize("method,kind", CASES)
def test_only_deltas_and_head_train_and_all_get_gradients(method: str, kind: str) -> None:
    model, x = make_backbone(kind), make_input(kind)
    with torch.no_grad():
        plain = run(model, x)
    deltatune.apply(model, method, **OPTIONS.get(method, {}))
    if getattr(make_config(method), "identity_at_init", False):
        with torch.no_grad():
            assert rel_err(run(model, x), plain) <= 1e-6  # the method promises an unchanged output at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = deltatune.delta_state_dict(model)
    bn_stats = {n for n, _ in model.named_buffers() if n.rpartition(".")[2] in ("running_mean", "running_var")}
    bn_stats |= {n for n, _ in model.named_buffers() if n.endswith("num_batches_tracked")}
    assert trainable == set(saved) - bn_stats and bn_stats <= set(saved)  # BatchNorm statistics: part of the delta
    assert deltatune.trainable_parameters(model) == sum(saved[n].numel() for n in trainable)
    perturb_deltas(model)
    run(model, make_input(kind)).square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_matches_unmerged(method: str, kind: str) -> None:
    model = tuned(method, kind)
    plain_names = dict(make_backbone(kind).named_parameters())
    plain_count = sum(p.numel() for p in plain_names.values())
    perturb_deltas(model)
    x = make_input(kind)
    with torch.no_grad():
        before = run(model, x)
        assert torch.equal(run(model, x), before)  # an eval model is deterministic (dropouts follow the mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            deltatune.merge(model)
        after = run(model, x)
    assert rel_err(after, before) <= 1e-5
    mergeable = deltatune.registry.config_class(method).mergeable
    if mergeable:  # everything folds but the wrappers that declare no fold exists (ConvNeXt's feature-map SSF)
        kept = {n: m for n, m in delta_modules(model)}
        assert all(getattr(m, "mergeable", True) is False for m in kept.values())
        extra = sum(p.numel() for m in kept.values() for p in m.delta_parameters())
        inside_kept = {n for n, _ in model.named_parameters() if any(n.startswith(k + ".") for k in kept)}
        added = set(dict(model.named_parameters())) - set(plain_names) - inside_kept
        assert all(n.endswith(".bias") for n in added)  # SSF's fold gives bias-free convs a bias
        assert sum(p.numel() for n, p in model.named_parameters() if n not in added) == plain_count + extra
        layout = {n: type(m) for n, m in make_backbone(kind).named_modules()}
        plain = {n: t for n, t in layout.items() if n not in kept}
        inside = {n for n, _ in model.named_modules() for k in kept if n == k or n.startswith(k + ".")}
        outside = {n: type(m) for n, m in model.named_modules() if n not in inside}
        assert outside == plain  # the plain architecture, module for module, outside the kept wrappers
        assert {n: type(m.base) for n, m in kept.items()} == {n: layout[n] for n in kept}
        assert all(f"{n} ({m.delta_method})" in str(w.message) for n, m in kept.items() for w in caught)
        assert len(caught) == (1 if kept else 0)
    else:
        assert delta_modules(model)
        assert any("cannot be merged" in str(w.message) for w in caught)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deltatune.merge(model)  # merging twice changes nothing
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method,kind", CASES)
def test_save_load_reproduces_outputs(method: str, kind: str, tmp_path) -> None:
    model = tuned(method, kind)
    assert modes(model) == {False}  # apply on an eval model leaves every module, wrappers included, in eval mode
    perturb_deltas(model)
    stored = stored_form(model)  # what a delta file holds: prefix tuning's MLP folded into each layer's prefixes
    path = tmp_path / "delta.safetensors"
    size = deltatune.save_delta(model, path)
    assert size == path.stat().st_size
    fresh = deltatune.load_delta(make_backbone(kind), path)
    assert modes(fresh) == {False}
    x = make_input(kind)
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(stored, x))
    params = dict(stored.named_parameters())  # the file's tensors but BatchNorm statistics (buffers) train
    saved = sum(t.numel() for n, t in delta_state_dict(stored).items() if n in params)
    assert deltatune.trainable_parameters(fresh) == saved
    assert deltatune.summary(fresh).split("trainable now")[0] == deltatune.summary(stored).split("trainable now")[0]


@pytest.mark.parametrize("method,kind", CASES)
def test_wrappers_follow_a_training_model(method: str, kind: str) -> None:
    model = make_backbone(kind).train()
    deltatune.apply(model, method, **OPTIONS.get(method, {}))
    assert modes(model) == {True}
    model.eval()
    assert modes(model) == {False}
