"""Classification: a label per text, predicted by a new head on the pretrained backbone; accuracy and macro-F1.

Forgetting reads the fine-tuned backbone under the checkpoint's own pretraining head: the task head is new, so
the pretraining head is the only one that knows the pretraining objective.
"""

import copy

import torch

from maskrun.batching import collate, encode
from maskrun.models import init_task_model, load_task_model
from maskrun.tasks.base import TaskType


def macro_f1(pred: list[int], gold: list[int], num_labels: int) -> float:
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / num_labels


@torch.no_grad()
def classify(model, tokenizer, split, max_length: int, device: torch.device, batch_size: int) -> dict:
    model.eval()
    pred = []
    for i in range(0, len(split), batch_size):
        batch = tokenizer(split.texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        pred += logits.argmax(-1).tolist()
    accuracy = sum(p == g for p, g in zip(pred, split.labels)) / len(split)
    return {"accuracy": accuracy, "macro_f1": macro_f1(pred, split.labels, model.config.num_labels)}


class Classification(TaskType):
    METRIC = "accuracy"

    def load_model(self, pretrained_dir, dtype=None):
        return load_task_model(pretrained_dir, self.data.num_labels, dtype)

    def new_model(self, pretrained_dir, seed):
        return init_task_model(pretrained_dir, self.data.num_labels, seed)

    def examples(self, split):
        return list(zip(encode(self.tokenizer, split.texts, self.max_length), split.labels))

    def collate(self, examples):
        ids, labels = zip(*examples)
        return collate(self.tokenizer, list(ids)) | {"labels": torch.tensor(labels)}

    def evaluate(self, model, split, device):
        return classify(model, self.tokenizer, getattr(self.data, split), self.max_length, device, self.ecfg.batch_size)

    def pretraining_view(self, pretrained, finetuned):
        view = copy.deepcopy(pretrained)
        result = view.base_model.load_state_dict(finetuned.base_model.state_dict(), strict=False)
        assert not result.missing_keys, f"fine-tuned backbone lacks {result.missing_keys}"
        return view

    def record(self):
        return super().record() | {"labels": self.data.label_names}


def build(data, tokenizer, max_length, ecfg) -> Classification:
    return Classification(data, tokenizer, max_length, ecfg)
