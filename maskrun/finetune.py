"""Masked fine-tuning of the task model: only the trainable entries ever move."""

import math

import torch
from transformers import get_scheduler

from maskrun.evaluate import classify
from maskrun.optim import MaskedOptimizer
from maskrun.progress import StageProgress


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(tokenizer, ids: list[list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


def finetune(model, tokenizer, task, frozen: dict[str, torch.Tensor], fcfg, ocfg, device: torch.device, seed: int) -> dict:
    """Train `model` on the task's training split; returns the loss and validation history."""
    torch.manual_seed(seed)
    train_ids = encode(tokenizer, task.train.texts, fcfg.max_length)
    labels = torch.tensor(task.train.labels)
    optimizer = MaskedOptimizer(model, frozen, ocfg, fcfg.lr)
    micro_per_epoch = math.ceil(len(train_ids) / fcfg.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / fcfg.grad_accum)
    total_steps = steps_per_epoch * fcfg.epochs
    scheduler = get_scheduler(
        fcfg.scheduler, optimizer.optimizer, num_warmup_steps=int(fcfg.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    generator = torch.Generator().manual_seed(seed)
    history = {"train": [], "validation": [], "optimizer_state_bytes": optimizer.state_bytes()}
    step = 0
    with StageProgress("finetune", total=total_steps) as progress:
        for epoch in range(1, fcfg.epochs + 1):
            model.train()
            order = torch.randperm(len(train_ids), generator=generator).tolist()
            batches = [order[i:i + fcfg.batch_size] for i in range(0, len(order), fcfg.batch_size)]
            for micro, rows in enumerate(batches, start=1):
                batch = collate(tokenizer, [train_ids[i] for i in rows], device)
                loss = model(**batch, labels=labels[rows].to(device)).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {step + 1} (lower finetune.lr)")
                (loss / fcfg.grad_accum).backward()
                if micro % fcfg.grad_accum and micro != len(batches):
                    continue
                grad_norm = optimizer.step(fcfg.max_grad_norm)
                scheduler.step()
                step += 1
                history["train"].append({"step": step, "epoch": epoch, "loss": loss.item(), "grad_norm": grad_norm})
                progress.advance(loss=loss.item())
            validation = classify(model, tokenizer, task.validation, fcfg.max_length, device)
            history["validation"].append({"step": step, "epoch": epoch, **validation})
    history["optimizer_state_bytes"] = optimizer.state_bytes()
    return history
