"""Mask generation: which pretrained entries stay frozen during fine-tuning.

A strategy turns per-entry scores into a mask; a new strategy is one module here, one YAML in
conf/mask/, and one line in STRATEGIES.
"""

import re

import torch

from maskrun.masks import importance, none, random

STRATEGIES = {
    "none": none.build,
    "random": random.build,
    "importance": importance.build,
}


def eligible_parameters(model: torch.nn.Module, pretrained: set[str], include, exclude) -> dict[str, torch.Tensor]:
    """Pretrained parameters selected by the include/exclude regexes, in the model's order."""
    params = {}
    for name, param in model.named_parameters():
        if name not in pretrained:
            continue  # a newly initialised head always trains
        if include and not any(re.search(p, name) for p in include):
            continue
        if exclude and any(re.search(p, name) for p in exclude):
            continue
        params[name] = param.detach()
    return params


def build_mask(mcfg, params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """One bool tensor per eligible parameter; True = frozen at its pretrained value."""
    return STRATEGIES[mcfg.strategy](mcfg, params, seed)


def mask_summary(mcfg, masks: dict[str, torch.Tensor]) -> dict:
    eligible = sum(m.numel() for m in masks.values())
    frozen = sum(int(m.sum()) for m in masks.values())
    return {
        "strategy": mcfg.strategy,
        "score": mcfg.score if mcfg.strategy == "importance" else None,
        "allocation": mcfg.allocation,
        "granularity": mcfg.granularity,
        "ratio": float(mcfg.ratio),
        "ratio_actual": frozen / eligible if eligible else 0.0,
        "eligible": eligible,
        "frozen": frozen,
        "trainable": eligible - frozen,
    }
