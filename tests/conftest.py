"""Shared helpers: run the real `maskrun` command in a temporary directory with its own cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

MASKRUN = [sys.executable, "-m", "maskrun.cli"]
# A toy review task, and (the `tokenizer` fixture) a WordPiece tokenizer trained on it.
GOOD = ["a warm funny film", "great acting and a clever story", "i loved every minute", "a joy to watch"]
BAD = ["a dull mess", "boring and far too long", "the plot makes no sense", "i wanted my money back"]
REPORT = [sys.executable, "-m", "maskrun.report.cli"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from maskrun.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer((GOOD + BAD) * 4, vocab_size=120, out_dir=out)
    return AutoTokenizer.from_pretrained(out)


def run_cli(args: list[str], cwd: Path, command=MASKRUN, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def maskrun(args: list[str], cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    result = run_cli(args, cwd)
    assert result.returncode == expect, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def run_dirs(root: Path) -> list[Path]:
    """Every run dir (one holding metrics.json) under root, in a stable order."""
    return sorted(p.parent for p in root.rglob("metrics.json") if ".cache" not in p.parts)


def load_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_frozen_entries_exact(run_dir: Path):
    """Every frozen entry of the saved fine-tuned model equals the pretrained checkpoint's, bit for bit."""
    metrics = load_metrics(run_dir)
    masks = load_file(run_dir / "mask.safetensors")
    pretrained = load_file(f"{metrics['artifacts']['pretrained']}/model.safetensors")
    finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
    assert masks, "mask.safetensors holds no tensors"
    for name, frozen in masks.items():
        assert frozen.dtype == torch.bool and frozen.shape == finetuned[name].shape
        assert torch.equal(finetuned[name][frozen], pretrained[name][frozen]), f"{name} moved where frozen"
    return masks, pretrained, finetuned


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One default smoke run, shared by the tests that only read its artifacts."""
    cwd = tmp_path_factory.mktemp("smoke")
    maskrun(["experiment=smoke", "optimizer.weight_decay=0.1"], cwd)
    (run_dir,) = run_dirs(cwd / "outputs")
    return run_dir


def task_of(data, tokenizer, max_length: int = 16):
    """`data` (a maskrun.data.TaskData) as the pipeline asks it, with the packaged eval settings."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from maskrun.tasks import build_task

    return build_task(data, tokenizer, max_length, OmegaConf.load(files("maskrun.conf") / "config.yaml").eval)


def byte_level_tokenizer(texts: list[str], vocab_size: int, bos: str | None, eos: str):
    """A hub-style byte-level BPE tokenizer trained here: bos (if any) added in front, and no padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [token for token in (bos, eos) if token is not None]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos)


def tiny_decoder_dir(out: Path, config_class, model_class, bos: str | None, eos: str, **config) -> Path:
    """A random tiny decoder under its causal-LM head and its tokenizer, saved as a hub checkpoint would be."""
    from omegaconf import OmegaConf

    from maskrun.data import load_corpus

    corpus = load_corpus(OmegaConf.create({"corpus": "movie_dialogs", "corpus_max_texts": 2000, "split_seed": 0}))
    tokenizer = byte_level_tokenizer(corpus.train, 400, bos, eos)
    assert tokenizer.pad_token is None
    torch.manual_seed(0)
    model = model_class(config_class(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **config))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (untied output embedding) with a Llama-style tokenizer: <s> in front, </s> at the end."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return tiny_decoder_dir(tmp_path_factory.mktemp("tiny_llama"), LlamaConfig, LlamaForCausalLM, "<s>", "</s>",
                            tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with tied input/output embeddings and a Qwen2-style tokenizer: no bos, <|endoftext|>."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return tiny_decoder_dir(tmp_path_factory.mktemp("tiny_qwen2"), Qwen2Config, Qwen2ForCausalLM, None,
                            "<|endoftext|>", tie_word_embeddings=True)
