"""Forgetting is measured the same way in every run: one checkpoint and one held-out text give one
pretraining loss before fine-tuning, whatever ran before the measure (fine-tuning settings, other draws)."""

import pytest
import torch
from transformers import AutoTokenizer

from conftest import load_metrics, maskrun
from maskrun.data.tokenizer import train_tokenizer
from maskrun.evaluate import heldout_blocks

TEXTS = [f"{who} read {count} books about {what}" for who in ("she", "he", "we") for count in ("two", "ten")
         for what in ("ships", "birds", "stars")]


def test_the_heldout_batch_does_not_depend_on_the_global_rng(tmp_path):
    train_tokenizer(TEXTS, 200, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batches = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        batches.append(heldout_blocks(tokenizer, TEXTS, 16, "mlm"))
        assert torch.equal(torch.get_rng_state(), state), "the held-out batch drew from the global RNG"
    (inputs, labels), (other_inputs, other_labels) = batches
    assert labels.ne(-100).any(), "no position was masked"
    assert torch.equal(inputs, other_inputs) and torch.equal(labels, other_labels)


def test_the_pretraining_loss_before_fine_tuning_is_the_same_whatever_the_fine_tuning(tmp_path):
    # Smoke runs sharing one cache, so one pretrained checkpoint, fine-tuned for 1 and for 2 epochs.
    interference = {}
    for epochs in (1, 2):
        maskrun(["experiment=smoke", f"finetune.epochs={epochs}", "dataset.max_examples=120", "pretrain.steps=10",
                 "eval.heldout_texts=16", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / str(epochs)}"],
                tmp_path)
        interference[epochs] = load_metrics(tmp_path / str(epochs))["interference"]
    one_epoch, two_epochs = interference[1], interference[2]
    assert one_epoch["pretrain_loss_before"] == two_epochs["pretrain_loss_before"]
    assert one_epoch["validation"]["pretrain_loss_before"] == two_epochs["validation"]["pretrain_loss_before"]
    for measure in (one_epoch, one_epoch["validation"]):  # the test slice, then the validation slice
        assert measure["heldout_texts"] == 16 and measure["heldout_overlap"] == 0
        assert measure["forgetting"] == pytest.approx(measure["pretrain_loss_after"] - measure["pretrain_loss_before"])
    assert one_epoch["validation"]["pretrain_loss_before"] != one_epoch["pretrain_loss_before"]  # other texts
