"""Freezing is exact: frozen entries stay bit-identical, whatever the optimizer does to the rest."""

import pytest
import torch
from omegaconf import OmegaConf

from maskrun.optim import MaskedOptimizer

OPTIMIZERS = {
    "adamw": {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8},
    "sgd_momentum": {"name": "sgd", "weight_decay": 0.1, "momentum": 0.9, "nesterov": False},
}


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def train(model, frozen, optimizer_cfg, steps=20):
    optimizer = MaskedOptimizer(model, frozen, OmegaConf.create(optimizer_cfg), lr=0.05)
    x, y = torch.randn(32, 8), torch.randint(3, (32,))
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step(max_grad_norm=1.0)
    return optimizer


@pytest.mark.parametrize("optimizer_cfg", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_frozen_entries_bit_identical(optimizer_cfg):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    frozen = {
        "0.weight": torch.rand(16, 8, generator=generator) < 0.5,  # partially frozen
        "0.bias": torch.ones(16, dtype=torch.bool),  # wholly frozen
    }
    train(model, frozen, optimizer_cfg)
    params = dict(model.named_parameters())
    assert torch.equal(params["0.weight"][frozen["0.weight"]], before["0.weight"][frozen["0.weight"]])
    assert torch.equal(params["0.bias"], before["0.bias"])
    # ...while everything trainable did move, weight decay and momentum included.
    assert not torch.equal(params["0.weight"][~frozen["0.weight"]], before["0.weight"][~frozen["0.weight"]])
    assert not torch.equal(params["2.weight"], before["2.weight"])


def test_wholly_frozen_tensor_computes_no_gradient():
    model = tiny_model()
    MaskedOptimizer(model, {"0.bias": torch.ones(16, dtype=torch.bool)}, OmegaConf.create(OPTIMIZERS["adamw"]), lr=0.1)
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad


def test_optimizer_state_shrinks_with_the_ratio():
    def state_bytes(ratio: float) -> int:
        model = tiny_model()
        frozen = {"0.weight": torch.arange(128).view(16, 8) < int(ratio * 128)}
        return train(model, frozen, OPTIMIZERS["adamw"], steps=1).state_bytes()

    assert state_bytes(0.9) < state_bytes(0.5) < state_bytes(0.0)
