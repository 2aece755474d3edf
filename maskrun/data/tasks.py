"""Fine-tuning tasks of every task type, deduplicated, then split seeded into train / validation / test.

- classification: labelled texts (rotten_tomatoes, sms_spam, bbc_news, a user's csv / json / parquet file or a
  hub dataset), split stratified by label.
- causal_lm: documents to continue the language-model objective on (python_code, or a file's text column).
- instruction: prompts and responses (arithmetic, a file's prompt and response columns, or a classification task
  with dataset.verbalize=true: each text in the dataset's prompt template, its label name as the response).

A generative task has no labels to stratify by: its split is a plain seeded random one. An instruction task is
deduplicated on its prompts, so no prompt is in two splits.
"""

import bz2
import csv
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from maskrun.data import arithmetic
from maskrun.data.checks import check_dataset_file, check_text_file, read_json
from maskrun.data.dedup import first_occurrences
from maskrun.data.packaged import packaged_file
from maskrun.data.python_code import python_code_documents, stdlib_files, stdlib_folder
from maskrun.errors import ConfigError

TASK_TYPES = ("classification", "causal_lm", "instruction")

# The config keys that name a file's or a hub dataset's columns, per task type: the text (or prompt) first.
COLUMNS = {"classification": ("text_column", "label_column"), "causal_lm": ("text_column",),
           "instruction": ("prompt_column", "response_column")}


@dataclass
class Split:
    texts: list[str]                    # classification: the text; causal_lm: one document; instruction: the prompt
    labels: list[int] | None = None     # classification only: class ids
    responses: list[str] | None = None  # instruction only: the reference response (loss and exact-match target)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    name: str
    task_type: str
    label_names: list[str]  # [] unless classification
    train: Split
    validation: Split
    test: Split
    split_sizes: dict = field(default_factory=dict)
    chat_template: str | bool = False  # instruction: "auto" formats prompts in the tokenizer's chat template if it has one

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def declared_type(dcfg) -> str:
    """The dataset's own task type; a dataset config written before task types existed is a classification one."""
    return dcfg.get("task_type", "classification")


def task_type(dcfg) -> str:
    """The task type a run trains: dataset.task_type, except that dataset.verbalize=true makes a classification
    dataset an instruction task. Read from the config alone, no data loaded."""
    return "instruction" if dcfg.get("verbalize") else declared_type(dcfg)


def as_response(text) -> str:
    """A reference response: the model reads prompt + response, so it starts with one space (" fresh", " 42")."""
    return " " + str(text).strip()


# Each source gives the task's texts and what goes with each: its raw label (classification), its response
# (instruction), or nothing (causal_lm: None).

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


def _python_code(dcfg) -> tuple[list[str], None]:
    return python_code_documents(), None


def _arithmetic(dcfg) -> tuple[list[str], list[str]]:
    problems = arithmetic.problems(dcfg.num_examples, dcfg.difficulty, dcfg.split_seed)
    return [p.prompt for p in problems], [p.response for p in problems]


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


def _local_file(dcfg) -> tuple[list[str], list | None]:
    columns = [dcfg[key] for key in COLUMNS[declared_type(dcfg)]]
    table = read_table(dcfg, columns).dropna()
    texts = table[columns[0]].astype(str).str.strip().tolist()
    return texts, paired(dcfg, table[columns[1]].tolist() if len(columns) > 1 else None)


def _hub(dcfg) -> tuple[list[str], list | None]:
    # Needs network access (or a warm Hugging Face cache); all rows of one split, split again here.
    import datasets

    rows = datasets.load_dataset(dcfg.hub_name, dcfg.hub_config, split=dcfg.hub_split)
    columns = [dcfg[key] for key in COLUMNS[declared_type(dcfg)]]
    texts = [str(t).strip() for t in rows[columns[0]]]
    if len(columns) == 1:
        return texts, None
    values, feature = rows[columns[1]], rows.features.get(columns[1])
    if hasattr(feature, "int2str"):  # a ClassLabel: keep the class names
        values = [feature.int2str(y) for y in values]
    return texts, paired(dcfg, values)


def paired(dcfg, values: list | None) -> list | None:
    """A file's second column as the task uses it: raw labels, or responses."""
    return [as_response(v) for v in values] if declared_type(dcfg) == "instruction" else values


TASKS = {"rotten_tomatoes": _rotten_tomatoes, "sms_spam": _sms_spam, "bbc_news": _bbc_news,
         "python_code": _python_code, "arithmetic": _arithmetic,
         "csv": _local_file, "json": _local_file, "parquet": _local_file, "hub": _hub}
PACKAGED_TASKS = ("rotten_tomatoes", "sms_spam", "bbc_news")
# The task types a task can be; a user's file or hub dataset can be any.
TASK_TYPES_OF = {**{task: ("classification",) for task in PACKAGED_TASKS},
                 "python_code": ("causal_lm",), "arithmetic": ("instruction",)}


