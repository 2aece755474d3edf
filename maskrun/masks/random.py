"""Freeze a seeded, uniformly random set of entries of exactly the requested size."""

import torch

from maskrun.masks.select import freeze_lowest


def build(mcfg, params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}
    return freeze_lowest(scores, mcfg.ratio)
