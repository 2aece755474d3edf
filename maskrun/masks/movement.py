"""Movement (Sanh et al., 2020): freeze the entries whose movement score -sum_t W_t * dL/dW_t is lowest.

The score accumulates over a short fine-tuning pass (the cached selection pass,
maskrun.masks.selection_pass: `mask.select_epochs` epochs, or the first `mask.select_steps` steps).
A high score marks a weight that fine-tuning pushes away from zero, a low one a weight it pulls towards
zero, which movement pruning removes and this strategy keeps at its pretrained value. Ties are drawn
from the seed and recorded, as for every score.
"""

import torch

from maskrun.masks import select

NEEDS_SCORES = False  # the scores come from the selection pass, not the calibration scores stage
SELECTION_RECORD = "movement"
ALLOCATIONS = select.ALLOCATIONS
GRANULARITIES = select.GRANULARITIES


def build(mcfg, params: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], seed: int) -> select.Selection:
    return select.freeze_lowest({name: scores[name] for name in params}, mcfg.ratio, mcfg.allocation,
                                mcfg.granularity, seed)
