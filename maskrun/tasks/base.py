"""What every task type is asked: see maskrun.tasks."""

import math

import torch
from transformers import AutoConfig, AutoModelForCausalLM


class TaskType:
    """A fine-tuning task of one type: the model head it trains, its batches and loss, and its metrics.

    `METRIC` names the key of `evaluate`'s result that is higher when the task is learned better: settings are
    chosen on it (validation) and reported by it (test).
    """

    METRIC: str

    def __init__(self, data, tokenizer, max_length: int, ecfg):
        self.data, self.tokenizer, self.max_length, self.ecfg = data, tokenizer, max_length, ecfg

    def load_model(self, pretrained_dir, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """The pretrained checkpoint under the task's head."""
        raise NotImplementedError

    def new_model(self, pretrained_dir, seed: int) -> torch.nn.Module:
        """The same task model with every weight newly initialised (the scratch control)."""
        raise NotImplementedError

    def examples(self, split) -> list:
        """A split's training examples, in the split's order; `collate` turns a list of them into a batch."""
        raise NotImplementedError

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for a batch, `labels` included: model(**batch).loss is the task loss."""
        raise NotImplementedError

    def start(self, model: torch.nn.Module, device: torch.device) -> None:
        """Measures what fine-tuning is compared with, on the model before it trains (nothing, by default)."""

    def evaluate(self, model: torch.nn.Module, split: str, device: torch.device) -> dict:
        """The task metrics of `model` on split "validation" or "test"."""
        raise NotImplementedError

    def pretraining_view(self, pretrained: torch.nn.Module, finetuned: torch.nn.Module) -> torch.nn.Module:
        """The fine-tuned model as the pretraining objective reads it (`pretrained` has the pretraining head)."""
        raise NotImplementedError

    def record(self) -> dict:
        """metrics.json `task`, before its validation and test results."""
        return {"name": self.data.name, "type": self.data.task_type, "metric": self.METRIC,
                "split_sizes": self.data.split_sizes}


class DecoderTask(TaskType):
    """A generative task: it trains the checkpoint's own causal LM, head included, so forgetting reads the
    fine-tuned model as it is."""

    def load_model(self, pretrained_dir, dtype=None):
        return AutoModelForCausalLM.from_pretrained(pretrained_dir, dtype=dtype)

    def new_model(self, pretrained_dir, seed):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pretrained_dir))

    def pretraining_view(self, pretrained, finetuned):
        return finetuned


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


@torch.no_grad()
def token_loss(model: torch.nn.Module, batches, device: torch.device) -> dict:
    """Mean cross-entropy per predicted token over the batches (each labelled as a causal LM's `labels`: a token's
    label is predicted from the positions before it; -100 is not predicted), and its perplexity."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch).logits[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                         ignore_index=-100, reduction="sum"))
        count += int(labels.ne(-100).sum())
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp overflows a float past ~709
