"""MLflow: one run per job, one experiment per sweep; a file store under the sweep or run dir unless told otherwise."""

import os
import time
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig

from maskrun.loggers.base import Scalar, TrackedRun, Tracker


class MLflowTracker(Tracker):
    NAME, LIBRARY, PACKAGE = "mlflow", "mlflow", "mlflow-skinny"

    def __init__(self, settings: DictConfig, run: TrackedRun):
        uri = settings.tracking_uri or (run.root / "mlruns").resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses its file store unless asked; it is the store that needs no database nor server,
            # and each run its own directory, so that parallel jobs never contend for one file.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        experiment_id = self.experiment(settings.experiment_name or run.group)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id

    def experiment(self, name: str) -> str:
        """The experiment's id; made by whichever job of the sweep comes first."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # a parallel job made it in between
            return self.client.get_experiment_by_name(name).experiment_id

    def log_hyperparams(self, params: dict[str, Scalar]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.log_metrics(metrics, step=0)

    def log_artifacts(self, paths: list[Path], base: Path) -> None:
        for path in paths:
            folder = path.parent.relative_to(base).as_posix()
            self.client.log_artifact(self.run_id, str(path), artifact_path=None if folder == "." else folder)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "ok" else "FAILED")
