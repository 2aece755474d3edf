"""Same command and seed on the CPU: identical metrics.json numbers, mask, and weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_metrics

# One intra-op thread: a shared CPU runs it several times faster, and every run here uses the same count.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
COMMAND = ["experiment=smoke", "optimizer.weight_decay=0.1", "device=cpu"]
VARYING = ("timing", "memory", "cache", "artifacts", "overrides")  # measurements and paths, not results


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


def test_same_command_and_seed_give_identical_results(reference_run, tmp_path):
    again = complete_run(tmp_path, "run")
    assert load_metrics(again)["cache"] == {"tokenizer": "miss", "pretrain": "miss"}  # recomputed, not reused
    assert results(again) == results(reference_run)
    assert weights(again) == weights(reference_run)
    assert results(again)["status"] == "ok"


def test_metrics_record_the_versions_that_produced_them(reference_run):
    import torch
    import transformers

    import maskrun

    versions = load_metrics(reference_run)["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert versions["maskrun"] == maskrun.__version__
    assert versions["git_commit"] is None or len(versions["git_commit"]) == 40
    assert json.loads(json.dumps(versions)) == versions
