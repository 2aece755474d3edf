"""The `logger` group: each tracker's output read back through the tracker's own API, for one smoke job of a sweep
logged to all four at once; a reused result logged once, as reused; bad choices refused before any work."""

import csv
import json
import os
import signal
import subprocess
import time

import pytest
from omegaconf import OmegaConf

from conftest import MASKRUN, load_metrics, maskrun, run_cli, run_dirs
from maskrun.errors import ConfigError

ALL = "logger=[tensorboard,mlflow,csv,wandb]"


def sweep(cwd, sweep_dir, *overrides):
    return maskrun(["-m", "experiment=smoke", ALL, f"hydra.sweep.dir={sweep_dir}", f"cache_dir={cwd / 'cache'}",
                    *overrides], cwd)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One job of a sweep, with a fresh cache (so pretraining runs), logged to every tracker."""
    cwd = tmp_path_factory.mktemp("loggers")
    sweep(cwd, cwd / "sweep", "mask.ratio=0.2")
    (run_dir,) = run_dirs(cwd / "sweep")
    history = json.loads((run_dir / "history.json").read_text())
    return cwd, run_dir, load_metrics(run_dir), history


def only_dir(folder):
    (found,) = [p for p in folder.iterdir() if p.is_dir()]
    return found


def mlflow_runs(store, experiment):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    mlflow.set_tracking_uri(store.resolve().as_uri())
    return mlflow.search_runs(experiment_names=[str(experiment)])


def wandb_records(run_dir):
    """The records of a W&B offline run, read with wandb's own reader of its run file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    (run_file,) = run_dir.glob("run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(run_file))
    records = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


