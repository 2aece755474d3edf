"""One job over several processes: `devices=N strategy=ddp|fsdp`.

The job process starts N workers with torch.distributed's elastic launcher (maskrun.launch), so a job
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

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

STRATEGIES = ("ddp", "fsdp")
# The methods each strategy runs exactly (maskrun.validate refuses the others before any work).
METHODS_ACROSS_PROCESSES = {"ddp": ("mask", "full", "lora", "l2sp"), "fsdp": ("mask", "full")}


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
