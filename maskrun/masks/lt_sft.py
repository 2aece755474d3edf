"""LT-SFT (Ansell et al., 2022): fine-tune fully, freeze the entries that moved least, reset, fine-tune under the mask.

The first fine-tuning is the cached selection pass (maskrun.masks.selection_pass: every eligible entry
trains with the run's finetune and optimizer settings for `mask.select_epochs` epochs); its record
|W_ft - W_pre| is the score, and the lowest share `mask.ratio` is frozen through the usual exact
selection (ties drawn from the seed, their share recorded). The run itself starts again from the
pretrained weights, which is the reset.
"""

import torch

from maskrun.masks import select

NEEDS_SCORES = False  # the scores come from the selection pass, not the calibration scores stage
SELECTION_RECORD = "moved"
ALLOCATIONS = select.ALLOCATIONS
GRANULARITIES = select.GRANULARITIES


def build(mcfg, params: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], seed: int) -> select.Selection:
    return select.freeze_lowest({name: scores[name] for name in params}, mcfg.ratio, mcfg.allocation,
                                mcfg.granularity, seed)
