"""Same command and seed on the CPU, same results: identical metrics.json numbers, mask and weights,
whether the cache was empty, hit, or left behind by jobs killed with SIGKILL mid-stage.
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
COMMAND = ["experiment=smoke", "optimizer.weight_decay=0.1", "device=cpu"]
VARYING = ("timing", "memory", "cache", "artifacts", "overrides", "lease")  # measurements and paths, not results


def start_run(root: Path, name: str) -> subprocess.Popen:
    args = [*COMMAND, f"cache_dir={root / 'cache'}", f"hydra.run.dir={root / name}"]
    return subprocess.Popen([sys.executable, "-m", "maskrun.cli", *args], cwd=root, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def complete_run(root: Path, name: str) -> Path:
    process = start_run(root, name)
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
    """The same command in a second cache: killed while pretraining, killed while fine-tuning, run again."""
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


def test_same_command_and_seed_give_identical_results(killed_then_rerun, reference_run):
    """Tokenizer and checkpoint built in another process (the second, killed job), then hit: same bytes, same numbers."""
    rerun = killed_then_rerun["rerun"]
    assert load_metrics(reference_run)["cache"] == {"tokenizer": "miss", "pretrain": "miss", "scores": "miss"}
    assert load_metrics(rerun)["cache"] == {"tokenizer": "hit", "pretrain": "hit", "scores": "hit"}
    assert load_metrics(rerun)["status"] == "ok"
    assert results(rerun) == results(reference_run)
    assert weights(rerun) == weights(reference_run)


def test_rerun_after_kills_uses_the_one_sound_checkpoint(killed_then_rerun):
    root, rerun = killed_then_rerun["root"], killed_then_rerun["rerun"]
    (checkpoint,) = [p for p in (root / "cache" / "pretrain").iterdir() if p.is_dir()]  # leftovers cleaned up
    assert entry_problem(checkpoint) is None
    assert Path(load_metrics(rerun)["artifacts"]["pretrained"]) == checkpoint
