"""Masked optimizers: frozen entries stay bit-identical, and optimizer state exists only for what trains.

Masking gradients is not enough: decoupled weight decay and momentum still move entries whose
gradient is zero. So the torch optimizer never sees a frozen entry at all. Each partially frozen
parameter is represented to it by a "shadow" parameter holding only its trainable entries,
gathered through a flat index before the step and scattered back after it. The shadow's storage
is released between steps, so the only persistent cost is the optimizer state of the trainable
entries plus an int32 index.
"""

import torch
from torch.distributed.tensor import DTensor

from maskrun.distributed import global_norm, local_entries, local_mask


def decays(param: torch.Tensor) -> bool:
    """Weight decay applies to matrices (weights, embeddings), never to vectors: biases and the gains of LayerNorm
    and RMSNorm, whatever their names (nanoGPT's and the HF Trainer's rule)."""
    return param.ndim >= 2


def make_torch_optimizer(ocfg, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if ocfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(ocfg.betas), eps=ocfg.eps)
    if ocfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(ocfg.betas), eps=ocfg.eps)
    if ocfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=ocfg.momentum, nesterov=ocfg.nesterov)
    raise ValueError(f"unknown optimizer {ocfg.name!r}")


class PartiallyFrozen:
    """A parameter with some frozen entries, seen by the optimizer through its trainable entries only.

    Under FSDP2 the parameter is a shard (a DTensor): everything below addresses its local entries
    (`local_entries`) with the same shard of the mask (`local_mask`).
    """

    def __init__(self, param: torch.nn.Parameter, frozen: torch.Tensor):
        self.param = param
        frozen = local_mask(frozen, param)
        self.index = (~frozen).flatten().nonzero().squeeze(1).to(device=param.device, dtype=torch.int32)
        self.shadow = torch.nn.Parameter(local_entries(param).new_empty(0))

    # index_select and scatter_ are several times faster on CPU than indexing with `[]`;
    # scatter_ wants an int64 index, made only for the moment of the write.
    def gather(self) -> None:
        self.shadow.data = torch.index_select(local_entries(self.param.detach()).view(-1), 0, self.index)
        grad = self.param.grad
        self.shadow.grad = None if grad is None else torch.index_select(local_entries(grad).view(-1), 0, self.index)
        self.param.grad = None

    def scatter(self) -> None:
        local_entries(self.param.data).view(-1).scatter_(0, self.index.long(), self.shadow.data)
        self.shadow.data = self.shadow.data.new_empty(0)
        self.shadow.grad = None


class MaskedOptimizer:
    """Wraps a torch optimizer so that it updates exactly the trainable entries of a model."""

    def __init__(self, model: torch.nn.Module, frozen: dict[str, torch.Tensor], ocfg, lr: float):
        self.partial: list[PartiallyFrozen] = []
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            mask = frozen.get(name)
            if mask is not None and bool(mask.all()):
                param.requires_grad_(False)  # no gradient is even computed for it
            if not param.requires_grad:  # frozen whole, or left out by the method (e.g. lora's base weights)
                continue
            group = decay if decays(param) else no_decay  # by the parameter's own rank: a shadow is flat
            if mask is not None and bool(mask.any()):
                part = PartiallyFrozen(param, mask.to(param.device))
                self.partial.append(part)
                param = part.shadow
            group.append(param)
        groups = [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = make_torch_optimizer(ocfg, [g for g in groups if g["params"]], lr)
        self.sharded = any(isinstance(p, DTensor) for p in model.parameters())  # FSDP2: each rank holds a shard

    def trainable_tensors(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, max_grad_norm: float | None = None, scaler: "torch.amp.GradScaler | None" = None) -> float:
        """Clip the trainable gradients, step, write the trainable entries back. Returns the grad norm.

        With a GradScaler, a step whose gradients overflowed is skipped: the shadows then hold the
        values they were gathered from, so scattering them back changes nothing.
        """
        for part in self.partial:
            part.gather()
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        with_grad = [p for p in self.trainable_tensors() if p.grad is not None]
        # Frozen entries are not in these gradients, so they take no share of the clipping budget.
        norm = global_norm([local_entries(p.grad) for p in with_grad], self.sharded)
        if max_grad_norm is not None:
            # torch's clipping takes plain and DTensor gradients, not both in one call
            for tensors in ([p for p in with_grad if not isinstance(p, DTensor)],
                            [p for p in with_grad if isinstance(p, DTensor)]):
                torch.nn.utils.clip_grads_with_norm_(tensors, max_grad_norm, norm)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        for part in self.partial:
            part.scatter()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_bytes(self) -> int:
        """Bytes of optimizer state, including the indices that address the trainable entries."""
        state = sum(
            local_entries(t).numel() * t.element_size()  # this rank's: FSDP2 shards the state too
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        return state + sum(p.index.numel() * p.index.element_size() for p in self.partial)
