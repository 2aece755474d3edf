"""Plain files per job: metrics.csv (step, name, value), summary.csv (name, value), hparams.json, artifacts/."""

import csv
import json
import shutil
from pathlib import Path

from omegaconf import DictConfig

from maskrun.loggers.base import Scalar, TrackedRun, Tracker


class CSVTracker(Tracker):
    NAME, LIBRARY, PACKAGE = "csv", "csv", "the Python standard library"

    def __init__(self, settings: DictConfig, run: TrackedRun):
        self.dir = run.job_dir(settings.save_dir, "csv")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = open(self.dir / "metrics.csv", "w", newline="")
        self.rows = csv.writer(self.file)
        self.rows.writerow(["step", "name", "value"])
        self.hparams: dict[str, Scalar] = {}

    def log_hyperparams(self, params: dict[str, Scalar]) -> None:
        self.hparams |= params
        (self.dir / "hparams.json").write_text(json.dumps(self.hparams, indent=2))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.writerows([step, key, value] for key, value in metrics.items())
        self.file.flush()  # readable while the job runs

    def log_summary(self, metrics: dict[str, float]) -> None:
        with open(self.dir / "summary.csv", "w", newline="") as file:
            rows = csv.writer(file)
            rows.writerow(["name", "value"])
            rows.writerows(metrics.items())

    def log_artifacts(self, paths: list[Path], base: Path) -> None:
        for path in paths:
            target = self.dir / "artifacts" / path.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)

    def close(self, status: str) -> None:
        self.log_hyperparams({"status": status})
        self.file.close()
