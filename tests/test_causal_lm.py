"""``deltatune train`` on causal-LM text (lm:PATH): next-token loss falls, perplexity matches transformers' own LM
loss, resume is exact, the delta reloads with identical logits and the (tied) LM head is never trained."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import tiny_config, train_until_first_checkpoint

import deltatune
from deltatune import DeltaTuneError
from deltatune.data.lm import Blocks
from deltatune.train import loop as training
from deltatune.train.loop import train

INIT = 0.3
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # processes draw apart: DDP compares exactly
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "under", "a", "mat", "log", "and", "then", "slept"]
TEXT = "the cat sat on a mat and then slept . the dog ran under a log and then sat .\n" * 40


def _save_lm(folder: Path, kind: str) -> Any:
    """A word-level tokenizer and a seeded random 2-layer GPT-2 or Llama (width 32) saved to ``folder``."""
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    vocab = len(WORDS) + 6
    # Weights of a trained model's scale: at GPT-2's 0.02 the frozen (tied) LM head caps every logit near 0.6.
    init = {"initializer_range": INIT, "bos_token_id": 3, "eos_token_id": 3}
    torch.manual_seed(0)
    if kind == "gpt2":
        init |= NO_DROPOUT
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, **init))
    else:
        kw = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_key_value_heads": 1, **init}
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=64, **kw))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    (root / "text.txt").write_text(TEXT)
    for kind in ("gpt2", "llama"):
        _save_lm(root / kind, kind)
    return root


def _cfg(corpus: Path, out: Path, kind: str = "gpt2", **extra: Any) -> dict[str, Any]:
    lm = {"model": f"hf:{corpus / kind}", "pretrained": True, "dataset": f"lm:{corpus / 'text.txt'}"}
    base = tiny_config(out, **lm, method="lora", block_size=16, batch_size=4, lr=3e-2, epochs=4, threads=1)
    for key in ("img_size", "model_kwargs"):
        base.pop(key)
    return {**base, **extra}


def _hf_loss(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """transformers' own causal-LM loss (it shifts the labels itself): the independent reference."""
    with torch.no_grad():
        return model.eval()(input_ids=blocks, labels=blocks).loss.item()


