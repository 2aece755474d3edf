"""Full fine-tuning: every entry trains."""

import torch

from maskrun.masks import select

NEEDS_SCORES = False
ALLOCATIONS = select.ALLOCATIONS
GRANULARITIES = select.GRANULARITIES


def build(mcfg, params: dict[str, torch.Tensor], scores, seed: int) -> select.Selection:
    return select.Selection({name: torch.zeros(p.shape, dtype=torch.bool) for name, p in params.items()})
