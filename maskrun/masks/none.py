"""Full fine-tuning: every entry trains."""

import torch


def build(mcfg, params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in params.items()}
