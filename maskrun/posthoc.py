"""Masks applied after training (eval.posthoc_reset): how much of the fine-tuned change can be undone, and what that
buys, without retraining.

For each ratio r, the run's mask strategy is built at r (same strategy, score, allocation, granularity, include/exclude
and seed, on the same scores: the `mask` stage's entry a run at mask.ratio=r would use), and the fine-tuned weights
entries it freezes are reset to their pretrained values,

    W = W_ft ⊙ (1 − m_r) + W_pre ⊙ m_r,

then the task metric (validation and test) and interference are measured; the fine-tuned weights are restored after.
The share r is of the eligible entries, as mask.ratio's is. An entry the run's own mask froze has no fine-tuned delta,
so resetting it changes nothing: where the strategy's masks nest (importance, random: the lowest r of one fixed
order), a ratio at or below the run's own resets nothing and the curve starts at the run's ratio. `reset_entries`
counts the entries a ratio really moves back. The task head is never eligible and keeps its fine-tuned weights.
"""

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from maskrun import stages
from maskrun.evaluate import interference
from maskrun.masks import MASK_FILE, build_mask, eligible_parameters, neuron_axes, write_mask
from maskrun.models import pretrained_names, pretraining_objective, torch_dtype

INTERFERENCE_KEYS = ("forgetting", "cka", "drift_l2", "kl_task")  # the scalar measures; per-layer lists stay out


def posthoc_curve(cfg, cache, model: torch.nn.Module, task, corpus, pretrained_dir, scores_dir, scores: dict | None,
                  frozen: dict, device: torch.device) -> list[dict]:
    """metrics.json `posthoc`: one record per ratio of cfg.eval.posthoc_reset, in the order given.

    `scores_dir` is the cache entry the run's mask was built from and `scores` what the strategy read of it; `frozen` is
    the run's own mask; `model` the fine-tuned model, left as it came.
    """
    pretrained_model = task.load_model(pretrained_dir, torch_dtype(cfg.model))
    pretrained = eligible_parameters(pretrained_model, pretrained_names(pretrained_dir), cfg.mask.include, cfg.mask.exclude)
    axes = neuron_axes(pretrained_model, pretrained)
    finetuned = {name: param for name, param in model.named_parameters() if name in pretrained}
    trained = {name: param.detach().clone() for name, param in finetuned.items()}

    records = []
    for ratio in cfg.eval.posthoc_reset:
        ratio_cfg = OmegaConf.merge(cfg, {"mask": {"ratio": ratio}})
        mask_dir, hit = cache.fetch("mask", stages.mask(ratio_cfg, pretrained_dir, scores_dir, pretrained), lambda out: write_mask(
            build_mask(ratio_cfg.mask, pretrained, scores, cfg.seed, axes), out))
        reset = load_file(mask_dir / MASK_FILE)
        with torch.no_grad():
            for name, param in finetuned.items():
                param.copy_(torch.where(reset[name].to(param.device), pretrained[name].to(param.device), trained[name]))
        try:
            records.append({"ratio": float(ratio), **reset_counts(reset, frozen), "mask_cache": hit,
                            **measure(cfg, model, task, corpus, pretrained_dir, device)})
        finally:
            with torch.no_grad():
                for name, param in finetuned.items():
                    param.copy_(trained[name])
    return records


def reset_counts(reset: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor]) -> dict:
    """The realized share of the reset mask, and how many entries it moves back (those the run's mask let train)."""
    eligible = sum(m.numel() for m in reset.values())
    return {"ratio_actual": sum(int(m.sum()) for m in reset.values()) / eligible,
            "reset_entries": sum(int((m & ~frozen[name]).sum()) for name, m in reset.items())}


def measure(cfg, model, task, corpus, pretrained_dir, device) -> dict:
    """The task metrics on validation and test, and interference, of the model as it is now."""
    measured = interference(pretrained_dir, model, task, corpus, cfg.eval.heldout_texts,
                            pretraining_objective(cfg.model, cfg.pretrain), cfg.pretrain.max_length, device,
                            cfg.eval.batch_size)
    return {"validation": task.evaluate(model, "validation", device), "test": task.evaluate(model, "test", device),
            "forgetting": measured["forgetting"],
            "interference": {key: measured[key] for key in INTERFERENCE_KEYS} | {"validation": measured["validation"]}}
