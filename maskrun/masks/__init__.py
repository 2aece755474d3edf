"""Mask generation: which pretrained entries stay frozen during fine-tuning.

The `mask` stage is cached, keyed by the pretrained checkpoint, the scores it was built from and
the mask settings. A strategy turns scores into a mask; a new strategy is one module here (with
`build`, and the `NEEDS_SCORES`, `ALLOCATIONS`, `GRANULARITIES` it supports), one YAML in
conf/mask/, and one line in STRATEGIES.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from maskrun.masks import importance, layers, none, random, similarity

MASK_FILE = "mask.safetensors"

STRATEGIES = {
    "none": none,
    "random": random,
    "importance": importance,
    "similarity": similarity,
    "layers": layers,
}


def needs_scores(mcfg) -> bool:
    return STRATEGIES[mcfg.strategy].NEEDS_SCORES


def eligible_parameters(model: torch.nn.Module, pretrained: set[str], include, exclude) -> dict[str, torch.Tensor]:
    """Pretrained parameters selected by the include/exclude regexes, in the model's order."""
    # A newly initialised head always trains.
    return {name: param.detach() for name, param in model.named_parameters()
            if name in pretrained and selected(name, include, exclude)}


def selected(name: str, include, exclude) -> bool:
    """Whether mask.include/mask.exclude (lists of regexes, or null) let the parameter `name` be masked."""
    return ((not include or any(re.search(p, name) for p in include))
            and not (exclude and any(re.search(p, name) for p in exclude)))


def build_mask(mcfg, params: dict[str, torch.Tensor], scores: dict[str, torch.Tensor] | None,
               seed: int) -> dict[str, torch.Tensor]:
    """One bool tensor per eligible parameter; True = frozen at its pretrained value."""
    return STRATEGIES[mcfg.strategy].build(mcfg, params, scores, seed)


def cached_mask(cache, inputs: dict, cfg, params: dict[str, torch.Tensor],
                scores: dict[str, torch.Tensor] | None) -> tuple[Path, str]:
    """The mask file of the cached `mask` stage, and "hit" or "miss"."""
    entry, status = cache.fetch("mask", inputs,
                                lambda out: save_mask(build_mask(cfg.mask, params, scores, cfg.seed), out / MASK_FILE))
    return entry / MASK_FILE, status


def save_mask(masks: dict[str, torch.Tensor], path: Path) -> None:
    save_file({name: m.contiguous().cpu() for name, m in masks.items()}, path)


def mask_summary(mcfg, masks: dict[str, torch.Tensor]) -> dict:
    eligible = sum(m.numel() for m in masks.values())
    frozen = sum(int(m.sum()) for m in masks.values())
    return {
        "strategy": mcfg.strategy,
        "score": mcfg.score if needs_scores(mcfg) else None,
        "allocation": mcfg.allocation,
        "granularity": mcfg.granularity,
        "ratio": float(mcfg.ratio),
        "ratio_actual": frozen / eligible if eligible else 0.0,
        "eligible": eligible,
        "frozen": frozen,
        "trainable": eligible - frozen,
    }