def _eval_blocks(corpus: Path, kind: str, block_size: int = 16) -> torch.Tensor:
    from deltatune.data.lm import load_lm

    return load_lm(corpus / "text.txt", str(corpus / kind), block_size).eval.blocks


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_loss_falls_and_perplexity_is_the_lm_loss_of_transformers(corpus: Path, tmp_path: Path, kind: str) -> None:
    kept: dict[str, torch.nn.Module] = {}
    real = training._write_outputs

    def keep(p: Any, *args: Any) -> None:
        kept["model"] = p.model
        real(p, *args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(training, "_write_outputs", keep)
        report = train(_cfg(corpus, tmp_path, kind))
    losses = [h["train_loss"] for h in report["history"]]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.7 * losses[0], losses
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all("eval_perplexity" in r and "eval_top1" not in r for r in log)
    assert log[-1]["eval_perplexity"] < log[0]["eval_perplexity"]
    assert "top1" not in report and report["perplexity"] == pytest.approx(math.exp(report["eval_loss"]), rel=1e-9)
    expected = _hf_loss(kept["model"], _eval_blocks(corpus, kind))
    assert report["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert json.loads((tmp_path / "report.json").read_text())["perplexity"] == report["perplexity"]


def test_lm_head_is_not_trained_and_the_delta_reloads_with_identical_logits(corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    kept: dict[str, torch.nn.Module] = {}
    real = training._write_outputs
    with pytest.MonkeyPatch.context() as m:
        m.setattr(training, "_write_outputs", lambda p, *a: (kept.setdefault("model", p.model), real(p, *a)))
        train(_cfg(corpus, tmp_path, epochs=1, train_head=True))
    trained = kept["model"].eval()
    keys = load_file(tmp_path / "delta.safetensors").keys()
    assert keys and all("lora_" in k for k in keys), sorted(keys)  # no lm_head, no (tied) wte
    original = AutoModelForCausalLM.from_pretrained(corpus / "gpt2")
    assert torch.equal(trained.lm_head.weight, original.lm_head.weight)
    assert trained.lm_head.weight is trained.transformer.wte.weight  # still tied
    fresh = deltatune.load_delta(AutoModelForCausalLM.from_pretrained(corpus / "gpt2"), tmp_path / "delta.safetensors")
    x = _eval_blocks(corpus, "gpt2")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=x).logits, trained(input_ids=x).logits)
        assert not torch.equal(original.eval()(input_ids=x).logits, trained(input_ids=x).logits)


def test_resume_after_an_interrupted_run_gives_identical_deltas(corpus: Path, tmp_path: Path) -> None:
    cfg = _cfg(corpus, tmp_path / "killed", ema_decay=0.9)
    train_until_first_checkpoint(cfg)
    resumed = train({**cfg, "resume": True})
    straight = train(_cfg(corpus, tmp_path / "straight", ema_decay=0.9))
    for name in ("delta.safetensors", "delta_ema.safetensors"):
        a, b = load_file(tmp_path / "killed" / name), load_file(tmp_path / "straight" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["perplexity"] == straight["perplexity"] and resumed["ema_perplexity"] == straight["ema_perplexity"]


def test_blocks_hold_out_the_end_and_folders_join_their_txt_files(corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from deltatune.data import load_data

    tok = AutoTokenizer.from_pretrained(corpus / "gpt2")
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    data = load_data(f"lm:{corpus / 'text.txt'}", tokenizer=str(corpus / "gpt2"), block_size=16)
    n = len(ids) // 16
    assert data.task == "causal-lm" and isinstance(data.train, Blocks)
    assert len(data.train) + len(data.eval) == n and len(data.eval) == round(0.1 * n)
    assert data.eval.blocks.flatten().tolist() == ids[(n - len(data.eval)) * 16 : n * 16]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("the dog ran")
    (tmp_path / "1.txt").write_text("the cat sat")
    (tmp_path / "skip.md").write_text("a log")
    folder = load_data(f"lm:{tmp_path}", tokenizer=str(corpus / "gpt2"), block_size=2)
    words = tok.convert_ids_to_tokens(torch.cat([folder.train.blocks, folder.eval.blocks]).flatten().tolist())
    assert words == ["the", "cat", "sat", "the", "dog", "ran"]


@pytest.mark.parametrize(
    ("text", "options", "match"),
    [
        ("the cat", {"block_size": 16}, "make 0 block"),
        (TEXT, {"block_size": 1}, "no next token"),
        (TEXT, {"block_size": 16, "train_split": "x"}, "--train-split does not apply"),
    ],
)
def test_bad_lm_data_is_refused(corpus: Path, tmp_path: Path, text: str, options: dict, match: str) -> None:
    from deltatune.data import load_data

    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(DeltaTuneError, match=match):
        load_data(f"lm:{tmp_path / 't.txt'}", tokenizer=str(corpus / "gpt2"), **options)


def test_blocks_longer_than_the_model_positions_are_refused(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(DeltaTuneError, match="exceeds the model's 64 positions"):
        train(_cfg(corpus, tmp_path, block_size=80))


def test_two_processes_train_the_lm_deltas_of_one_with_the_same_global_batch(corpus: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from test_ddp import _free_port
    from test_resume import _cli_args

    common = {"epochs": 2, "grad_clip": 1.0, "max_train_samples": 40}  # even: DistributedSampler pads by repeating
    single = train(_cfg(corpus, tmp_path / "one", batch_size=8, **common))
    cfg = _cfg(corpus, tmp_path / "two", batch_size=4, **common)
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    run += ["--master-port", str(_free_port()), "-m", "deltatune.cli", *_cli_args(cfg)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    one, two = load_file(tmp_path / "one" / "delta.safetensors"), load_file(tmp_path / "two" / "delta.safetensors")
    assert report["world_size"] == 2 and report["perplexity"] == pytest.approx(single["perplexity"], rel=1e-5)
    assert one.keys() == two.keys() and max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
