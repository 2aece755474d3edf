"""Masked-language-model pretraining of a backbone from scratch on the pretraining corpus."""

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, get_linear_schedule_with_warmup

from maskrun.models import build_pretraining_model
from maskrun.progress import StageProgress


def pack_texts(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Concatenate the texts, separated by [SEP], into full blocks of max_length tokens."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [tok for seq in ids for tok in seq + [tokenizer.sep_token_id]]
    body = max_length - 2
    n_blocks = max(1, len(stream) // body)
    stream = (stream + [tokenizer.pad_token_id] * body)[: n_blocks * body]
    blocks = torch.tensor(stream).view(n_blocks, body)
    cls = torch.full((n_blocks, 1), tokenizer.cls_token_id)
    sep = torch.full((n_blocks, 1), tokenizer.sep_token_id)
    return torch.cat([cls, blocks, sep], dim=1)


def masked_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MLM loss computed only at the masked positions: the vocabulary projection dominates the cost."""
    hidden = model.bert(input_ids=input_ids, attention_mask=input_ids.ne(model.config.pad_token_id)).last_hidden_state
    selected = labels.ne(-100)
    logits = model.cls(hidden[selected])
    return torch.nn.functional.cross_entropy(logits.float(), labels[selected])


def pretrain(mcfg, pcfg, texts: list[str], tokenizer_dir: Path, out_dir: Path, device: torch.device, seed: int) -> None:
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_pretraining_model(mcfg, tokenizer).to(device)
    blocks = pack_texts(tokenizer, texts, pcfg.max_length)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=pcfg.mlm_probability)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, weight_decay=pcfg.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, min(pcfg.warmup_steps, pcfg.steps // 10), pcfg.steps)
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    with StageProgress("pretrain", total=pcfg.steps) as progress:
        for step in range(1, pcfg.steps + 1):
            rows = torch.randint(len(blocks), (pcfg.batch_size,), generator=generator)
            batch = collator.torch_mask_tokens(blocks[rows].clone())
            loss = masked_lm_loss(model, batch[0].to(device), batch[1].to(device))
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
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "pretrain_history.json").write_text(json.dumps(history))
