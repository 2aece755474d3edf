"""Interference measures on hand-built cases, and a small sweep with the scratch control and sequential fine-tuning."""

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import assert_frozen_entries_exact, load_metrics, maskrun, run_dirs, task_of
from maskrun.data import Corpus, TaskData
from maskrun.data.tasks import Split
from maskrun.data.tokenizer import train_tokenizer
from maskrun.evaluate import drift_l2, interference, kl_divergences, kl_task, layer_of, linear_cka
from maskrun.models import build_pretraining_model, load_task_model
from maskrun.pretrain import MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE, mask_tokens

TEXTS = [f"the {w} sat on the {v} and looked at the {u}" for w in ("cat", "dog", "bird", "man") for v in ("mat", "hat", "log")
         for u in ("moon", "sun", "sea")]


def test_cka_is_one_for_identical_and_rotated_scaled_features_and_lower_for_unrelated():
    x = torch.randn(200, 16, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(200, 16, dtype=torch.float64)) < 0.5


def test_drift_is_zero_for_identical_weights_and_the_perturbation_norm_per_layer():
    before = {"bert.encoder.layer.0.attention.self.query.weight": torch.zeros(4, 4),
              "bert.encoder.layer.1.output.dense.bias": torch.zeros(4),
              "bert.embeddings.word_embeddings.weight": torch.zeros(10, 4)}
    assert drift_l2(before, before) == {"total": 0.0, "per_layer": {"layer.0": 0.0, "layer.1": 0.0, "embeddings": 0.0}}
    after = dict(before)
    after["bert.encoder.layer.0.attention.self.query.weight"] = torch.full((4, 4), 0.5)  # norm sqrt(16 * 0.25) = 2
    after["bert.embeddings.word_embeddings.weight"] = torch.zeros(10, 4).index_fill(0, torch.tensor([3]), 1.5)  # norm 3
    drift = drift_l2(before, after)
    assert drift["per_layer"] == pytest.approx({"layer.0": 2.0, "layer.1": 0.0, "embeddings": 3.0})
    assert drift["total"] == pytest.approx((2.0 ** 2 + 3.0 ** 2) ** 0.5)


def test_layers_are_named_alike_for_bert_and_gpt2():
    assert layer_of("bert.encoder.layer.3.output.dense.weight") == "layer.3"
    assert layer_of("transformer.h.3.mlp.c_fc.weight") == "layer.3"
    assert layer_of("transformer.wte.weight") == layer_of("bert.embeddings.word_embeddings.weight") == "embeddings"
    assert layer_of("transformer.ln_f.weight") == layer_of("bert.pooler.dense.weight") == "other"


def test_kl_divergence_per_position_equals_the_sum_over_the_vocabulary():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    by_hand = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), 0.0]
    assert kl_divergences(p.log(), q.log()).tolist() == pytest.approx(by_hand)


