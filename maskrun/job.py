"""One Hydra job: run the pipeline, record metrics.json whatever happens, write the run report.

A job whose run dir already holds a finished metrics.json with the same config hash is reused,
not rerun: rerunning a sweep with the same `hydra.sweep.dir` redoes only what is missing.
"""

import json
import resource
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from maskrun.cache import cache_key
from maskrun.devices import gpu_lease
from maskrun.progress import console
from maskrun.provenance import versions
from maskrun.report.run import print_summary, write_run_report


def hash_config(cfg: DictConfig) -> str:
    """Hash of everything that decides a job's results (where the cache lives does not)."""
    settings = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "cache_dir")]),
                                      resolve=True)
    return cache_key("run", settings)


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
        "task": None,
        "interference": None,
        "mask": None,
        "cache": {},
        "artifacts": {"pretrained": None, "mask": None, "finetuned": None},
        "timing": {},
        "memory": {},
        "versions": versions(),
        "lease": {"gpu": None, "start": None, "end": None},
    }


def run_job(cfg: DictConfig) -> str:
    """Returns the job's status; exits 1 on failure of a single run (a sweep goes on to its next job)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config_hash = hash_config(cfg)
    if finished_before(run_dir, config_hash):
        console.print(f"maskrun: reused finished run {run_dir} (config {config_hash})")
        return "ok"
    from maskrun import pipeline  # torch and transformers: not needed to reuse a finished job

    (run_dir / "metrics.json").unlink(missing_ok=True)  # another config's result: a crash must not leave it here
    metrics = new_metrics(cfg, config_hash)
    with gpu_lease(str(cfg.device)) as gpu:  # before any CUDA call
        metrics["lease"].update(gpu=gpu, start=time.time())
        start = time.perf_counter()
        try:
            pipeline.run(cfg, run_dir, metrics)
            metrics["status"] = "ok"
        except Exception as err:  # recorded, not raised: a failed job is a result too
            metrics["status"] = "failed"
            metrics["error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"
        metrics["timing"]["total_s"] = round(time.perf_counter() - start, 3)
        metrics["memory"].update(peak_memory())
        metrics["lease"]["end"] = time.time()
        write_metrics(run_dir, metrics)
    write_run_report(run_dir, metrics)
    print_summary(run_dir, metrics)
    if metrics["status"] == "failed" and HydraConfig.get().mode == RunMode.RUN:
        print(f"maskrun: run failed: {metrics['error']} (details in {run_dir / 'metrics.json'})", file=sys.stderr)
        sys.exit(1)
    return metrics["status"]


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """Written whole or not at all, so that a killed job never leaves a metrics.json that resume trusts."""
    tmp = run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(run_dir / "metrics.json")


def peak_memory() -> dict:
    import torch

    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cuda_peak_mb": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory
