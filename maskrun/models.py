"""Build a backbone for pretraining, load it with a task head, and say which parameters are pretrained."""

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, BertConfig, BertForMaskedLM, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

# Loading a pretraining checkpoint under a new task head is the point, not a warning;
# maskrun draws its own progress bars.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def build_pretraining_model(mcfg, tokenizer: PreTrainedTokenizerBase) -> BertForMaskedLM:
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=mcfg.hidden_size,
        num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads,
        intermediate_size=mcfg.intermediate_size,
        max_position_embeddings=mcfg.max_position_embeddings,
        hidden_dropout_prob=mcfg.dropout,
        attention_probs_dropout_prob=mcfg.dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertForMaskedLM(config)


def load_pretraining_model(pretrained_dir: Path) -> BertForMaskedLM:
    return BertForMaskedLM.from_pretrained(pretrained_dir)


def load_task_model(pretrained_dir: Path, num_labels: int) -> torch.nn.Module:
    """The pretrained backbone under a newly initialised classification head."""
    return AutoModelForSequenceClassification.from_pretrained(pretrained_dir, num_labels=num_labels)


def pretrained_names(pretrained_dir: Path) -> set[str]:
    """Names of the tensors the pretrained checkpoint holds (the task model uses the same names)."""
    with safe_open(Path(pretrained_dir) / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
