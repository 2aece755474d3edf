"""Starting one job's worker processes (`devices=N`): torch's elastic launcher runs the pipeline in each, and
the cache is fetched rank 0 first. What the ranks do together while fine-tuning is maskrun.distributed's.

Kept apart from maskrun.distributed because a worker runs the whole pipeline: the fine-tuning code imports
maskrun.distributed, and must not count the pipeline as its own code (maskrun.stages fingerprints imports).
"""

import os
import signal
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from maskrun import preemption
from maskrun.checkpoint import CHECKPOINT_DIR

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
        with launcher_handles(preemption.SIGNALS):
            results = elastic_launch(config, worker)(settings, str(run_dir), metrics)
    except ChildFailedError as err:
        raise WorkerFailed(err.name, err.failures) from None
    except SignalException as err:
        signum = signal.Signals(err.sigval)
        if signum not in preemption.SIGNALS:
            raise
        steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / CHECKPOINT_DIR).glob("step-*"))
        raise preemption.noted(signum, f"{signum.name} received: passed on to the workers, which stopped "
                                       + (f"with fine-tuning checkpointed at step {steps[-1]} in "
                                          f"{run_dir / CHECKPOINT_DIR}" if steps else "before any checkpoint")
                                       + "; rerun the same command to resume") from None
    metrics.update(results[0])


@contextmanager
def launcher_handles(signals):
    """The elastic launcher in the job process handles `signals` too (its default: SIGTERM, SIGINT, SIGHUP, SIGQUIT):
    it sends each to the workers, waits for them to end, and raises SignalException."""
    key = "TORCHELASTIC_SIGNALS_TO_HANDLE"
    before = os.environ.get(key)
    handled = [name.strip() for name in (before or "SIGTERM,SIGINT,SIGHUP,SIGQUIT").split(",")]
    os.environ[key] = ",".join(handled + [s.name for s in signals if s.name not in handled])
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


class WorkerFailed(ChildFailedError):
    """The launcher's report that a worker failed (it stops the others then), told in one line."""

    def __str__(self) -> str:
        rank, failure = self.get_first_failure()
        return f"rank {rank} failed: {failure.message}"


def worker(settings: dict, run_dir: str, metrics: dict) -> dict | None:
    """One rank of the job: the pipeline with the cache fetched rank 0 first. Returns rank 0's metrics."""
    from maskrun import pipeline
    from maskrun.cache import Cache
    from maskrun.devices import peak_memory, resolve_device

    cfg = OmegaConf.create(settings)
    cuda = resolve_device(cfg.device).type == "cuda"
    if cuda:  # the job leased its GPUs: they are all this process sees, one per local rank
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    stage_group = dist.new_group(backend="gloo", timeout=STAGE_TIMEOUT)  # a CPU barrier, however long it waits
    cache = Cache(cfg.cache_dir)
    try:
        with preemption.handled():  # a signal the launcher passes on: every rank checkpoints the same step and stops
            pipeline.run(cfg, RankZeroFirst(cache, stage_group), Path(run_dir), metrics)
        # The job process holds no model: what the job's memory is, is the ranks'. (The ranks past fine-tuning wait
        # here for rank 0's evaluation, on the CPU barrier's group, however long it takes.)
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, peak_memory(), group=stage_group)
        if int(os.environ["RANK"]) == 0:
            metrics.setdefault("memory", {}).update(
                {key: max((r[key] for r in ranks if r[key] is not None), default=None) for key in ranks[0]},
                peak_by_rank=ranks)
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
