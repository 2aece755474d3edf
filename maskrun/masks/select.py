"""Exact selection: freeze exactly floor(ratio * N) entries, the lowest-scoring ones, ties broken by position."""

import math

import torch


def freeze_lowest(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Global allocation at element granularity: one threshold over every eligible entry."""
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    k = math.floor(ratio * flat.numel())
    frozen = torch.zeros(flat.numel(), dtype=torch.bool)
    # A stable sort breaks ties by position: parameter order, then flat index.
    frozen[torch.sort(flat, stable=True).indices[:k]] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = frozen[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return masks
