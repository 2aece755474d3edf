"""Domain adaptation: continue the causal-LM objective on a new corpus (e.g. code after prose).

Each split's documents are packed into blocks of `max_length` tokens, as pretraining packs its corpus; the model is
the checkpoint's own causal LM, its head included. Learning is the drop of the held-out task loss from the
pretrained model's (`learning` = loss_before − loss); forgetting reads the fine-tuned model as it is.
"""

import torch

from maskrun.pretrain import objective_batch, pack_texts
from maskrun.tasks.base import DecoderTask, token_loss


class CausalLM(DecoderTask):
    METRIC = "learning"

    def __init__(self, data, tokenizer, max_length, ecfg):
        super().__init__(data, tokenizer, max_length, ecfg)
        self.loss_before: dict[str, float] = {}
        self.blocks: dict[str, list[torch.Tensor]] = {}  # each held-out split's blocks, packed once

    def examples(self, split):
        return list(pack_texts(self.tokenizer, split.texts, self.max_length))

    def collate(self, examples):
        inputs, labels = objective_batch(self.tokenizer, torch.stack(examples), "causal_lm", 0.0, None)
        return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "labels": labels}  # no padding

    def batches(self, split: str):
        if split not in self.blocks:
            self.blocks[split] = self.examples(getattr(self.data, split))
        blocks = self.blocks[split]
        size = self.ecfg.batch_size
        return (self.collate(blocks[i:i + size]) for i in range(0, len(blocks), size))

    def start(self, model, device):
        self.loss_before = {split: token_loss(model, self.batches(split), device)["loss"]
                            for split in ("validation", "test")}

    def evaluate(self, model, split, device):
        result = token_loss(model, self.batches(split), device)
        before = self.loss_before[split]
        return result | {"loss_before": before, "learning": before - result["loss"]}


def build(data, tokenizer, max_length, ecfg) -> CausalLM:
    return CausalLM(data, tokenizer, max_length, ecfg)
