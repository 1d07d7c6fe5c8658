"""Mixed-task batches on HF text models: prompts and prefixes mix per row in one backbone pass, and each row equals
its task's own separately built single-task model (tiny BERT, GPT-2 and Llama sequence classifiers)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import perturb_deltas
from tiny_run import tiny_bert_config
from torch import nn

import deltatune
from deltatune import DeltaTuneError
from deltatune.serve import MultiTaskModel

_OUT = {"insert": "output"}
_IN = {"insert": "input"}
# per backbone: (task name, stages of (method, options), classes); different prompt/prefix lengths p per task
SPECS: dict[str, list[tuple[str, list[tuple[Any, dict]], int]]] = {
    "bert": [
        ("p-out", [("prompt", {"num_tokens": 3, **_OUT})], 3),
        ("p-in", [("prompt", {"num_tokens": 5, **_IN})], 4),
        ("p-out2", [("prompt", {"num_tokens": 2, **_OUT, "insert_at": 4})], 2),
        ("prefix", [("prefix", {"num_tokens": 2})], 2),
        ("lora+prefix", [("lora", {}), ("prefix", {"num_tokens": 4, "reparameterize": False})], 5),
        ("bitfit+prompt", [("bitfit", {}), ("prompt", {"num_tokens": 4, **_IN, "insert_at": 1})], 3),
        ("prefix-l1", [("prefix", {"num_tokens": 3, "target_modules": r".*layer\.1\.attention\.self"})], 4),
        ("lora", [("lora", {})], 3),
        ("bitfit", [("bitfit", {})], 4),
    ],
    "bert-eager": [],  # filled below: BERT's tasks under eager attention
    "gpt2": [
        ("prompt", [("prompt", {"num_tokens": 3, **_IN})], 3),
        ("prompt5", [("prompt", {"num_tokens": 5, **_IN})], 4),
        ("prefix", [("prefix", {"num_tokens": 2})], 2),
        ("lora+prefix", [("lora", {}), ("prefix", {"num_tokens": 4})], 5),
        ("ssf", [("ssf", {})], 3),
    ],
    "llama": [
        ("prompt", [("prompt", {"num_tokens": 3, **_IN})], 3),
        ("prefix", [("prefix", {"num_tokens": 2})], 2),
        ("prefix5", [("prefix", {"num_tokens": 5, "reparameterize": False})], 4),
        ("lora+prompt", [("lora", {}), ("prompt", {"num_tokens": 4, **_IN})], 5),
        ("lora", [("lora", {})], 3),
    ],
}
SPECS["bert-eager"] = SPECS["bert"]


def _build(kind: str, classes: int) -> nn.Module:
    """A tiny sequence classifier (transformers' default dropout: eval mode must turn it off); pad token 0."""
    from transformers import (
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    if kind.startswith("bert"):
        cfg = tiny_bert_config(vocab_size=99, num_labels=classes)
        if kind == "bert-eager":  # the explicit attention path: additive float masks
            cfg._attn_implementation = "eager"
        return BertForSequenceClassification(cfg)
    if kind == "gpt2":
        kw = dict(bos_token_id=1, eos_token_id=1, pad_token_id=0)
        cfg = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_inner=37, n_positions=64, **kw)
        cfg.num_labels = classes
        return GPT2ForSequenceClassification(cfg)
    kw = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    kw["attention_dropout"] = 0.1
    cfg = LlamaConfig(vocab_size=99, num_hidden_layers=2, max_position_embeddings=64, num_labels=classes, **kw)
    return LlamaForSequenceClassification(cfg)


@functools.cache
def _weights(kind: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _build(kind, 3).state_dict()


def _fresh(kind: str, classes: int, seed: int = 0) -> nn.Module:
    """The test backbone with a ``classes``-way head (the same frozen weights; the head drawn from ``seed``)."""
    torch.manual_seed(seed)
    model = _build(kind, classes).eval()
    heads = ("classifier", "score")
    model.load_state_dict({k: v for k, v in _weights(kind).items() if not k.startswith(heads)}, strict=False)
    return model


def _save(folder: Path, kind: str, name: str, stages: list, classes: int, seed: int) -> str:
    model = _fresh(kind, classes, seed)
    for method, options in stages:
        deltatune.apply(model, method, **options)
    perturb_deltas(model, seed=seed)
    path = str(folder / f"{kind}-{name}.safetensors")
    deltatune.save_delta(model, path)
    return path


@functools.cache
def _paths(folder: str, kind: str) -> dict[str, str]:
    Path(folder).mkdir(parents=True, exist_ok=True)
    return {n: _save(Path(folder), kind, n, s, c, i + 3) for i, (n, s, c) in enumerate(SPECS[kind])}


def _setup(tmp_path: Path, kind: str) -> tuple[MultiTaskModel, dict[str, str]]:
    """Every task of ``kind`` attached to one backbone."""
    paths = _paths(str(tmp_path.parent.parent / "multitask_text_files"), kind)
    mt = MultiTaskModel(_fresh(kind, 3))
    for name, path in paths.items():
        mt.add_task(name, path)
    return mt, paths


def _single(kind: str, paths: dict[str, str], name: str) -> nn.Module:
    """The independent reference: the file loaded by load_delta into a freshly built backbone."""
    classes = dict((n, c) for n, _, c in SPECS[kind])[name]
    return deltatune.load_delta(_fresh(kind, classes, seed=99), paths[name]).eval()


def _texts(rows: int, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with right padding (mask zeros, pad id 0) of different lengths per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (rows, length), generator=g)
    keep = torch.randint(3, length + 1, (rows,), generator=g)
    mask = (torch.arange(length) < keep[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _take(x: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in x.items()}


def _expected(kind: str, paths: dict[str, str], names: list[str], x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Row i under its task's own single-task model (each task's rows as their own batch)."""
    out: list[Any] = [None] * len(names)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        logits = _single(kind, paths, name)(**_take(x, rows)).logits
        for i, row in zip(rows, logits):
            out[i] = row
    return out


NAMES = {
    "bert": ["p-out", "lora", "p-in", "prefix", "bitfit", "p-out2", "lora+prefix", "p-in", "bitfit+prompt", "p-out",
             "prefix-l1"],
    "bert-eager": ["p-in", "prefix", "lora+prefix", "bitfit", "p-out", "prefix", "lora"],
    "gpt2": ["prompt", "ssf", "prefix", "prompt5", "lora+prefix", "prefix", "prompt"],
    "llama": ["prefix", "lora", "prompt", "prefix5", "lora+prompt", "prompt", "prefix"],
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_mixed_text_rows_equal_single_task_models(tmp_path, kind):
    mt, paths = _setup(tmp_path, kind)
    names = NAMES[kind]
    assert all(mt.task(n).plan is not None for n in names), [mt.task(n).why_grouped for n in names]
    x = _texts(len(names))
    with torch.no_grad():
        out = mt(x, names, strict=True)  # one backbone pass, per-row kernels: strict mixing accepts the batch
        refs = _expected(kind, paths, names, x)
    for i, (row, ref) in enumerate(zip(mt.split(out, names), refs)):
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"row {i} ({names[i]}): {m}")
        assert torch.isinf(out[i, len(row) :]).all()


@pytest.mark.parametrize("kind", list(SPECS))
def test_mixed_text_without_attention_mask(tmp_path, kind):
    """No mask given: the single-task models attend everywhere; the mixed batch masks its pads only."""
    mt, paths = _setup(tmp_path, kind)
    names = NAMES[kind][:5]
    x = {"input_ids": torch.randint(1, 99, (len(names), 7), generator=torch.Generator().manual_seed(4))}
    with torch.no_grad():
        out = mt(x, names, strict=True)
        refs = _expected(kind, paths, names, x)
    for row, ref in zip(mt.split(out, names), refs):
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(SPECS))
def test_mixed_text_token_types_positions_and_embeddings(tmp_path, kind):
    """Token types (BERT) or explicit positions (decoders) given, and embeddings instead of token ids."""
    mt, paths = _setup(tmp_path, kind)
    names = NAMES[kind]
    x = _texts(len(names), seed=5)
    extra = "token_type_ids" if kind.startswith("bert") else "position_ids"
    x[extra] = (torch.arange(9) >= 4).long() if extra == "token_type_ids" else torch.arange(9) + 2
    x[extra] = x[extra].expand(len(names), -1).clone()
    words = mt.backbone.get_input_embeddings()(x["input_ids"]).detach()  # (B, L, d)
    embeds = {"inputs_embeds": words, **{k: v for k, v in x.items() if k != "input_ids"}}
    for batch in (x, embeds):
        with torch.no_grad():
            out = mt(batch, names, strict=True)
            refs = _expected(kind, paths, names, batch)
        for row, ref in zip(mt.split(out, names), refs):
            torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5)


def _no_dropout(model: nn.Module) -> nn.Module:
    """Train mode without dropout: gradients comparable row for row."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout"):  # Llama's attention reads a float
            m.attention_dropout = 0.0
    return model


@pytest.mark.parametrize("kind", list(SPECS))
def test_joint_training_gradients_equal_single_task_gradients(tmp_path, kind):
    mt, paths = _setup(tmp_path, kind)
    names = NAMES[kind]
    classes = dict((n, c) for n, _, c in SPECS[kind])
    targets = torch.tensor([i % classes[n] for i, n in enumerate(names)])
    x = _texts(len(names), seed=2)
    mt.mixed_model()  # built, so that its dropout layers are among mt's modules
    _no_dropout(mt.train())
    nn.functional.cross_entropy(mt(x, names, strict=True), targets, reduction="sum").backward()
    for name in dict.fromkeys(names):
        ref = _no_dropout(_single(kind, paths, name).train())
        rows = [i for i, n in enumerate(names) if n == name]
        nn.functional.cross_entropy(ref(**_take(x, rows)).logits, targets[rows], reduction="sum").backward()
        mine = dict(mt.task_model(name).named_parameters())
        grads = [(p_name, p) for p_name, p in ref.named_parameters() if p.requires_grad]
        assert grads and all(p.grad is not None for _, p in grads)
        for p_name, p in grads:
            torch.testing.assert_close(mine[p_name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{name}: {p_name}")


@pytest.mark.parametrize("kind", list(SPECS))
def test_batch_without_prompts_builds_no_padding(tmp_path, kind):
    """The mixed model holds prompt/prefix tasks; a batch of none runs the plain sequence length."""
    mt, paths = _setup(tmp_path, kind)
    plain = {"bert": ["lora", "bitfit", "lora"], "bert-eager": ["bitfit", "lora"], "gpt2": ["ssf"], "llama": ["lora"]}
    names = plain[kind]
    if len(set(names)) == 1:  # a second task without prompts, so the batch mixes
        mt.add_task("other", paths[names[0]])
        names = [names[0], "other"]
    x = _texts(len(names), seed=3)
    net = mt.mixed_model()
    stack = net.bert.encoder if kind.startswith("bert") else net.get_submodule(net.base_model_prefix).base
    seen = []
    handle = stack.register_forward_hook(lambda _m, _a, out: seen.append(out.last_hidden_state.shape))
    with torch.no_grad():
        out = mt(x, names, strict=True)
    handle.remove()
    assert seen == [(len(names), x["input_ids"].shape[1], 32)]  # (B, L, d): no pads, no prompts
    for i, n in enumerate(names):
        ref = _single(kind, paths, names[0] if n == "other" else n)(**_take(x, [i])).logits[0]
        torch.testing.assert_close(out[i, : len(ref)], ref, atol=1e-5, rtol=1e-5)


def test_tasks_of_one_prompt_length_pad_nothing(tmp_path):
    """Two tasks with 3-token prompts after [CLS]: the encoder runs L + 3 positions, as each single-task model."""
    mt, paths = _setup(tmp_path, "bert")
    mt.add_task("p-out-b", paths["p-out"])
    names, x, seen = ["p-out", "p-out-b", "p-out-b", "p-out"], _texts(4), []
    encoder = mt.mixed_model().bert.encoder
    handle = encoder.register_forward_hook(lambda _m, _a, o: seen.append(o.last_hidden_state.shape))
    with torch.no_grad():
        out = mt(x, names, strict=True)
    handle.remove()
    assert seen == [(4, 9 + 3, 32)]
    torch.testing.assert_close(out[:, :3], _single("bert", paths, "p-out")(**x).logits, atol=1e-5, rtol=1e-5)


def test_pads_sit_after_the_tokens_and_are_masked(tmp_path):
    """Llama, prefixes of 2 and 5 slots and prompts of 3: every row's mask and positions as its own model's."""
    mt, _ = _setup(tmp_path, "llama")
    names = ["prefix", "prefix5", "prompt"]
    x = _texts(3, length=4)
    x["attention_mask"] = torch.ones_like(x["attention_mask"])
    seen = {}
    net = mt.mixed_model()
    stack = net.model.base

    def grab(_m: nn.Module, _a: tuple, kwargs: dict) -> None:
        seen.update(kwargs)

    handle = stack.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        mt(x, names, strict=True)
    handle.remove()
    # cache slots (5): prefix rows 2 then 5 used; then tokens, the prompt row's 3 prompts first, pads after
    want_mask = torch.tensor([[1, 1, 0, 0, 0] + [1] * 4 + [0] * 3, [1] * 5 + [1] * 4 + [0] * 3, [0] * 5 + [1] * 7])
    want_pos = torch.tensor([[2, 3, 4, 5, 0, 0, 0], [5, 6, 7, 8, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6]])
    torch.testing.assert_close(seen["attention_mask"], want_mask)
    torch.testing.assert_close(seen["position_ids"], want_pos)


def test_decoder_prefixes_refuse_gradient_checkpointing_in_training(tmp_path):
    """As single-task prefix tuning: the KV-cache prefixes would be dropped by checkpointed layers."""
    paths = _paths(str(tmp_path.parent.parent / "multitask_text_files"), "gpt2")
    backbone = _fresh("gpt2", 3)
    backbone.gradient_checkpointing_enable()
    mt = MultiTaskModel(backbone).train()
    for name in ("prefix", "ssf"):
        mt.add_task(name, paths[name])
    x = _texts(2)
    for model in (mt.task_model("prefix"), mt):  # the single-task wrapper, then the mixed batch
        try:
            model(**x) if model is not mt else mt(x, ["prefix", "ssf"], strict=True)
        except DeltaTuneError as e:
            assert "gradient checkpointing" in str(e)
        else:
            raise AssertionError("prefixes trained under gradient checkpointing")
