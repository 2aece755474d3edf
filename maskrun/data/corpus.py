"""Pretraining corpora: plain text, split into train and a held-out part for interference."""

import random
from dataclasses import dataclass

from maskrun.data.packaged import packaged_file

HELDOUT_FRACTION = 0.05


@dataclass
class Corpus:
    name: str
    train: list[str]
    heldout: list[str]


def _movie_dialogs() -> list[str]:
    # Each line is "utterance<TAB>reply"; both halves are text to learn from.
    lines = packaged_file("movie_dialogs").read_text(encoding="utf-8").splitlines()
    return [half.strip() for line in lines for half in line.split("\t") if half.strip()]


CORPORA = {"movie_dialogs": _movie_dialogs}


def load_corpus(name: str, max_texts: int | None, seed: int) -> Corpus:
    texts = CORPORA[name]()
    random.Random(seed).shuffle(texts)
    if max_texts:
        texts = texts[:max_texts]
    n_heldout = max(1, int(len(texts) * HELDOUT_FRACTION))
    return Corpus(name=name, train=texts[n_heldout:], heldout=texts[:n_heldout])
