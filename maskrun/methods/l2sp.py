"""L2-SP (Li et al., 2018): fine-tune with the penalty alpha/2 · ||W − W_pre||² towards the pretrained weights.

The sum runs over every pretrained entry that trains; the new head has no pretrained value and is
not penalised. Under a mask the frozen entries equal W_pre exactly, so they add nothing to the
penalty nor to its gradient. Its curve is traced along alpha (0: full fine-tuning).
"""

import math

import torch

from maskrun.checks import in_range
from maskrun.methods import base

USES_MASK = True
DIAL = "method.alpha"


def check(cfg) -> None:
    check_strength(cfg.method.alpha, "method.alpha", "0.01")


def build(cfg, context) -> base.Method:
    return L2SP(cfg, context, cfg.method.alpha)


def check_strength(value, key: str, example: str) -> None:
    in_range(value, key, example, 0.0, math.inf, upper_open=True)


def squared_distance(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor],
                     importance: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Σ importance · (W − W_pre)² over every entry of `params` (importance 1 where None)."""
    terms = []
    for name, param in params.items():
        squared = (param - anchor[name]).square()
        terms.append((squared if importance is None else importance[name] * squared).sum())
    return torch.stack(terms).sum()


class L2SP(base.Method):
    """strength/2 · Σ importance · (W − W_pre)² over the pretrained entries that train: importance is 1 here,
    the Fisher score for EWC (maskrun.methods.ewc)."""

    def __init__(self, cfg, context: base.Context, strength: float):
        super().__init__(cfg, context)
        self.strength = strength

    def importance(self, anchor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The weight of each entry's squared distance, on the anchor's device (None: 1 for every entry)."""
        return None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from maskrun.models import pretrained_names  # keeps transformers off the config-check path

        pretrained = pretrained_names(self.context.pretrained_dir)
        self.params = {name: p for name, p in model.named_parameters() if name in pretrained}
        self.anchor = {name: p.detach().clone() for name, p in self.params.items()}
        self.weights = self.importance(self.anchor)
        return model

    def extra_loss(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        # A tensor the mask freezes whole has requires_grad=False (MaskedOptimizer) and stays at W_pre.
        training = {name: p for name, p in self.params.items() if p.requires_grad}
        if not training:
            return None
        return self.strength / 2 * squared_distance(training, self.anchor, self.weights)