def wandb_items(items) -> dict:
    """A record's items by name: W&B stores a key with a slash (train/loss) as its nested parts."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_tensorboard_holds_the_curves_of_pretraining_and_fine_tuning(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd, run_dir, metrics, history = logged
    job = only_dir(cwd / "sweep" / "tensorboard")
    assert job.name == "0_experiment=smoke," + f"cache_dir={cwd / 'cache'}".replace("/", "-") + ",mask.ratio=0.2"
    events = EventAccumulator(str(job), size_guidance={"scalars": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in history["train"]]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in history["train"]], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in history["train"]], rel=1e-6)
    assert len(events.Scalars("train/grad_norm")) == len(history["train"])
    assert [e.step for e in events.Scalars("validation/accuracy")] == [r["step"] for r in history["validation"]]
    assert len(events.Scalars("pretrain/loss")) == 30  # experiment=smoke: pretrain.steps=30, a cache miss here
    assert "plots/loss_curves.png" in events.Tags()["images"]


def test_mlflow_run_has_the_config_as_params_and_the_final_metrics(logged):
    cwd, run_dir, metrics, history = logged
    (run,) = mlflow_runs(cwd / "sweep" / "mlruns", cwd / "sweep").to_dict("records")
    assert run["status"] == "FINISHED"
    assert run["params.mask.ratio"] == "0.2" and run["params.choices.mask"] == "importance"
    assert run["params.reused"] == "False"
    assert run["metrics.test/accuracy"] == pytest.approx(metrics["task"]["test"]["accuracy"])
    assert run["metrics.interference/forgetting"] == pytest.approx(metrics["interference"]["forgetting"])
    assert run["metrics.mask/ratio_actual"] == pytest.approx(metrics["mask"]["ratio_actual"])

    from mlflow import MlflowClient

    client = MlflowClient()
    assert len(client.get_metric_history(run["run_id"], "train/loss")) == len(history["train"])
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"report.md", "plots"} <= artifacts


def test_wandb_offline_run_holds_the_same_metrics(logged):
    cwd, run_dir, metrics, history = logged
    (offline_run,) = (cwd / "sweep" / "wandb").glob("offline-run-*")
    records = wandb_records(offline_run)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == str(cwd / "sweep")
    config = {key: value for r in records if r.WhichOneof("record_type") == "config"
              for key, value in wandb_items(r.config.update).items()}
    assert config["mask.ratio"] == 0.2
    steps = [wandb_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    losses = [step["train/loss"] for step in steps if "train/loss" in step]
    assert losses == pytest.approx([r["loss"] for r in history["train"]])
    summary = {key: value for r in records if r.WhichOneof("record_type") == "summary"
               for key, value in wandb_items(r.summary.update).items()}
    assert summary["test/accuracy"] == pytest.approx(metrics["task"]["test"]["accuracy"])


def test_csv_files_hold_curves_summary_and_hyperparameters(logged):
    cwd, run_dir, metrics, history = logged
    job = only_dir(cwd / "sweep" / "csv")
    with open(job / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    losses = [float(row["value"]) for row in rows if row["name"] == "train/loss"]
    assert losses == pytest.approx([r["loss"] for r in history["train"]])
    with open(job / "summary.csv", newline="") as file:
        summary = {row["name"]: float(row["value"]) for row in csv.DictReader(file)}
    assert summary["test/accuracy"] == pytest.approx(metrics["task"]["test"]["accuracy"])
    hparams = json.loads((job / "hparams.json").read_text())
    assert hparams["mask.ratio"] == 0.2 and hparams["status"] == "ok"
    assert (job / "artifacts" / "report.md").read_text() == (run_dir / "report.md").read_text()


def test_reused_result_logs_its_final_numbers_once_and_no_curves(logged):
    cwd, run_dir, metrics, history = logged
    sweep(cwd, cwd / "sweep", "mask.ratio=0.2")  # the same sweep again: its finished run dir already holds its logs
    assert len(mlflow_runs(cwd / "sweep" / "mlruns", cwd / "sweep")) == 1
    sweep(cwd, cwd / "again", "mask.ratio=0.2")  # another sweep dir: the result comes from the cache
    (run,) = mlflow_runs(cwd / "again" / "mlruns", cwd / "again").to_dict("records")
    assert run["params.reused"] == "True"
    assert run["metrics.test/accuracy"] == pytest.approx(metrics["task"]["test"]["accuracy"])
    assert "metrics.train/loss" not in run


def test_unknown_logger_in_a_list_is_refused_with_the_options(tmp_path):
    result = run_cli(["experiment=smoke", "logger=[tensorboard,tensorbored]"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == ("maskrun: error: unknown logger 'tensorbored' "
                                             "(choose one of: csv, mlflow, tensorboard, wandb)")
    assert not (tmp_path / "outputs").exists()


def test_tracker_not_installed_names_the_package(monkeypatch):
    from maskrun.loggers import TRACKERS
    from maskrun.validate import check_loggers

    monkeypatch.setattr(TRACKERS["wandb"], "LIBRARY", "maskrun_no_such_library")
    with pytest.raises(ConfigError, match="logger=wandb needs the wandb package.*pip install wandb"):
        check_loggers(OmegaConf.create({"logger": {"tensorboard": {}, "wandb": {}}}))


def test_only_rank_zero_opens_trackers(monkeypatch, tmp_path):
    import torch.distributed as dist

    from maskrun.loggers import TrackedRun, Trackers, is_rank_zero

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    cfg = OmegaConf.create({"logger": {"csv": {"save_dir": None}}})
    trackers = Trackers(cfg, TrackedRun(tmp_path, str(tmp_path), "job", tmp_path), ["csv"])
    trackers.start()
    trackers.log_metrics({"train/loss": 1.0}, step=1)
    assert trackers.open == {} and not (tmp_path / "csv").exists()
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert is_rank_zero()


def test_failed_job_ends_its_tracker_runs_failed_with_the_steps_before_it(tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from maskrun.job import run_job

    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", ["experiment=smoke", f"cache_dir={tmp_path / 'cache'}", "pretrain.lr=1e30",
                                 "logger=[mlflow,csv]"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(SystemExit):
        run_job(cfg)
    assert load_metrics(tmp_path)["status"] == "failed"
    (run,) = mlflow_runs(tmp_path / "mlruns", tmp_path).to_dict("records")
    assert run["status"] == "FAILED" and run["params.reused"] == "False"
    with open(only_dir(tmp_path / "csv") / "metrics.csv", newline="") as file:
        pretrain_steps = [int(row["step"]) for row in csv.DictReader(file) if row["name"] == "pretrain/loss"]
    assert pretrain_steps == list(range(1, len(pretrain_steps) + 1)) and pretrain_steps  # up to the step that diverged
    assert json.loads((only_dir(tmp_path / "csv") / "hparams.json").read_text())["status"] == "failed"


def test_a_shared_save_dir_keeps_each_sweep_in_its_own_folder(tmp_path):
    from maskrun.loggers import TrackedRun

    run = TrackedRun(tmp_path / "sweep", "outputs/multirun/2026-01-01/10-00-00", "0_mask.ratio=0.2", tmp_path / "sweep" / "0")
    assert run.job_dir(None, "tensorboard") == tmp_path / "sweep" / "tensorboard" / "0_mask.ratio=0.2"
    assert run.job_dir(str(tmp_path / "tb"), "tensorboard") == (
        tmp_path / "tb" / "outputs-multirun-2026-01-01-10-00-00" / "0_mask.ratio=0.2")


def test_a_tracker_that_cannot_open_fails_the_job_and_ends_the_runs_opened_before_it(tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from maskrun.job import run_job

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", ["experiment=smoke", f"cache_dir={tmp_path / 'cache'}", "logger=[mlflow,csv]",
                                 f"logger.csv.save_dir={not_a_dir}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(cfg)
    with pytest.raises(SystemExit):
        run_job(cfg)
    assert load_metrics(tmp_path / "run")["status"] == "failed"
    (run,) = mlflow_runs(tmp_path / "run" / "mlruns", tmp_path / "run").to_dict("records")  # not one more per try
    assert run["status"] == "FAILED"


def test_a_resumed_job_logs_the_whole_of_its_curves_once(logged, tmp_path):
    """Stopped by SIGTERM after a checkpoint and rerun: the rerun's tracker runs hold every step of history.json,
    those before the checkpoint too, and TensorBoard shows each step once, not the stopped attempt's points again."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd = logged[0]  # its cache: pretraining is a hit
    args = ["experiment=smoke", "optimizer.weight_decay=0.1", "finetune.checkpoint_every=1",
            "logger=[mlflow,csv,tensorboard]",
            f"cache_dir={cwd / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    job = subprocess.Popen(MASKRUN + args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path / "run" / "checkpoint").is_dir() and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    job.wait(timeout=300)
    maskrun(args, tmp_path)
    metrics = load_metrics(tmp_path / "run")
    assert metrics["finetune"]["resumed_from_step"]
    steps = [r["step"] for r in json.loads((tmp_path / "run" / "history.json").read_text())["train"]]

    runs = mlflow_runs(tmp_path / "run" / "mlruns", tmp_path / "run")
    (finished,) = runs[runs["status"] == "FINISHED"].to_dict("records")
    assert sorted(m.step for m in MlflowClient().get_metric_history(finished["run_id"], "train/loss")) == steps
    with open(only_dir(tmp_path / "run" / "csv") / "metrics.csv", newline="") as file:
        assert [int(row["step"]) for row in csv.DictReader(file) if row["name"] == "train/loss"] == steps
    events = EventAccumulator(str(only_dir(tmp_path / "run" / "tensorboard")), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == steps
