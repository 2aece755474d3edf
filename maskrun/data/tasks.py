"""Fine-tuning tasks: labelled texts, deduplicated, with a seeded, stratified train/validation/test split.

A task comes from a data package (rotten_tomatoes, sms_spam, bbc_news), from a user's own
csv / json / parquet file, or from the Hugging Face hub (for users with network access).
"""

import bz2
import csv
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from maskrun.data.checks import check_dataset_file, read_json
from maskrun.data.dedup import first_occurrences
from maskrun.data.packaged import packaged_file
from maskrun.errors import ConfigError


@dataclass
class Split:
    texts: list[str]
    labels: list[int] | None = None
    responses: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    name: str
    label_names: list[str]
    train: Split
    validation: Split
    test: Split
    split_sizes: dict = field(default_factory=dict)
    task_type: str = "classification"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _rotten_tomatoes(dcfg) -> tuple[list[str], list]:
    with bz2.open(packaged_file("rotten_tomatoes"), "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    return [r["text"].strip() for r in rows], [r["category"] for r in rows]


def _sms_spam(dcfg) -> tuple[list[str], list]:
    with packaged_file("sms_spam").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"].strip() for r in rows], ["spam" if r["spam"] == "1" else "ham" for r in rows]


def _bbc_news(dcfg) -> tuple[list[str], list]:
    texts, labels = [], []
    for topic in sorted(p for p in packaged_file("bbc_news").iterdir() if p.is_dir()):
        for article in sorted(topic.glob("*.txt")):
            texts.append(" ".join(article.read_text(encoding="utf-8", errors="replace").split()))
            labels.append(topic.name)
    return texts, labels


def read_table(dcfg, columns: list[str] | None = None):
    """A user's csv / json / parquet file as a pandas DataFrame (only `columns`, when given)."""
    import pandas as pd

    path = Path(dcfg.path)
    try:
        if dcfg.task == "csv":
            return pd.read_csv(path, encoding=dcfg.encoding, usecols=columns)
        if dcfg.task == "json":  # JSON or JSON Lines, whatever the suffix, parsed as the checks parse it
            table = pd.DataFrame(read_json(path, dcfg.encoding))
            return table if columns is None else table[columns]
        return pd.read_parquet(path, columns=columns)
    except (OSError, ValueError, UnicodeDecodeError, LookupError, ImportError) as err:
        raise ConfigError(f"cannot read dataset.path={path} as {dcfg.task}: {' '.join(str(err).split())[:200]}",
                          "check the file, dataset.encoding and the dataset=<format> choice") from None


def _local_file(dcfg) -> tuple[list[str], list]:
    table = read_table(dcfg, [dcfg.text_column, dcfg.label_column]).dropna()
    return table[dcfg.text_column].astype(str).str.strip().tolist(), table[dcfg.label_column].tolist()


def _hub(dcfg) -> tuple[list[str], list]:
    # Needs network access (or a warm Hugging Face cache); all rows of one split, split again here.
    import datasets

    rows = datasets.load_dataset(dcfg.hub_name, dcfg.hub_config, split=dcfg.hub_split)
    feature = rows.features.get(dcfg.label_column)
    labels = rows[dcfg.label_column]
    if hasattr(feature, "int2str"):  # a ClassLabel: keep the class names
        labels = [feature.int2str(y) for y in labels]
    return [str(t).strip() for t in rows[dcfg.text_column]], labels


TASKS = {"rotten_tomatoes": _rotten_tomatoes, "sms_spam": _sms_spam, "bbc_news": _bbc_news,
         "csv": _local_file, "json": _local_file, "parquet": _local_file, "hub": _hub}
PACKAGED_TASKS = ("rotten_tomatoes", "sms_spam", "bbc_news")


def task_type(dcfg) -> str:
    return dcfg.get("task_type") or "classification"


def check_task(dcfg) -> None:
    """Cheap checks, before any work, that the task's data exists and has what a classifier needs."""
    if dcfg.task not in TASKS:
        raise ConfigError(f"dataset.task={dcfg.task!r} is not supported", f"choose one of: {', '.join(TASKS)}")
    if dcfg.task in PACKAGED_TASKS:
        packaged_file(dcfg.task)
    elif dcfg.task == "hub":
        if not dcfg.get("hub_name"):
            raise ConfigError("dataset=hub needs dataset.hub_name", "e.g. dataset.hub_name=imdb")
    elif not dcfg.get("path"):
        raise ConfigError(f"dataset={dcfg.task} needs dataset.path", f"point it at your {dcfg.task} file")
    else:
        check_dataset_file(dcfg.path, dcfg.task, dcfg.text_column, dcfg.label_column, dcfg.get("encoding", "utf-8"))


def deduplicate(texts: list[str], labels: list) -> tuple[list[str], list, int]:
    """Drop empty texts and repeats of a text up to case, punctuation and whitespace (the first one and its label
    win), so no text is in two splits."""
    nonempty = [i for i, text in enumerate(texts) if text]
    keep = [nonempty[i] for i in first_occurrences([texts[i] for i in nonempty])]
    return [texts[i] for i in keep], [labels[i] for i in keep], len(texts) - len(keep)


def label_ids(raw_labels: list) -> tuple[list[int], list[str]]:
    """Each label's id and the names in id order (sorted, so the mapping is stable)."""
    names = sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(names)}
    return [index[y] for y in raw_labels], [str(name) for name in names]


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
    """A stratified, seeded subset of about n indices (each class keeps its share)."""
    keep, _, _ = stratified_split(labels, (0.0, 1.0 - n / len(labels)), seed)
    return keep


def pick(split: Split, indices: list[int]) -> Split:
    return Split([split.texts[i] for i in indices], [split.labels[i] for i in indices])


def load_task(dcfg, seed: int) -> TaskData:
    """The task's splits; `seed` (the dataset's split_seed) fixes them and any subsample."""
    texts, raw_labels, duplicates = deduplicate(*TASKS[dcfg.task](dcfg))
    labels, label_names = label_ids(raw_labels)
    if len(label_names) < 2:
        raise ConfigError(f"task {dcfg.task} has {len(label_names)} class(es)", "a classification task needs at least 2 labels")
    if dcfg.max_examples and dcfg.max_examples < len(labels):
        keep = subsample(labels, dcfg.max_examples, seed)
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    train, validation, test = (pick(Split(texts, labels), p)
                               for p in stratified_split(labels, (dcfg.validation_fraction, dcfg.test_fraction), seed))
    if dcfg.get("train_size") and dcfg.train_size < len(train):
        train = pick(train, subsample(train.labels, dcfg.train_size, seed))
    return TaskData(
        name=dcfg.name,
        label_names=label_names,
        train=train,
        validation=validation,
        test=test,
        split_sizes={"train": len(train), "validation": len(validation), "test": len(test), "duplicates_dropped": duplicates},
    )
