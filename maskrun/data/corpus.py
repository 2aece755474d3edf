"""Pretraining corpora: plain text, deduplicated, then split into train and a held-out part for interference.

The held-out part is split again into a validation slice (what settings are chosen on) and a test
slice (what is reported), so forgetting is never both chosen on and reported on the same text.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from maskrun.data import dedup
from maskrun.data.packaged import packaged_file
from maskrun.errors import ConfigError

HELDOUT_FRACTION = 0.05
MIN_TEXTS = 3  # one to pretrain on, one for each held-out slice


@dataclass
class Corpus:
    name: str
    train: list[str]
    validation: list[str]
    test: list[str]


def _movie_dialogs() -> list[str]:
    # Each line is "utterance<TAB>reply"; both halves are text to learn from.
    lines = packaged_file("movie_dialogs").read_text(encoding="utf-8").splitlines()
    return [half.strip() for line in lines for half in line.split("\t") if half.strip()]


def _bible() -> list[str]:
    with packaged_file("bible").open(encoding="utf-8") as f:
        return [json.loads(line)["text"].strip() for line in f if line.strip()]


def _shakespeare() -> list[str]:
    # One text per paragraph (speeches are separated by blank lines); the *_gut_f.txt files are duplicates.
    texts = []
    for path in sorted(packaged_file("shakespeare").glob("*_gut.txt")):
        paragraphs = path.read_text(encoding="utf-8", errors="replace").split("\n\n")
        texts += [" ".join(p.split()) for p in paragraphs if p.strip()]
    return texts


CORPORA = {"movie_dialogs": _movie_dialogs, "bible": _bible, "shakespeare": _shakespeare}


def text_file_lines(path: Path, encoding: str) -> list[str]:
    """A user's corpus: one text per non-empty line."""
    try:
        return [line.strip() for line in path.read_text(encoding=encoding).splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, LookupError) as err:
        raise ConfigError(f"cannot read dataset.corpus_path={path}: {err}", "point it at a text file, one text per line") from None


def too_few_texts(name: str, count: int) -> ConfigError:
    return ConfigError(f"corpus {name} holds {count} distinct text(s)",
                       f"pretraining needs at least {MIN_TEXTS}: one to train on, one each to validate and test forgetting on")


def check_corpus(dcfg) -> None:
    """Cheap checks, before any work, that the corpus can be read."""
    if dcfg.get("corpus_path"):
        path = Path(dcfg.corpus_path)
        if not path.is_file():
            raise ConfigError(f"dataset.corpus_path={path} is not a file", "point it at a text file, one text per line")
        distinct = len(dedup.first_occurrences(text_file_lines(path, dcfg.get("encoding") or "utf-8")))
        if distinct < MIN_TEXTS:
            raise too_few_texts(str(path), distinct)
        return
    if dcfg.corpus not in CORPORA:
        raise ConfigError(f"dataset.corpus={dcfg.corpus!r} is not supported",
                          f"choose one of: {', '.join(sorted(CORPORA))}, or set dataset.corpus_path")
    packaged_file(dcfg.corpus)


def load_corpus(dcfg) -> Corpus:
    """The corpus, deduplicated before it is shuffled (seeded), cut to dataset.corpus_max_texts and split."""
    if dcfg.get("corpus_path"):
        name, texts = str(dcfg.corpus_path), text_file_lines(Path(dcfg.corpus_path), dcfg.get("encoding") or "utf-8")
    else:
        name, texts = dcfg.corpus, CORPORA[dcfg.corpus]()
    texts = [texts[i] for i in dedup.first_occurrences(texts)]
    random.Random(dcfg.split_seed).shuffle(texts)
    if dcfg.corpus_max_texts:
        texts = texts[: dcfg.corpus_max_texts]
    if len(texts) < MIN_TEXTS:
        raise too_few_texts(name, len(texts))
    n_heldout = max(2, int(len(texts) * HELDOUT_FRACTION))  # at least a text in each held-out slice
    heldout, n_validation = texts[:n_heldout], n_heldout // 2
    return Corpus(name=name, train=texts[n_heldout:], validation=heldout[:n_validation], test=heldout[n_validation:])
