"""Freeze a seeded, uniformly random set of exactly the requested size.

One uniform draw per unit (an entry, a row, a tensor), so that every unit is equally likely to be
frozen whatever its width: a LayerNorm vector's entry as often as a wide matrix's row.
"""

import torch

from maskrun.masks import select

NEEDS_SCORES = False
ALLOCATIONS = select.ALLOCATIONS
GRANULARITIES = select.GRANULARITIES


def build(mcfg, params: dict[str, torch.Tensor], scores, seed: int) -> select.Selection:
    generator = torch.Generator().manual_seed(seed)
    draws = {name: unit_draws(p, mcfg.granularity, generator) for name, p in params.items()}
    return select.freeze_lowest(draws, mcfg.ratio, mcfg.allocation, mcfg.granularity, seed)


def unit_draws(p: torch.Tensor, granularity: str, generator: torch.Generator) -> torch.Tensor:
    """A tensor of p's shape holding one uniform draw per unit, repeated over the unit's entries."""
    if granularity == "element":
        return torch.rand(p.shape, generator=generator)
    units = select.as_units(p, granularity)
    return torch.rand(len(units), 1, generator=generator).expand(units.shape).reshape(p.shape)
