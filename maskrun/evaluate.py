"""Task metrics of the fine-tuned model, and interference: what fine-tuning did to pretraining."""

import re
from pathlib import Path

import torch

from maskrun.data import Corpus
from maskrun.data.dedup import overlap
from maskrun.models import load_backbone, load_pretraining_model
from maskrun.pretrain import objective_batch, objective_loss, pack_texts

# One checkpoint and one held-out text give the same masked positions, hence the same loss, in every run.
EVAL_SEED = 1234
EVAL_MLM_PROBABILITY = 0.15


def macro_f1(pred: list[int], gold: list[int], num_labels: int) -> float:
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / num_labels


@torch.no_grad()
def classify(model, tokenizer, split, max_length: int, device: torch.device, batch_size: int = 256) -> dict:
    model.eval()
    pred = []
    for i in range(0, len(split), batch_size):
        batch = tokenizer(split.texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        pred += logits.argmax(-1).tolist()
    accuracy = sum(p == g for p, g in zip(pred, split.labels)) / len(split)
    return {"accuracy": accuracy, "macro_f1": macro_f1(pred, split.labels, model.config.num_labels)}


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
        # A causal LM predicts every labelled token but the first of each block.
        n = int(batch_labels.ne(-100).sum()) - (len(batch_labels) if objective == "causal_lm" else 0)
        total += objective_loss(model, batch_inputs, batch_labels, objective).item() * n
        count += n
    return total / count


@torch.no_grad()
def hidden_states(backbone, inputs: torch.Tensor, device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """Each layer's hidden states at the non-padding positions, as (tokens, hidden) matrices."""
    backbone.eval()
    layers = None
    for i in range(0, len(inputs), batch_size):
        ids = inputs[i:i + batch_size].to(device)
        keep = ids.ne(backbone.config.pad_token_id)
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


def interference(pretrained_dir: Path, finetuned_model, tokenizer, corpus: Corpus, heldout_texts: int,
                 objective: str | None, max_length: int, device: torch.device, batch_size: int) -> dict:
    """Forgetting (held-out pretraining loss after − before), CKA of hidden states, and weight drift.

    The top-level measures use the corpus's test slice; `validation` holds forgetting on its validation slice,
    for choosing settings. Each slice is capped at `heldout_texts` texts. `objective` is None for a checkpoint
    without a pretraining head: then the losses and forgetting are null.
    """
    texts = {"test": corpus.test[:heldout_texts], "validation": corpus.validation[:heldout_texts]}
    batches = {name: heldout_blocks(tokenizer, slice_texts, max_length, objective) for name, slice_texts in texts.items()}
    model = (load_pretraining_model(pretrained_dir, objective) if objective else load_backbone(pretrained_dir)).to(device)
    backbone = model.base_model

    def losses() -> dict:
        return {name: pretraining_loss(model, inputs, labels, objective, device, batch_size) if objective else None
                for name, (inputs, labels) in batches.items()}

    before = {name: p.detach().clone() for name, p in backbone.named_parameters()}
    loss_before = losses()
    hidden_before = hidden_states(backbone, batches["test"][0], device, batch_size)
    # The fine-tuned backbone under the pretrained head.
    result = backbone.load_state_dict(finetuned_model.base_model.state_dict(), strict=False)
    assert not result.missing_keys, f"fine-tuned backbone lacks {result.missing_keys}"
    loss_after = losses()
    hidden_after = hidden_states(backbone, batches["test"][0], device, batch_size)
    cka_per_layer = [linear_cka(a, b) for a, b in zip(hidden_before, hidden_after)]
    drift = drift_l2(before, dict(backbone.named_parameters()))
    return {
        **forgetting(texts["test"], corpus.train, loss_before["test"], loss_after["test"]),
        "cka": sum(cka_per_layer) / len(cka_per_layer),
        "cka_per_layer": cka_per_layer,
        "drift_l2": drift["total"],
        "drift_l2_per_layer": drift["per_layer"],
        "validation": forgetting(texts["validation"], corpus.train, loss_before["validation"], loss_after["validation"]),
    }
