"""Mask generation: which pretrained entries stay frozen during fine-tuning.

The `mask` stage is cached (its key: maskrun.stages.mask); the entry holds the mask and, beside it,
its tied share. A strategy turns
scores into a `Selection` (the masks, and how many frozen entries were chosen among exactly tied
scores); a new strategy is one module here (with `build`, and the `NEEDS_SCORES`,
`ALLOCATIONS`, `GRANULARITIES` it supports), one YAML in conf/mask/, and one line in STRATEGIES.
A strategy whose mask moves during fine-tuning (maskrun.masks.dynamic) also has `check(mcfg, shapes)` and
`moving_mask(mcfg, model, names, seed)`, the callback that decides each step's mask.
A strategy that chooses after a short fine-tuning pass (lt_sft, movement) also names the
`SELECTION_RECORD` of that cached pass its scores are (maskrun.masks.selection_pass).

Strategies see every tensor neuron-major: a matrix's rows are its output neurons, whatever the
layout its module stores (GPT-2's Conv1D keeps its weight as (in, out)); the masks they return
are put back in each parameter's own layout.
"""

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from maskrun.masks import (child_tuning, dynamic, file, hft, importance, layers, lisa, lt_sft, movement, none,
                           random, similarity, spectrum)
from maskrun.masks.select import Selection

MASK_FILE = "mask.safetensors"
MASK_INFO_FILE = "mask.json"  # beside the mask in its cache entry: what a cache hit reports of its build
TIED_SHARE_WARNING = 0.05  # above this share of frozen entries chosen among ties, a run warns

log = logging.getLogger(__name__)

STRATEGIES = {
    "none": none,
    "random": random,
    "importance": importance,
    "similarity": similarity,
    "layers": layers,
    "lt_sft": lt_sft,
    "movement": movement,
    "spectrum": spectrum,
    "hft": hft,
    "child_tuning": child_tuning,
    "lisa": lisa,
    "file": file,
}


def needs_scores(mcfg) -> bool:
    return STRATEGIES[mcfg.strategy].NEEDS_SCORES


def moves(mcfg) -> bool:
    """Whether the strategy's mask moves during fine-tuning."""
    return hasattr(STRATEGIES[mcfg.strategy], "moving_mask")


def check_moving(cfg, shapes: dict[str, torch.Size]) -> None:
    """The checks of a moving mask, given the shapes of the eligible parameters; ConfigError before any work."""
    dynamic.check(cfg)
    STRATEGIES[cfg.mask.strategy].check(cfg.mask, shapes)


def moving_mask(mcfg, model: torch.nn.Module, names, seed: int) -> dynamic.MovingMask | None:
    """The fine-tuning callback that moves the mask of the eligible parameters `names`; None for a static mask."""
    return STRATEGIES[mcfg.strategy].moving_mask(mcfg, model, names, seed) if moves(mcfg) else None


def selection_record(mcfg) -> str | None:
    """Which record of the selection pass (maskrun.masks.selection_pass) the strategy's scores are; None for the
    strategies that need no fine-tuning pass (only those that do declare SELECTION_RECORD)."""
    return getattr(STRATEGIES[mcfg.strategy], "SELECTION_RECORD", None)


def eligible_parameters(model: torch.nn.Module, pretrained: set[str], include, exclude) -> dict[str, torch.Tensor]:
    """Pretrained parameters selected by the include/exclude regexes, in the model's order."""
    # A newly initialised head always trains.
    return {name: param.detach() for name, param in model.named_parameters()
            if name in pretrained and selected(name, include, exclude)}


def selected(name: str, include, exclude) -> bool:
    """Whether mask.include/mask.exclude (lists of regexes, or null) let the parameter `name` be masked."""
    return ((not include or any(re.search(p, name) for p in include))
            and not (exclude and any(re.search(p, name) for p in exclude)))


def neuron_axes(model: torch.nn.Module, names) -> dict[str, int]:
    """The axis of each named parameter along which its output neurons lie, from the type of its module.

    nn.Linear stores (out, in), nn.Embedding one row per token, convolutions (out, ...): axis 0.
    GPT-2's Conv1D stores (in, out): axis 1. A vector's entries are its neurons (axis 0).
    """
    from transformers.pytorch_utils import Conv1D  # imported here: config checks import this package

    axes = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(prefix=module_name, recurse=False):
            if param_name in names:
                axes[param_name] = 1 if isinstance(module, Conv1D) and param.dim() == 2 else 0
    return axes


