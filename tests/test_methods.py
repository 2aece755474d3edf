"""The penalties (l2sp, ewc) and replay: their losses and gradients against the formulas on tiny models, replay's
steps and texts, exact freezing under a mask, smoke runs of each, and the direction of each dial."""

import json
import math
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import assert_frozen_entries_exact, load_metrics, maskrun, run_dirs
from maskrun import cli
from maskrun.cli import CONFIG_MODULE
from maskrun.data import Corpus
from maskrun.data.tokenizer import train_tokenizer
from maskrun.errors import ConfigError
from maskrun.methods import build_method, ewc, l2sp, replay
from maskrun.methods.base import Context
from maskrun.models import build_pretraining_model, load_pretraining_model, load_task_model, pretrained_names
from maskrun.pretrain import objective_batch, objective_loss, pack_texts
from maskrun.validate import check_config, compose_jobs

TEXTS = [f"the {w} sat on the {v} and looked at the {u}" for w in ("cat", "dog", "bird", "man")
         for v in ("mat", "hat", "log") for u in ("moon", "sun", "sea")]
TINY = ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=32",
        "model.max_position_embeddings=32", "model.dropout=0.0", "pretrain.max_length=16"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TEXTS, 120, out)
    return out


def composed(*overrides: str):
    (cfg,) = compose_jobs(CONFIG_MODULE, "config", [*TINY, *overrides], multirun=False)
    return cfg


