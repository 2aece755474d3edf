"""One job over several processes: `devices=N strategy=ddp|fsdp`.

The job process starts N workers with torch.distributed's elastic launcher (what torchrun runs), so a job
stays one Hydra job under any Hydra launcher (a SLURM array task with N GPUs runs one N-GPU job). Each worker
runs the whole pipeline:

- Stages before fine-tuning: rank 0 fetches each cached stage (computing it on a miss; pretraining stays
  single-process) while the other ranks wait at a barrier, then they read the same entry. Every rank thus
  starts fine-tuning from identical weights and an identical mask, and the cache is written by rank 0 alone.
- Fine-tuning: `finetune.batch_size` is the global batch. Every rank draws the same seeded order and takes its
  share (rows rank, rank + N, ...) of each micro-batch; its loss is weighted so that the gradient averaged over
  the ranks equals the one-process gradient of the global batch, also for a short last batch and grad_accum.
  DDP all-reduces gradients and the masked optimizer runs on every rank, so all ranks stay identical; under
  FSDP2 (`fully_shard`) each rank steps its own shard of every parameter with the matching shard of the mask.
  Every rank validates on the full validation split, so that all take the same early-stopping decision.
- After fine-tuning, rank 0 holds the full fine-tuned model (FSDP gathers it there), evaluates it and writes
  the run's files and metrics.json; the other ranks end.

A worker that dies fails the whole job: the launcher stops the others and raises ChildFailedError, which the
job records as status failed (WorkerFailed: the rank and its error). Cache entries appear only by an atomic
rename, so nothing is half-written.

A preemption signal (SIGTERM, SIGUSR1) reaching the job is handled by the launcher, which passes it on to the workers
and waits for them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default); each worker handles it as one process does
(maskrun.preemption): every rank checkpoints at the end of the same step and stops. The job then records Preempted and
passes the signal on, as a job of one process does.
"""

import copy
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
from torch.distributed.tensor import DTensor, distribute_tensor

from maskrun import preemption
from maskrun.checkpoint import CHECKPOINT_DIR

STRATEGIES = ("ddp", "fsdp")
# The methods each strategy runs exactly (maskrun.validate refuses the others before any work).
METHODS_ACROSS_PROCESSES = {"ddp": ("mask", "full", "lora", "l2sp"), "fsdp": ("mask", "full")}
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
    from maskrun.devices import resolve_device
    from maskrun.job import peak_memory

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


class Processes:
    """This process's place in the job: its rank among `world_size` processes, and how they fine-tune together.

    With no strategy, or in a job of one process (no process group), every method is the identity, so
    one-process fine-tuning is exactly what it was.
    """

    def __init__(self, strategy: str | None):
        grouped = strategy is not None and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if grouped else 0
        self.world_size = dist.get_world_size() if grouped else 1
        self.strategy = strategy if self.world_size > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module, frozen: dict[str, torch.Tensor]) -> torch.nn.Module:
        """What fine-tuning trains: `model` under DDP, a sharded copy of it under FSDP, or `model` itself."""
        if self.strategy is None:
            return model
        # DDP and FSDP decide at wrapping which parameters get gradients: a wholly frozen one must be off by then.
        for name, param in model.named_parameters():
            if name in frozen and bool(frozen[name].all()):
                param.requires_grad_(False)
        if self.strategy == "ddp":
            device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        from torch.distributed.fsdp import fully_shard

        sharded = copy.deepcopy(model)  # `model` stays whole, to receive the fine-tuned weights on rank 0
        blocks = set(getattr(sharded, "_no_split_modules", None) or ())  # the model's transformer blocks
        for module in sharded.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        return fully_shard(sharded)

    def unwrapped(self, trained: torch.nn.Module) -> torch.nn.Module:
        """The module whose parameters are named as in the mask (DDP's inner module; FSDP shards in place)."""
        return trained.module if self.strategy == "ddp" else trained

    def gather(self, trained: torch.nn.Module, model: torch.nn.Module) -> None:
        """Puts the fine-tuned weights of `trained` into `model` on rank 0 (DDP trains `model` itself)."""
        if self.strategy != "fsdp":
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            model.load_state_dict(full)

    def share(self, rows: list[int]) -> tuple[list[int], int]:
        """This rank's rows of a micro-batch and how many of them count.

        A rank left without rows (a last micro-batch shorter than the number of ranks) runs one row with no
        weight, so that it still joins the collective gradient reduction.
        """
        mine = rows[self.rank::self.world_size]
        return (mine, len(mine)) if mine else (rows[-1:], 0)

    def sum(self, *values: float) -> tuple[float, ...]:
        """Each value summed over the ranks (itself in one process)."""
        if self.strategy is None:
            return values
        on_gpu = dist.get_backend() == "nccl"  # nccl reduces CUDA tensors only
        total = torch.tensor(values, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
        dist.all_reduce(total)
        return tuple(total.tolist())


# The masked optimizer under FSDP2: a parameter and its gradient are DTensors sharded along dim 0 (Shard(0));
# each rank steps the entries it holds, with the same shard of the mask.

def local_entries(tensor: torch.Tensor) -> torch.Tensor:
    """The entries of `tensor` this rank holds: its local shard under FSDP2, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The shard of `mask` that matches `param`'s local shard: the same mesh and placement."""
    if not isinstance(param, DTensor):
        return mask
    # as uint8: gloo has no bool
    return distribute_tensor(mask.to(torch.uint8), param.device_mesh, param.placements).to_local().bool()


def global_norm(local_grads: list[torch.Tensor], sharded: bool) -> torch.Tensor:
    """The 2-norm of the whole gradient, when each rank holds a shard of it: the local squared norms summed."""
    local = torch.nn.utils.get_total_norm(local_grads)
    if not sharded:
        return local
    squared = local.double() ** 2
    dist.all_reduce(squared)
    return squared.sqrt().to(local.dtype)
