"""Fine-tuning's curves to the trackers, through finetune's Callback seam."""

from maskrun.finetune import Callback
from maskrun.loggers import POSITION, Trackers, is_number

TRAIN_KEYS = ("loss", "lr", "grad_norm", "extra_loss")


class TrainingCurves(Callback):
    """Every step's loss, learning rate and gradient norm (and a method's extra loss); every epoch's validation
    metrics, at the step they were measured after; a resumed run's steps before its checkpoint, when it resumes."""

    def __init__(self, trackers: Trackers):
        self.trackers = trackers

    def on_step_end(self, step: int, model, optimizer, record: dict) -> None:
        self.trackers.log_metrics({f"train/{key}": record[key] for key in TRAIN_KEYS}, step)

    def on_resume(self, history: dict) -> None:
        # A resumed job is a new tracker run: it holds the steps before the checkpoint too, so that its curves are
        # the whole of history.json (TensorBoard, reading the same directory, replaces the earlier run's points).
        for record in history["train"]:
            self.on_step_end(record["step"], None, None, record)
        for record in history["validation"]:
            self.on_validation(record)

    def on_validation(self, record: dict) -> None:
        numbers = {f"validation/{key}": value for key, value in record.items() if key not in POSITION and is_number(value)}
        self.trackers.log_metrics(numbers, record["step"])


def replay(trackers: Trackers, history: dict) -> None:
    """The curves of a fine-tuning that ran in worker processes (maskrun.distributed), from the history rank 0
    wrote: the job's own process logs them, as it logs everything else of the job."""
    curves = TrainingCurves(trackers)
    for record in history["train"]:
        curves.on_step_end(record["step"], None, None, record)
    for record in history["validation"]:
        curves.on_validation(record)
