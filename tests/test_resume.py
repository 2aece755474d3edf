"""Checkpoint and resume: a fine-tuning run stopped after any step and resumed ends bit for bit as an uninterrupted one,
whatever the recipe; checkpoints are written whole or not at all, and only a run of the same config resumes one; a
preemption signal checkpoints and stops the job, and the rerun resumes it."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import MASKRUN, load_metrics, maskrun, task_of
from maskrun import preemption
from maskrun.checkpoint import Checkpointing, decode, encode
from maskrun.cli import CONFIG_MODULE
from maskrun.errors import ConfigError
from maskrun.finetune import Callback, finetune
from maskrun.methods import build_method
from maskrun.stages import hash_config
from maskrun.validate import check_config, compose_jobs
from test_finetune import half_frozen, task, tiny_model, training_configs  # noqa: F401 (task: a fixture)
from test_methods import bert_dir, composed, context, task_model, tokenizer_dir  # noqa: F401 (fixtures)

CPU = torch.device("cpu")


class Killed(Exception):
    """Stands for the end of the process: the run stops before step `after` + 1 begins."""


class KillAfter(Callback):
    def __init__(self, after: int):
        self.after = after

    def on_step_begin(self, step, model, optimizer):
        if step == self.after + 1:
            raise Killed


def train(setup, fcfg, ocfg, directory: Path | None = None, every: int | None = None, fingerprint: str = "config",
          callbacks=()):
    """A fresh model (and method) from `setup`, fine-tuned, checkpointing into `directory` as the pipeline has it
    checkpoint; returns the model, its history and the Checkpointing."""
    model, frozen, method, tokenizer = setup()
    checkpointing = Checkpointing(directory, every, fingerprint, method and method.generators())
    history = finetune(model, task_of(setup.task, tokenizer, fcfg.max_length), frozen, fcfg, ocfg, CPU, seed=0,
                       extra_loss=method and method.extra_loss, callbacks=callbacks, checkpointing=checkpointing)
    return model, history, checkpointing


class Setup:
    """Builds the same starting point every time: the toy BERT alone, or a pretrained one under a method."""

    def __init__(self, task, tokenizer, bert_dir: Path, method: tuple[str, ...] = ()):
        self.task, self.tokenizer, self.bert_dir, self.method = task, tokenizer, bert_dir, method

    def __call__(self):
        if not self.method:
            model = tiny_model(self.tokenizer)
            return model, half_frozen(model), None, self.tokenizer
        cfg = composed(*self.method)
        method = build_method(cfg, context(cfg, self.bert_dir))
        model = method.prepare(task_model(self.bert_dir))
        return model, half_frozen(model), method, AutoTokenizer.from_pretrained(self.bert_dir)


# 32 toy examples in micro-batches of 4: 8 per epoch; with grad_accum=2, 4 steps per epoch.
CASES = {
    "grad_accum, resumed before an epoch's validation": ((), dict(grad_accum=2), 2, 5, 4),
    "unfreeze_after, resumed in the released phase": ((), dict(epochs=3, unfreeze_after=1), 2, 11, 10),
    "early stopping, resumed with a best model kept": ((), dict(epochs=3, early_stopping_patience=2), 3, 13, 12),
    "fp16 with its GradScaler": ((), dict(precision="fp16"), 1, 7, 7),
    "input masking noise": ((), dict(input_mask_prob=0.3), 2, 6, 6),
    "replay": (("method=replay", "method.share=0.5", "method.batch_size=4"), {}, 2, 5, 4),
    "l2sp": (("method=l2sp", "method.alpha=0.1"), {}, 2, 5, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_a_run_stopped_after_any_step_and_resumed_ends_bit_identical_to_an_uninterrupted_one(
        tmp_path, tokenizer, task, bert_dir, case):
    method, overrides, every, kill_after, checkpointed = CASES[case]
    setup = Setup(task, tokenizer, bert_dir, method)
    fcfg, ocfg = training_configs(batch_size=4, **overrides)
    uninterrupted, expected, _ = train(setup, fcfg, ocfg)

    with pytest.raises(Killed):
        train(setup, fcfg, ocfg, tmp_path, every, callbacks=[KillAfter(kill_after)])
    resumed, history, resuming = train(setup, fcfg, ocfg, tmp_path, every)

    assert resuming.resumed_from_step == checkpointed
    assert history == expected
    for (name, param), (_, reference) in zip(resumed.named_parameters(), uninterrupted.named_parameters(), strict=True):
        assert torch.equal(param, reference), f"{name} differs from the uninterrupted run's"


def test_a_checkpoint_of_another_config_is_never_resumed(tmp_path, tokenizer, task, bert_dir):
    setup = Setup(task, tokenizer, bert_dir)
    fcfg, ocfg = training_configs(batch_size=4)
    _, expected, _ = train(setup, fcfg, ocfg)
    with pytest.raises(Killed):
        train(setup, fcfg, ocfg, tmp_path, 1, "another config", [KillAfter(3)])

    assert Checkpointing(tmp_path, 1, "this config").latest() is None
    _, history, other = train(setup, fcfg, ocfg, tmp_path, 1, "this config")
    assert other.resumed_from_step is None and history == expected
    assert [p.name for p in tmp_path.iterdir()] == [f"step-{len(history['train'])}"]  # this run's replaced it


def test_a_checkpoint_is_published_whole_and_the_previous_one_stays_until_then(tmp_path, tokenizer, task, bert_dir,
                                                                             monkeypatch):
    setup = Setup(task, tokenizer, bert_dir)
    fcfg, ocfg = training_configs(batch_size=4)
    with pytest.raises(Killed):
        train(setup, fcfg, ocfg, tmp_path, 2, callbacks=[KillAfter(3)])
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]  # the newest only

    def dies_while_writing(checkpointing, out, *args):
        (out / "model.safetensors").write_bytes(b"half a file")
        raise Killed

    monkeypatch.setattr(Checkpointing, "write", dies_while_writing)
    with pytest.raises(Killed):
        train(setup, fcfg, ocfg, tmp_path, 2)
    checkpoint = Checkpointing(tmp_path, 2, "config").latest()
    assert checkpoint is not None and checkpoint.path.name == "step-2" and checkpoint.position.step == 2


def test_state_dicts_round_trip_through_json_and_safetensors_without_pickle():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
             "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0], "fused": None, "name": "decay"}]}
    tensors = {}
    encoded = json.loads(json.dumps(encode(state, tensors, "optimizer")))
    decoded = decode(encoded, tensors)
    assert decoded["param_groups"] == state["param_groups"] and list(decoded["state"]) == [0]
    assert all(torch.equal(decoded["state"][0][k], v) for k, v in state["state"][0].items())
    with pytest.raises(TypeError, match="without pickle"):
        encode({"lambda": lambda step: step}, {}, "scheduler")


@pytest.mark.parametrize("value", [0, -2, 1.5, "often"])
def test_a_bad_checkpoint_interval_is_refused_before_any_work(value):
    (cfg,) = compose_jobs(CONFIG_MODULE, "config", [f"finetune.checkpoint_every={value}"], multirun=False)
    with pytest.raises(ConfigError, match=re.escape("finetune.checkpoint_every")):
        check_config(cfg)


def test_sigterm_checkpoints_and_stops_the_job_and_the_rerun_resumes_it_to_the_uninterrupted_weights(
        tmp_path, smoke_run):
    command = MASKRUN + ["experiment=smoke", "optimizer.weight_decay=0.1", "finetune.checkpoint_every=1",
                         f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "run" / "checkpoint").is_dir() and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    stopped = load_metrics(tmp_path / "run")
    assert job.returncode == -signal.SIGTERM, stderr  # ended by the signal it passed on to the default handler
    assert stopped["status"] == "failed" and stopped["error"].startswith("Preempted: SIGTERM received: checkpointed")
    (checkpoint,) = (tmp_path / "run" / "checkpoint").iterdir()

    maskrun(command[len(MASKRUN):], tmp_path)
    resumed = load_metrics(tmp_path / "run")
    assert resumed["status"] == "ok" and resumed["finetune"]["resumed_from_step"] == int(checkpoint.name[len("step-"):])
    assert {stage: resumed["cache"][stage] for stage in ("tokenizer", "pretrain", "mask")} == {
        "tokenizer": "hit", "pretrain": "hit", "mask": "hit"}
    assert not (tmp_path / "run" / "checkpoint").exists()
    weights = (tmp_path / "run" / "finetuned" / "model.safetensors").read_bytes()
    assert weights == (smoke_run / "finetuned" / "model.safetensors").read_bytes()
    assert load_metrics(smoke_run)["finetune"]["resumed_from_step"] is None


def test_a_preemption_signal_stops_at_once_outside_fine_tuning_and_waits_for_the_step_inside_it():
    passed_on = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: passed_on.append(signum))  # e.g. submitit's requeue
    try:
        with pytest.raises(preemption.Preempted, match="SIGUSR1 received outside fine-tuning"):
            with preemption.handled():
                signal.raise_signal(signal.SIGUSR1)
                pytest.fail("the signal did not stop the job")
        with pytest.raises(preemption.Preempted, match="after the last fine-tuning step"):
            with preemption.handled(), preemption.deferred():
                signal.raise_signal(signal.SIGUSR1)
                noted = preemption.received()  # still running: the loop checkpoints first
        assert noted == signal.SIGUSR1 and passed_on == []
        preemption.pass_on(preemption.received())
        assert passed_on == [signal.SIGUSR1]  # the handler from before the job is back and gets the signal
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_how_often_a_run_checkpoints_is_no_part_of_its_result_key():
    def key(*overrides):
        (cfg,) = compose_jobs(CONFIG_MODULE, "config", list(overrides), multirun=False)
        return hash_config(cfg)

    assert key("finetune.checkpoint_every=5") == key() != key("finetune.epochs=3")