def build_mask(mcfg, params: dict[str, torch.Tensor], scores: dict[str, torch.Tensor] | None, seed: int,
               axes: dict[str, int]) -> Selection:
    """One bool tensor per eligible parameter (True = frozen at its pretrained value), and its ties.

    `axes` gives each parameter's output-neuron axis (`neuron_axes`).
    """
    def neuron_major(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.movedim(axes[name], 0) for name, t in tensors.items() if name in params}

    strategy = STRATEGIES[mcfg.strategy]
    if getattr(strategy, "PARAMETER_LAYOUT", False):  # a mask read back from a file is in the parameters' layout
        return strategy.build(mcfg, params, scores, seed)
    selection = strategy.build(mcfg, neuron_major(params), None if scores is None else neuron_major(scores), seed)
    masks = {name: m.movedim(0, axes[name]).contiguous() for name, m in selection.masks.items()}
    return Selection(masks, selection.tied)


def write_mask(selection: Selection, out_dir: Path) -> None:
    """The `mask` stage's entry: the masks, and beside them what a cache hit must report of their build."""
    save_mask(selection.masks, Path(out_dir) / MASK_FILE)
    (Path(out_dir) / MASK_INFO_FILE).write_text(json.dumps({"tied_share": selection.tied_share}))


def read_tied_share(entry: Path, strategy: str | None = None) -> float:
    """The tied share of the mask in a `mask` entry, logged when high."""
    tied_share = json.loads((Path(entry) / MASK_INFO_FILE).read_text())["tied_share"]
    warn_if_tied(tied_share, strategy)
    return tied_share


def tied_share_warning(tied_share: float | None, strategy: str | None = None) -> str | None:
    """What a run says when too much of its mask was chosen among exactly tied scores; None when it is fine.
    The remedies named are those of the strategy's scores: a selection pass's (lt_sft, movement) or calibration's."""
    if tied_share is None or tied_share <= TIED_SHARE_WARNING:
        return None
    message = (f"{tied_share:.1%} of the frozen entries were chosen at random among exactly tied scores "
               f"(more than {TIED_SHARE_WARNING:.0%}), so the mask there reflects the seed, not importance. ")
    if strategy in STRATEGIES and hasattr(STRATEGIES[strategy], "SELECTION_RECORD"):
        return message + ("Such ties are mostly entries the selection pass never moves (unused tokens and positions "
                          "have a zero gradient); raise mask.ratio past them, leave them out with mask.exclude, or "
                          "lengthen the pass (mask.select_epochs, mask.select_steps=null)")
    return message + ("Such ties are mostly entries the calibration data never reach (unused tokens and positions "
                      "have a zero gradient); raise mask.ratio past them, leave them out with mask.exclude, calibrate "
                      "on more data (mask.calib_batches=null: the whole training split), or use mask.score=magnitude")


def warn_if_tied(tied_share: float, strategy: str | None = None) -> None:
    message = tied_share_warning(tied_share, strategy)
    if message:
        log.warning(message)


def save_mask(masks: dict[str, torch.Tensor], path: Path) -> None:
    save_file({name: m.contiguous().cpu() for name, m in masks.items()}, path)


def mask_summary(mcfg, masks: dict[str, torch.Tensor], tied_share: float) -> dict:
    eligible = sum(m.numel() for m in masks.values())
    frozen = sum(int(m.sum()) for m in masks.values())
    realized = frozen / eligible if eligible else 0.0
    return {
        "strategy": mcfg.strategy,
        "score": mcfg.score if needs_scores(mcfg) else None,
        "allocation": mcfg.allocation,
        "granularity": mcfg.granularity,
        "ratio": float(mcfg.ratio) if mcfg.ratio is not None else realized,  # mask=file: the file's share
        "ratio_actual": realized,
        "eligible": eligible,
        "frozen": frozen,
        "trainable": eligible - frozen,
        "tied_share": tied_share,
    }
