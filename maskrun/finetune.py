"""Masked fine-tuning of the task model: only the trainable entries ever move.

Recipes from the masking literature, all off by default:
- `finetune.unfreeze_after=E`: train under the mask for E epochs, then release every entry and
  continue with a fresh optimizer and a fresh warmup + decay schedule over the remaining epochs.
- `finetune.input_mask_prob=p`: during training, replace each non-special input token by [MASK]
  with probability p (augmentation; evaluation always sees the clean text).
- `finetune.early_stopping_patience=P`: stop after P epochs without a better validation result (by the task's
  metric) and restore the best model (kept in memory) before evaluation.
- `finetune.checkpoint_every=S`: checkpoint the whole training state every S steps (maskrun.checkpoint); a rerun
  resumes from the last checkpoint and ends bit for bit as an uninterrupted run.
"""

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import get_scheduler

from maskrun.checkpoint import Checkpointing, Position
from maskrun.distributed import Processes
from maskrun.optim import MaskedOptimizer
from maskrun.progress import StageProgress

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def mask_inputs(input_ids: torch.Tensor, tokenizer, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each non-special token by [MASK] with probability `prob`."""
    replace = torch.rand(input_ids.shape, generator=generator) < prob
    replace &= ~torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    return input_ids.masked_fill(replace, tokenizer.mask_token_id)


def warmup_steps(warmup_ratio: float, steps: int) -> int:
    """Steps of learning-rate warmup, rounded up as transformers' TrainingArguments.get_warmup_steps does."""
    return math.ceil(warmup_ratio * steps)


def micro_batch_loss(model, task, examples: list, fcfg, device: torch.device,
                     noise_generator: torch.Generator) -> torch.Tensor:
    """The mean loss over one micro-batch, its inputs masked when `finetune.input_mask_prob` asks for it."""
    batch = task.collate(examples)
    if fcfg.input_mask_prob:
        batch["input_ids"] = mask_inputs(batch["input_ids"], task.tokenizer, fcfg.input_mask_prob, noise_generator)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[fcfg.precision], enabled=fcfg.precision != "fp32"):
        return model(**batch).loss


class Phase:
    """One optimizer with its learning-rate schedule: the masked phase, or the released one after it."""

    def __init__(self, model, frozen: dict[str, torch.Tensor], fcfg, ocfg, steps: int):
        self.optimizer = MaskedOptimizer(model, frozen, ocfg, fcfg.lr)
        self.scheduler = get_scheduler(fcfg.scheduler, self.optimizer.optimizer,
                                       num_warmup_steps=warmup_steps(fcfg.warmup_ratio, steps),
                                       num_training_steps=steps)

    def step(self, max_grad_norm: float | None, scaler: torch.amp.GradScaler) -> float:
        scale_before = scaler.get_scale()
        grad_norm = self.optimizer.step(max_grad_norm, scaler)
        # The scaler skips a step whose gradients overflowed and lowers its scale; the schedule
        # waits for a step that happened (as HF accelerate and Trainer do).
        if scaler.get_scale() >= scale_before:
            self.scheduler.step()
        return grad_norm


def released_phase(model, fcfg, ocfg, steps: int) -> Phase:
    """After finetune.unfreeze_after: every entry trains, under a fresh optimizer and schedule over `steps`."""
    model.requires_grad_(True)
    return Phase(model, {}, fcfg, ocfg, steps)


class Callback:
    """What watches or steers fine-tuning from outside the loop (a tracker, a mask that moves); each hook's default
    does nothing."""

    def on_step_begin(self, step: int, model, optimizer: MaskedOptimizer) -> None:
        """Before the first forward pass of step `step` (counted from 1)."""

    def on_step_end(self, step: int, model, optimizer: MaskedOptimizer, record: dict) -> None:
        """After the optimizer step of step `step`; `record` is its history["train"] entry."""

    def on_validation(self, record: dict) -> None:
        """After an epoch's validation; `record` is its history["validation"] entry."""

    def on_resume(self, history: dict) -> None:
        """After a checkpoint is restored, before the first step left; `history` holds the steps and validations
        taken before it (by a run whose callbacks were other objects)."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep for a resumed run to go on as this one would (tensors, JSON values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Puts back what `state_dict` returned, at the end of the checkpoint's step."""


