"""One Hydra job: run the pipeline, record metrics.json whatever happens, write the run report.

A finished job is never computed twice by the same code. Its run dir is reused when it already
holds an ok metrics.json with the same config hash (rerunning a sweep with the same
`hydra.sweep.dir` redoes only what is missing); otherwise the `result` stage of the cache holds the
run's results for any other run dir (another sweep, a later command). Both are keyed by the
result stage's inputs (maskrun.stages.result): the settings, the libraries' versions and a
fingerprint of the maskrun source, so an edit, committed or not, recomputes. A failed job
publishes no result, so it is computed again next time.
"""

import json
import shutil
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from maskrun import preemption, stages
from maskrun.cache import Cache
from maskrun.devices import gpu_lease, peak_memory
from maskrun.loggers import Trackers, job_trackers
from maskrun.progress import console
from maskrun.provenance import versions
from maskrun.report.run import print_summary, write_run_report


# What a run dir holds of its results (report.md and plots/ are redrawn from metrics.json).
RESULT_FILES = ("metrics.json", "history.json", "mask.safetensors", "mask_task_b.safetensors", "finetuned", "adapter")


class JobFailed(Exception):
    """The job ended with status failed (recorded in its metrics.json): nothing to publish."""


def finished_before(run_dir: Path, expected_hash: str) -> bool:
    try:
        previous = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return previous.get("status") == "ok" and previous.get("config_hash") == expected_hash


def new_metrics(cfg: DictConfig, config_hash: str) -> dict:
    hydra_cfg = HydraConfig.get()
    return {
        "status": "running",
        "error": None,
        "config_hash": config_hash,
        "overrides": list(hydra_cfg.overrides.task),
        "choices": {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")},
        "seed": cfg.seed,
        "device": str(cfg.device),
        "world_size": cfg.devices,  # processes that fine-tune together (maskrun.distributed)
        "task": None,
        "interference": None,
        "mask": None,
        "cache": {},
        "artifacts": {"pretrained": None, "mask": None, "finetuned": None, "adapter": None},
        "timing": {},
        "memory": {},
        "versions": versions(),
        "lease": {"gpu": None, "start": None, "end": None},
    }


def run_job(cfg: DictConfig) -> str:
    """Returns the job's status; exits 1 on failure of a single run (a sweep goes on to its next job)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config_hash = stages.hash_config(cfg)
    if finished_before(run_dir, config_hash):
        console.print(f"maskrun: reused finished run {run_dir} (config {config_hash})")
        finished = json.loads((run_dir / "metrics.json").read_text())
        job_trackers(cfg, run_dir, config_hash, finished=True).finish(finished, config_hash, reused=True)
        return "ok"
    for name in RESULT_FILES:  # another config's results: a crash must not leave them here
        remove(run_dir / name)
    metrics = new_metrics(cfg, config_hash)
    cache = Cache(cfg.cache_dir)
    trackers = job_trackers(cfg, run_dir, config_hash)
    try:
        entry, status = cache.fetch("result", stages.result(cfg),
                                    lambda out: compute(cfg, cache, run_dir, metrics, out, trackers))
        if status == "hit":
            metrics = restore(entry, run_dir, metrics)
            console.print(f"maskrun: reused the cached result {entry}")
    except JobFailed:
        pass
    finally:
        cache.close()
    write_run_report(run_dir, metrics)
    trackers.finish(metrics, config_hash, reused="reused_result" in metrics)
    print_summary(run_dir, metrics)
    preempted_by = preemption.received()
    if metrics["status"] == "failed" and (HydraConfig.get().mode == RunMode.RUN or preempted_by):
        print(f"maskrun: run failed: {metrics['error']} (details in {run_dir / 'metrics.json'})", file=sys.stderr)
        if preempted_by:  # a preempted sweep stops too, as its signal asked
            preemption.pass_on(preempted_by)  # the default handler ends the process here; submitit's requeues
        sys.exit(128 + preempted_by if preempted_by else 1)
    return metrics["status"]


def compute(cfg: DictConfig, cache: Cache, run_dir: Path, metrics: dict, result_dir: Path, trackers: Trackers) -> None:
    """Runs the pipeline into run_dir and records metrics.json; an ok run's results go to result_dir too."""
    from maskrun import checkpoint, pipeline  # torch and transformers: not needed to reuse a finished job
    from maskrun.launch import launch
    from maskrun.loggers.curves import TrainingCurves, replay

    with gpu_lease(str(cfg.device), cfg.devices) as gpu:  # before any CUDA call
        metrics["lease"].update(gpu=gpu, start=time.time())
        start = time.perf_counter()
        try:
            trackers.start()  # a tracker that cannot open fails the job, before its work
            with preemption.handled():
                if cfg.devices > 1:
                    launch(cfg, run_dir, metrics)  # the pipeline in cfg.devices worker processes
                    replay(trackers, json.loads((run_dir / "history.json").read_text()))
                else:
                    pipeline.run(cfg, cache, run_dir, metrics, trackers.log_pretrain_step, [TrainingCurves(trackers)])
            metrics["status"] = "ok"
            metrics["cache"]["result"] = "miss"
            checkpoint.discard(run_dir)
        except Exception as err:  # recorded, not raised: a failed job is a result too
            metrics["status"] = "failed"
            metrics["error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"
        metrics["timing"]["total_s"] = round(time.perf_counter() - start, 3)
        for key, value in peak_memory().items():  # with worker processes: the largest of theirs and the job's
            known = [v for v in (value, metrics["memory"].get(key)) if v is not None]
            metrics["memory"][key] = max(known) if known else None
        metrics["lease"]["end"] = time.time()
        write_metrics(run_dir, metrics)
    if metrics["status"] != "ok":
        raise JobFailed
    for name in RESULT_FILES:
        copy(run_dir / name, result_dir / name)


def restore(entry: Path, run_dir: Path, metrics: dict) -> dict:
    """The cached result's files in run_dir, and its metrics under this job's own overrides and choices."""
    for name in RESULT_FILES:
        copy(entry / name, run_dir / name)
    cached = json.loads((entry / "metrics.json").read_text())
    cached.update({key: metrics[key] for key in ("overrides", "choices", "lease")})
    cached["cache"] = {stage: "hit" if status == "miss" else status  # every artifact came from the cache
                       for stage, status in cached["cache"].items()}
    cached["cache"]["result"] = "hit"
    cached["reused_result"] = str(entry.resolve())
    write_metrics(run_dir, cached)
    return cached


def copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    elif source.is_file():
        shutil.copyfile(source, target)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Written whole or not at all, so that a killed job never leaves a metrics.json that resume trusts."""
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(run_dir / "metrics.json")
