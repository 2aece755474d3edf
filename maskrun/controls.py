"""Controls that keep the numbers honest: the same task model fine-tuned from random initialisation.

If pretraining did not help the task, `pretraining_gain` (the task's metric − scratch's) says so: it
can be negative. The control depends on the model, tokenizer, task, fine-tuning settings and seed, but
not on the mask, so a sweep over mask settings computes it once through the cache.
"""

import json
from pathlib import Path

import torch

from maskrun import stages
from maskrun.cache import Cache
from maskrun.finetune import finetune

def scratch_control(cache: Cache, cfg, pretrained_dir: Path, tokenizer_dir: Path, task,
                    device: torch.device) -> tuple[dict, str]:
    """The scratch control's test metrics, and "hit" or "miss" in the cache."""

    def build(out: Path) -> None:
        model = task.new_model(pretrained_dir, cfg.seed).to(device)
        finetune(model, task, {}, cfg.finetune, cfg.optimizer, device, cfg.seed)
        test = task.evaluate(model, "test", device)
        (out / "result.json").write_text(json.dumps({"test": test}))

    entry, hit = cache.fetch("scratch", stages.scratch(cfg, tokenizer_dir), build)
    return json.loads((entry / "result.json").read_text()), hit


def run_controls(cache: Cache, cfg, pretrained_dir: Path, tokenizer_dir: Path, task, task_test: dict,
                 device: torch.device) -> tuple[dict, dict]:
    """metrics.json's `controls` section, and each control's cache hit or miss."""
    controls, hits = {}, {}
    if "scratch" in cfg.eval.controls:
        controls["scratch"], hits["scratch"] = scratch_control(cache, cfg, pretrained_dir, tokenizer_dir, task, device)
        controls["pretraining_gain"] = task_test[task.METRIC] - controls["scratch"]["test"][task.METRIC]
    return controls, hits
