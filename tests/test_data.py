"""Tasks and corpora: packaged data, a user's own files, label mapping, deduplication and subsampling."""

from collections import Counter

import pandas as pd
import pytest
from omegaconf import OmegaConf

from maskrun import stages
from maskrun.data.corpus import check_corpus, load_corpus
from maskrun.data.dedup import text_key
from maskrun.data.tasks import check_task, deduplicate, label_ids, load_task
from maskrun.errors import ConfigError

BASE = {"name": "mine", "corpus": "movie_dialogs", "corpus_path": None, "corpus_max_texts": None, "max_examples": None,
        "train_size": None, "validation_fraction": 0.2, "test_fraction": 0.2, "split_seed": 0,
        "text_column": "review", "label_column": "verdict", "encoding": "utf-8"}


def dataset(**overrides):
    return OmegaConf.create({**BASE, **overrides})


def reviews(n: int = 50) -> pd.DataFrame:
    verdicts = ["good", "bad", "meh"]
    return pd.DataFrame({"review": [f"review number {i}" for i in range(n)], "verdict": [verdicts[i % 3] for i in range(n)]})


def test_deduplicate_keeps_the_first_of_each_text_and_drops_empty_ones():
    texts, labels, dropped = deduplicate(["a", "b", "a", "", "c", "b"], [0, 1, 1, 0, 1, 0])
    assert (texts, labels, dropped) == (["a", "b", "c"], [0, 1, 1], 3)


def test_texts_equal_up_to_case_punctuation_and_whitespace_are_the_same_text():
    texts, labels, dropped = deduplicate(["Call me now!", "call  me now", "CALL ME, NOW?", "call me later", "Ça va?", "ÇA VA"],
                                         [1, 0, 0, 1, 0, 1])
    assert (texts, labels, dropped) == (["Call me now!", "call me later", "Ça va?"], [1, 1, 0], 3)


def test_labels_map_to_ids_in_sorted_order():
    assert label_ids(["spam", "ham", "spam"]) == ([1, 0, 1], ["ham", "spam"])
    assert label_ids([3, 1, 3]) == ([1, 0, 1], ["1", "3"])


@pytest.mark.parametrize("fmt", ["csv", "csv with a byte order mark", "json", "jsonl", "json lines in .json", "parquet"])
def test_a_users_own_file_becomes_a_task_with_its_label_names(tmp_path, fmt):
    path = tmp_path / ("reviews." + {"csv with a byte order mark": "csv", "json lines in .json": "json"}.get(fmt, fmt))
    table = reviews()
    {"csv": lambda: table.to_csv(path, index=False),
     "csv with a byte order mark": lambda: table.to_csv(path, index=False, encoding="utf-8-sig"),
     "json": lambda: table.to_json(path, orient="records"),
     "jsonl": lambda: table.to_json(path, orient="records", lines=True),
     "json lines in .json": lambda: table.to_json(path, orient="records", lines=True),
     "parquet": lambda: table.to_parquet(path)}[fmt]()
    dcfg = dataset(task=path.suffix.lstrip(".").replace("jsonl", "json"), path=str(path))
    check_task(dcfg)
    task = load_task(dcfg, seed=0)
    assert task.label_names == ["bad", "good", "meh"]
    assert sum(task.split_sizes[s] for s in ("train", "validation", "test")) == 50
    by_text = dict(zip(table.review, table.verdict))
    for split in (task.train, task.validation, task.test):
        assert all(task.label_names[y] == by_text[t] for t, y in zip(split.texts, split.labels))


def test_a_users_file_is_checked_before_work(tmp_path):
    path = tmp_path / "reviews.csv"
    reviews().to_csv(path, index=False)
    with pytest.raises(ConfigError, match="does not exist"):
        check_task(dataset(task="csv", path=str(tmp_path / "missing.csv")))
    with pytest.raises(ConfigError, match="no column 'stars' .*one of: review, verdict"):
        check_task(dataset(task="csv", path=str(path), label_column="stars"))
    reviews().assign(verdict="good").to_csv(path, index=False)
    with pytest.raises(ConfigError, match="one class only"):
        check_task(dataset(task="csv", path=str(path)))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="is not valid Parquet"):
        check_task(dataset(task="parquet", path=str(tmp_path / "bad.parquet")))
    with pytest.raises(ConfigError, match="dataset.task='tsv'"):
        check_task(dataset(task="tsv"))


def test_sms_spam_is_deduplicated_before_splitting_so_no_near_duplicate_is_in_two_splits():
    task = load_task(dataset(task="sms_spam", name="sms_spam"), seed=0)
    assert task.label_names == ["ham", "spam"]
    assert task.split_sizes["duplicates_dropped"] > 0
    keys = [{text_key(t) for t in split.texts} for split in (task.train, task.validation, task.test)]
    assert [len(k) for k in keys] == [len(task.train), len(task.validation), len(task.test)]
    train, validation, test = keys
    assert not train & validation and not train & test and not validation & test


def test_bbc_news_has_five_topics_in_folder_order():
    task = load_task(dataset(task="bbc_news", name="bbc_news"), seed=0)
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    sizes = task.split_sizes
    assert sizes["train"] + sizes["validation"] + sizes["test"] + sizes["duplicates_dropped"] == 2225  # DESIGN §7


def test_train_size_is_a_stratified_seeded_subsample_of_the_training_split():
    full = load_task(dataset(task="rotten_tomatoes"), seed=0)
    small = load_task(dataset(task="rotten_tomatoes", train_size=200), seed=0)
    assert abs(len(small.train) - 200) <= 1 and set(small.train.texts) <= set(full.train.texts)
    assert small.test.texts == full.test.texts
    share = lambda labels: Counter(labels)[1] / len(labels)
    assert share(small.train.labels) == pytest.approx(share(full.train.labels), abs=0.01)
    assert load_task(dataset(task="rotten_tomatoes", train_size=200), seed=0).train.texts == small.train.texts


def test_a_users_corpus_is_read_by_line_deduplicated_and_keyed_by_its_content(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"line {i}" for i in range(40)) + "\n\nLine 7!\nline   12\n")
    dcfg = dataset(corpus_path=str(path))
    check_corpus(dcfg)
    corpus = load_corpus(dcfg)
    assert sorted(corpus.train + corpus.validation + corpus.test) == sorted(f"line {i}" for i in range(40))
    assert len(corpus.validation) == len(corpus.test) == 1
    key = stages.corpus(dcfg)
    path.write_text("something else\nentirely\nand more\n")
    assert stages.corpus(dcfg) != key
    with pytest.raises(ConfigError, match="corpus_path"):
        check_corpus(dataset(corpus_path=str(tmp_path / "missing.txt")))
    path.write_text("the same line\nThe same line.\nanother line\n")
    with pytest.raises(ConfigError, match="holds 2 distinct text"):
        check_corpus(dcfg)


@pytest.mark.parametrize("name", ["movie_dialogs", "bible", "shakespeare"])
def test_packaged_corpora_hold_real_text(name):
    corpus = load_corpus(dataset(corpus=name, corpus_max_texts=2000))
    assert len(corpus.train) + len(corpus.validation) + len(corpus.test) == 2000 and all(t.strip() for t in corpus.train)


def test_held_out_text_of_the_default_corpus_is_never_in_its_training_split():
    corpus = load_corpus(dataset(corpus="movie_dialogs"))
    train, validation, test = ({text_key(t) for t in texts} for texts in (corpus.train, corpus.validation, corpus.test))
    assert len(validation) == len(corpus.validation) > 0 and len(test) == len(corpus.test) > 0
    assert not validation & train and not test & train and not validation & test