class Bigram(torch.nn.Module):
    """A causal LM whose next-token distribution depends on the current token only: row t of `probs`."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_probs = probs.log()
        self.config = SimpleNamespace(pad_token_id=0)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.log_probs[input_ids])


def test_kl_task_is_the_mean_over_next_token_positions_of_a_causal_lm():
    """Token 0 pads. Row [1, 2, 0] predicts only after token 1 (the next token there is padding); row [2, 1, 2]
    predicts after tokens 2 and 1. So the mean is over three positions: after 1, 2 and 1."""
    pretrained = Bigram(torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.4, 0.4], [0.1, 0.1, 0.8]]))
    finetuned = Bigram(torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]]))
    inputs = torch.tensor([[1, 2, 0], [2, 1, 2]])
    labels = inputs.masked_fill(inputs.eq(0), -100)
    after_1 = 0.2 * math.log(0.2 / 0.2) + 0.4 * math.log(0.4 / 0.2) + 0.4 * math.log(0.4 / 0.6)
    after_2 = 0.0  # the same distribution
    by_hand = (after_1 + after_2 + after_1) / 3
    for batch_size in (1, 2):  # a mean over positions, not over batches
        assert kl_task(pretrained, finetuned, inputs, labels, "causal_lm", torch.device("cpu"), batch_size) == \
            pytest.approx(by_hand)
    assert kl_task(pretrained, pretrained, inputs, labels, "causal_lm", torch.device("cpu"), 2) == 0.0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TEXTS, 200, out)
    return AutoTokenizer.from_pretrained(out)


def test_masking_chooses_ordinary_tokens_at_the_rate_asked_and_treats_them_as_bert_does(tokenizer):
    ordinary = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in ("the", "cat", "sat", "on")])
    blocks = ordinary.repeat(2000, 8)
    blocks[:, 0], blocks[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    state = torch.get_rng_state()
    inputs, labels = mask_tokens(tokenizer, blocks, 0.2, torch.Generator().manual_seed(0))
    again, _ = mask_tokens(tokenizer, blocks, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(inputs, again)

    chosen = labels.ne(-100)
    assert not chosen[:, [0, -1]].any()  # special tokens are never chosen
    assert torch.equal(labels[chosen], blocks[chosen]) and torch.equal(inputs[~chosen], blocks[~chosen])
    share = lambda positions: float(positions.sum()) / float(chosen.sum())
    assert float(chosen.sum()) / blocks[:, 1:-1].numel() == pytest.approx(0.2, abs=0.01)
    assert share(inputs.eq(tokenizer.mask_token_id) & chosen) == pytest.approx(MASK_TOKEN_SHARE, abs=0.01)
    unchanged = share(inputs.eq(blocks) & chosen)  # kept, or replaced by chance with the same token
    assert unchanged == pytest.approx(1 - MASK_TOKEN_SHARE - RANDOM_TOKEN_SHARE, abs=0.01)


@pytest.mark.parametrize("family, objective", [("bert", "mlm"), ("gpt2", "causal_lm")])
def test_an_unchanged_model_shows_no_interference_and_a_perturbed_one_shows_its_drift(tmp_path, tokenizer, family, objective):
    mcfg = OmegaConf.create({"family": family, "objective": objective, "name_or_path": None, "hidden_size": 16,
                             "num_layers": 2, "num_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32,
                             "dropout": 0.0, "dtype": "fp32"})
    build_pretraining_model(mcfg, tokenizer).save_pretrained(tmp_path)
    task_model = load_task_model(tmp_path, num_labels=2)
    # The slices split TEXTS; one test text also occurs (in other case and punctuation) in the training split.
    corpus = Corpus("toy", train=[TEXTS[0].upper() + "!", "an unrelated text"], validation=TEXTS[18:], test=TEXTS[:18])
    # The task's held-out inputs, on which kl_task is measured: 18 test texts (capped at 16) and 6 validation texts.
    task = TaskData("toy", "classification", ["a", "b"], train=Split(TEXTS[:2], [0, 1]), validation=Split(TEXTS[30:], [0, 1] * 3),
                    test=Split(TEXTS[12:30], [0, 1] * 9))
    measure = lambda objective=objective: interference(tmp_path, task_model, task_of(task, tokenizer), corpus, 16,
                                                       objective, 16, torch.device("cpu"), 8)

    unchanged = measure()
    assert (unchanged["heldout_texts"], unchanged["heldout_overlap"]) == (16, 1)
    assert (unchanged["validation"]["heldout_texts"], unchanged["validation"]["heldout_overlap"]) == (16, 0)
    assert (unchanged["kl_task_texts"], unchanged["validation"]["kl_task_texts"]) == (16, 6)
    assert unchanged["forgetting"] == pytest.approx(0.0, abs=1e-6)
    assert unchanged["validation"]["forgetting"] == pytest.approx(0.0, abs=1e-6)
    assert unchanged["kl_task"] == 0.0 and unchanged["validation"]["kl_task"] == 0.0
    assert unchanged["cka"] == pytest.approx(1.0) and all(c == pytest.approx(1.0) for c in unchanged["cka_per_layer"])
    assert len(unchanged["cka_per_layer"]) == 3  # embeddings and 2 layers
    assert unchanged["drift_l2"] == 0.0 and set(unchanged["drift_l2_per_layer"]) >= {"embeddings", "layer.0", "layer.1"}

    layer = task_model.base_model.get_submodule("encoder.layer.1" if family == "bert" else "h.1")
    weight = next(layer.parameters())
    noise = torch.randn_like(weight) * 2.0
    with torch.no_grad():
        weight.add_(noise)
    expected = float(noise.norm())
    perturbed = measure()
    assert perturbed["drift_l2_per_layer"]["layer.1"] == pytest.approx(expected, rel=1e-5)
    assert perturbed["drift_l2"] == pytest.approx(expected, rel=1e-5)
    assert perturbed["drift_l2_per_layer"]["layer.0"] == 0.0
    assert perturbed["cka_per_layer"][:2] == pytest.approx([1.0, 1.0]) and perturbed["cka_per_layer"][2] < 1.0
    assert perturbed["forgetting"] != 0.0 and perturbed["validation"]["forgetting"] != 0.0
    assert perturbed["validation"]["pretrain_loss_before"] == unchanged["validation"]["pretrain_loss_before"]
    assert perturbed["kl_task"] > 0.0 and perturbed["validation"]["kl_task"] > 0.0
    torch.manual_seed(99)  # the positions measured come from their own generator, not the global one
    assert measure()["kl_task"] == perturbed["kl_task"]
    without_head = measure(objective=None)  # a checkpoint used as is: no pretraining head to compare
    assert without_head["kl_task"] is None and without_head["validation"]["kl_task"] is None


@pytest.fixture(scope="module")
def controlled_sweep(tmp_path_factory):
    """Two mask ratios with the scratch control and a second task: the control is computed once."""
    cwd = tmp_path_factory.mktemp("controls")
    maskrun(["-m", "experiment=[smoke,sequential]", "eval.controls=[scratch]", "mask.ratio=0.0,0.5",
             "dataset.max_examples=120", "pretrain.steps=10", "finetune.epochs=1"], cwd)
    return [load_metrics(d) for d in run_dirs(cwd / "outputs")], run_dirs(cwd / "outputs")


def test_the_scratch_control_is_computed_once_per_setting_and_gives_the_pretraining_gain(controlled_sweep):
    metrics, _ = controlled_sweep
    assert [m["status"] for m in metrics] == ["ok", "ok"]
    assert sorted(m["cache"]["scratch"] for m in metrics) == ["hit", "miss"]
    first, second = metrics
    assert first["controls"]["scratch"] == second["controls"]["scratch"]
    for m in metrics:
        gain = m["task"]["test"]["accuracy"] - m["controls"]["scratch"]["test"]["accuracy"]
        assert m["controls"]["pretraining_gain"] == pytest.approx(gain)


def test_sequential_fine_tuning_reports_task_a_before_and_after_task_b(controlled_sweep):
    metrics, dirs = controlled_sweep
    for m, run_dir in zip(metrics, dirs):
        sequential = m["sequential"]
        assert (sequential["task_a"], sequential["task_b"]) == ("rotten_tomatoes", "sms_spam")
        assert sequential["task_a_after_a"] == m["task"]["test"]
        assert sequential["retention"] == pytest.approx(
            sequential["task_a_after_b"]["accuracy"] - sequential["task_a_after_a"]["accuracy"])
        assert 0.0 <= sequential["task_b_test"]["accuracy"] <= 1.0
        assert_frozen_entries_exact(run_dir)  # finetuned/ is this run's model, saved before task B
        assert m["interference"]["cka"] is not None and m["interference"]["drift_l2"] is not None
        report = (run_dir / "report.md").read_text()
        assert "Retention (after B − after A)" in report and "Pretraining gain" in report
        assert (run_dir / "plots" / "interference_per_layer.png").stat().st_size > 0


def test_remask_builds_task_b_its_own_mask_from_the_task_a_weights(tmp_path):
    maskrun(["experiment=[smoke,sequential]", "sequential.remask=true", "mask.score=gradient", "mask.ratio=0.5",
             "dataset.max_examples=120", "pretrain.steps=10", "finetune.epochs=1"], tmp_path)
    (run_dir,) = run_dirs(tmp_path / "outputs")
    metrics = load_metrics(run_dir)
    assert metrics["status"] == "ok" and metrics["sequential"]["remask"] is True
    mask_a, mask_b = load_file(run_dir / "mask.safetensors"), load_file(run_dir / "mask_task_b.safetensors")
    assert mask_a.keys() == mask_b.keys()
    summary_b = metrics["sequential"]["mask_task_b"]
    assert summary_b["frozen"] == sum(int(m.sum()) for m in mask_b.values()) == metrics["mask"]["frozen"]
    assert any(not torch.equal(mask_a[name], mask_b[name]) for name in mask_a)  # other weights, other data
