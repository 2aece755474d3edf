"""Faults never lose or corrupt work: a job killed with SIGKILL at any stage and run again gives the
uninterrupted result from a sound cache; a NaN loss stops the job with status failed.

(Damaged cache entries, killed cache writers and concurrent jobs: see test_cache.py.)
"""

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from conftest import load_metrics
from maskrun.cache import entry_problem
from maskrun.job import run_job
from test_determinism import complete_run, reference_run, results, start_run, weights  # noqa: F401 (a fixture)


def kill_when(process, reached: Callable[[], bool], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not reached():
        assert process.poll() is None, f"the run ended before the kill point:\n{process.stderr.read()}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.02)
    process.kill()  # SIGKILL: no handler, no cleanup
    process.wait()


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    pretrain_dir = root / "cache" / "pretrain"
    kill_when(start_run(root, "killed_in_pretrain"), lambda: any(pretrain_dir.glob(".tmp-*")))
    after_first_kill = sorted(p.name for p in pretrain_dir.iterdir())
    # The mask is written as fine-tuning starts (it is computed from the pretrained weights).
    kill_when(start_run(root, "killed_in_finetune"), lambda: (root / "killed_in_finetune" / "mask.safetensors").exists())
    return {"root": root, "after_first_kill": after_first_kill, "rerun": complete_run(root, "rerun")}


def test_a_job_killed_in_pretraining_leaves_no_entry(killed_then_rerun):
    names = killed_then_rerun["after_first_kill"]
    assert any(name.startswith(".tmp-") for name in names)
    assert [name for name in names if not name.startswith(".") and not name.endswith(".lock")] == []


def test_rerun_after_kills_gives_the_uninterrupted_result(killed_then_rerun, reference_run):
    rerun = killed_then_rerun["rerun"]
    assert load_metrics(rerun)["status"] == "ok"
    assert results(rerun) == results(reference_run)
    assert weights(rerun) == weights(reference_run)


def test_rerun_reuses_the_one_sound_checkpoint(killed_then_rerun):
    root, rerun = killed_then_rerun["root"], killed_then_rerun["rerun"]
    assert load_metrics(rerun)["cache"] == {"tokenizer": "hit", "pretrain": "hit"}  # built by the second, killed job
    (checkpoint,) = [p for p in (root / "cache" / "pretrain").iterdir() if p.is_dir()]  # leftovers cleaned up
    assert entry_problem(checkpoint) is None
    assert Path(load_metrics(rerun)["artifacts"]["pretrained"]) == checkpoint


@pytest.mark.parametrize("overrides, stage, published", [
    (["pretrain.lr=1e30"], "pretraining", ["tokenizer"]),
    (["pretrain.steps=0", "finetune.lr=1e30"], "fine-tuning", ["pretrain", "tokenizer"]),
])
def test_a_nan_loss_fails_the_job(tmp_path, overrides, stage, published):
    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", ["experiment=smoke", f"cache_dir={tmp_path / 'cache'}", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert exit_info.value.code == 1 and metrics["status"] == "failed"
    assert metrics["error"].startswith(f"FloatingPointError: {stage} loss became")
    entries = [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir() and not p.name.startswith(".")]
    assert sorted(p.parent.name for p in entries) == published  # a failed stage publishes nothing
    assert all(entry_problem(p) is None for p in entries)
