"""Pretraining of a backbone on the pretraining corpus: masked LM for encoders, causal LM for decoders.

A pretrained model with `pretrain.steps=0` is used as is: only its backbone is saved, and with no
pretraining head its forgetting cannot be measured (cka and drift_l2 still are).
"""

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, get_linear_schedule_with_warmup

from maskrun.models import build_pretraining_model, pretrained_source, save_backbone
from maskrun.progress import StageProgress


def pretraining_objective(mcfg, pcfg) -> str | None:
    """The objective the checkpoint's head was trained for; None when a pretrained model is used as is."""
    if pretrained_source(mcfg) and pcfg.steps == 0:
        return None
    return mcfg.objective


def pack_texts(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Concatenate the texts, each ended by a separator, into full blocks of max_length tokens."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [tok for seq in ids for tok in seq + [end]]
    body = max_length - 2
    n_blocks = max(1, len(stream) // body)
    stream = (stream + [tokenizer.pad_token_id] * body)[: n_blocks * body]
    blocks = torch.tensor(stream).view(n_blocks, body)
    return torch.cat([torch.full((n_blocks, 1), start), blocks, torch.full((n_blocks, 1), end)], dim=1)


def objective_batch(collator, blocks: torch.Tensor, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels: masked positions for MLM; every non-padding next token for causal LM."""
    if objective == "mlm":
        return collator.torch_mask_tokens(blocks.clone())
    return blocks, blocks.masked_fill(blocks.eq(collator.tokenizer.pad_token_id), -100)


def objective_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    attention_mask = input_ids.ne(model.config.pad_token_id)
    if objective == "mlm" and hasattr(model, "cls"):
        # BERT: project only the masked positions, since the vocabulary projection dominates the cost.
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        selected = labels.ne(-100)
        logits = model.cls(hidden[selected])
        return torch.nn.functional.cross_entropy(logits.float(), labels[selected])
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def pretrain(mcfg, pcfg, texts: list[str], tokenizer_dir: Path, out_dir: Path, device: torch.device, seed: int) -> None:
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(out_dir)
    objective = pretraining_objective(mcfg, pcfg)
    if objective is None:
        save_backbone(pretrained_source(mcfg), tokenizer, out_dir)
        return
    model = build_pretraining_model(mcfg, tokenizer).to(device)
    blocks = pack_texts(tokenizer, texts, pcfg.max_length)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=objective == "mlm", mlm_probability=pcfg.mlm_probability)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, weight_decay=pcfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, min(pcfg.warmup_steps, pcfg.steps // 10), pcfg.steps)
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    with StageProgress("pretrain", total=pcfg.steps) as progress:
        for step in range(1, pcfg.steps + 1):
            rows = torch.randint(len(blocks), (pcfg.batch_size,), generator=generator)
            inputs, labels = objective_batch(collator, blocks[rows], objective)
            loss = objective_loss(model, inputs.to(device), labels.to(device), objective)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step, "loss": loss.item()})
            progress.advance(loss=loss.item())
    model.save_pretrained(out_dir)
    (Path(out_dir) / "pretrain_history.json").write_text(json.dumps(history))
