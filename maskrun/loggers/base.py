"""What every tracker does for one job: one tracker run, opened when the job starts and closed when it ends."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

Scalar = int | float | str | bool


@dataclass(frozen=True)
class TrackedRun:
    """Where and under which names a job is tracked."""

    root: Path     # the sweep dir in a sweep, else the run dir: where trackers keep their files by default
    group: str     # the sweep (MLflow experiment, W&B group)
    name: str      # the job within its sweep (TensorBoard and CSV sub-directory, MLflow and W&B run name)
    run_dir: Path  # the job's own output dir, which holds report.md and plots/

    def job_dir(self, save_dir: str | None, default: str) -> Path:
        """A file-based tracker's directory for this job: <root>/<default>/<job>, or under a `save_dir` that
        several sweeps may share, <save_dir>/<sweep>/<job>."""
        if save_dir:
            return Path(save_dir) / self.group.strip("/").replace("/", "-") / self.name
        return self.root / default / self.name


class Tracker(ABC):
    """One tracker's run for one job. Its library is imported when it opens, so that the registry imports none."""

    NAME: str     # the option of the `logger` group
    LIBRARY: str  # the module it imports
    PACKAGE: str  # what `pip install` brings that module

    @abstractmethod
    def __init__(self, settings: DictConfig, run: TrackedRun):
        """Opens the tracker's run; `settings` is the tracker's node of the `logger` config."""

    @abstractmethod
    def log_hyperparams(self, params: dict[str, Scalar]) -> None:
        """Flat keys (mask.ratio, choices.method); called more than once, never twice with the same key."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Points of curves, keyed by namespace/name (train/loss, validation/accuracy, pretrain/lr)."""

    @abstractmethod
    def log_summary(self, metrics: dict[str, float]) -> None:
        """The job's final numbers (test/accuracy, interference/forgetting, mask/ratio_actual), once."""

    @abstractmethod
    def log_artifacts(self, paths: list[Path], base: Path) -> None:
        """Files of the run dir `base` (report.md, plots/*.png), kept under their path relative to it."""

    @abstractmethod
    def close(self, status: str) -> None:
        """Ends the run with the job's status (ok or failed)."""
