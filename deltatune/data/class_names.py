"""The class names of a training set, recorded in the delta file so predictions come back as names, not indices."""

from __future__ import annotations

from typing import Any

# Offline image tasks whose labels have a natural name (the others are numbered from 0).
OFFLINE_NAMES: dict[str, list[str]] = {
    "digits": [str(i) for i in range(10)],
    "digits-shift": [str(i) for i in range(10)],
    "count": [str(i) for i in range(1, 7)],  # label 0 is one shape
}


def class_names(data: Any, dataset: str = "") -> list[str]:
    """The names of ``data``'s classes in label order: the dataset's own ``classes`` (ImageFolder, torchvision,
    labelled text files), the offline task's, else the label numbers as text."""
    n = data.num_classes
    own = getattr(getattr(data, "train", None), "classes", None)
    if own is not None and len(own) == n:
        return [str(c) for c in own]
    task = dataset.lower().removeprefix("offline:")
    if task in ("topics", "topics-mixed"):
        from deltatune.offline.text_tasks import TOPICS

        return list(TOPICS)
    names = OFFLINE_NAMES.get(task)
    return names if names is not None and len(names) == n else [str(i) for i in range(n)]
