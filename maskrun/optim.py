"""Masked optimizers: frozen entries stay bit-identical, and optimizer state exists only for what trains.

Masking gradients is not enough: decoupled weight decay and momentum still move entries whose
gradient is zero. So the torch optimizer never sees a frozen entry at all. Each partially frozen
parameter is represented to it by a "shadow" parameter holding only its trainable entries,
gathered through a flat index before the step and scattered back after it. The shadow's storage
and the index are released between steps, so what stays resident is the optimizer state of the
trainable entries plus a record of which entries train (a bitmap of one bit per entry, or an int32
index of the smaller side where that is smaller still: see TrainableEntries). With a stateful
optimizer it never exceeds plain fine-tuning's state, and stays within (1 - r) x it plus one bit
per entry.
"""

import math

import numpy as np
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


# numpy's bit packing and flatnonzero are the library routines for this, and on the CPU they are several times
# faster than torch's nonzero; on an accelerator torch's own ops run where the tensors are.
def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as uint8 bytes, eight entries each (entry i is bit i % 8 of byte i // 8)."""
    return torch.from_numpy(np.packbits(bits.cpu().numpy(), bitorder="little")).to(bits.device)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat bool tensor of `numel` entries that pack_bits packed."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(bool))
    return unpack_bits_with_torch(packed, numel)


def unpack_bits_with_torch(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """unpack_bits with torch's bit ops, on whatever device `packed` is."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


def flat_nonzero(bits: torch.Tensor) -> torch.Tensor:
    """The ascending positions (int64) of the True entries of a flat bool tensor."""
    if bits.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(bits.numpy()))
    return bits.nonzero().squeeze(1)


class TrainableEntries:
    """Which entries of a flattened parameter train, kept in the fewest bytes of three forms: the int32 index
    of the trainable entries, the int32 index of the frozen ones, or a bitmap of one bit per entry. The
    smaller index costs at most 4 bytes per frozen entry, no more than the state each frozen entry saves
    (8 bytes of fp32 Adam moments, 4 of SGD momentum), so a partially frozen parameter never costs more
    than it would fully trained; the bitmap bounds the record by one bit per entry. Every form gives the same ascending index, so the optimizer sees the same entries in the same order."""

    def __init__(self, frozen: torch.Tensor):
        trainable = ~frozen.flatten()
        self.numel, self.count = trainable.numel(), int(trainable.sum())
        sizes = {"trainable_index": 4 * self.count, "frozen_index": 4 * (self.numel - self.count),
                 "bitmap": math.ceil(self.numel / 8)}
        self.form = min(sizes, key=sizes.get)  # on a tie the trainable index, which needs no unpacking
        if self.form == "bitmap":
            self.stored = pack_bits(trainable)
        else:
            side = trainable if self.form == "trainable_index" else ~trainable
            self.stored = flat_nonzero(side).to(torch.int32)

    def index(self) -> torch.Tensor:
        """The ascending flat index of the trainable entries, made for the moment of use."""
        if self.form == "trainable_index":
            return self.stored
        if self.form == "bitmap":
            trainable = unpack_bits(self.stored, self.numel)
        else:
            trainable = torch.ones(self.numel, dtype=torch.bool, device=self.stored.device)
            trainable[self.stored.long()] = False
        return flat_nonzero(trainable)

    def nbytes(self) -> int:
        return self.stored.numel() * self.stored.element_size()


class PartiallyFrozen:
    """A parameter with some frozen entries, seen by the optimizer through its trainable entries only.

    Under FSDP2 the parameter is a shard (a DTensor): everything below addresses its local entries
    (`local_entries`) with the same shard of the mask (`local_mask`).
    """

    def __init__(self, param: torch.nn.Parameter, frozen: torch.Tensor):
        self.param = param
        self.entries = TrainableEntries(local_mask(frozen, param))
        self.shadow = torch.nn.Parameter(local_entries(param).new_empty(0))

    # index_select and scatter_ are several times faster on CPU than indexing with `[]` or masked_select;
    # scatter_ wants an int64 index. An index unpacked from a bitmap is unpacked again at the write rather
    # than held through the optimizer step, so that the step's peak memory holds no unpacked index.
    def gather(self) -> None:
        index = self.entries.index()
        self.shadow.data = torch.index_select(local_entries(self.param.detach()).view(-1), 0, index)
        grad = self.param.grad
        self.shadow.grad = None if grad is None else torch.index_select(local_entries(grad).view(-1), 0, index)
        self.param.grad = None

    def scatter(self) -> None:
        local_entries(self.param.data).view(-1).scatter_(0, self.entries.index().long(), self.shadow.data)
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
        """Bytes the masking keeps resident for training: the optimizer state of the trainable entries and each
        partially frozen parameter's record of which of its entries train."""
        state = sum(
            local_entries(t).numel() * t.element_size()  # this rank's: FSDP2 shards the state too
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        return state + sum(part.entries.nbytes() for part in self.partial)
