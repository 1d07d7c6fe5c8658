"""Random mutations of delta files: each load either raises DeltaTuneError, leaving the model bit-identical to the
plain backbone, or gives exactly the outputs of the unmutated file. Seeded; a few hundred cases."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_backbone, make_input, perturb_deltas, run
from safetensors import safe_open

import deltatune
from deltatune import DeltaTuneError
from deltatune import _deltafile as fmt
from deltatune.core import delta_modules

CASES_PER_KIND = 20
BAD_VALUES: list[Any] = [
    "8",
    8.5,
    True,
    None,
    [],
    {},
    -1,
    0,
    10**9,
    1e308,
    float("inf"),
    "((.+)+)+Z",
    ".*",
    [[[[["deep"]]]]],
    {"a": {"b": [1, 2]}},
    "x" * 1000,
]
DTYPES = [torch.int64, torch.int8, torch.bool, torch.float8_e5m2, torch.float64, torch.uint8]


def _raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _resign(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    fmt.write(path, tensors, {k: v for k, v in meta.items() if k != "digest"})


def _containers(node: Any) -> list[Any]:
    """Every dict and list inside a decoded JSON value (the places an edit can land)."""
    found = [node] if isinstance(node, dict | list) else []
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        found += _containers(child)
    return found


def _edit_json(rng: random.Random, stages: list[Any]) -> None:
    """One random edit: a value replaced by a bad one, a key removed, or a key added."""
    target = rng.choice(_containers(stages))
    if isinstance(target, list):
        if target and rng.random() < 0.5:
            target[rng.randrange(len(target))] = rng.choice(BAD_VALUES)
        else:
            target.append(rng.choice(BAD_VALUES))
        return
    action = rng.choice(["replace", "remove", "add"]) if target else "add"
    if action == "add":
        key = rng.choice(["extra", "r", "method", "options", "stage"]) + "x" * rng.randrange(2)
        target[key] = rng.choice(BAD_VALUES)
    else:
        key = rng.choice(sorted(target))
        if action == "remove":
            del target[key]
        else:
            target[key] = rng.choice(BAD_VALUES)


def flip_bit(rng: random.Random, data: bytes, lo: int, hi: int) -> bytes:
    out = bytearray(data)
    i = rng.randrange(lo, hi)
    out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def mutate_header_bits(rng: random.Random, path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(flip_bit(rng, data, 0, 8 + int.from_bytes(data[:8], "little")))


def mutate_data_bits(rng: random.Random, path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(flip_bit(rng, data, 8 + int.from_bytes(data[:8], "little"), len(data)))


def truncate(rng: random.Random, path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(len(data))])


def edit_metadata_signed(rng: random.Random, path: Path) -> None:
    """A structural edit with a recomputed digest: the deeper checks must catch it."""
    meta, tensors = _raw(path)
    if rng.random() < 0.7:
        stages = json.loads(meta["stages"])
        _edit_json(rng, stages)
        meta["stages"] = json.dumps(stages)
    else:
        key = rng.choice(sorted(k for k in meta if k != "digest"))
        if rng.random() < 0.5:
            del meta[key]
        else:
            meta[key] = json.dumps(rng.choice(BAD_VALUES))
    _resign(path, meta, tensors)


def edit_metadata_unsigned(rng: random.Random, path: Path) -> None:
    """An edit that keeps the old digest (as a text editor would)."""
    from safetensors.torch import save_file

    meta, tensors = _raw(path)
    stages = json.loads(meta["stages"])
    _edit_json(rng, stages)
    save_file(tensors, path, metadata={**meta, "stages": json.dumps(stages)})


def change_dtype_signed(rng: random.Random, path: Path) -> None:
    meta, tensors = _raw(path)
    name = rng.choice(sorted(tensors))
    tensors[name] = tensors[name].to(rng.choice(DTYPES))
    _resign(path, meta, tensors)


MUTATIONS: list[Callable[[random.Random, Path], None]] = [
    mutate_header_bits,
    mutate_data_bits,
    truncate,
    edit_metadata_signed,
    edit_metadata_unsigned,
    change_dtype_signed,
]


@pytest.mark.parametrize("method", ["lora", "adapter"])
@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__)
def test_random_mutations_are_refused_or_harmless(tmp_path: Path, method: str, mutation: Callable) -> None:
    plain = make_backbone("vit")
    plain_state = {k: v.clone() for k, v in plain.state_dict().items()}
    tuned = deltatune.apply(copy.deepcopy(plain), method)
    perturb_deltas(tuned)
    good = tmp_path / "good.safetensors"
    deltatune.save_delta(tuned, good)
    x = make_input("vit")
    with torch.no_grad():
        expected = run(tuned, x)
    rng = random.Random(f"{method}-{mutation.__name__}")
    outcomes = {"refused": 0, "identical": 0}
    for case in range(CASES_PER_KIND):
        path = tmp_path / f"case{case}.safetensors"
        path.write_bytes(good.read_bytes())
        mutation(rng, path)
        model = copy.deepcopy(plain)
        try:
            deltatune.load_delta(model, path)
        except DeltaTuneError:
            outcomes["refused"] += 1
            assert not delta_modules(model) and "_deltatune" not in model.__dict__, case
            assert all(torch.equal(v, plain_state[k]) for k, v in model.state_dict().items()), case
            continue
        with torch.no_grad():
            assert torch.equal(run(model, x), expected), f"case {case}: loaded with different outputs"
        outcomes["identical"] += 1
    assert outcomes["refused"] > 0, outcomes  # the mutations do reach the checks
