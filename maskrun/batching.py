"""Task texts to padded model inputs: shared by fine-tuning and the gradient scores, so both see the same batches."""

import torch


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(tokenizer, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    return dict(tokenizer.pad({"input_ids": ids}, return_tensors="pt"))
