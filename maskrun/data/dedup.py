"""One meaning of "the same text" for every corpus and task: equal up to case, punctuation and whitespace.

Corpora and tasks are deduplicated with it before they are split, and the overlap of held-out text
with the pretraining training split is counted with it, so a text is never both trained and measured on.
"""

import re

PUNCTUATION = re.compile(r"[^\w\s]|_")


def text_key(text: str) -> str:
    """The text casefolded, without punctuation, its whitespace collapsed: texts with equal keys are the same text."""
    return " ".join(PUNCTUATION.sub("", text.casefold()).split())


def first_occurrences(texts: list[str]) -> list[int]:
    """The index of the first text of each key, in order."""
    seen, keep = set(), []
    for i, text in enumerate(texts):
        key = text_key(text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def overlap(texts: list[str], reference: list[str]) -> int:
    """How many of `texts` also occur in `reference` as the same text."""
    reference_keys = {text_key(text) for text in reference}
    return sum(text_key(text) in reference_keys for text in texts)
