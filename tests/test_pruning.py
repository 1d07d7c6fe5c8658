"""MiMi pruning: scores by hand, exact global counts, real shrinking, removal, save/load, optimizer state."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_backbone, make_input, run
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import deltatune
from deltatune import DeltaTuneError
from deltatune.methods.adapter import Adapter
from deltatune.methods.pruning import activation_scores, adapter_sizes, adapters, neuron_scores, resize_adapters


def test_mimi_score_matches_hand_computation() -> None:
    adapter = Adapter(nn.Linear(3, 2), hidden=2, act="gelu", bias=False, init_std=0.02)
    with torch.no_grad():
        adapter.adapter_down.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
        adapter.adapter_up.weight.copy_(torch.tensor([[3.0, 0.0], [-1.0, 4.0]]))
    # neuron 0: |1| + |-2| (down row) + |3| + |-1| (up column) = 7, over d_in + d_out = 4
    # neuron 1: 0.5 + 0 + 0 + 4 = 4.5
    assert torch.allclose(neuron_scores(adapter, "mimi"), torch.tensor([7 / 4, 4.5 / 4]))
    assert torch.allclose(neuron_scores(adapter, "l1"), torch.tensor([7.0, 4.5]))


def test_normalisation_changes_the_global_ranking_across_widths() -> None:
    model = deltatune.apply(make_backbone("swin"), "mimi", sigma=4)  # widths 16 and 32: hidden 16 and 32
    found = adapters(model)
    with torch.no_grad():
        for _, a in found:
            a.adapter_down.weight.fill_(1.0)
            a.adapter_up.weight.fill_(1.0)
    # l1 favours the wider stage (bigger sums); mimi's normalisation makes all neurons equal (ties keep order)
    sizes_l1 = deltatune.prune_adapters(make_copy(model), 0.5, score="l1")
    assert all(v == 0 for k, v in sizes_l1.items() if k.startswith("layers.0"))
    sizes_mimi = deltatune.prune_adapters(model, 0.5, score="mimi")
    assert any(v > 0 for k, v in sizes_mimi.items() if k.startswith("layers.0"))


def make_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.77, 1.0])
def test_global_keeps_exactly_the_expected_count(amount: float) -> None:
    torch.manual_seed(0)
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=16)
    scores = torch.cat([neuron_scores(a, "mimi") for _, a in adapters(model)])
    total = scores.numel()
    keep = math.floor(total * (1 - amount) + 1e-9)  # the official MiMi code floors the kept count
    top = torch.sort(scores, descending=True).values[:keep]
    sizes = deltatune.prune_adapters(model, amount)
    assert sum(sizes.values()) == keep
    remaining = torch.cat([neuron_scores(a, "mimi") for _, a in adapters(model)]) if keep else torch.empty(0)
    assert torch.allclose(torch.sort(remaining, descending=True).values, top)  # the top-k survive, none else
    params = sum(a.adapter_down.weight.numel() + a.adapter_up.weight.numel() for _, a in adapters(model))
    assert params == 2 * model.embed_dim * keep  # matrices really shrank
    assert deltatune.trainable_parameters(model) == params + sum(p.numel() for p in model.head.parameters())


def test_cumulative_amounts_and_pruned_neurons_stay_pruned() -> None:
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=8)
    total = 8 * len(adapters(model))
    for amount in (0.5, 0.75, 0.875):
        assert sum(deltatune.prune_adapters(model, amount).values()) == round(total * (1 - amount))
    with torch.no_grad():  # a lower amount later cannot grow adapters back
        assert sum(deltatune.prune_adapters(model, 0.2).values()) == round(total * 0.125)


def test_local_scope_prunes_the_same_fraction_everywhere() -> None:
    model = deltatune.apply(make_backbone("swin"), "mimi", sigma=4)
    original = {a.site: a.original_hidden for _, a in adapters(model)}
    sizes = deltatune.prune_adapters(model, 0.75, scope="local")
    assert sizes == {k: round(v * 0.25) for k, v in original.items()}


def test_zero_neurons_prune_without_changing_outputs() -> None:
    torch.manual_seed(0)
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=6, init_std=0.5)
    with torch.no_grad():
        for _, a in adapters(model):
            a.adapter_down.weight[:2] = 0
            a.adapter_up.weight[:, :2] = 0
    x = make_input("vit")
    with torch.no_grad():
        before = run(model, x)
        sizes = deltatune.prune_adapters(model, 2 / 6)
        assert set(sizes.values()) == {4}
        assert torch.allclose(run(model, x), before, atol=1e-6)


def test_removed_adapter_is_identity_and_shrinks_flops(tmp_path) -> None:
    torch.manual_seed(0)
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=8, init_std=0.3)
    x = make_input("vit")
    with FlopCounterMode(display=False) as full:
        run(model, x)
    with torch.no_grad():
        a = model.blocks[0].mlp.fc2
        a.adapter_down.weight.mul_(1e-3)  # make this adapter the weakest
        a.adapter_up.weight.mul_(1e-3)
    sizes = deltatune.prune_adapters(model, 1 / len(adapters(model)))
    assert sizes["blocks.0.mlp.fc2"] == 0 and isinstance(model.blocks[0].mlp.fc2, nn.Linear)
    sizes = deltatune.prune_adapters(model, 0.75)
    with FlopCounterMode(display=False) as pruned, torch.no_grad():  # as loaded runs below: the same path
        out = run(model, x)
    assert pruned.get_total_flops() < full.get_total_flops()
    path = tmp_path / "pruned.safetensors"
    deltatune.save_delta(model, path)
    assert deltatune.read_metadata(path)["stages"][0]["options"]["hidden_sizes"] == sizes
    loaded = deltatune.load_delta(make_backbone("vit"), path)
    assert {a.site: a.hidden for _, a in adapters(loaded)} == {k: v for k, v in sizes.items() if v}
    with torch.no_grad():
        assert torch.equal(run(loaded, x), out)


def test_optimizer_state_follows_surviving_neurons() -> None:
    torch.manual_seed(0)
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=6, bias=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        run(model, make_input("vit")).square().mean().backward()
        opt.step()
    a = model.blocks[1].attn.proj
    scores = neuron_scores(a, "mimi")
    before = {name: opt.state[p]["exp_avg"].clone() for name, p in a.named_parameters() if "adapter" in name}
    deltatune.prune_adapters(model, 0.5, optimizer=opt)
    keep = torch.sort(torch.argsort(scores, descending=True)[: a.hidden]).values
    assert torch.equal(opt.state[a.adapter_down.weight]["exp_avg"], before["adapter_down.weight"][keep])
    assert torch.equal(opt.state[a.adapter_down.bias]["exp_avg"], before["adapter_down.bias"][keep])
    assert torch.equal(opt.state[a.adapter_up.weight]["exp_avg"], before["adapter_up.weight"][:, keep])
    assert torch.equal(opt.state[a.adapter_up.bias]["exp_avg"], before["adapter_up.bias"])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    opt.zero_grad()
    run(model, make_input("vit")).square().mean().backward()
    opt.step()  # the optimizer works with the new shapes


def test_other_scores_and_errors() -> None:
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=4)
    with pytest.raises(DeltaTuneError, match="needs gradients"):
        deltatune.prune_adapters(model, 0.5, score="grad")
    with pytest.raises(DeltaTuneError, match="needs inputs"):
        deltatune.prune_adapters(model, 0.5, score="activation")
    with pytest.raises(DeltaTuneError, match="amount must be in"):
        deltatune.prune_adapters(model, 1.5)
    with pytest.raises(DeltaTuneError, match="no adapters"):
        deltatune.prune_adapters(deltatune.apply(make_backbone("vit"), "ssf"), 0.5)
    x = make_input("vit")
    sizes = deltatune.prune_adapters(model, 0.5, score="activation", inputs=lambda: run(model, x))
    assert sum(sizes.values()) == 2 * len(sizes)
    run(model, x).square().mean().backward()
    assert sum(deltatune.prune_adapters(model, 0.75, score="grad").values()) == len(sizes)
    assert sum(deltatune.prune_adapters(model, 0.875, score="random").values()) == round(len(sizes) / 2)


def test_mimi_schedule() -> None:
    cfg = deltatune.MiMiConfig(sigma=4, rho=0.5, target_sigma=32)
    assert cfg.schedule(1000) == [0.5, 0.75, 0.875]
    assert deltatune.MiMiConfig(rho=0.5, target_params=300).schedule(1000) == pytest.approx([0.5, 0.7])
    with pytest.raises(DeltaTuneError, match="rho must be in"):
        deltatune.MiMiConfig(rho=1.0)
    with pytest.raises(DeltaTuneError, match="unknown score"):
        deltatune.MiMiConfig(score="magnitude")
    assert deltatune.MiMiConfig(phases=4).schedule(1000) == pytest.approx([0.5, 0.75, 0.875])  # rho derived: 0.5
    with pytest.raises(DeltaTuneError, match="phases must be"):
        deltatune.MiMiConfig(phases=0)


def test_activation_score_is_the_mean_over_every_batch() -> None:
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=4)
    found = adapters(model)
    a, b = make_input("vit"), 3 * make_input("vit")
    both = activation_scores(found, lambda: (run(model, a), run(model, b)))
    single = [activation_scores(found, lambda x=x: run(model, x)) for x in (a, b)]
    for name, _ in found:  # equal batch shapes: the mean over both is the mean of the two means
        torch.testing.assert_close(both[name], (single[0][name] + single[1][name]) / 2)


def test_resize_adapters_restores_recorded_sizes_and_removals() -> None:
    pruned = deltatune.apply(make_backbone("vit"), "adapter", hidden=4)
    deltatune.prune_adapters(pruned, 0.8)
    sizes = adapter_sizes(pruned)
    assert 0 in sizes.values() and sum(sizes.values()) == math.floor(0.2 * 4 * len(sizes))  # floor(9.6) = 9
    fresh = deltatune.apply(make_backbone("vit"), "adapter", hidden=4)
    resize_adapters(fresh, sizes)
    assert adapter_sizes(fresh) == sizes and adapter_sizes(fresh, original=True) == dict.fromkeys(sizes, 4)
    assert {k: v.shape for k, v in deltatune.delta_state_dict(fresh).items()} == {
        k: v.shape for k, v in deltatune.delta_state_dict(pruned).items()
    }
    with pytest.raises(DeltaTuneError, match="cannot grow"):
        resize_adapters(fresh, {next(n for n, v in sizes.items() if v): 5})


def test_random_score_differs_between_adapters_of_the_same_shape() -> None:
    model = deltatune.apply(make_backbone("vit"), "adapter", hidden=16)
    scores = [neuron_scores(a, "random", seed=3) for _, a in adapters(model)]
    assert len(scores) >= 4 and all(not torch.equal(scores[0], s) for s in scores[1:])
    assert torch.equal(scores[1], neuron_scores(adapters(model)[1][1], "random", seed=3))  # reproducible
