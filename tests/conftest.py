"""Shared helpers: run the real `maskrun` command in a temporary directory with its own cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

MASKRUN = [sys.executable, "-m", "maskrun.cli"]
REPORT = [sys.executable, "-m", "maskrun.report.cli"]


def run_cli(args: list[str], cwd: Path, command=MASKRUN, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def maskrun(args: list[str], cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    result = run_cli(args, cwd)
    assert result.returncode == expect, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def run_dirs(root: Path) -> list[Path]:
    """Every run dir (one holding metrics.json) under root, in a stable order."""
    return sorted(p.parent for p in root.rglob("metrics.json") if ".cache" not in p.parts)


def load_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_frozen_entries_exact(run_dir: Path):
    """Every frozen entry of the saved fine-tuned model equals the pretrained checkpoint's, bit for bit."""
    metrics = load_metrics(run_dir)
    masks = load_file(run_dir / "mask.safetensors")
    pretrained = load_file(f"{metrics['artifacts']['pretrained']}/model.safetensors")
    finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
    assert masks, "mask.safetensors holds no tensors"
    for name, frozen in masks.items():
        assert frozen.dtype == torch.bool and frozen.shape == finetuned[name].shape
        assert torch.equal(finetuned[name][frozen], pretrained[name][frozen]), f"{name} moved where frozen"
    return masks, pretrained, finetuned


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One default smoke run, shared by the tests that only read its artifacts."""
    cwd = tmp_path_factory.mktemp("smoke")
    maskrun(["experiment=smoke", "optimizer.weight_decay=0.1"], cwd)
    (run_dir,) = run_dirs(cwd / "outputs")
    return run_dir


def task_of(data, tokenizer, max_length: int = 16):
    """`data` (a maskrun.data.TaskData) as the pipeline asks it, with the packaged eval settings."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from maskrun.tasks import build_task

    return build_task(data, tokenizer, max_length, OmegaConf.load(files("maskrun.conf") / "config.yaml").eval)
