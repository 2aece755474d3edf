"""The fine-tuning loop: mixed precision stays exact, accumulated steps, skipped fp16 steps, warmup,
the two-phase recipe, input masking, early stopping."""

import re
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from conftest import BAD, GOOD, load_metrics, task_of
from maskrun.data.tasks import Split, TaskData
from maskrun.cli import CONFIG_MODULE
from maskrun.errors import ConfigError
from maskrun.batching import collate
from maskrun.finetune import Callback, Phase, finetune, mask_inputs
from maskrun.masks.random import build as random_mask
from maskrun.validate import check_config, compose_jobs
from maskrun.tasks.classification import Classification



@pytest.fixture(scope="module")
def task() -> TaskData:
    texts, labels = (GOOD + BAD) * 4, ([1] * len(GOOD) + [0] * len(BAD)) * 4
    split = Split(texts, labels)
    return TaskData("toy", "classification", ["bad", "good"], train=split, validation=Split(GOOD + BAD, [1] * 4 + [0] * 4), test=split)


def tiny_model(tokenizer, **config_overrides) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
                        **config_overrides)
    return BertForSequenceClassification(config)


def half_frozen(model) -> dict[str, torch.Tensor]:
    backbone = {n: p.detach() for n, p in model.named_parameters() if n.startswith("bert.") and "pooler" not in n}
    return random_mask(SimpleNamespace(ratio=0.5, allocation="global", granularity="element"), backbone, None, seed=0).masks


def training_configs(**overrides):
    """The finetune and optimizer sections of the packaged config, sized for the toy task."""
    defaults = OmegaConf.load(files("maskrun.conf") / "config.yaml").finetune
    fcfg = OmegaConf.merge(defaults, {"epochs": 2, "batch_size": 8, "max_length": 16, "lr": 1e-2}, overrides)
    ocfg = OmegaConf.merge(OmegaConf.load(files("maskrun.conf") / "optimizer" / "adamw.yaml"), {"weight_decay": 0.1})
    return fcfg, ocfg


def train(model, tokenizer, task, frozen, **overrides) -> dict:
    fcfg, ocfg = training_configs(**overrides)
    return finetune(model, task_of(task, tokenizer, fcfg.max_length), frozen, fcfg, ocfg, torch.device("cpu"), seed=0)


def frozen_moved(model, before: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor]) -> int:
    params = dict(model.named_parameters())
    return sum(int((params[n].detach()[m] != before[n][m]).sum()) for n, m in frozen.items())


def trainable_moved(model, before: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor]) -> int:
    params = dict(model.named_parameters())
    return sum(int((params[n].detach()[~m] != before[n][~m]).sum()) for n, m in frozen.items())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_keeps_every_frozen_entry_exact(tokenizer, task, precision):
    model = tiny_model(tokenizer)
    frozen = half_frozen(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tokenizer, task, frozen, precision=precision)
    assert frozen_moved(model, before, frozen) == 0
    assert trainable_moved(model, before, frozen) > 0


