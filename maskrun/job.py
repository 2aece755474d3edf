"""One Hydra job: run the pipeline, record metrics.json whatever happens, write the run report."""

import json
import resource
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from maskrun import pipeline
from maskrun.provenance import versions
from maskrun.report.run import print_summary, write_run_report


def new_metrics(cfg: DictConfig) -> dict:
    hydra_cfg = HydraConfig.get()
    return {
        "status": "running",
        "error": None,
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
    }


def run_job(cfg: DictConfig) -> str:
    """Returns the job's status; exits 1 on failure of a single run (a sweep goes on to its next job)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = new_metrics(cfg)
    start = time.perf_counter()
    try:
        pipeline.run(cfg, run_dir, metrics)
        metrics["status"] = "ok"
    except Exception as err:  # recorded, not raised: a failed job is a result too
        metrics["status"] = "failed"
        metrics["error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"
    metrics["timing"]["total_s"] = round(time.perf_counter() - start, 3)
    metrics["memory"].update(peak_memory())
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_run_report(run_dir, metrics)
    print_summary(run_dir, metrics)
    if metrics["status"] == "failed" and HydraConfig.get().mode == RunMode.RUN:
        print(f"maskrun: run failed: {metrics['error']} (details in {run_dir / 'metrics.json'})", file=sys.stderr)
        sys.exit(1)
    return metrics["status"]


def peak_memory() -> dict:
    import torch

    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cuda_peak_mb": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory
