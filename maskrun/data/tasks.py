"""Fine-tuning tasks: labelled texts with a seeded, stratified train/validation/test split."""

import bz2
import csv
import random
from collections import defaultdict
from dataclasses import dataclass, field

from maskrun.data.packaged import packaged_file


@dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    name: str
    label_names: list[str]
    train: Split
    validation: Split
    test: Split
    split_sizes: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _rotten_tomatoes() -> tuple[list[str], list[str]]:
    path = packaged_file("rotten_tomatoes")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    return [r["text"].strip() for r in rows], [r["category"] for r in rows]


TASKS = {"rotten_tomatoes": _rotten_tomatoes}


def stratified_split(labels: list[int], fractions: tuple[float, float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of train / validation / test, each class split in the same proportions."""
    by_class = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(seed)
    train, validation, test = [], [], []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        n_val, n_test = round(len(idx) * fractions[0]), round(len(idx) * fractions[1])
        validation += idx[:n_val]
        test += idx[n_val:n_val + n_test]
        train += idx[n_val + n_test:]
    return sorted(train), sorted(validation), sorted(test)


def subsample(labels: list[int], n: int, seed: int) -> list[int]:
    """A stratified, seeded subset of n indices."""
    keep, _, _ = stratified_split(labels, (0.0, 1.0 - n / len(labels)), seed)
    return keep


def load_task(dcfg, seed: int) -> TaskData:
    texts, raw_labels = TASKS[dcfg.task]()
    label_names = sorted(set(raw_labels))
    labels = [label_names.index(y) for y in raw_labels]
    if dcfg.max_examples and dcfg.max_examples < len(labels):
        keep = subsample(labels, dcfg.max_examples, seed)
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    parts = stratified_split(labels, (dcfg.validation_fraction, dcfg.test_fraction), seed)
    train, validation, test = (Split([texts[i] for i in p], [labels[i] for i in p]) for p in parts)
    return TaskData(
        name=dcfg.task,
        label_names=label_names,
        train=train,
        validation=validation,
        test=test,
        split_sizes={"train": len(train), "validation": len(validation), "test": len(test)},
    )
