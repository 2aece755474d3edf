"""Freeze the least important entries (or, with freeze=most_important, the most important)."""

import torch

from maskrun.masks.scores import magnitude
from maskrun.masks.select import freeze_lowest


def build(mcfg, params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    scores = magnitude(params)
    if mcfg.freeze == "most_important":
        scores = {name: -s for name, s in scores.items()}
    return freeze_lowest(scores, mcfg.ratio)