def accumulated_and_whole_batch_runs(tokenizer, task, monkeypatch) -> list[tuple[list[dict], list]]:
    """One epoch in micro-batches of 4 accumulated 3 at a time, and one in batches of 12: (history, gradients) each.

    30 examples: the micro-batches of 4 (the last one of 2) in groups of 3 hold the same examples, in the
    same order, as the batches of 12 (the last one of 6, a short last group). lr=0 keeps the weights where
    they are, so both runs take every step's gradient at the same point; dropout is off so that the
    forward passes match. The gradients are recorded as each step receives them, before clipping.
    """
    train_split = Split(task.train.texts[:30], task.train.labels[:30])
    small_task = TaskData("toy", "classification", task.label_names, train=train_split, validation=task.validation, test=task.test)
    phase_step = Phase.step

    def recording_step(phase, *args):
        step_gradients.append([p.grad.clone() for p in phase.optimizer.trainable_tensors()])
        return phase_step(phase, *args)

    monkeypatch.setattr(Phase, "step", recording_step)
    runs = []
    for batch_size, grad_accum in [(4, 3), (12, 1)]:
        step_gradients = []
        model = tiny_model(tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        history = train(model, tokenizer, small_task, {}, epochs=1, lr=0.0, batch_size=batch_size,
                        grad_accum=grad_accum)
        runs.append((history["train"], step_gradients))
    return runs


def test_an_accumulated_step_has_the_gradient_of_its_examples_taken_as_one_batch(tokenizer, task, monkeypatch):
    (_, accumulated_gradients), (_, whole_gradients) = accumulated_and_whole_batch_runs(tokenizer, task, monkeypatch)
    assert len(accumulated_gradients) == len(whole_gradients) == 3
    for step, (accumulated, whole) in enumerate(zip(accumulated_gradients, whole_gradients), start=1):
        for accumulated_grad, whole_grad in zip(accumulated, whole, strict=True):
            torch.testing.assert_close(accumulated_grad, whole_grad, rtol=0, atol=1e-6, msg=f"step {step}")


def test_an_accumulated_step_logs_the_mean_loss_of_its_examples(tokenizer, task, monkeypatch):
    (accumulated, _), (whole, _) = accumulated_and_whole_batch_runs(tokenizer, task, monkeypatch)
    assert [h["loss"] for h in accumulated] == pytest.approx([h["loss"] for h in whole], rel=1e-6)


def test_an_fp16_step_skipped_for_overflow_moves_neither_the_weights_nor_the_schedule(tokenizer, task):
    model = tiny_model(tokenizer)
    fcfg, ocfg = training_configs(precision="fp16")
    phase = Phase(model, half_frozen(model), fcfg, ocfg, steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = collate(tokenizer, tokenizer(task.train.texts[:8])["input_ids"])
    labels = torch.tensor(task.train.labels[:8])

    def backward(overflow: bool) -> None:
        scaler.scale(model(**batch, labels=labels).loss).backward()
        if overflow:  # the classifier is never frozen, so its gradient reaches the scaler
            model.classifier.weight.grad[0, 0] = float("inf")

    # A scheduler counts the steps it took in last_epoch.
    backward(overflow=False)
    phase.step(fcfg.max_grad_norm, scaler)
    assert phase.scheduler.last_epoch == 1
    learning_rate = phase.scheduler.get_last_lr()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    backward(overflow=True)
    phase.step(fcfg.max_grad_norm, scaler)
    assert phase.scheduler.last_epoch == 1 and phase.scheduler.get_last_lr() == learning_rate
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), f"{name} moved in a skipped step"


@pytest.mark.parametrize("steps", [10, 15, 558])  # 558: the default job's fine-tuning steps
def test_warmup_lasts_as_many_steps_as_in_the_hf_trainer(tokenizer, steps):
    fcfg, ocfg = training_configs(scheduler="linear", warmup_ratio=0.1)
    phase = Phase(tiny_model(tokenizer), {}, fcfg, ocfg, steps)
    learning_rate_factors = [phase.scheduler.lr_lambdas[0](step) for step in range(steps)]
    # Building TrainingArguments needs accelerate; its get_warmup_steps reads only warmup_steps (below 1: a ratio).
    hf_warmup_steps = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=fcfg.warmup_ratio), steps)
    # The linear schedule reaches its peak exactly when warmup ends.
    assert learning_rate_factors.index(max(learning_rate_factors)) == hf_warmup_steps


def test_unfreeze_after_trains_under_the_mask_then_releases_every_entry(tokenizer, task):
    masked_only = tiny_model(tokenizer)
    frozen = half_frozen(masked_only)
    before = {n: p.detach().clone() for n, p in masked_only.named_parameters()}
    first_epoch = train(masked_only, tokenizer, task, frozen, epochs=1)

    two_phase = tiny_model(tokenizer)
    history = train(two_phase, tokenizer, task, frozen, epochs=2, unfreeze_after=1)

    # The first epoch is the masked run, step for step; the second moves the entries it froze.
    assert [h["loss"] for h in history["train"] if h["epoch"] == 1] == [h["loss"] for h in first_epoch["train"]]
    assert frozen_moved(masked_only, before, frozen) == 0
    assert frozen_moved(two_phase, before, frozen) > 0
    assert all(p.requires_grad for p in two_phase.parameters())


