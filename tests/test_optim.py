"""MaskedOptimizer: no gradient for what is frozen whole, state only for what trains, GradScaler steps stay exact."""

from types import SimpleNamespace

import pytest
import torch

from maskrun.optim import MaskedOptimizer

ADAMW = SimpleNamespace(name="adamw", weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)


def model_and_masks(ratio: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 2))
    generator = torch.Generator().manual_seed(0)
    masks = {"0.weight": torch.rand(32, 32, generator=generator) < ratio, "0.bias": torch.ones(32, dtype=torch.bool)}
    return model, masks


def train_step(model, optimizer, scaler=None) -> None:
    loss = model(torch.randn(8, 32)).square().mean()
    (loss if scaler is None else scaler.scale(loss)).backward()
    optimizer.step(max_grad_norm=1.0, scaler=scaler)


def test_a_tensor_frozen_whole_gets_no_gradient_and_no_optimizer_slot():
    model, masks = model_and_masks(0.5)
    optimizer = MaskedOptimizer(model, masks, ADAMW, lr=0.1)
    assert not model[0].bias.requires_grad
    assert all(p is not model[0].bias for p in optimizer.trainable_tensors())
    train_step(model, optimizer)
    assert model[0].bias.grad is None


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_optimizer_state_holds_two_moments_per_trainable_entry_plus_its_index(ratio):
    model, masks = model_and_masks(ratio)
    optimizer = MaskedOptimizer(model, masks, ADAMW, lr=0.1)
    train_step(model, optimizer)
    trainable_in_masked = int((~masks["0.weight"]).sum())
    trainable = trainable_in_masked + sum(p.numel() for p in model[1].parameters())
    index_bytes = 4 * trainable_in_masked if masks["0.weight"].any() else 0
    steps = 4 * len(optimizer.trainable_tensors())  # one float32 step count per tensor
    assert optimizer.state_bytes() == 2 * 4 * trainable + index_bytes + steps


def test_a_scaled_step_keeps_frozen_entries_and_an_overflowed_step_changes_nothing():
    model, masks = model_and_masks(0.5)
    optimizer = MaskedOptimizer(model, masks, ADAMW, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = model[0].weight.detach().clone()
    frozen = masks["0.weight"]

    train_step(model, optimizer, scaler)
    assert torch.equal(model[0].weight[frozen], before[frozen])
    assert not torch.equal(model[0].weight[~frozen], before[~frozen])

    after_first = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale = scaler.get_scale()
    loss = scaler.scale(model(torch.randn(8, 32)).square().mean())
    loss.backward()
    model[0].weight.grad.view(-1)[(~frozen).flatten().nonzero()[0]] = float("inf")
    optimizer.step(max_grad_norm=1.0, scaler=scaler)
    assert scaler.get_scale() < scale  # the scaler saw the overflow and backed off
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), after_first[name]), f"{name} changed in a skipped step"
