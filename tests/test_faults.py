"""A NaN or infinite loss stops the job with status failed; its stage publishes nothing, and no result is
cached.

(Jobs killed mid-stage and rerun: test_determinism.py. Damaged cache entries, killed cache writers
and concurrent jobs: test_cache.py. Results reused only by the code that computed them: test_stage_keys.py.)
"""

import json

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from maskrun.cache import entry_problem
from maskrun.job import run_job


def job_config(tmp_path, overrides: list[str], run_dir):
    """The composed config of a single run in `run_dir`, as Hydra hands it to the job."""
    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", ["experiment=smoke", f"cache_dir={tmp_path / 'cache'}", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("overrides, stage, published", [
    (["pretrain.lr=1e30"], "pretraining", ["tokenizer"]),
    (["pretrain.steps=0", "finetune.lr=1e30"], "fine-tuning", ["mask", "pretrain", "scores", "tokenizer"]),
])
def test_a_nan_loss_fails_the_job(tmp_path, overrides, stage, published):
    cfg = job_config(tmp_path, overrides, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert exit_info.value.code == 1 and metrics["status"] == "failed"
    assert metrics["error"].startswith(f"FloatingPointError: {stage} loss became")
    entries = [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir() and not p.name.startswith(".")]
    assert sorted(p.parent.name for p in entries) == published  # a failed stage publishes nothing
    assert all(entry_problem(p) is None for p in entries)
