"""Freeze a seeded, uniformly random set of exactly the requested size."""

import torch

from maskrun.masks import select

NEEDS_SCORES = False
ALLOCATIONS = select.ALLOCATIONS
GRANULARITIES = select.GRANULARITIES


def build(mcfg, params: dict[str, torch.Tensor], scores, seed: int) -> select.Selection:
    generator = torch.Generator().manual_seed(seed)
    random_scores = {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}
    return select.freeze_lowest(random_scores, mcfg.ratio, mcfg.allocation, mcfg.granularity, seed)
