"""TensorBoard: event files written by torch.utils.tensorboard, one sub-directory per job of a sweep."""

from pathlib import Path

from omegaconf import DictConfig

from maskrun.loggers.base import Scalar, TrackedRun, Tracker


class TensorBoardTracker(Tracker):
    NAME, LIBRARY, PACKAGE = "tensorboard", "tensorboard", "tensorboard"

    def __init__(self, settings: DictConfig, run: TrackedRun):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=0: a rerun of the job (a resumed one relogs the steps before its checkpoint) marks a restart,
        # so that TensorBoard hides the points an earlier attempt left in the same directory instead of doubling them.
        self.writer = SummaryWriter(log_dir=str(run.job_dir(settings.save_dir, "tensorboard")), purge_step=0)
        self.hparams: dict[str, Scalar] = {}
        self.summary: dict[str, float] = {}

    def log_hyperparams(self, params: dict[str, Scalar]) -> None:
        self.hparams |= params  # the hparams plugin takes them together with the final metrics: written at close

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.summary |= metrics

    def log_artifacts(self, paths: list[Path], base: Path) -> None:
        from matplotlib.image import imread

        for path in paths:
            tag = path.relative_to(base).as_posix()
            if path.suffix == ".png":
                self.writer.add_image(tag, imread(path), dataformats="HWC")
            else:
                self.writer.add_text(tag, path.read_text())

    def close(self, status: str) -> None:
        # run_name=".": the hparams and final metrics go into the job's own directory, not a timestamped one below it
        self.writer.add_hparams(self.hparams | {"status": status}, self.summary, run_name=".")
        self.writer.close()
