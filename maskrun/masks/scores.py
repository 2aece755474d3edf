"""Per-entry importance scores of the pretrained parameters: what the cached `scores` stage computes.

    magnitude  |W|
    gradient   |g|          g = gradient of the mean task loss over the calibration batches
    taylor     |W * g|
    fisher     E[g_i^2]     per example (mask.fisher=per_example, as in FISH Mask) or per
                            batch (mask.fisher=batch, as in Child-Tuning_D)

Gradients are of the task's own loss (maskrun.tasks) on its training data: the first
`calib_batches` batches of `calib_batch_size` training examples in a seeded order (`calib_batches:
null`, the default, takes the whole training split, so that every token the task uses gets a
non-zero gradient score), through the pretrained checkpoint under the task's head (a new head is
seeded), in eval mode (no dropout) so the scores are a function of the cache key alone. Scores cover every pretrained tensor, so changing
mask.include/exclude reuses them.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


SCORES = ("magnitude", "gradient", "taylor", "fisher")
FISHER = ("per_example", "batch")


SCORES_FILE = "scores.safetensors"


def write_scores(scores: dict[str, torch.Tensor], out_dir: Path) -> None:
    save_file({name: s.contiguous() for name, s in scores.items()}, Path(out_dir) / SCORES_FILE)


def read_scores(entry: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(entry) / SCORES_FILE)


def compute_scores(mcfg, pretrained_dir: Path, task, device: torch.device, seed: int,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`mcfg.score` of every pretrained tensor, on the CPU; `task` is a maskrun.tasks TaskType."""
    if mcfg.score == "magnitude":
        return {name: w.float().abs() for name, w in load_file(Path(pretrained_dir) / "model.safetensors").items()}
    # Imported here so that config checks (which read SCORES) do not load transformers.
    from maskrun.models import pretrained_names

    with torch.random.fork_rng(devices=[]):  # seeded head, without touching the run's own random stream
        torch.manual_seed(seed)
        model = task.load_model(pretrained_dir, dtype).to(device)
    return model_scores(mcfg, model, pretrained_names(pretrained_dir), task, seed)


def model_scores(mcfg, model, names: set[str], task, seed: int) -> dict[str, torch.Tensor]:
    """`mcfg.score` of the model's parameters in `names`, on the CPU; the model's weights are left as they were."""
    params = {name: p for name, p in model.named_parameters() if name in names}
    if mcfg.score == "magnitude":
        return {name: p.detach().float().abs().cpu() for name, p in params.items()}
    was_training = model.training
    model.eval()
    examples = task.examples(task.data.train)
    batches = calibration_batches(len(examples), mcfg.calib_batches, mcfg.calib_batch_size, seed)
    if mcfg.score == "fisher" and mcfg.fisher == "per_example":
        # One example per backward pass: on a CPU this beats batched per-example gradients (autograd's
        # is_grads_batched), whose one backward pass costs as much as a full-batch backward per example.
        batches = [[example] for batch in batches for example in batch]
    mean = mean_gradients(model, params, batches, examples, task, squared=mcfg.score == "fisher")
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if mcfg.score == "gradient":
        mean = {name: g.abs() for name, g in mean.items()}
    elif mcfg.score == "taylor":
        mean = {name: (params[name].detach() * g).abs() for name, g in mean.items()}
    if not all(torch.isfinite(s).all() for s in mean.values()):
        raise FloatingPointError(f"{mcfg.score} scores are not finite (check the pretrained checkpoint)")
    return {name: s.cpu() for name, s in mean.items()}


def mean_gradients(model, params: dict[str, torch.Tensor], batches: list[list[int]], examples: list, task,
                   squared: bool) -> dict[str, torch.Tensor]:
    """The gradient of the mean loss over every example of the batches; squared: the mean of each batch's squared gradient."""
    device = next(model.parameters()).device
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for rows in batches:
        model.zero_grad(set_to_none=True)
        batch = task.collate([examples[i] for i in rows])
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                total[name] += p.grad.square() if squared else len(rows) * p.grad  # a short last batch weighs less
    return {name: t / (len(batches) if squared else sum(map(len, batches))) for name, t in total.items()}


def calibration_batches(n_examples: int, n_batches: int | None, batch_size: int, seed: int) -> list[list[int]]:
    """The first n_batches batches of a seeded shuffle of the training examples (fewer if they are few; None: all)."""
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    if n_batches is not None:
        order = order[:n_batches * batch_size]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
