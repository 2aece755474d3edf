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
from maskrun.evaluate import classify
from maskrun.finetune import finetune
from maskrun.masks import build_mask, eligible_parameters, mask_summary, needs_scores, neuron_axes, save_mask, warn_if_tied
from maskrun.masks.scores import model_scores
from maskrun.models import load_task_model, pretrained_names


def fine_tune_next(model_a, task_a, frozen: dict[str, torch.Tensor], tied_share: float, pretrained_dir: Path, tokenizer,
                   cfg, device: torch.device, run_dir: Path) -> dict:
    """metrics.json's `sequential` section; `model_a` is left as it was after task A, under `frozen` (of `tied_share`)."""
    scfg, max_length, batch_size = cfg.sequential, cfg.finetune.max_length, cfg.eval.batch_size
    task_b = load_task(scfg.dataset, scfg.dataset.split_seed)
    after_a = classify(model_a, tokenizer, task_a.test, max_length, device, batch_size)

    model_b = load_task_model(pretrained_dir, task_b.num_labels).to(device)
    model_b.base_model.load_state_dict(model_a.base_model.state_dict())
    if scfg.remask:  # scored on the task-A weights and task B's data
        params = eligible_parameters(model_b, pretrained_names(pretrained_dir), cfg.mask.include, cfg.mask.exclude)
        scores = model_scores(cfg.mask, model_b, set(params), task_b, tokenizer, max_length, cfg.seed)
        selection = build_mask(cfg.mask, params, scores if needs_scores(cfg.mask) else None, cfg.seed,
                               neuron_axes(model_b, params))
        frozen, tied_share = selection.masks, selection.tied_share
        warn_if_tied(tied_share)
        save_mask(frozen, run_dir / "mask_task_b.safetensors")
    finetune(model_b, tokenizer, task_b, frozen, cfg.finetune, cfg.optimizer, device, cfg.seed)

    model_a_after_b = copy.deepcopy(model_a)
    model_a_after_b.base_model.load_state_dict(model_b.base_model.state_dict())
    after_b = classify(model_a_after_b, tokenizer, task_a.test, max_length, device, batch_size)
    return {
        "task_a": task_a.name,
        "task_b": task_b.name,
        "remask": bool(scfg.remask),
        "mask_task_b": mask_summary(cfg.mask, frozen, tied_share),
        "task_b_test": classify(model_b, tokenizer, task_b.test, max_length, device, batch_size),
        "task_a_after_a": after_a,
        "task_a_after_b": after_b,
        "retention": after_b["accuracy"] - after_a["accuracy"],
    }
