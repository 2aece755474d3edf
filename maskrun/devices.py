"""Device choice, the memory a process took, and GPU leases: `devices` GPUs per job (one by default) on one host.

Parallel jobs on one host must not share a GPU. Each job takes an exclusive lock on one
per-GPU lock file per GPU it needs before any CUDA call and holds them until the job ends; then it
sets `CUDA_VISIBLE_DEVICES` to those GPUs, so CUDA (started later, by the job and its worker
processes) sees only them.
Launchers reuse pool workers, so a counter such as `job.num % n_gpus` would hand one GPU to
two running jobs; a lock cannot. Once a worker has pinned its GPU, its later jobs see only
that GPU and lease it again: CUDA reads `CUDA_VISIBLE_DEVICES` once per process.

The GPUs are found without starting CUDA (the launching process never touches it):
`CUDA_VISIBLE_DEVICES` when set, else `nvidia-smi -L`. `MASKRUN_FAKE_GPUS=N` declares N
devices, so the lease logic can be tested on a CPU.
"""

import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

FAKE_GPUS_ENV = "MASKRUN_FAKE_GPUS"
LOCK_DIR = Path(tempfile.gettempdir()) / f"maskrun-gpu-leases-{os.getuid()}"  # per host and user


def resolve_device(name: str):
    """The torch.device that `device=name` means."""
    import torch  # here, not at the top: leases and resumed jobs need no torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_memory() -> dict:
    """This process's peak resident memory, and its peak CUDA allocation when it used CUDA."""
    import torch

    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cuda_peak_mb": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process may use, found without initialising CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    if os.environ.get(FAKE_GPUS_ENV):
        return [str(i) for i in range(int(os.environ[FAKE_GPUS_ENV]))]
    if visible == "" or shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    gpu_lines = [line for line in listing.splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(gpu_lines))]


@contextmanager
def gpu_lease(device: str, count: int = 1, poll_s: float = 0.5) -> Iterator[str | None]:
    """Holds `count` free GPUs for the body and yields their ids, comma-separated; yields None when no GPU is to
    be leased.

    Only `device=auto` and `device=cuda` lease: `cuda:N` and `cpu` are the user's explicit choice.
    """
    gpus = visible_gpus() if device in ("auto", "cuda") else []
    if not gpus:
        yield None
        return
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    leased, locks = wait_for_free_gpus(gpus, count, poll_s)
    try:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(leased)
        yield ",".join(leased)
    finally:
        for lock in locks:
            lock.release()


def wait_for_free_gpus(gpus: list[str], count: int, poll_s: float) -> tuple[list[str], list[FileLock]]:
    """Locks `count` of `gpus`. A try that finds too few free releases what it took before waiting: two jobs
    holding part of what each needs would otherwise wait for each other forever."""
    while True:
        leased, locks = [], []
        for gpu in gpus:
            lock = FileLock(LOCK_DIR / f"gpu-{gpu}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            leased.append(gpu)
            locks.append(lock)
            if len(leased) == count:
                return leased, locks
        for lock in locks:
            lock.release()
        time.sleep(poll_s)
