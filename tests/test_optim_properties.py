"""MaskedOptimizer, specified by properties over random masks, optimizers, clipping and accumulation:

- every frozen entry is bit-identical to its starting value, and
- the trainable entries end where the plain torch optimizer takes them when it is given those
  entries alone (same gradients, same clipping, same weight-decay groups).
"""

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskrun.optim import MaskedOptimizer, make_torch_optimizer

OPTIMIZERS = {
    "adamw": SimpleNamespace(name="adamw", weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8),
    "adam": SimpleNamespace(name="adam", weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8),
    "sgd": SimpleNamespace(name="sgd", weight_decay=0.1, momentum=0.9, nesterov=False),
    "sgd_nesterov": SimpleNamespace(name="sgd", weight_decay=0.1, momentum=0.9, nesterov=True),
}
LR, STEPS = 0.05, 3


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def random_masks(model, seed: int, ratio: float) -> dict[str, torch.Tensor]:
    """Each parameter frozen at `ratio` on average; one is frozen whole and the last bias, like a task
    head, always trains, so that ratio 1 is a linear probe."""
    generator = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=generator) < ratio for n, p in model.named_parameters()}
    masks["0.bias"] = torch.ones_like(masks["0.bias"])
    masks["2.bias"] = torch.zeros_like(masks["2.bias"])
    return masks


def micro_batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)) for _ in range(count)]


def loss_of(model, batch) -> torch.Tensor:
    inputs, targets = batch
    return torch.nn.functional.mse_loss(model(inputs), targets)


def masked_training(model, masks, ocfg, clip, accum, batches) -> None:
    optimizer = MaskedOptimizer(model, masks, ocfg, LR)
    for step in range(STEPS):
        for batch in batches[step * accum:(step + 1) * accum]:
            (loss_of(model, batch) / accum).backward()
        optimizer.step(clip)


def reference_training(model, masks, ocfg, clip, accum, batches) -> None:
    """The dense torch optimizer over standalone tensors that hold only the trainable entries."""
    params = dict(model.named_parameters())
    keep = {n: ~m.flatten() for n, m in masks.items() if not m.all()}
    entries = {n: torch.nn.Parameter(params[n].detach().flatten()[k].clone()) for n, k in keep.items()}
    groups = [{"params": [entries[n] for n in entries if "bias" not in n], "weight_decay": ocfg.weight_decay},
              {"params": [entries[n] for n in entries if "bias" in n], "weight_decay": 0.0}]
    optimizer = make_torch_optimizer(ocfg, [g for g in groups if g["params"]], LR)
    for step in range(STEPS):
        for batch in batches[step * accum:(step + 1) * accum]:
            (loss_of(model, batch) / accum).backward()
        for name, entry in entries.items():
            entry.grad = params[name].grad.flatten()[keep[name]].clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(entries.values()), clip)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, entry in entries.items():
                params[name].view(-1)[keep[name]] = entry


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), ratio=st.floats(0.0, 1.0), optimizer=st.sampled_from(sorted(OPTIMIZERS)),
       clip=st.sampled_from([None, 0.05, 100.0]), accum=st.integers(1, 3))
def test_frozen_entries_stay_and_trainable_entries_follow_the_dense_optimizer(seed, ratio, optimizer, clip, accum):
    ocfg = OPTIMIZERS[optimizer]
    batches = micro_batches(seed, STEPS * accum)
    masked, reference = tiny_model(seed), tiny_model(seed)
    masks = random_masks(masked, seed, ratio)
    before = {n: p.detach().clone() for n, p in masked.named_parameters()}

    masked_training(masked, masks, ocfg, clip, accum, batches)
    reference_training(reference, masks, ocfg, clip, accum, batches)

    expected = dict(reference.named_parameters())
    for name, param in masked.named_parameters():
        frozen = masks[name]
        assert torch.equal(param.detach()[frozen], before[name][frozen]), f"{name}: a frozen entry moved"
        torch.testing.assert_close(param.detach()[~frozen], expected[name].detach()[~frozen], rtol=0, atol=1e-6)
