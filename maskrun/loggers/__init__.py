"""Experiment trackers, chosen with the `logger` group (several at once: logger=[tensorboard,mlflow]).

Each job is one tracker run, grouped by its sweep. A job logs its resolved config and the chosen option of
every group as hyperparameters; the loss, learning rate and gradient norm of every fine-tuning step and,
when pretraining runs (not on a cache hit), of every pretraining step; each epoch's validation metrics;
its final task, interference and mask numbers; report.md and plots/ as artifacts. A job whose result is
reused (from the cache, or a finished run dir) logs its final numbers only, with reused=true, and a
finished run dir is logged once per tracker. With several processes per job, only rank 0 logs.
"""

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from maskrun.loggers.base import Scalar, TrackedRun, Tracker
from maskrun.loggers.csv_logs import CSVTracker
from maskrun.loggers.mlflow import MLflowTracker
from maskrun.loggers.tensorboard import TensorBoardTracker
from maskrun.loggers.wandb import WandbTracker

TRACKERS: dict[str, type[Tracker]] = {t.NAME: t for t in (CSVTracker, MLflowTracker, TensorBoardTracker, WandbTracker)}
LOGGED_FILE = "trackers.json"  # in a run dir: the trackers that already hold its result, and that result's config hash
POSITION = ("step", "epoch")  # where a record was taken, not what it measured
SUMMARY_SECTIONS = {"test": ("task", "test"), "validation_selected": ("task", "validation"),
                    "interference": ("interference",), "mask": ("mask",)}


def is_rank_zero() -> bool:
    """Whether this process logs: the only one, or rank 0 of a job's processes."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def chosen(cfg: DictConfig) -> list[str]:
    """The trackers the job's `logger` group selected."""
    return list(cfg.get("logger") or {})


class Trackers:
    """The job's trackers, called as one. Nothing opens before `start` (or, for a reused result, `finish`)."""

    def __init__(self, cfg: DictConfig, run: TrackedRun | None, names: Iterable[str]):
        self.cfg, self.run, self.names = cfg, run, list(names)
        self.open: dict[str, Tracker] = {}
        self.started = False

    def start(self) -> None:
        """Opens every tracker and logs the job's hyperparameters, once. When one fails to open, those opened
        before it stay in `open`, so that `finish` ends their runs (failed) instead of leaving them running."""
        if not self.names or self.started or not is_rank_zero():
            return
        self.started = True
        params = hyperparameters(self.cfg)
        for name in self.names:
            tracker = TRACKERS[name](self.cfg.logger[name], self.run)
            self.open[name] = tracker
            tracker.log_hyperparams(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.open and is_rank_zero():
            for tracker in self.open.values():
                tracker.log_metrics(metrics, step)

    def log_pretrain_step(self, record: dict) -> None:
        self.log_metrics({f"pretrain/{key}": record[key] for key in ("loss", "lr")}, record["step"])

    def finish(self, metrics: dict, config_hash: str, reused: bool) -> None:
        """Logs the job's final numbers, report and plots, closes every tracker with the job's status, and
        records in the run dir which trackers hold its result. A tracker that fails here costs a warning, not
        the job: its results are already written."""
        if not self.names or not is_rank_zero():
            return
        try:
            self.start()
        except Exception as err:  # noqa: BLE001 - any tracker's own failure
            print(f"maskrun: warning: the loggers could not open to record the result: {err}", file=sys.stderr)
        summary = final_numbers(metrics)
        artifacts = [path for path in [self.run.run_dir / "report.md", *sorted((self.run.run_dir / "plots").glob("*.png"))]
                     if path.is_file()]
        recorded = []
        for name, tracker in self.open.items():
            try:
                tracker.log_hyperparams({"reused": reused})
                tracker.log_summary(summary)
                tracker.log_artifacts(artifacts, self.run.run_dir)
                tracker.close(metrics["status"])
                recorded.append(name)
            except Exception as err:  # noqa: BLE001 - any tracker's own failure
                print(f"maskrun: warning: logger={name} could not record the result: {err}", file=sys.stderr)
        if metrics["status"] == "ok":
            record_logged(self.run.run_dir, config_hash, recorded)


def job_trackers(cfg: DictConfig, run_dir: Path, config_hash: str, finished: bool = False) -> Trackers:
    """The trackers of this job; for a `finished` run dir, those that do not hold its result yet."""
    names = chosen(cfg)
    if not names:
        return Trackers(cfg, None, [])
    if finished:
        names = [name for name in names if name not in logged_before(run_dir, config_hash)]
    return Trackers(cfg, tracked_run(run_dir), names)


def tracked_run(run_dir: Path) -> TrackedRun:
    """A sweep's jobs share the sweep dir as their home and group, each named by its number and own overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    overrides = ",".join(o for o in hydra.overrides.task if o.lstrip("+~").split("=", 1)[0] != "logger")
    if hydra.mode == RunMode.MULTIRUN:
        root, name = Path(hydra.sweep.dir), f"{hydra.job.num}_{overrides}"
    else:
        root, name = run_dir, overrides or run_dir.name
    return TrackedRun(root=root, group=str(root), name=name.replace("/", "-"), run_dir=run_dir)


def hyperparameters(cfg: DictConfig) -> dict[str, Scalar]:
    """The resolved config as flat keys (mask.ratio, method.name, seed) and the chosen option of every group
    (choices.mask, choices.logger), so that a tracker's table filters by them."""
    from hydra.core.hydra_config import HydraConfig

    choices = {group: option for group, option in HydraConfig.get().runtime.choices.items() if not group.startswith("hydra")}
    choices["logger"] = ",".join(chosen(cfg))  # a list-valued group: Hydra records no choice for it
    settings = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                for key, value in cfg.items() if key != "hydra"}  # Hydra's own node, where present, is no setting
    return flatten(settings) | flatten({"choices": choices})


def flatten(tree: dict, prefix: str = "") -> dict[str, Scalar]:
    """Nested keys joined by dots; lists and nulls as JSON text, which every tracker takes."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def final_numbers(metrics: dict) -> dict[str, float]:
    """The numbers of metrics.json's task test and selected validation results, interference and mask summary,
    keyed test/accuracy, validation_selected/accuracy, interference/forgetting, mask/ratio_actual, ..."""
    numbers = {}
    for namespace, path in SUMMARY_SECTIONS.items():
        section = metrics
        for key in path:
            section = (section or {}).get(key)
        numbers |= numeric_leaves(section or {}, f"{namespace}/")
    return numbers


def numeric_leaves(tree: dict, prefix: str) -> dict[str, float]:
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves |= numeric_leaves(value, f"{prefix}{key}/")
        elif is_number(value) and key not in POSITION:
            leaves[f"{prefix}{key}"] = float(value)
    return leaves


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def logged_before(run_dir: Path, config_hash: str) -> list[str]:
    try:
        logged = json.loads((run_dir / LOGGED_FILE).read_text())
    except (OSError, ValueError):
        return []
    return logged["trackers"] if logged.get("config_hash") == config_hash else []


def record_logged(run_dir: Path, config_hash: str, names: list[str]) -> None:
    trackers = sorted(set(logged_before(run_dir, config_hash)) | set(names))
    (run_dir / LOGGED_FILE).write_text(json.dumps({"config_hash": config_hash, "trackers": trackers}))