def check_task(dcfg) -> None:
    """Cheap checks, before any work, that the task's data exists and has what its task type needs."""
    if dcfg.task not in TASKS:
        raise ConfigError(f"dataset.task={dcfg.task!r} is not supported", f"choose one of: {', '.join(TASKS)}")
    check_task_type(dcfg)
    if dcfg.task in PACKAGED_TASKS:
        packaged_file(dcfg.task)
    elif dcfg.task == "python_code":
        if not stdlib_files():
            raise ConfigError(f"no Python source files under {stdlib_folder()} (this Python ships its standard library "
                              "compiled only)", "run with a Python install that has its .py files, or pick another dataset")
    elif dcfg.task == "arithmetic":
        if isinstance(dcfg.difficulty, bool) or dcfg.difficulty not in arithmetic.LEVELS:  # True would pass as 1
            raise ConfigError(f"dataset.difficulty={dcfg.difficulty!r} is not a difficulty",
                              f"choose one of: {', '.join(map(str, arithmetic.LEVELS))}")
        if not isinstance(dcfg.num_examples, int) or isinstance(dcfg.num_examples, bool) or dcfg.num_examples < 1:
            raise ConfigError(f"dataset.num_examples={dcfg.num_examples!r} must be a whole number >= 1",
                              "e.g. dataset.num_examples=4000")
    else:
        check_columns_set(dcfg)
        if dcfg.task == "hub":
            if not dcfg.get("hub_name"):
                raise ConfigError("dataset=hub needs dataset.hub_name", "e.g. dataset.hub_name=imdb")
        elif not dcfg.get("path"):
            raise ConfigError(f"dataset={dcfg.task} needs dataset.path", f"point it at your {dcfg.task} file")
        elif declared_type(dcfg) == "classification":
            check_dataset_file(dcfg.path, dcfg.task, dcfg.text_column, dcfg.label_column, dcfg.get("encoding", "utf-8"))
        else:
            check_text_file(dcfg.path, dcfg.task, {f"dataset.{key}": dcfg[key] for key in COLUMNS[declared_type(dcfg)]},
                            dcfg.get("encoding", "utf-8"))


def check_task_type(dcfg) -> None:
    declared = declared_type(dcfg)
    if declared not in TASK_TYPES:
        raise ConfigError(f"dataset.task_type={declared!r} is not supported", f"choose one of: {', '.join(TASK_TYPES)}")
    allowed = TASK_TYPES_OF.get(dcfg.task, TASK_TYPES)
    if declared not in allowed:
        raise ConfigError(f"dataset={dcfg.task} is a {' or '.join(allowed)} task, not {declared}",
                          f"set dataset.task_type={allowed[0]}, or pick a dataset of type {declared}")
    verbalize = dcfg.get("verbalize", False)
    if not isinstance(verbalize, bool):
        raise ConfigError(f"dataset.verbalize={verbalize!r} is not true or false", "dataset.verbalize=true or false")
    if verbalize and declared != "classification":
        raise ConfigError(f"dataset.verbalize=true needs a classification dataset, and dataset={dcfg.task} is {declared}",
                          "set dataset.verbalize=false")
    if verbalize and "{text}" not in str(dcfg.get("verbalize_template")):
        raise ConfigError(f"dataset.verbalize_template={dcfg.get('verbalize_template')!r} has no {{text}} to put the text in",
                          'e.g. dataset.verbalize_template="Review: {text}\\nSentiment:"')


def check_columns_set(dcfg) -> None:
    """A file or hub dataset names the columns its task type reads."""
    for key in COLUMNS[declared_type(dcfg)]:
        if not dcfg.get(key):
            raise ConfigError(f"dataset.task_type={declared_type(dcfg)} reads dataset.{key}, which is not set",
                              f"set dataset.{key} to the column's name")


def deduplicate(texts: list[str], paired: list | None = None) -> tuple[list[str], list | None, int]:
    """Drop empty texts and repeats of a text up to case, punctuation and whitespace (the first one and what is
    paired with it, its label or response, win), so no text is in two splits."""
    nonempty = [i for i, text in enumerate(texts) if text.strip()]
    keep = [nonempty[i] for i in first_occurrences([texts[i] for i in nonempty])]
    return [texts[i] for i in keep], None if paired is None else [paired[i] for i in keep], len(texts) - len(keep)


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


def strata(split: Split) -> list[int]:
    """What a split is stratified by: its labels, or for a generative task one stratum for all (a plain seeded
    random split or subset)."""
    return split.labels if split.labels is not None else [0] * len(split)


def pick(split: Split, indices: list[int]) -> Split:
    def take(values):
        return None if values is None else [values[i] for i in indices]

    return Split(take(split.texts), take(split.labels), take(split.responses))


def verbalized(split: Split, template: str, label_names: list[str]) -> Split:
    """A classification split as instructions: each text in the prompt template, its label's name the response."""
    return Split([template.replace("{text}", text) for text in split.texts],
                 responses=[as_response(label_names[y]) for y in split.labels])


def load_task(dcfg, seed: int) -> TaskData:
    """The task's splits; `seed` (the dataset's split_seed) fixes them and any subsample."""
    texts, paired_values, duplicates = deduplicate(*TASKS[dcfg.task](dcfg))
    if declared_type(dcfg) == "classification":
        labels, label_names = label_ids(paired_values)
        if len(label_names) < 2:
            raise ConfigError(f"task {dcfg.task} has {len(label_names)} class(es)", "a classification task needs at least 2 labels")
        whole = Split(texts, labels)
    else:
        label_names, whole = [], Split(texts, responses=paired_values)
    if dcfg.max_examples and dcfg.max_examples < len(whole):
        whole = pick(whole, subsample(strata(whole), dcfg.max_examples, seed))
    train, validation, test = (pick(whole, p)
                               for p in stratified_split(strata(whole), (dcfg.validation_fraction, dcfg.test_fraction), seed))
    if dcfg.get("train_size") and dcfg.train_size < len(train):
        train = pick(train, subsample(strata(train), dcfg.train_size, seed))
    if dcfg.get("verbalize"):  # split as the classification task is, so each split holds the same texts
        train, validation, test = (verbalized(split, dcfg.verbalize_template, label_names) for split in (train, validation, test))
        label_names = []
    return TaskData(
        name=dcfg.name,
        task_type=task_type(dcfg),
        label_names=label_names,
        train=train,
        validation=validation,
        test=test,
        split_sizes={"train": len(train), "validation": len(validation), "test": len(test), "duplicates_dropped": duplicates},
        chat_template=dcfg.get("chat_template", False),
    )
