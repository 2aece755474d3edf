"""The selection pass: a short fine-tuning of the pretrained model whose record chooses the mask of lt_sft and movement.

The pass fine-tunes every entry (nothing is frozen) with the run's own finetune and optimizer settings,
for `mask.select_epochs` epochs (`mask.select_steps`, when set, stops it after that many optimizer
steps), through the same `finetune()` loop and task seam as the run. It records two per-entry scores of
every pretrained tensor the task model holds, so that one cached pass serves both strategies:

    moved      |W_ft - W_pre|                     how far each entry moved (LT-SFT, Ansell et al., 2022)
    movement   -sum over steps t of W_t * g_t     the movement score (Sanh et al., 2020); g_t is the step's
                                                  gradient of the task loss (the mean over its micro-batches),
                                                  W_t the weight it was taken at

Both are low for the entries fine-tuning wants least, so lt_sft and movement freeze the lowest first.
The pass runs on its own copy of the model; the run then starts again from the pretrained weights
(LT-SFT's reset) under the mask. It does not touch the run's random streams.
"""

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from maskrun.finetune import Callback, finetune


class StepLimitReached(Exception):
    """Raised after the last step `mask.select_steps` allows: the pass ends there, mid-epoch."""


class StopAfter(Callback):
    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, step, model, optimizer, record):
        if step >= self.steps:
            raise StepLimitReached


class MovementScores:
    """Accumulates -W * dL/dW of the watched parameters over every backward pass (a step's micro-batches sum to its
    gradient, and W does not change between them)."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.scores = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self.handles = [p.register_hook(self.accumulate(name, p)) for name, p in params.items()]

    def accumulate(self, name: str, param: torch.nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            # The product in float32: in a bf16 model's own dtype it would keep 8 bits, and tie many scores.
            self.scores[name] -= param.detach().float() * grad.float()
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_selection_pass(mcfg, fcfg, ocfg, pretrained_dir: Path, names: set[str], task, device: torch.device, seed: int,
                       dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Both records ({"moved": ..., "movement": ...}) of the task model's parameters in `names`, on the CPU."""
    pass_cfg = OmegaConf.merge(fcfg, {"epochs": mcfg.select_epochs, "unfreeze_after": None})  # nothing to release
    with torch.random.fork_rng(devices=[]):  # seeded head and training, without touching the run's own random stream
        torch.manual_seed(seed)
        model = task.load_model(pretrained_dir, dtype).to(device)
        params = {name: p for name, p in model.named_parameters() if name in names}
        before = {name: p.detach().float().cpu().clone() for name, p in params.items()}
        movement = MovementScores(params)
        callbacks = [StopAfter(mcfg.select_steps)] if mcfg.get("select_steps") else []
        task.start(model, device)  # what the pass's validation compares with (generative tasks)
        try:
            finetune(model, task, {}, pass_cfg, ocfg, device, seed, callbacks=callbacks)
        except StepLimitReached:
            pass
        finally:
            movement.remove()
    moved = {name: (p.detach().float().cpu() - before[name]).abs() for name, p in params.items()}
    records = {"moved": moved, "movement": {name: s.cpu() for name, s in movement.scores.items()}}
    for record, scores in records.items():
        if not all(torch.isfinite(s).all() for s in scores.values()):
            raise FloatingPointError(f"the selection pass's {record} scores are not finite (lower finetune.lr)")
    return records


def write_records(records: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
    """The `selection` stage's entry: one safetensors file per record."""
    for record, scores in records.items():
        save_file({name: s.contiguous() for name, s in scores.items()}, Path(out_dir) / f"{record}.safetensors")


def read_record(entry: Path, record: str) -> dict[str, torch.Tensor]:
    return load_file(Path(entry) / f"{record}.safetensors")
