"""Build or load a backbone for pretraining, load it under a task head, and say which parameters are pretrained.

Families: BERT-style encoders pretrained by masked language modelling and decoders (GPT-2, Llama,
Qwen2, Mistral) pretrained as causal language models, either built from scratch (`model.family`) or
loaded pretrained (`model.packaged`, `model.name_or_path` or `model.gguf`, a quantized file dequantized
into the cache by maskrun.dequantize). Every checkpoint maskrun saves keeps the backbone under the task
model's names, so a mask's names match both.
"""

import copy
import functools
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from maskrun.data.packaged import packaged_file
from maskrun.dequantize import gguf_config, located
from maskrun.errors import ConfigError

# Loading a pretraining checkpoint under a new task head is the point, not a warning;
# maskrun draws its own progress bars.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

OBJECTIVES = {"mlm": AutoModelForMaskedLM, "causal_lm": AutoModelForCausalLM}
# The head a checkpoint was saved with, by the ending of its class name (config.architectures).
HEAD_ENDINGS = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm", "ForMaskedLM": "mlm"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model.dtype: the parameters' dtype


def torch_dtype(mcfg) -> torch.dtype:
    return DTYPES[mcfg.dtype]


def pretrained_source(mcfg) -> str | None:
    """Where a pretrained model is loaded from (a packaged model, a hub id or a local dir); None: built from scratch.
    A GGUF checkpoint's is its file, which its config is read from: the stages load its weights and tokenizer from
    its dequantized cache entry, a local dir in its place (maskrun.pipeline)."""
    if mcfg.get("packaged"):
        return str(packaged_file(mcfg.packaged))
    if mcfg.get("gguf"):
        return str(located(mcfg.gguf))
    return mcfg.get("name_or_path")


@functools.lru_cache(maxsize=None)  # validation and the stages ask one source several questions
def source_config(source: str) -> PretrainedConfig:
    """A pretrained model's config, read once; callers only read it."""
    return gguf_config(Path(source)) if source.endswith(".gguf") else AutoConfig.from_pretrained(source)


def checkpoint_head(source: str) -> str | None:
    """The objective of the LM head the checkpoint holds (from the class it was saved as); None: a bare backbone."""
    for architecture in source_config(source).architectures or ():
        for ending, objective in HEAD_ENDINGS.items():
            if architecture.endswith(ending):
                return objective
    return None


def model_objective(mcfg) -> str | None:
    """`model.objective`, or when it is null the pretrained checkpoint's own: its head's, else its architecture's
    (a model type with a masked-LM head is an encoder, one with only a causal-LM head a decoder)."""
    source = pretrained_source(mcfg)
    if mcfg.objective or not source:
        return mcfg.objective
    head = checkpoint_head(source)
    if head:
        return head
    model_type = source_config(source).model_type
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "mlm"
    return "causal_lm" if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


def pretraining_objective(mcfg, pcfg) -> str | None:
    """The objective of the head the pretrained checkpoint ends up with; None when it has none.

    A pretrained model used as is (pretrain.steps=0) keeps its own LM head if it has one, so its
    forgetting is measured with that head; a bare backbone (e.g. the packaged MiniLM) has none.
    """
    source = pretrained_source(mcfg)
    if source and pcfg.steps == 0:
        return checkpoint_head(source)
    return model_objective(mcfg)


def check_objective(mcfg, pcfg) -> None:
    """A pretrained model's objective must be one its architecture has a head for, and at pretrain.steps=0 the head
    it already has (that head measures forgetting)."""
    source = pretrained_source(mcfg)
    objective, model_type = model_objective(mcfg), source_config(source).model_type
    if objective is None:
        raise ConfigError(f"cannot tell the pretraining objective of {source} (model type {model_type})",
                          f"set model.objective to one of: {', '.join(OBJECTIVES)}")
    mapping = {"mlm": MODEL_FOR_MASKED_LM_MAPPING_NAMES, "causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}[objective]
    if model_type not in mapping:
        raise ConfigError(f"model.objective={objective} has no head for model type {model_type}",
                          "set model.objective=null to take the checkpoint's own")
    head = checkpoint_head(source)
    if pcfg.steps == 0 and head not in (None, objective):
        raise ConfigError(f"model.objective={objective}, but {source} holds a {head} head, used as is at pretrain.steps=0",
                          f"set model.objective=null (or {head})")


def boundary_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The tokens that begin and end a document: BERT's [CLS] and [SEP], else bos and eos; a tokenizer with no
    bos (Qwen2's) begins with eos, the end of the document before."""
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    start = next((i for i in (tokenizer.cls_token_id, tokenizer.bos_token_id) if i is not None), end)
    return start, end


def scratch_config(mcfg, vocab_size: int, pad_id: int, start_id: int, end_id: int) -> PretrainedConfig:
    if mcfg.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=mcfg.hidden_size,
            n_layer=mcfg.num_layers,
            n_head=mcfg.num_heads,
            n_inner=mcfg.intermediate_size,
            n_positions=mcfg.max_position_embeddings,
            resid_pdrop=mcfg.dropout,
            embd_pdrop=mcfg.dropout,
            attn_pdrop=mcfg.dropout,
            bos_token_id=start_id,
            eos_token_id=end_id,
            pad_token_id=pad_id,
        )
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=mcfg.hidden_size,
        num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads,
        intermediate_size=mcfg.intermediate_size,
        max_position_embeddings=mcfg.max_position_embeddings,
        hidden_dropout_prob=mcfg.dropout,
        attention_probs_dropout_prob=mcfg.dropout,
        pad_token_id=pad_id,
    )


