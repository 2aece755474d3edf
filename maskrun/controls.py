"""Controls that keep the numbers honest: the same task model fine-tuned from random initialisation.

If pretraining did not help the task, `pretraining_gain` (task metric − scratch's) says so: it can
be negative. The control depends on the model, tokenizer, task, fine-tuning settings and seed, but
not on the mask, so a sweep over mask settings computes it once through the cache.
"""

import json
from pathlib import Path

import torch

from maskrun import stages
from maskrun.cache import Cache
from maskrun.evaluate import classify
from maskrun.finetune import finetune
from maskrun.models import init_task_model

def scratch_control(cache: Cache, cfg, pretrained_dir: Path, tokenizer_dir: Path, tokenizer, task,
                    device: torch.device) -> tuple[dict, str]:
    """The scratch control's test metrics, and "hit" or "miss" in the cache."""

    def build(out: Path) -> None:
        model = init_task_model(pretrained_dir, task.num_labels, cfg.seed).to(device)
        finetune(model, tokenizer, task, {}, cfg.finetune, cfg.optimizer, device, cfg.seed)
        test = classify(model, tokenizer, task.test, cfg.finetune.max_length, device, cfg.eval.batch_size)
        (out / "result.json").write_text(json.dumps({"test": test}))

    entry, hit = cache.fetch("scratch", stages.scratch(cfg, tokenizer_dir), build)
    return json.loads((entry / "result.json").read_text()), hit


def run_controls(cache: Cache, cfg, pretrained_dir: Path, tokenizer_dir: Path, tokenizer, task, task_test: dict,
                 device: torch.device) -> tuple[dict, dict]:
    """metrics.json's `controls` section, and each control's cache hit or miss."""
    controls, hits = {}, {}
    if "scratch" in cfg.eval.controls:
        controls["scratch"], hits["scratch"] = scratch_control(cache, cfg, pretrained_dir, tokenizer_dir, tokenizer, task, device)
        controls["pretraining_gain"] = task_test["accuracy"] - controls["scratch"]["test"]["accuracy"]
    return controls, hits