def pretrained_checkpoint(out: Path, tokenizer_dir: Path, model: str) -> Path:
    """A tiny checkpoint as the pretrain stage writes it: the pretraining model (backbone and head), and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    build_pretraining_model(composed(f"model={model}").model, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return pretrained_checkpoint(tmp_path_factory.mktemp("bert"), tokenizer_dir, "tiny_bert")


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return pretrained_checkpoint(tmp_path_factory.mktemp("gpt"), tokenizer_dir, "tiny_gpt")


class HeldOut(list):
    """A held-out slice that fails the test when anything reads it."""

    def __getitem__(self, index):
        raise AssertionError("replay read a held-out slice")

    def __iter__(self):
        raise AssertionError("replay read a held-out slice")


def context(cfg, pretrained_dir: Path, corpus=None, scores=None) -> Context:
    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir)
    corpus = corpus or Corpus("toy", train=TEXTS, validation=HeldOut(TEXTS), test=HeldOut(TEXTS))
    return Context(cfg, pretrained_dir, pretrained_dir, tokenizer, corpus, torch.device("cpu"), scores)


def task_model(pretrained_dir: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return load_task_model(pretrained_dir, num_labels=2)


def move_every_parameter(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def test_the_squared_distance_of_a_hand_example():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    anchor = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}
    assert float(l2sp.squared_distance(params, anchor)) == 1 + 4 + 4
    importance = {"a": torch.tensor([3.0, 0.5]), "b": torch.tensor([[0.25]])}
    assert float(l2sp.squared_distance(params, anchor, importance)) == 3 * 1 + 0.5 * 4 + 0.25 * 4


@pytest.mark.parametrize("method, setting, value", [("l2sp", "alpha", 0.3), ("ewc", "strength", 2e3)])
def test_each_penalty_and_its_gradient_equal_the_formula_over_the_trainable_pretrained_entries(
        bert_dir, method, setting, value):
    model = task_model(bert_dir)
    pretrained = {name: p.detach().clone() for name, p in model.named_parameters() if name in pretrained_names(bert_dir)}
    generator = torch.Generator().manual_seed(2)
    fisher = {name: torch.rand(w.shape, generator=generator) * 1e-3 for name, w in pretrained.items()}
    asked = []
    cfg = composed(f"method={method}", f"method.{setting}={value}")
    penalty = build_method(cfg, context(cfg, bert_dir, scores=lambda kind: asked.append(kind) or fisher))
    model = penalty.prepare(model)
    move_every_parameter(model)
    untouched = "bert.encoder.layer.0.output.dense.weight"  # as if a mask froze it whole
    dict(model.named_parameters())[untouched].requires_grad_(False)

    loss = penalty.extra_loss(model, step=1)
    loss.backward()

    params = dict(model.named_parameters())
    penalised = [name for name in pretrained if name != untouched]
    weight = {name: fisher[name] if method == "ewc" else torch.ones_like(fisher[name]) for name in penalised}
    delta = {name: params[name].detach().double() - pretrained[name].double() for name in penalised}
    expected = value / 2 * sum(float((weight[name] * delta[name] ** 2).sum()) for name in penalised)
    assert loss.item() == pytest.approx(expected, rel=1e-5) and expected > 0
    for name in penalised:
        torch.testing.assert_close(params[name].grad, (value * weight[name] * delta[name]).float())
    head = [name for name in params if name not in pretrained]
    assert "classifier.weight" in head and all(params[name].grad is None for name in head)  # no pretrained value
    assert params[untouched].grad is None
    assert asked == (["fisher"] if method == "ewc" else [])


def test_ewc_records_the_mean_of_the_fisher_it_uses(bert_dir):
    model = task_model(bert_dir)
    names = pretrained_names(bert_dir) & {name for name, _ in model.named_parameters()}
    fisher = {name: torch.full(p.shape, float(i + 1)) for i, (name, p) in enumerate(model.named_parameters())
              if name in names}
    cfg = composed("method=ewc")
    penalty = build_method(cfg, context(cfg, bert_dir, scores=lambda kind: fisher))
    penalty.prepare(model)
    entries = sum(f.numel() for f in fisher.values())
    recorded = penalty.record()
    assert recorded["strength"] == cfg.method.strength
    assert recorded["fisher"]["mean"] == pytest.approx(sum(float(f.sum()) for f in fisher.values()) / entries)
    assert recorded["fisher"]["kind"] == cfg.mask.fisher


@pytest.mark.parametrize("share, steps, replayed", [
    (0.25, 8, [4, 8]),
    (0.1, 36, [10, 20, 30]),
    (1.0, 5, [1, 2, 3, 4, 5]),
    (0.01, 99, []),
    (0.01, 100, [100]),
])
def test_replay_takes_exactly_the_share_of_steps_rounded_down_evenly_spread(share, steps, replayed):
    method = build_method(composed("method=replay", f"method.share={share}"), None)
    assert [step for step in range(1, steps + 1) if replay.replays(step, method.share)] == replayed


def test_replay_counts_steps_by_the_share_as_written_not_its_binary_approximation():
    method = build_method(composed("method=replay", "method.share=0.29"), None)
    assert 0.29 * 100 < 29  # in floating point
    assert sum(replay.replays(step, method.share) for step in range(1, 101)) == 29 and replay.replays(100, method.share)


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_gpt"])
def test_replay_trains_the_task_backbone_under_the_pretrained_head_on_training_texts_only(
        bert_dir, gpt_dir, model, monkeypatch):
    pretrained_dir = bert_dir if model == "tiny_bert" else gpt_dir
    cfg = composed(f"model={model}", "method=replay", "method.share=0.5", "method.batch_size=4", "method.weight=0.5")
    packed = []
    monkeypatch.setattr("maskrun.pretrain.pack_texts", lambda tokenizer, texts, max_length: packed.append(texts)
                        or pack_texts(tokenizer, texts, max_length))
    ctx = context(cfg, pretrained_dir)
    task = task_model(pretrained_dir).eval()
    method = build_method(cfg, ctx)
    method.prepare(task)
    assert len(packed) == 1 and packed[0] is ctx.corpus.train

    head_model = method.pretraining_model
    assert head_model.base_model is task.base_model
    assert head_model.get_output_embeddings().weight is task.get_input_embeddings().weight  # tied, as pretrained
    backbone = {id(p) for p in task.parameters()}
    head = [p for p in head_model.parameters() if id(p) not in backbone]
    assert not any(p.requires_grad for p in head)
    assert bool(head) == (model == "tiny_bert")  # BERT's MLM transform and bias; GPT-2's head is the tied embedding

    assert method.extra_loss(task, step=1) is None  # share 0.5: steps 2, 4, ... replay
    loss = method.extra_loss(task, step=2)
    loss.backward()
    # The same batch through the checkpoint's own pretraining model, the task backbone loaded into it.
    reference = load_pretraining_model(pretrained_dir, cfg.model.objective).eval()
    reference.base_model.load_state_dict(task.base_model.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(cfg.seed + replay.SEED_OFFSET)
    blocks = pack_texts(ctx.tokenizer, TEXTS, cfg.pretrain.max_length)
    rows = torch.randint(len(blocks), (4,), generator=generator)
    inputs, labels = objective_batch(ctx.tokenizer, blocks[rows], cfg.model.objective, cfg.pretrain.mlm_probability,
                                     generator)
    expected = 0.5 * objective_loss(reference, inputs, labels, cfg.model.objective)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert task.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in head)


@pytest.mark.parametrize("overrides, key", [
    (["method=l2sp", "method.alpha=-1"], "method.alpha"),
    (["method=ewc", "method.strength=nan"], "method.strength"),
    (["method=replay", "method.share=0"], "method.share"),
    (["method=replay", "method.share=1.5"], "method.share"),
    (["method=replay", "method.weight=0"], "method.weight"),
    (["method=replay", "method.batch_size=0"], "method.batch_size"),
    (["method=replay", "model=minilm", "pretrain.steps=0"], "pretraining head"),
])
def test_bad_method_settings_are_refused_before_any_work(overrides, key):
    (cfg,) = compose_jobs(CONFIG_MODULE, "config", overrides, multirun=False)
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_config(cfg)


def test_the_command_refuses_a_bad_share_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["maskrun", "method=replay", "method.share=2"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2 and not any(tmp_path.iterdir())
    assert capsys.readouterr().err.strip() == "maskrun: error: method.share=2 is not a number in (0, 1] (e.g. method.share=0.1)"


@pytest.mark.parametrize("method", ["method=l2sp method.alpha=1.0", "method=ewc method.strength=1e5",
                                    "method=replay method.share=0.5"])
def test_a_penalty_or_replay_under_a_mask_keeps_every_frozen_entry_bit_identical(tmp_path, method):
    maskrun(["experiment=smoke", *method.split(), "mask=importance", "mask.ratio=0.5", "optimizer.weight_decay=0.1"],
            tmp_path)
    (run_dir,) = run_dirs(tmp_path / "outputs")
    masks, pretrained, finetuned = assert_frozen_entries_exact(run_dir)
    assert any(not torch.equal(finetuned[name][~m], pretrained[name][~m]) for name, m in masks.items())
    metrics = load_metrics(run_dir)
    assert metrics["mask"]["strategy"] == "importance" and metrics["mask"]["frozen"] > 0
    assert metrics["method"]["trainable"] < metrics["mask"]["eligible"] + metrics["mask"]["head_entries"]
    assert json.loads((run_dir / "history.json").read_text())["train"][-1]["extra_loss"] > 0  # the penalty acted


# Each method's dial at a negligible and at a strong value on the smoke preset, and what the strong one lowers
# (replay trains the backbone on more text, so its drift grows while its forgetting falls). A higher learning rate
# than the preset's moves the backbone far enough for the dial to show.
METHOD_MODULES = {"l2sp": l2sp, "ewc": ewc, "replay": replay}
DIAL_SWEEPS = {
    "l2sp": ("method.alpha=1e-6,10", ("drift_l2", "forgetting")),
    "ewc": ("method.strength=1e-3,1e8", ("drift_l2", "forgetting")),
    "replay": ("method.share=0.05,1.0", ("forgetting",)),
}


@pytest.fixture(scope="module")
def dial_sweep(tmp_path_factory):
    """The smoke sweep over a method's dial (run once per module): its run dirs and their metrics, weak first."""
    done = {}

    def sweep(method: str) -> list[tuple[Path, dict]]:
        if method not in done:
            cwd = tmp_path_factory.mktemp(method)
            maskrun(["-m", "experiment=smoke", f"method={method}", DIAL_SWEEPS[method][0], "finetune.lr=5e-3"], cwd)
            setting = METHOD_MODULES[method].DIAL.removeprefix("method.")
            runs = [(run_dir, load_metrics(run_dir)) for run_dir in run_dirs(cwd / "outputs")]
            done[method] = sorted(runs, key=lambda run: run[1]["method"][setting])
        return done[method]

    return sweep