class EarlyStopping:
    """Tracks the best validation result by the task's metric; keeps a copy of the best model's weights."""

    def __init__(self, patience: int | None, metric: str):
        self.patience, self.metric, self.best, self.best_state, self.bad_epochs = patience, metric, None, None, 0

    def should_stop(self, model, validation: dict) -> bool:
        if self.patience is None:
            return False
        if self.best is None or validation[self.metric] > self.best[self.metric]:
            self.best, self.bad_epochs = validation, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore_best(self, model) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def finetune(model, task, frozen: dict[str, torch.Tensor] | Path, fcfg, ocfg, device: torch.device, seed: int,
             extra_loss: Callable[[torch.nn.Module, int], torch.Tensor | None] | None = None,
             callbacks: Sequence[Callback] = (), checkpointing: Checkpointing | None = None,
             processes: Processes | None = None) -> dict:
    """Train `model` on the training split of `task` (a maskrun.tasks TaskType); returns the loss and validation
    history.

    The parameters that train are those with requires_grad, less the entries `frozen` holds (the masks, or the
    mask file to read them from: then no bool mask stays resident while training, only the optimizer's packed copy);
    `extra_loss(model, step)`, when given, is what a method adds to the task loss of every
    micro-batch of step `step` (penalties, replay); `callbacks` are called around every step and validation;
    `checkpointing` says where and how often to checkpoint, and a checkpoint found there is resumed.

    With several `processes` (maskrun.distributed), `model` is what they train together (wrapped by
    `processes.wrap`), `finetune.batch_size` is the global batch and each rank runs its share of every micro-batch.

    `history["selected"]` is the validation result of the model left in `model` (the best one under
    early stopping, else the last); `optimizer_state_bytes` is the largest over the phases.
    """
    torch.manual_seed(seed)
    processes = processes or Processes(None)
    trained, model = model, processes.unwrapped(model)  # forward through `trained`; names and evaluation: `model`
    examples = task.examples(task.data.train)
    micro_per_epoch = math.ceil(len(examples) / fcfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / fcfg.grad_accum)
    masked_epochs = fcfg.unfreeze_after or fcfg.epochs
    # Read inline, so that the masks read from a file are released as soon as the optimizer has packed them.
    phase = Phase(model, load_file(frozen) if isinstance(frozen, Path) else frozen, fcfg, ocfg,
                  steps_per_epoch * masked_epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=fcfg.precision == "fp16")
    stopping = EarlyStopping(fcfg.early_stopping_patience, task.METRIC)
    if fcfg.gradient_checkpointing:  # recompute activations in the backward pass: less memory, more time
        model.activation_checkpointing_enable({"use_reentrant": False})
    order_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(seed + 1)
    history = {"train": [], "validation": [], "selected": None, "optimizer_state_bytes": 0}
    step, first_epoch = 0, 1
    checkpointing = checkpointing or Checkpointing(None)
    checkpoint = checkpointing.latest()
    if checkpoint is not None:
        if checkpoint.position.released:
            phase = released_phase(model, fcfg, ocfg, steps_per_epoch * (fcfg.epochs - masked_epochs))
        checkpointing.restore(checkpoint, model, phase, scaler, stopping, history,
                              {"order": order_generator, "noise": noise_generator}, callbacks)
        step, first_epoch = checkpoint.position.step, checkpoint.position.epoch
        for callback in callbacks:  # not every callback derives from Callback (a mask that moves)
            if hasattr(callback, "on_resume"):
                callback.on_resume(history)
    with StageProgress("finetune", total=steps_per_epoch * fcfg.epochs) as progress, \
            checkpointing.deferring_preemption():
        for epoch in range(first_epoch, fcfg.epochs + 1):
            taken = step - (epoch - 1) * steps_per_epoch  # the steps of this epoch a resumed run took before
            if epoch == masked_epochs + 1 and taken == 0:
                history["optimizer_state_bytes"] = phase.optimizer.state_bytes()
                phase = released_phase(model, fcfg, ocfg, steps_per_epoch * (fcfg.epochs - masked_epochs))
            model.train()
            epoch_order = order_generator.get_state()  # a resumed epoch draws its order again from here
            order = torch.randperm(len(examples), generator=order_generator).tolist()
            batches = [order[i:i + fcfg.batch_size] for i in range(0, len(order), fcfg.batch_size)]
            groups = [batches[i:i + fcfg.grad_accum] for i in range(0, len(batches), fcfg.grad_accum)]
            for group in groups[taken:]:
                # Each micro-batch's mean loss is weighted by its share of the group's examples, so that
                # the step's gradient and loss are the means over the group (also a short last group).
                group_size = sum(len(rows) for rows in group)
                step_loss, step_extra = 0.0, 0.0
                for callback in callbacks:
                    callback.on_step_begin(step + 1, model, phase.optimizer)
                for rows in group:
                    rows, counted = processes.share(rows)  # all of them in one process
                    loss = micro_batch_loss(trained, task, [examples[i] for i in rows], fcfg, device, noise_generator)
                    extra = extra_loss(model, step + 1) if extra_loss else None
                    total = loss if extra is None else loss + extra
                    if not torch.isfinite(total):
                        raise FloatingPointError(
                            f"fine-tuning loss became {total.item()} at step {step + 1} (lower finetune.lr)")
                    weight = counted / group_size  # exactly 1.0 for a group of one micro-batch in one process
                    # DDP and FSDP average the ranks' gradients: each rank's share counts world_size times.
                    scaler.scale(total * (weight * processes.world_size)).backward()
                    step_loss += loss.item() * weight
                    step_extra += 0.0 if extra is None else extra.item() * weight
                step_loss, step_extra = processes.sum(step_loss, step_extra)
                lr = phase.scheduler.get_last_lr()[0]  # the rate this step uses
                grad_norm = phase.step(fcfg.max_grad_norm, scaler)
                step += 1
                record = {"step": step, "epoch": epoch, "loss": step_loss, "extra_loss": step_extra,
                          "grad_norm": grad_norm, "lr": lr}
                history["train"].append(record)
                for callback in callbacks:
                    callback.on_step_end(step, model, phase.optimizer, record)
                if checkpointing.due(step):
                    checkpointing.save(Position(epoch, step, released=epoch > masked_epochs), model, phase, scaler,
                                       stopping, history, {"order": epoch_order, "noise": noise_generator.get_state()},
                                       callbacks)
                    checkpointing.stop_if_preempted(step)
                progress.advance(loss=step_loss)
            validation = {"step": step, "epoch": epoch, **task.evaluate(model, "validation", device)}
            history["validation"].append(validation)
            for callback in callbacks:
                callback.on_validation(validation)
            history["selected"] = validation
            if stopping.should_stop(model, validation):
                break
    if stopping.best is not None:
        stopping.restore_best(model)
        history["selected"] = stopping.best
    history["optimizer_state_bytes"] = max(history["optimizer_state_bytes"], phase.optimizer.state_bytes())
    return history