def build_pretraining_model(mcfg, tokenizer: PreTrainedTokenizerBase) -> torch.nn.Module:
    """The backbone under its pretraining head, in `model.dtype`: new from `scratch_config`, or loaded (a missing
    head starts new)."""
    auto = OBJECTIVES[model_objective(mcfg)]
    source = pretrained_source(mcfg)
    model = auto.from_pretrained(source, dtype=torch_dtype(mcfg)) if source else auto.from_config(
        scratch_config(mcfg, len(tokenizer), tokenizer.pad_token_id, *boundary_ids(tokenizer)), dtype=torch_dtype(mcfg))
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders classify at the last non-padding token
    return model


def backbone_shapes(mcfg, pcfg) -> dict[str, torch.Size]:
    """The task model's backbone parameters (what a mask can select) and their shapes, from the model config alone."""
    source = pretrained_source(mcfg)
    # Built from scratch, the model gets the tokenizer trained to model.vocab_size; the special ids change no shape.
    config = copy.deepcopy(source_config(source)) if source else scratch_config(mcfg, mcfg.vocab_size, 0, 1, 2)
    objective = pretraining_objective(mcfg, pcfg)
    with torch.device("meta"):  # no weights are allocated
        task_model = AutoModelForSequenceClassification.from_config(config)
        # A checkpoint written by pretraining holds what its pretraining model has (a BERT has no pooler there).
        pretraining = objective and dict(OBJECTIVES[objective].from_config(config).named_parameters())
    prefix = task_model.base_model_prefix + "."
    return {name: param.shape for name, param in task_model.named_parameters()
            if name.startswith(prefix) and (pretraining is None or name in pretraining)}


@functools.lru_cache(maxsize=None)  # the config checks ask for every job, and the jobs of a sweep share their model
def backbone_shapes_of(model_yaml: str, pretrain_yaml: str) -> dict[str, torch.Size]:
    """backbone_shapes of the model and pretrain sections written as YAML (hashable, so the answer is kept)."""
    return backbone_shapes(OmegaConf.create(model_yaml), OmegaConf.create(pretrain_yaml))


def save_backbone(source: str, tokenizer: PreTrainedTokenizerBase, out_dir: Path, dtype: torch.dtype) -> None:
    """A pretrained model used as is that has no LM head: only its backbone, saved under the task model's names."""
    model = AutoModelForSequenceClassification.from_pretrained(source, pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    prefix = model.base_model_prefix + "."
    model.save_pretrained(out_dir, state_dict={k: v for k, v in model.state_dict().items() if k.startswith(prefix)})


def load_pretraining_model(pretrained_dir: Path, objective: str) -> torch.nn.Module:
    return OBJECTIVES[objective].from_pretrained(pretrained_dir)


def load_backbone(pretrained_dir: Path) -> torch.nn.Module:
    return AutoModel.from_pretrained(pretrained_dir)


def load_task_model(pretrained_dir: Path, num_labels: int, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The pretrained backbone under a newly initialised classification head."""
    return AutoModelForSequenceClassification.from_pretrained(pretrained_dir, num_labels=num_labels, dtype=dtype)


def init_task_model(pretrained_dir: Path, num_labels: int, seed: int) -> torch.nn.Module:
    """The same task model with every weight newly initialised: no pretraining at all."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(pretrained_dir, num_labels=num_labels))


def pretrained_names(pretrained_dir: Path) -> set[str]:
    """Names of the tensors the pretrained checkpoint holds (the task model uses the same names)."""
    with safe_open(Path(pretrained_dir) / "model.safetensors", framework="pt") as f:
        return set(f.keys())


def head_summary(task_model: torch.nn.Module, pretrained: set[str]) -> dict:
    """The head: every parameter of the task model not in the pretrained checkpoint, in model order.

    It is never masked and always trains: the new classifier, and for a BERT pretrained here its
    pooler too (a masked-LM model has none, so the checkpoint does not hold it).
    """
    head = {name: param for name, param in task_model.named_parameters() if name not in pretrained}
    return {"head_parameters": list(head), "head_entries": sum(param.numel() for param in head.values())}