@pytest.mark.parametrize("method", sorted(DIAL_SWEEPS))
def test_each_method_runs_as_a_smoke_job_and_records_its_name_dial_and_settings(dial_sweep, method):
    module = METHOD_MODULES[method]
    setting = module.DIAL.removeprefix("method.")
    runs = dial_sweep(method)
    for _, m in runs:
        assert m["status"] == "ok" and m["mask"]["strategy"] == "none"
        assert m["method"]["name"] == method and m["method"]["dial"]["key"] == module.DIAL
        assert m["method"]["dial"]["value"] == m["method"][setting]
        assert m["method"]["trainable"] == m["mask"]["eligible"] + m["mask"]["head_entries"]
    swept = DIAL_SWEEPS[method][0].split("=")[1].split(",")
    assert [m["method"][setting] for _, m in runs] == [float(value) for value in swept]
    if method == "replay":
        assert all(m["method"]["weight"] == 1.0 and m["method"]["batch_size"] == 16 for _, m in runs)  # smoke's batch


def test_ewc_penalises_with_the_fisher_of_the_scores_stage(dial_sweep):
    runs = dial_sweep("ewc")
    cache = Path(runs[0][1]["artifacts"]["pretrained"]).parents[1]
    (entry,) = (cache / "scores").glob("*/scores.safetensors")  # mask=none computes no scores of its own
    fisher = load_file(entry)
    mean = sum(float(f.double().sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    assert sorted(m["cache"]["method_scores"] for _, m in runs) == ["hit", "miss"]  # computed once, cached
    assert all(m["method"]["fisher"]["mean"] == pytest.approx(mean, rel=1e-12) for _, m in runs)


def test_replay_steps_are_exactly_the_share_of_the_training_steps(dial_sweep):
    for run_dir, m in dial_sweep("replay"):
        train = json.loads((run_dir / "history.json").read_text())["train"]
        replayed = [row["step"] for row in train if row["extra_loss"] != 0.0]
        share = Fraction(str(m["method"]["share"]))
        assert len(replayed) == math.floor(len(train) * share) and replayed == [
            step for step in range(1, len(train) + 1) if math.floor(step * share) > math.floor((step - 1) * share)]


@pytest.mark.parametrize("method", sorted(DIAL_SWEEPS))
def test_a_stronger_dial_gives_less_drift_or_forgetting(dial_sweep, method):
    (_, weak), (_, strong) = dial_sweep(method)
    for measure in DIAL_SWEEPS[method][1]:
        assert strong["interference"][measure] < weak["interference"][measure], measure
    assert strong["interference"]["validation"]["forgetting"] < weak["interference"]["validation"]["forgetting"]
