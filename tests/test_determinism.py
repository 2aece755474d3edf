"""Same command and seed on the CPU, same results: identical metrics.json numbers, mask and weights,
whether the cache was empty, hit, or left behind by jobs killed with SIGKILL mid-stage. Bit for bit
at one CPU thread count (recorded as `cpu_threads`); another count changes only the last bits.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import load_metrics
from maskrun.cache import entry_problem

# One intra-op thread: a shared CPU runs it several times faster, and every run here uses the same count.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# Fisher scores over 16 calibration batches: a scoring stage long enough to be killed in.
COMMAND = ["experiment=smoke", "optimizer.weight_decay=0.1", "mask.score=fisher", "mask.calib_batches=16", "device=cpu"]
VARYING = ("timing", "memory", "cache", "artifacts", "overrides", "lease")  # measurements and paths, not results


def start_run(root: Path, name: str, threads: int = 1) -> subprocess.Popen:
    args = [*COMMAND, f"cache_dir={root / 'cache'}", f"hydra.run.dir={root / name}"]
    return subprocess.Popen([sys.executable, "-m", "maskrun.cli", *args], cwd=root,
                            env={**ENV, "OMP_NUM_THREADS": str(threads)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def complete_run(root: Path, name: str, threads: int = 1) -> Path:
    process = start_run(root, name, threads)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    return root / name


def results(run_dir: Path) -> dict:
    metrics = load_metrics(run_dir)
    return {key: value for key, value in metrics.items() if key not in VARYING}


def weights(run_dir: Path) -> dict[str, bytes]:
    """The bytes of the mask, the fine-tuned model and the pretrained checkpoint the run used."""
    pretrained = Path(load_metrics(run_dir)["artifacts"]["pretrained"])
    return {"mask": (run_dir / "mask.safetensors").read_bytes(),
            "finetuned": (run_dir / "finetuned" / "model.safetensors").read_bytes(),
            "pretrained": (pretrained / "model.safetensors").read_bytes(),
            "history": (run_dir / "history.json").read_bytes()}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted smoke run with a cache of its own."""
    return complete_run(tmp_path_factory.mktemp("reference"), "run")


def test_metrics_record_the_versions_that_produced_them(reference_run):
    import torch
    import transformers

    import maskrun

    versions = load_metrics(reference_run)["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert versions["maskrun"] == maskrun.__version__
    assert versions["git_commit"] is None or len(versions["git_commit"]) == 40
    assert json.loads(json.dumps(versions)) == versions


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
    """The same command in a second cache: killed while pretraining, while scoring, while fine-tuning; run again."""
    root = tmp_path_factory.mktemp("faults")
    left_behind = {}
    for stage in ("pretrain", "scores"):
        stage_dir = root / "cache" / stage
        kill_when(start_run(root, f"killed_in_{stage}"), lambda: stage_dir.is_dir() and any(stage_dir.glob(".tmp-*")))
        left_behind[stage] = sorted(p.name for p in stage_dir.iterdir())
    # The mask is copied into the run dir just before fine-tuning starts.
    kill_when(start_run(root, "killed_in_finetune"), lambda: (root / "killed_in_finetune" / "mask.safetensors").exists())
    return {"root": root, "left_behind": left_behind, "rerun": complete_run(root, "rerun")}


@pytest.mark.parametrize("stage", ["pretrain", "scores"])
def test_a_job_killed_mid_stage_leaves_no_entry(killed_then_rerun, stage):
    names = killed_then_rerun["left_behind"][stage]
    assert any(name.startswith(".tmp-") for name in names)
    assert [name for name in names if not name.startswith(".") and not name.endswith(".lock")] == []


def test_same_command_and_seed_give_identical_results(killed_then_rerun, reference_run):
    """Stages built in other processes (the killed jobs), then hit: same bytes, same numbers."""
    rerun = killed_then_rerun["rerun"]
    assert load_metrics(reference_run)["cache"] == {"tokenizer": "miss", "pretrain": "miss", "scores": "miss",
                                                    "mask": "miss", "result": "miss"}
    # Built by the killed jobs (the scores and mask by the one killed while fine-tuning), then hit.
    assert load_metrics(rerun)["cache"] == {"tokenizer": "hit", "pretrain": "hit", "scores": "hit",
                                            "mask": "hit", "result": "miss"}
    assert load_metrics(rerun)["status"] == "ok"
    assert results(rerun) == results(reference_run)
    assert weights(rerun) == weights(reference_run)


@pytest.mark.parametrize("stage", ["pretrain", "scores"])
def test_rerun_after_kills_uses_one_sound_entry_per_stage(killed_then_rerun, stage):
    root, rerun = killed_then_rerun["root"], killed_then_rerun["rerun"]
    (entry,) = [p for p in (root / "cache" / stage).iterdir() if p.is_dir()]  # leftovers cleaned up
    assert entry_problem(entry) is None
    if stage == "pretrain":
        assert Path(load_metrics(rerun)["artifacts"]["pretrained"]) == entry


def test_another_thread_count_changes_only_the_last_bits(reference_run, tmp_path):
    """Float sums split across threads round differently: the same mask and predictions, numbers within 1e-6."""
    two_threads = complete_run(tmp_path, "two_threads", threads=2)
    reference, other = load_metrics(reference_run), load_metrics(two_threads)
    assert (reference["cpu_threads"], other["cpu_threads"]) == (1, 2)
    assert (two_threads / "mask.safetensors").read_bytes() == (reference_run / "mask.safetensors").read_bytes()
    assert other["task"]["test"] == reference["task"]["test"] and other["mask"] == reference["mask"]
    for key in ("pretrain_loss_before", "pretrain_loss_after", "cka", "drift_l2"):
        assert other["interference"][key] == pytest.approx(reference["interference"][key], rel=1e-6, abs=1e-9), key
