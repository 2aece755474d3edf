"""Interference: what fine-tuning did to pretraining (the task's own metrics: maskrun.tasks)."""

import re
from pathlib import Path

import torch

from maskrun.data import Corpus
from maskrun.data.dedup import overlap
from maskrun.models import load_backbone, load_pretraining_model
from maskrun.pretrain import block_attention, objective_batch, objective_loss, pack_texts

# One checkpoint and one held-out text give the same masked positions, hence the same loss, in every run.
EVAL_SEED = 1234
EVAL_MLM_PROBABILITY = 0.15


def heldout_blocks(tokenizer, texts: list[str], max_length: int, objective: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out pretraining text and its labels; for MLM masked positions drawn from their own generator, seeded
    with EVAL_SEED, so neither the global RNG nor the device moves them."""
    blocks = pack_texts(tokenizer, texts, max_length)
    return objective_batch(tokenizer, blocks, objective or "causal_lm", EVAL_MLM_PROBABILITY,
                           torch.Generator().manual_seed(EVAL_SEED))


@torch.no_grad()
def pretraining_loss(model, inputs: torch.Tensor, labels: torch.Tensor, objective: str, device: torch.device,
                     batch_size: int) -> float:
    """Mean loss per predicted token of the pretraining objective."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch_size):
        batch_inputs, batch_labels = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        # A causal LM predicts each labelled token from the ones before it: never a block's first.
        predicted = batch_labels[:, 1:] if objective == "causal_lm" else batch_labels
        n = int(predicted.ne(-100).sum())
        total += objective_loss(model, batch_inputs, batch_labels, objective).item() * n
        count += n
    return total / count


@torch.no_grad()
def hidden_states(backbone, inputs: torch.Tensor, objective: str | None, device: torch.device,
                  batch_size: int) -> list[torch.Tensor]:
    """Each layer's hidden states at the positions attended to, as (tokens, hidden) matrices."""
    backbone.eval()
    layers = None
    for i in range(0, len(inputs), batch_size):
        ids = inputs[i:i + batch_size].to(device)
        keep = block_attention(ids, objective, backbone.config.pad_token_id)
        out = backbone(input_ids=ids, attention_mask=keep, output_hidden_states=True).hidden_states
        chunk = [h[keep].double().cpu() for h in out]
        layers = chunk if layers is None else [torch.cat([a, b]) for a, b in zip(layers, chunk)]
    return layers


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (examples, features) matrices: 1 when they differ by a rotation and scale."""
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: layer.N (BERT's layer.N, GPT-2's h.N), embeddings, or other."""
    match = re.search(r"(?:^|\.)(?:layers?|h)\.(\d+)\.", name)
    if match:
        return f"layer.{match.group(1)}"
    return "embeddings" if re.search(r"embed|(?:^|\.)(?:wte|wpe)\.", name) else "other"


def drift_l2(pretrained: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> dict:
    """‖W_ft − W_pre‖ per layer and in total, over the pretrained parameters."""
    squares: dict[str, float] = {}
    for name, before in pretrained.items():
        change = float((finetuned[name].detach().double() - before.double()).pow(2).sum())
        squares[layer_of(name)] = squares.get(layer_of(name), 0.0) + change
    return {"total": sum(squares.values()) ** 0.5, "per_layer": {k: v ** 0.5 for k, v in squares.items()}}


def forgetting(texts: list[str], pretraining_texts: list[str], loss_before: float | None,
               loss_after: float | None) -> dict:
    """Forgetting on one held-out slice, with how many texts it used and how many of them pretraining saw (0)."""
    return {
        "heldout_texts": len(texts),
        "heldout_overlap": overlap(texts, pretraining_texts),
        "pretrain_loss_before": loss_before,
        "pretrain_loss_after": loss_after,
        "forgetting": None if loss_before is None else loss_after - loss_before,
    }


def task_inputs(tokenizer, texts: list[str], max_length: int, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's texts, one per row as the task model reads them, and the positions the pretraining head predicts
    there: for MLM masked positions drawn from their own generator, seeded with EVAL_SEED, as in heldout_blocks;
    for a causal LM every token of the text."""
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    if objective == "causal_lm":
        return ids, ids.masked_fill(batch["attention_mask"].eq(0), -100)
    return objective_batch(tokenizer, ids, objective, EVAL_MLM_PROBABILITY, torch.Generator().manual_seed(EVAL_SEED))


def predicted_log_probs(model, inputs: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """The pretraining head's log-probabilities over the vocabulary at each predicted position: the labelled ones
    for MLM, for a causal LM each position whose next token is labelled. (positions, vocabulary), in float64: a
    divergence between close models is a small difference of log-probabilities."""
    # A causal LM's labels are the tokenizer's attention mask (task_inputs); a padding test would hide an
    # end-of-text where pad is eos.
    attention_mask = inputs.ne(model.config.pad_token_id) if objective == "mlm" else labels.ne(-100)
    if objective == "mlm" and hasattr(model, "cls"):
        # BERT: project only the masked positions, as objective_loss does.
        hidden = model.bert(input_ids=inputs, attention_mask=attention_mask).last_hidden_state
        return model.cls(hidden[labels.ne(-100)]).double().log_softmax(-1)
    logits = model(input_ids=inputs, attention_mask=attention_mask).logits
    if objective == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits[labels.ne(-100)].double().log_softmax(-1)


def kl_divergences(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) = Σ_v P(v) (log P(v) − log Q(v)) at each position, from log-probabilities (positions, vocabulary)."""
    return torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


@torch.no_grad()
def kl_task(pretrained, finetuned, inputs: torch.Tensor, labels: torch.Tensor, objective: str, device: torch.device,
            batch_size: int) -> float:
    """Mean over predicted positions of KL(P_pre || P_ft) between two models' pretraining-head distributions."""
    pretrained.eval(), finetuned.eval()
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch_size):
        batch_inputs, batch_labels = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        kl = kl_divergences(predicted_log_probs(pretrained, batch_inputs, batch_labels, objective),
                            predicted_log_probs(finetuned, batch_inputs, batch_labels, objective))
        total += float(kl.sum())
        count += len(kl)
    return total / count


def interference(pretrained_dir: Path, finetuned_model, task, corpus: Corpus, heldout_texts: int,
                 objective: str | None, max_length: int, device: torch.device, batch_size: int) -> dict:
    """Forgetting (held-out pretraining loss after − before), CKA of hidden states, weight drift, and the KL
    divergence of the pretraining head's predictions on the task's held-out inputs (kl_task).

    The top-level measures use the corpus's test slice and the task's test texts; `validation` holds forgetting
    and kl_task on their validation counterparts, for choosing settings. Each is capped at `heldout_texts` texts.
    `objective` is None for a checkpoint without a pretraining head: then the losses, forgetting and kl_task are
    null. `task` (a maskrun.tasks TaskType) says how the pretraining objective reads the fine-tuned model.
    """
    tokenizer, data = task.tokenizer, task.data
    texts = {"test": corpus.test[:heldout_texts], "validation": corpus.validation[:heldout_texts]}
    task_texts = {"test": data.test.texts[:heldout_texts], "validation": data.validation.texts[:heldout_texts]}
    batches = {name: heldout_blocks(tokenizer, slice_texts, max_length, objective) for name, slice_texts in texts.items()}
    pretrained = (load_pretraining_model(pretrained_dir, objective) if objective else load_backbone(pretrained_dir)).to(device)
    finetuned = task.pretraining_view(pretrained, finetuned_model)

    def losses(model) -> dict:
        return {name: pretraining_loss(model, inputs, labels, objective, device, batch_size) if objective else None
                for name, (inputs, labels) in batches.items()}

    def task_kl(name: str) -> float | None:
        if not objective:
            return None
        inputs, labels = task_inputs(tokenizer, task_texts[name], max_length, objective)
        return kl_task(pretrained, finetuned, inputs, labels, objective, device, batch_size)

    loss_before, loss_after = losses(pretrained), losses(finetuned)
    hidden_before = hidden_states(pretrained.base_model, batches["test"][0], objective, device, batch_size)
    hidden_after = hidden_states(finetuned.base_model, batches["test"][0], objective, device, batch_size)
    cka_per_layer = [linear_cka(a, b) for a, b in zip(hidden_before, hidden_after)]
    drift = drift_l2(*({name: p.detach() for name, p in model.base_model.named_parameters()}
                       for model in (pretrained, finetuned)))
    return {
        **forgetting(texts["test"], corpus.train, loss_before["test"], loss_after["test"]),
        "cka": sum(cka_per_layer) / len(cka_per_layer),
        "cka_per_layer": cka_per_layer,
        "drift_l2": drift["total"],
        "drift_l2_per_layer": drift["per_layer"],
        "kl_task": task_kl("test"),
        "kl_task_texts": len(task_texts["test"]),
        "validation": {**forgetting(texts["validation"], corpus.train, loss_before["validation"], loss_after["validation"]),
                       "kl_task": task_kl("validation"), "kl_task_texts": len(task_texts["validation"])},
    }