def test_input_masking_replaces_ordinary_tokens_and_never_special_ones(tokenizer):
    batch = tokenizer([" ".join(GOOD)] * 200 + ["a"] * 200, padding=True, return_tensors="pt")["input_ids"]
    masked = mask_inputs(batch, tokenizer, prob=0.5, generator=torch.Generator().manual_seed(0))
    special = torch.isin(batch, torch.tensor(tokenizer.all_special_ids))
    assert torch.equal(masked[special], batch[special])
    replaced = masked[~special] == tokenizer.mask_token_id
    assert abs(replaced.float().mean().item() - 0.5) < 0.05
    assert torch.equal(masked[~special][~replaced], batch[~special][~replaced])


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(tokenizer, task, monkeypatch):
    scripted_accuracy = iter([0.5, 0.8, 0.6, 0.7, 0.9])
    snapshots = []

    def scripted_classify(model, *args, **kwargs):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": next(scripted_accuracy), "macro_f1": 0.0}

    monkeypatch.setattr(Classification, "evaluate", lambda self, model, split, device: scripted_classify(model))
    model = tiny_model(tokenizer)
    history = train(model, tokenizer, task, half_frozen(model), epochs=5, early_stopping_patience=2)

    assert [v["epoch"] for v in history["validation"]] == [1, 2, 3, 4]
    assert history["selected"]["epoch"] == 2 and history["selected"]["accuracy"] == 0.8
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[1][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)


def test_a_run_keeps_frozen_entries_of_its_mask_bit_identical_to_the_pretrained_checkpoint(smoke_run: Path):
    metrics = load_metrics(smoke_run)
    masks = load_file(smoke_run / "mask.safetensors")
    launch_dir = smoke_run.parents[2]  # the cache path is recorded relative to where maskrun was started
    pretrained = load_file(launch_dir / metrics["artifacts"]["pretrained"] / "model.safetensors")
    finetuned = load_file(smoke_run / "finetuned" / "model.safetensors")
    assert metrics["status"] == "ok" and sum(int(m.sum()) for m in masks.values()) > 0
    for name, mask in masks.items():
        assert torch.equal(finetuned[name][mask], pretrained[name][mask]), f"{name}: a frozen entry moved"
    assert not all(torch.equal(finetuned[n], pretrained[n]) for n in masks)
    assert 0 < metrics["memory"]["optimizer_state_bytes"]
    assert metrics["task"]["validation"]["epoch"] == 2


@pytest.mark.parametrize("overrides, key", [
    (["finetune.precision=fp8"], "finetune.precision"),
    (["finetune.unfreeze_after=3"], "finetune.unfreeze_after"),
    (["finetune.input_mask_prob=1.5"], "finetune.input_mask_prob"),
    (["finetune.early_stopping_patience=0"], "finetune.early_stopping_patience"),
    (["finetune.max_grad_norm=-1"], "finetune.max_grad_norm"),
    (["optimizer=sgd", "optimizer.momentum=0", "optimizer.nesterov=true"], "optimizer.nesterov"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
])
def test_bad_training_settings_are_refused_before_any_work(overrides, key):
    (cfg,) = compose_jobs(CONFIG_MODULE, "config", overrides, multirun=False)
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_config(cfg)


def test_sensible_training_settings_pass_the_checks():
    (cfg,) = compose_jobs(CONFIG_MODULE, "config", ["finetune.unfreeze_after=1", "finetune.input_mask_prob=0.1"],
                          multirun=False)
    check_config(cfg)


def test_callbacks_see_every_step_with_its_learning_rate_and_every_validation(tokenizer, task):
    class Recorder(Callback):
        def __init__(self):
            self.calls = []

        def on_step_begin(self, step, model, optimizer):
            self.calls.append(("begin", step))

        def on_step_end(self, step, model, optimizer, record):
            self.calls.append(("end", step, record["lr"]))

        def on_validation(self, record):
            self.calls.append(("validation", record["epoch"]))

    recorder = Recorder()
    fcfg, ocfg = training_configs(scheduler="constant", warmup_ratio=0.0, lr=0.02)
    history = finetune(tiny_model(tokenizer), task_of(task, tokenizer, fcfg.max_length), {}, fcfg, ocfg,
                       torch.device("cpu"), seed=0, callbacks=[recorder])
    steps = len(history["train"])
    expected = [call for step in range(1, steps + 1) for call in (("begin", step), ("end", step, 0.02))]
    validations = [i for i, call in enumerate(recorder.calls) if call[0] == "validation"]
    assert [call for call in recorder.calls if call[0] != "validation"] == expected
    assert [recorder.calls[i][1] for i in validations] == [1, 2]
    assert validations[-1] == len(recorder.calls) - 1
    assert [h["lr"] for h in history["train"]] == [0.02] * steps
