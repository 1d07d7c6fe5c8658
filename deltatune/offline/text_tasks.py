"""Small offline text tasks (no downloads) on which pretrained word knowledge is what generalises.

- ``topics``: which of 6 topics (animals, food, sports, music, vehicles, weather) a generated sentence is about.
  Every sentence fills a topic-neutral template with three words of its topic.
- ``topics-mixed``: the same with two words of the topic and one distractor word of another topic, in random
  order: the topic named twice wins.

Each topic's 30 words are split by seed into 20 training and 10 test words, so no test sentence holds a topic word
seen in training: a model can only beat chance (1/6) on the test set by knowing what words mean, i.e. from
pretraining. 360 training and 240 test sentences, balanced over the topics.

Deterministic by seed. Rows are ``{"text": str, "label": int}`` (labels index ``TOPICS``), as ``--dataset text``
reads them; ``--dataset offline:topics`` builds them in memory. Write a task as a folder with:

    python -m deltatune.offline.text_tasks data/topics --task topics-mixed --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from deltatune.errors import DeltaTuneError

Rows = list[dict[str, str | int]]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# 30 words per topic, each one WordPiece token in BERT's uncased vocabulary: no test word shares a sub-word
# piece with a training word.
TOPICS: dict[str, tuple[str, ...]] = {
    "animals": _words(
        "dog cat horse cow sheep goat pig rabbit lion tiger elephant duck zebra monkey bear wolf fox deer eagle "
        "owl parrot dolphin whale shark snake frog turtle mouse squirrel camel"
    ),
    "food": _words(
        "bread cheese rice pasta pizza soup salad cake cookie apple banana cereal grape potato tomato carrot "
        "onion steak butter honey sugar chocolate sandwich noodles pie cherry lemon mango bacon sausage"
    ),
    "sports": _words(
        "football soccer tennis golf baseball basketball hockey cricket rugby volleyball boxing wrestling "
        "swimming cycling skiing surfing rowing sailing archery fencing bowling badminton marathon skating "
        "gymnastics karate polo lacrosse softball diving"
    ),
    "music": _words(
        "guitar piano violin drum trumpet flute cello saxophone clarinet harp banjo trombone accordion harmonica "
        "song tuba oboe ballad mandolin hymn jazz blues opera symphony orchestra melody choir rhythm concert "
        "lullaby"
    ),
    "vehicles": _words(
        "car truck bus train bicycle motorcycle airplane helicopter boat ship tractor van taxi raft subway tram "
        "jeep yacht canoe submarine rocket ambulance limousine ferry wagon cart sedan jet glider carriage"
    ),
    "weather": _words(
        "rain snow storm thunder fog wind hail cyclone sunshine frost blizzard hurricane tornado breeze cloud "
        "lightning humidity rainbow forecast flood drought ice monsoon dew mist gale typhoon temperature haze "
        "snowfall"
    ),
}
# Topic-neutral frames shared by all topics and by both splits: only the filled-in words carry the label.
TEMPLATES: tuple[str, ...] = (
    "we talked about {a}, {b} and {c} all evening.",
    "her notes were mostly about {a}, then {b} and {c}.",
    "the article mentioned {a}, {b} and {c} and nothing else.",
    "he drew a picture of {a} and {b} next to {c}.",
    "everyone in town had an opinion on {a}, {b} and {c}.",
    "the kids asked so many questions about {a}, {b} and {c}.",
    "she wrote a short poem about {a}, {b} and {c}.",
    "there is a new book on {a}, {b} and {c} at the library.",
    "my grandfather remembers {a}, {b} and {c} from his childhood.",
    "the meeting was about {a} and {b}, and later about {c}.",
    "i keep dreaming of {a}, {b} and {c}.",
    "the radio show covered {a} and {b} first and {c} after the news.",
)
TEST_WORDS = 10  # of each topic's 30


def split_words(seed: int = 0) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each topic's words shuffled by ``seed`` and split into (training words, test words), disjoint."""
    rng = random.Random(f"topics-words-{seed}")
    train, test = {}, {}
    for topic, words in TOPICS.items():
        shuffled = rng.sample(words, len(words))
        train[topic], test[topic] = sorted(shuffled[TEST_WORDS:]), sorted(shuffled[:TEST_WORDS])
    return train, test


def _sentences(words: dict[str, list[str]], per_topic: int, mixed: bool, rng: random.Random) -> Rows:
    """``per_topic`` sentences per topic, each a template filled with three different words of the topic (mixed:
    two, and one word of another topic, in random order); shuffled."""
    rows: Rows = []
    for label, topic in enumerate(TOPICS):
        for _ in range(per_topic):
            chosen = rng.sample(words[topic], 2 if mixed else 3)
            if mixed:
                other = rng.choice([t for t in TOPICS if t != topic])
                chosen.insert(rng.randrange(3), rng.choice(words[other]))
            a, b, c = chosen
            rows.append({"text": rng.choice(TEMPLATES).format(a=a, b=b, c=c), "label": label})
    rng.shuffle(rows)
    return rows


def topics(
    seed: int = 0, mixed: bool = False, train_per_topic: int = 60, test_per_topic: int = 40
) -> tuple[Rows, Rows, list[str]]:
    """The ``topics`` task (``mixed``: ``topics-mixed``): (train rows, test rows, class names); 360 training and
    240 test sentences by default."""
    train_words, test_words = split_words(seed)
    rng = random.Random(f"topics-sentences-{seed}-{mixed}")
    train = _sentences(train_words, train_per_topic, mixed, rng)
    return train, _sentences(test_words, test_per_topic, mixed, rng), list(TOPICS)


TEXT_TASKS: dict[str, Callable[[int], tuple[Rows, Rows, list[str]]]] = {
    "topics": topics,
    "topics-mixed": lambda seed: topics(seed, mixed=True),
}


def make_text_task(name: str, seed: int = 0) -> tuple[Rows, Rows, list[str]]:
    """(train rows, test rows, class names) of the offline text task ``name``."""
    if name not in TEXT_TASKS:
        raise DeltaTuneError(f"unknown offline text task {name!r}; choose one of {', '.join(TEXT_TASKS)}")
    return TEXT_TASKS[name](seed)


def write_text_task(root: str | Path, name: str = "topics", seed: int = 0) -> Path:
    """Writes ``train.jsonl`` and ``test.jsonl`` of a task into ``root`` (a folder for ``--dataset text``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train, test, _ = make_text_task(name, seed)
    for split, rows in (("train", train), ("test", test)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def main() -> None:
    """``python -m deltatune.offline.text_tasks DIR [--task topics] [--seed 0]``."""
    p = argparse.ArgumentParser(description="Write an offline text task as train.jsonl and test.jsonl.")
    p.add_argument("out", type=Path)
    p.add_argument("--task", default="topics", choices=list(TEXT_TASKS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(write_text_task(args.out, args.task, args.seed))


if __name__ == "__main__":
    main()
