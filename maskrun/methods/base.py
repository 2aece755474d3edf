"""What every method is asked, and the answers of a method that adds nothing: see maskrun.methods."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


@dataclass
class Context:
    """What a method may need beyond its own settings."""

    cfg: DictConfig
    pretrained_dir: Path
    run_dir: Path
    tokenizer: object
    corpus: object  # maskrun.data.corpus.Corpus: its training texts only (replay)
    device: torch.device
    scores: Callable[[str], dict[str, torch.Tensor]]  # the scores stage's scores of a kind, e.g. "fisher" (ewc)


class Method:
    """The model trains as it is, under the mask; nothing is added to the loss."""

    def __init__(self, cfg: DictConfig, context: Context):
        self.cfg, self.context = cfg, context

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train; parameters left with requires_grad=False never train."""
        return model

    def extra_loss(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        """Added to the task loss of every micro-batch of optimizer step `step` (1-based)."""
        return None

    def generators(self) -> dict[str, torch.Generator]:
        """The random generators of its own that fine-tuning draws from (after prepare), by name: a checkpoint keeps
        their states."""
        return {}

    def finish(self, model: torch.nn.Module) -> torch.nn.Module:
        """The fine-tuned model to evaluate and save."""
        return model

    def record(self) -> dict:
        """Its settings for metrics.json `method` (the pipeline adds name, dial and trainable)."""
        return OmegaConf.to_container(self.cfg.method, resolve=True)

    def artifacts(self) -> dict:
        """What it wrote into the run dir, by name, for metrics.json `artifacts` (after finish)."""
        return {}


def trainable_entries(model: torch.nn.Module, frozen: dict[str, torch.Tensor]) -> int:
    """Entries that fine-tuning moves: of every parameter that trains, those its mask leaves trainable."""
    total = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            total += param.numel() - (int(frozen[name].sum()) if name in frozen else 0)
    return total
