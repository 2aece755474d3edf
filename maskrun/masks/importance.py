"""Freeze the least important entries (or, with freeze=most_important, the most important)."""

import torch

from maskrun.masks import select

NEEDS_SCORES = True
ALLOCATIONS = select.ALLOCATIONS
GRANULARITIES = select.GRANULARITIES
FREEZE = ("least_important", "most_important")


def build(mcfg, params: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], seed: int) -> select.Selection:
    sign = -1 if mcfg.freeze == "most_important" else 1
    return select.freeze_lowest({name: sign * scores[name] for name in params}, mcfg.ratio, mcfg.allocation,
                                mcfg.granularity, seed)
