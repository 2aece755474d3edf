"""Pretraining of a backbone on the pretraining corpus: masked LM for encoders, causal LM for decoders.

A pretrained model with `pretrain.steps=0` is used as is: saved whole when it has its own LM head
(which then measures forgetting), else only its backbone, and with no pretraining head its
forgetting cannot be measured (cka and drift_l2 still are).
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from maskrun.models import (boundary_ids, build_pretraining_model, pretrained_source, pretraining_objective,
                            save_backbone, torch_dtype)
from maskrun.progress import StageProgress

# BERT's treatment of a position chosen for masked LM: [MASK] 80% of the time, a random token 10%, unchanged the rest.
MASK_TOKEN_SHARE = 0.8
RANDOM_TOKEN_SHARE = 0.1


def pack_texts(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Concatenate the texts, each ended by a separator, into full blocks of max_length tokens (a stream shorter
    than one block makes one shorter block: blocks never hold padding)."""
    start, end = boundary_ids(tokenizer)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [tok for seq in ids for tok in seq + [end]]
    body = min(max_length - 2, len(stream))
    n_blocks = len(stream) // body
    blocks = torch.tensor(stream[: n_blocks * body]).view(n_blocks, body)
    return torch.cat([torch.full((n_blocks, 1), start), blocks, torch.full((n_blocks, 1), end)], dim=1)


def mask_tokens(tokenizer, blocks: torch.Tensor, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each non-special token is chosen with `probability` and becomes [MASK], a random token or
    stays (80/10/10); only chosen positions have labels.

    Every draw comes from `generator` (a CPU generator, `blocks` on the CPU), never from the global RNG: the
    positions depend on the generator's seed alone, not on what ran before nor on the device.
    """
    chosen = torch.rand(blocks.shape, generator=generator).lt(probability)
    chosen &= ~torch.isin(blocks, torch.tensor(tokenizer.all_special_ids))
    treatment = torch.rand(blocks.shape, generator=generator)
    random_tokens = torch.randint(len(tokenizer), blocks.shape, generator=generator)
    to_mask = chosen & treatment.lt(MASK_TOKEN_SHARE)
    to_random = chosen & treatment.ge(MASK_TOKEN_SHARE) & treatment.lt(MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)
    inputs = blocks.masked_fill(to_mask, tokenizer.mask_token_id)
    inputs[to_random] = random_tokens[to_random]
    return inputs, blocks.masked_fill(~chosen, -100)


def objective_batch(tokenizer, blocks: torch.Tensor, objective: str, mlm_probability: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels: masked positions drawn from `generator` for MLM; for a causal LM every next token but the
    separator pack_texts closes each block with (at a fixed position, not where a text ends: trivially learnt)."""
    if objective == "mlm":
        return mask_tokens(tokenizer, blocks, mlm_probability, generator)
    labels = blocks.clone()
    labels[:, -1] = -100
    return blocks, labels


def block_attention(input_ids: torch.Tensor, objective: str | None, pad_token_id: int) -> torch.Tensor:
    """The attention mask of packed blocks, which hold no padding: a causal LM attends to every position (a
    padding test would hide each end-of-text where pad is eos); MLM hides the [PAD] tokens its random
    replacement may draw."""
    return input_ids.ne(pad_token_id) if objective == "mlm" else torch.ones_like(input_ids, dtype=torch.bool)


def objective_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    attention_mask = block_attention(input_ids, objective, model.config.pad_token_id)
    if objective == "mlm" and hasattr(model, "cls"):
        # BERT: project only the masked positions, since the vocabulary projection dominates the cost.
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        selected = labels.ne(-100)
        logits = model.cls(hidden[selected])
        return torch.nn.functional.cross_entropy(logits.float(), labels[selected])
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def pretrain(mcfg, pcfg, texts: list[str], tokenizer_dir: Path, out_dir: Path, device: torch.device, seed: int,
             on_step: Callable[[dict], None] | None = None) -> None:
    """Pretrains (or saves as is) the backbone into out_dir; `on_step`, when given, sees each step's history record."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(out_dir)
    objective = pretraining_objective(mcfg, pcfg)
    if objective is None:
        save_backbone(pretrained_source(mcfg), tokenizer, out_dir, torch_dtype(mcfg))
        return
    model = build_pretraining_model(mcfg, tokenizer).to(device)
    history = train_objective(model, tokenizer, objective, pcfg, texts, device, seed, on_step) if pcfg.steps else []
    model.save_pretrained(out_dir)
    (Path(out_dir) / "pretrain_history.json").write_text(json.dumps(history))


def train_objective(model, tokenizer, objective: str, pcfg, texts: list[str], device: torch.device,
                    seed: int, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """`pcfg.steps` steps of the objective on batches of packed blocks; the loss and learning rate of each."""
    blocks = pack_texts(tokenizer, texts, pcfg.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, weight_decay=pcfg.weight_decay)
    # A schedule shorter than its warmup warms up over all of it.
    schedule = get_linear_schedule_with_warmup(optimizer, min(pcfg.warmup_steps, pcfg.steps), pcfg.steps)
    generator = torch.Generator().manual_seed(seed)  # the batches' rows and their masked positions
    history = []
    model.train()
    with StageProgress("pretrain", total=pcfg.steps) as progress:
        for step in range(1, pcfg.steps + 1):
            rows = torch.randint(len(blocks), (pcfg.batch_size,), generator=generator)
            inputs, labels = objective_batch(tokenizer, blocks[rows], objective, pcfg.mlm_probability, generator)
            loss = objective_loss(model, inputs.to(device), labels.to(device), objective)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            learning_rate = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step, "loss": loss.item(), "lr": learning_rate})
            if on_step:
                on_step(history[-1])
            progress.advance(loss=loss.item())
    return history
