"""Starting one job's worker processes (`devices=N`): torch's elastic launcher runs the pipeline in each, and
the cache is fetched rank 0 first. What the ranks do together while fine-tuning is maskrun.distributed's.

Kept apart from maskrun.distributed because a worker runs the whole pipeline: the fine-tuning code imports
maskrun.distributed, and must not count the pipeline as its own code (maskrun.stages fingerprints imports).
"""

import os
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

# How long ranks wait at a barrier for rank 0 to compute a stage: pretraining a large model may take hours.
STAGE_TIMEOUT = timedelta(days=1)


def launch(cfg: DictConfig, run_dir: Path, metrics: dict) -> None:
    """Runs the pipeline in `cfg.devices` worker processes on this host; `metrics` becomes rank 0's."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.devices, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # a free port: parallel jobs coexist
                          max_restarts=0, monitor_interval=0.1)
    settings = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    try:
        results = elastic_launch(config, worker)(settings, str(run_dir), metrics)
    except ChildFailedError as err:
        raise WorkerFailed(err.name, err.failures) from None
    metrics.update(results[0])


class WorkerFailed(ChildFailedError):
    """The launcher's report that a worker failed (it stops the others then), told in one line."""

    def __str__(self) -> str:
        rank, failure = self.get_first_failure()
        return f"rank {rank} failed: {failure.message}"


def worker(settings: dict, run_dir: str, metrics: dict) -> dict | None:
    """One rank of the job: the pipeline with the cache fetched rank 0 first. Returns rank 0's metrics."""
    from maskrun import pipeline
    from maskrun.cache import Cache
    from maskrun.devices import resolve_device

    cfg = OmegaConf.create(settings)
    cuda = resolve_device(cfg.device).type == "cuda"
    if cuda:  # the job leased its GPUs: they are all this process sees, one per local rank
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    stage_group = dist.new_group(backend="gloo", timeout=STAGE_TIMEOUT)  # a CPU barrier, however long it waits
    cache = Cache(cfg.cache_dir)
    try:
        pipeline.run(cfg, RankZeroFirst(cache, stage_group), Path(run_dir), metrics)
    finally:
        cache.close()
        dist.destroy_process_group()
    return metrics if int(os.environ["RANK"]) == 0 else None


class RankZeroFirst:
    """The cache as the ranks of one job use it: rank 0 fetches each entry, then the others read it."""

    def __init__(self, cache, group):
        self.cache, self.group = cache, group

    def fetch(self, stage: str, inputs: dict, build):
        if dist.get_rank() == 0:
            fetched = self.cache.fetch(stage, inputs, build)
            dist.barrier(group=self.group)
            return fetched
        dist.barrier(group=self.group)
        return self.cache.fetch(stage, inputs, build)
