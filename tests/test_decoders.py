"""Decoders built or loaded: tiny_gpt's byte-level tokenizer, hub-style Llama/Qwen2/GPT-2 checkpoints used with their
own LM head, tied embeddings counted and masked once, the parameters' dtype, and a whole run on each."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaModel)

from conftest import assert_frozen_entries_exact, load_metrics, maskrun, run_dirs
from maskrun.data.tokenizer import END_OF_TEXT, prepare_tokenizer
from maskrun.errors import ConfigError
from maskrun.masks import eligible_parameters
from maskrun.methods.base import trainable_entries
from maskrun.models import backbone_shapes, check_objective, model_objective, pretrained_names, pretraining_objective
from maskrun.optim import MaskedOptimizer
from maskrun.pretrain import pack_texts, pretrain

CPU = torch.device("cpu")
AS_IS = OmegaConf.create({"steps": 0})
CONTINUED = OmegaConf.create({"steps": 5, "batch_size": 2, "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0,
                              "max_length": 16, "mlm_probability": 0.15})
PROSE = ["Where are you going tonight?", "I told you already, to the movies.", "Don't be late again."] * 20
UNUSUAL = 'def naïve(x: int) -> str:\n\treturn f"{x!r} → 日本語 😀"  # ünïcödé\r\n\n    \\ end'


def hf(source, objective=None, dtype="fp32"):
    return OmegaConf.create({"name": "hf", "family": None, "objective": objective, "name_or_path": str(source),
                             "dtype": dtype})


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 under its LM head (tied output embedding), with a tiny_gpt tokenizer."""
    out = tmp_path_factory.mktemp("tiny_gpt2")
    prepare_tokenizer(None, PROSE, 300, out, family="gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=2, n_head=2, n_inner=32, n_positions=64)
                    ).save_pretrained(out)
    return out


@pytest.fixture
def decoder_dirs(tiny_llama_dir, tiny_qwen2_dir, tiny_gpt2_dir):
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "gpt2": tiny_gpt2_dir}


def pretrained_as_is(source, out_dir, steps_cfg=AS_IS, texts=PROSE):
    """pretrain() of the hf model at `source`, through the tokenizer stage as the pipeline runs it."""
    prepare_tokenizer(str(source), texts, None, out_dir / "tokenizer")
    pretrain(hf(source), steps_cfg, texts, out_dir / "tokenizer", out_dir / "pretrained", CPU, seed=0)
    return out_dir / "pretrained"


def test_tiny_gpts_tokenizer_round_trips_code_and_any_script_with_no_unknown_token(tmp_path):
    prepare_tokenizer(None, PROSE, 300, tmp_path, family="gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    source = inspect.getsource(json) + UNUSUAL  # real Python source, and characters the corpus never had
    ids = tokenizer(source)["input_ids"]
    assert tokenizer.unk_token is None and max(ids) < len(tokenizer) <= 300
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == source
    assert tokenizer.decode(tokenizer(source, add_special_tokens=False)["input_ids"]) == source
    assert tokenizer.bos_token == tokenizer.eos_token == END_OF_TEXT
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, None)  # padding never hides a real end
    assert tokenizer.mask_token is None and tokenizer.cls_token is None and tokenizer.sep_token is None


def test_tiny_gpts_tokenizer_is_the_same_in_every_process(tmp_path):
    script = ("import sys; from pathlib import Path; from maskrun.data.tokenizer import prepare_tokenizer; "
              f"prepare_tokenizer(None, {PROSE + [UNUSUAL]!r}, 290, Path(sys.argv[1]), family='gpt2')")
    for run, threads in enumerate(("1", "4")):  # a new process, a new hash seed, and the trainer's thread count
        env = {"PYTHONHASHSEED": str(run), "RAYON_NUM_THREADS": threads, "PATH": ""}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(run))], check=True, env=env)
    assert (tmp_path / "0" / "tokenizer.json").read_bytes() == (tmp_path / "1" / "tokenizer.json").read_bytes()


def test_documents_are_packed_between_the_tokenizers_own_boundaries(decoder_dirs, tmp_path):
    for kind, source in decoder_dirs.items():
        prepare_tokenizer(str(source), PROSE, None, tmp_path / kind)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / kind)
        blocks = pack_texts(tokenizer, PROSE, 16)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        assert tokenizer.pad_token_id is not None, kind  # set for a tokenizer that has none
        assert blocks[:, 0].eq(start).all() and blocks[:, -1].eq(tokenizer.eos_token_id).all(), kind


def test_the_objective_comes_from_the_checkpoint_when_not_set(tmp_path, tiny_llama_dir, tiny_gpt2_dir):
    bert = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(bert).save_pretrained(tmp_path / "bert_mlm")
    BertModel(bert).save_pretrained(tmp_path / "bert_bare")
    LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32)).save_pretrained(tmp_path / "llama_bare")
    expected = {  # source: (objective as is, objective when pretraining continues)
        tiny_llama_dir: ("causal_lm", "causal_lm"), tiny_gpt2_dir: ("causal_lm", "causal_lm"),
        tmp_path / "bert_mlm": ("mlm", "mlm"), tmp_path / "bert_bare": (None, "mlm"),
        tmp_path / "llama_bare": (None, "causal_lm"),
    }
    for source, (as_is, continued) in expected.items():
        assert (pretraining_objective(hf(source), AS_IS), pretraining_objective(hf(source), CONTINUED)) == (
            as_is, continued), source
    assert model_objective(hf(tmp_path / "bert_bare", objective="causal_lm")) == "causal_lm"  # a set one wins


def test_an_objective_the_checkpoint_cannot_serve_is_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="no head for model type llama"):
        check_objective(hf(tiny_llama_dir, objective="mlm"), CONTINUED)
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="holds a mlm head"):
        check_objective(hf(tmp_path, objective="causal_lm"), AS_IS)  # BERT has a causal head, but not this one


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_a_checkpoint_with_its_lm_head_is_kept_whole_under_the_task_models_names(kind, decoder_dirs, tmp_path):
    source = decoder_dirs[kind]
    pretrained = pretrained_as_is(source, tmp_path)
    with safe_open(source / "model.safetensors", framework="pt") as original:
        with safe_open(pretrained / "model.safetensors", framework="pt") as saved:
            assert set(saved.keys()) == set(original.keys())  # the head included, the tied one not twice
            assert all(torch.equal(saved.get_tensor(k), original.get_tensor(k)) for k in original.keys())
    classifier, loading = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=2,
                                                                             output_loading_info=True)
    prefix = classifier.base_model_prefix + "."
    assert not any(k.startswith(prefix) for k in loading["missing_keys"]) and loading["missing_keys"]  # the new head
    _, loading = AutoModelForCausalLM.from_pretrained(pretrained, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    shapes = backbone_shapes(hf(source), AS_IS)
    assert shapes == {n: p.shape for n, p in classifier.named_parameters() if n.startswith(prefix)}
    assert set(shapes) <= pretrained_names(pretrained)
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    assert classifier.config.pad_token_id == tokenizer.pad_token_id is not None


def test_tied_embeddings_are_counted_and_masked_once_and_stay_tied_and_exact(tiny_qwen2_dir, tmp_path):
    pretrained = pretrained_as_is(tiny_qwen2_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding
    params = eligible_parameters(model, pretrained_names(pretrained), None, None)
    assert "lm_head.weight" not in params and "model.embed_tokens.weight" in params
    assert sum(p.numel() for p in params.values()) == sum(p.numel() for p in model.parameters())
    frozen = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.5 for name, p in params.items()}
    assert trainable_entries(model, frozen) == sum(int((~m).sum()) for m in frozen.values())
    before = embedding.detach().clone()
    optimizer = MaskedOptimizer(model, frozen, OmegaConf.create(
        {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8}), lr=0.1)
    inputs = torch.randint(len(embedding), (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=inputs, labels=inputs).loss.backward()  # the output projection's gradient joins the input's
        optimizer.step(max_grad_norm=1.0)
    mask = frozen["model.embed_tokens.weight"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(embedding[mask], before[mask]) and not torch.equal(embedding[~mask], before[~mask])


def test_model_dtype_sets_the_parameters_dtype_of_the_pretrained_checkpoint(tiny_llama_dir, tmp_path):
    for dtype, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        prepare_tokenizer(str(tiny_llama_dir), PROSE, None, tmp_path / "tokenizer")
        pretrain(hf(tiny_llama_dir, dtype=dtype), AS_IS, PROSE, tmp_path / "tokenizer", tmp_path / dtype, CPU, seed=0)
        with safe_open(tmp_path / dtype / "model.safetensors", framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {expected}


@pytest.fixture(scope="module")
def decoder_runs(tiny_llama_dir, tiny_qwen2_dir, tmp_path_factory):
    """A smoke run of each decoder used as is and with 5 steps of continued causal-LM pretraining."""
    runs = {}
    for kind, source in (("llama", tiny_llama_dir), ("qwen2", tiny_qwen2_dir)):
        for steps in (0, 5):
            cwd = tmp_path_factory.mktemp(f"{kind}_{steps}")
            maskrun(["experiment=smoke", "model=hf", f"model.name_or_path={source}", f"pretrain.steps={steps}",
                     "mask=importance", "mask.ratio=0.5"], cwd)
            (run_dir,) = run_dirs(cwd / "outputs")
            runs[kind, steps] = run_dir
    return runs


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("steps", [0, 5])
def test_a_hub_style_decoder_runs_with_its_own_lm_head_measuring_forgetting(decoder_runs, kind, steps):
    run_dir = decoder_runs[kind, steps]
    metrics = load_metrics(run_dir)
    assert metrics["status"] == "ok", metrics["error"]
    interference = metrics["interference"]
    assert interference["pretrain_loss_before"] > 0.0 and interference["forgetting"] is not None
    masks, pretrained, _ = assert_frozen_entries_exact(run_dir)
    assert metrics["mask"]["ratio_actual"] == pytest.approx(0.5, abs=1e-3)
    assert set(masks) <= set(pretrained) and "lm_head.weight" not in masks  # the classifier has no LM head
    history = Path(metrics["artifacts"]["pretrained"]) / "pretrain_history.json"
    assert len(json.loads(history.read_text())) == steps
