"""Sequential fine-tuning: task A, then task B on the same backbone; what task A keeps is interference between tasks.

Task B gets its own new head on the task-A backbone, under the same mask (frozen entries stay at
their pretrained values) or, with `sequential.remask=true`, a fresh mask built on the task-A
weights. Task A is then scored with its own head on the task-B backbone:
`retention` = task A accuracy after B − after A.
"""

import copy
from pathlib import Path

import torch

from maskrun.data import load_task
from maskrun.finetune import finetune
from maskrun.masks import build_mask, eligible_parameters, mask_summary, needs_scores, neuron_axes, save_mask, warn_if_tied
from maskrun.masks.scores import model_scores
from maskrun.models import pretrained_names, torch_dtype
from maskrun.tasks import build_task


def fine_tune_next(model_a, task_a, frozen: dict[str, torch.Tensor], tied_share: float, pretrained_dir: Path,
                   cfg, device: torch.device, run_dir: Path) -> dict:
    """metrics.json's `sequential` section; `model_a` is left as it was after task A (a classification task type),
    under `frozen` (of `tied_share`)."""
    scfg = cfg.sequential
    task_b = build_task(load_task(scfg.dataset, scfg.dataset.split_seed), task_a.tokenizer, task_a.max_length, cfg.eval)
    after_a = task_a.evaluate(model_a, "test", device)

    model_b = task_b.load_model(pretrained_dir, torch_dtype(cfg.model)).to(device)
    model_b.base_model.load_state_dict(model_a.base_model.state_dict())
    if scfg.remask:  # scored on the task-A weights and task B's data
        params = eligible_parameters(model_b, pretrained_names(pretrained_dir), cfg.mask.include, cfg.mask.exclude)
        scores = model_scores(cfg.mask, model_b, set(params), task_b, cfg.seed)
        selection = build_mask(cfg.mask, params, scores if needs_scores(cfg.mask) else None, cfg.seed,
                               neuron_axes(model_b, params))
        frozen, tied_share = selection.masks, selection.tied_share
        warn_if_tied(tied_share)
        save_mask(frozen, run_dir / "mask_task_b.safetensors")
    finetune(model_b, task_b, frozen, cfg.finetune, cfg.optimizer, device, cfg.seed)

    model_a_after_b = copy.deepcopy(model_a)
    model_a_after_b.base_model.load_state_dict(model_b.base_model.state_dict())
    after_b = task_a.evaluate(model_a_after_b, "test", device)
    return {
        "task_a": task_a.data.name,
        "task_b": task_b.data.name,
        "remask": bool(scfg.remask),
        "mask_task_b": mask_summary(cfg.mask, frozen, tied_share),
        "task_b_test": task_b.evaluate(model_b, "test", device),
        "task_a_after_a": after_a,
        "task_a_after_b": after_b,
        "retention": after_b["accuracy"] - after_a["accuracy"],
    }
