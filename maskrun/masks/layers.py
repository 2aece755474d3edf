"""Freeze the embeddings and the bottom transformer layers, train the top.

Only whole layers freeze, so the frozen share is the one closest to the ratio that whole layers
allow; ratio_actual records it. Parameters outside the blocks (e.g. the pooler) count as the top.
No scores, hence no ties.
"""

import torch

from maskrun.masks.select import Selection, closest_prefix, layer_of, layer_order

NEEDS_SCORES = False
ALLOCATIONS = ("global",)
GRANULARITIES = ("tensor",)


def build(mcfg, params: dict[str, torch.Tensor], scores, seed: int) -> Selection:
    bottom_up = sorted({layer_of(name) for name in params}, key=layer_order)
    sizes = [sum(p.numel() for name, p in params.items() if layer_of(name) == layer) for layer in bottom_up]
    frozen_layers = bottom_up[:closest_prefix(sizes, mcfg.ratio * sum(sizes))]
    return Selection({name: torch.full(p.shape, layer_of(name) in frozen_layers) for name, p in params.items()})
