"""Weights & Biases: one run per job, one group per sweep; offline unless the settings ask otherwise."""

import shutil
from pathlib import Path

from omegaconf import DictConfig

from maskrun.loggers.base import Scalar, TrackedRun, Tracker


class WandbTracker(Tracker):
    NAME, LIBRARY, PACKAGE = "wandb", "wandb", "wandb"

    def __init__(self, settings: DictConfig, run: TrackedRun):
        import wandb

        save_dir = Path(settings.save_dir) if settings.save_dir else run.root
        save_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=settings.project, entity=settings.entity, group=settings.group or run.group,
                              name=run.name, dir=str(save_dir), mode=settings.mode,
                              settings=wandb.Settings(console="off", quiet=True))  # the job's console stays its own
        self.axes: set[str] = set()

    def log_hyperparams(self, params: dict[str, Scalar]) -> None:
        self.run.config.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # W&B's one step counter only goes up, and pretraining and fine-tuning each count from 1: each namespace
        # (pretrain/, train/, validation/) gets its own step axis instead.
        points = {}
        for key, value in metrics.items():
            namespace = key.split("/", 1)[0]
            if namespace not in self.axes:
                self.run.define_metric(f"{namespace}/*", step_metric=f"{namespace}/step")
                self.axes.add(namespace)
            points |= {key: value, f"{namespace}/step": step}
        self.run.log(points)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def log_artifacts(self, paths: list[Path], base: Path) -> None:
        # A copy in the run's files directory: W&B uploads what is there (now, or at `wandb sync`), and the copy
        # outlives the run dir, which run.save would only link to.
        for path in paths:
            target = Path(self.run.dir) / path.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "ok" else 1)
