"""Per-entry importance scores of the eligible parameters."""

import torch


def magnitude(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.abs() for name, p in params.items()}
