"""Model families: GPT-2-style decoders, pretrained checkpoints saved under the task model's names, and a smoke run of each."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoTokenizer, BertConfig, BertModel

from conftest import load_metrics, maskrun, run_dirs
from maskrun.data.tokenizer import train_tokenizer
from maskrun.models import load_task_model, pretrained_names, save_backbone
from maskrun.pretrain import pretrain

TEXTS = [f"a {w} and a {v} went to the {u}" for w in ("cat", "dog", "fox") for v in ("hen", "owl") for u in ("sea", "wood")]
TINY = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32,
        "dropout": 0.0, "vocab_size": 200, "name_or_path": None, "dtype": "fp32"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TEXTS, 200, out)
    return out


def test_tiny_gpt_pretrains_as_a_causal_lm_and_classifies_padded_batches(tmp_path, tokenizer_dir):
    mcfg = OmegaConf.create({**TINY, "name": "tiny_gpt", "family": "gpt2", "objective": "causal_lm"})
    pcfg = OmegaConf.create({"steps": 3, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0,
                             "max_length": 16, "mlm_probability": 0.15})
    pretrain(mcfg, pcfg, TEXTS, tokenizer_dir, tmp_path, torch.device("cpu"), seed=0)
    assert len(json.loads((tmp_path / "pretrain_history.json").read_text())) == 3
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = load_task_model(tmp_path, num_labels=3).eval()
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["a cat", "a dog and a hen went to the sea"], padding=True, return_tensors="pt")
    alone = tokenizer(["a cat"], return_tensors="pt")
    with torch.no_grad():  # padding must not change what the short text is classified from
        assert torch.allclose(model(**batch).logits[0], model(**alone).logits[0], atol=1e-5)
    backbone = {n for n in model.state_dict() if n.startswith("transformer.")}
    assert backbone <= pretrained_names(tmp_path) and "score.weight" not in pretrained_names(tmp_path)


def test_pretraining_warms_up_over_the_configured_steps(tmp_path, tokenizer_dir):
    mcfg = OmegaConf.create({**TINY, "name": "tiny_gpt", "family": "gpt2", "objective": "causal_lm"})
    pcfg = OmegaConf.create({"steps": 8, "batch_size": 2, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 4,
                             "max_length": 16, "mlm_probability": 0.15})
    pretrain(mcfg, pcfg, TEXTS, tokenizer_dir, tmp_path, torch.device("cpu"), seed=0)
    rates = [h["lr"] for h in json.loads((tmp_path / "pretrain_history.json").read_text())]
    assert rates == pytest.approx([0, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3])


def test_a_pretrained_model_used_as_is_keeps_the_task_models_names_and_no_head(tmp_path, tokenizer_dir):
    source = tmp_path / "source"
    BertModel(BertConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    save_backbone(str(source), tokenizer, tmp_path / "pretrained", torch.float32)
    task_model = load_task_model(tmp_path / "pretrained", num_labels=2)
    names = pretrained_names(tmp_path / "pretrained")
    assert names == {n for n in task_model.state_dict() if n.startswith("bert.")}
    with safe_open(source / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("encoder.layer.0.output.dense.weight"),
                           task_model.bert.encoder.layer[0].output.dense.weight)


@pytest.fixture(scope="module")
def model_sweep(tmp_path_factory):
    """tiny_gpt and the packaged MiniLM used as is, on BBC News, kept tiny (MiniLM has 22.7M parameters)."""
    cwd = tmp_path_factory.mktemp("models")
    maskrun(["-m", "experiment=smoke", "model=tiny_gpt,minilm", "dataset=bbc_news", "mask=random", "mask.ratio=0.5",
             "pretrain.steps=0", "dataset.max_examples=40", "finetune.epochs=1", "finetune.batch_size=32",
             "finetune.max_length=16", "pretrain.max_length=16", "eval.heldout_texts=8",
             "finetune.warmup_ratio=0"], cwd)  # one step: a warmup step would leave it at learning rate 0
    runs = {load_metrics(d)["choices"]["model"]: (load_metrics(d), d) for d in run_dirs(cwd / "outputs")}
    return runs, cwd


def test_each_model_runs_and_reports_interference(model_sweep):
    runs, cwd = model_sweep
    assert set(runs) == {"tiny_gpt", "minilm"}
    for metrics, run_dir in runs.values():
        assert metrics["status"] == "ok", metrics["error"]
        assert metrics["task"]["name"] == "bbc_news" and len(metrics["task"]["labels"]) == 5
        interference = metrics["interference"]
        assert 0.0 < interference["cka"] <= 1.0 + 1e-9 and interference["drift_l2"] > 0.0
        with safe_open(run_dir / "mask.safetensors", framework="pt") as f:
            assert set(f.keys()) == pretrained_names(cwd / metrics["artifacts"]["pretrained"])


def test_minilm_has_no_mlm_head_so_forgetting_is_null_while_the_decoder_has_a_causal_lm_loss(model_sweep):
    runs, _ = model_sweep
    minilm, _ = runs["minilm"]
    assert minilm["interference"]["forgetting"] is None
    assert len(minilm["interference"]["cka_per_layer"]) == 7  # embeddings and 6 layers
    assert minilm["mask"]["eligible"] > 20_000_000
    gpt, _ = runs["tiny_gpt"]
    assert gpt["interference"]["pretrain_loss_before"] > 0.0 and gpt["interference"]["forgetting"] is not None
