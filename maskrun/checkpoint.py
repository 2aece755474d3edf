"""Resumable fine-tuning: the loop's whole state, written atomically into the run dir, and read back by a rerun.

`finetune.checkpoint_every=S` writes a checkpoint at the end of every S-th optimizer step, and a preemption signal
(maskrun.preemption) one at the end of the current step. A checkpoint is a directory `run_dir/checkpoint/step-N/`:

    model.safetensors     every parameter that trains (the frozen ones are still the pretrained values)
    tensors.safetensors   optimizer state, RNG states (torch's global CPU RNG, which dropout draws from, CUDA's on
                          CUDA, the loop's order and noise generators, a method's own, e.g. replay's)
    best.safetensors      early stopping's best weights, when there are any
    state.json            everything else: position (epoch, step), phase, history, early stopping's best result,
                          the scheduler, the GradScaler, the optimizer's settings, the callbacks' state (a mask that
                          moves: its generator and what it froze so far), and the config's fingerprint

It is written to a temporary directory, fsynced and renamed into place; the older ones are removed only then, so a
kill at any moment leaves the last complete checkpoint. Tensors go to safetensors, the rest to JSON: never a pickle.
A rerun resumes from the newest checkpoint whose fingerprint (the job's result key, maskrun.job.hash_config) is its
own, so a checkpoint of other settings or other code is never resumed.

A resumed epoch draws its batch order again from the order generator's state at the start of that epoch, skips the
steps it already took and goes on with every other state as it was at the end of step N: on the same device and
thread count, the run ends bit for bit as an uninterrupted one. The checkpoint is taken before the epoch's
validation, which the resumed run takes.

With several processes, rank 0 alone writes, every rank reads, and the position (epoch, step) counts global batches,
the same on every rank.
"""

import json
import os
import shutil
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from maskrun import preemption
from maskrun.progress import console

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
TENSORS_FILE = "tensors.safetensors"
BEST_FILE = "best.safetensors"


def is_writer() -> bool:
    """Rank 0 of several processes, or the only one."""
    return not dist.is_initialized() or dist.get_rank() == 0


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on some rank: every rank must stop after the same step."""
    if not dist.is_initialized():
        return flag
    votes = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")  # nccl: CUDA only
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


def ranks_rng_states() -> dict[str, torch.Tensor]:
    """The global RNG states (torch's CPU one, which dropout draws from on the CPU, and CUDA's on CUDA) of every
    rank, named by rank: each rank of a resumed job takes its own back."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    ranks = [states]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, states)
    return {f"{kind}.rank{rank}": state for rank, each in enumerate(ranks) for kind, state in each.items()}


def encode(value, tensors: dict[str, torch.Tensor], path: str):
    """`value` (a state_dict) as JSON; its tensors go to `tensors`, named by where they were. Every JSON object is a
    tag (`tensor`, `tuple`, `dict`), so that int keys and tuples come back as they were."""
    if torch.is_tensor(value):
        tensors[path] = value.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(value, tuple):
        return {"tuple": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {"dict": [[key, encode(v, tensors, f"{path}.{key}")] for key, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint {path} of type {type(value).__name__} without pickle")


def decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if isinstance(value, dict):
        (tag, content), = value.items()
        if tag == "tensor":
            return tensors[content]
        if tag == "tuple":
            return tuple(decode(v, tensors) for v in content)
        return {key: decode(v, tensors) for key, v in content}
    return value


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Position:
    """Where the loop stands at the end of a step: `step` optimizer steps taken, the last of them in `epoch`; the
    phase is released after finetune.unfreeze_after."""

    epoch: int
    step: int
    released: bool


@dataclass
class Checkpoint:
    path: Path
    state: dict  # its state.json

    @property
    def position(self) -> Position:
        return Position(**self.state["position"])


class Checkpointing:
    """Where and how often fine-tuning checkpoints; `directory=None`: never (and signals are not deferred)."""

    def __init__(self, directory: Path | None, every: int | None = None, fingerprint: str = "",
                 generators: dict[str, torch.Generator] | None = None):
        self.directory, self.every, self.fingerprint = directory, every, fingerprint
        self.generators = generators or {}  # a method's own, e.g. replay's
        self.resumed_from_step: int | None = None
        self.preempted = False  # a preemption signal reached some rank: stop after this step's checkpoint

    def deferring_preemption(self):
        """The loop's scope: a preemption signal waits for the end of the step, which checkpoints."""
        return preemption.deferred() if self.directory is not None else nullcontext()

    def due(self, step: int) -> bool:
        """Whether to checkpoint at the end of `step`: every `every` steps, and when a preemption signal came."""
        if self.directory is None:
            return False
        self.preempted = any_rank(preemption.received() is not None)
        return self.preempted or (self.every is not None and step % self.every == 0)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint of this config; those of another config are left alone (the next save removes them)."""
        if self.directory is None or not self.directory.is_dir():
            return None
        for path in sorted(self.directory.glob("step-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True):
            state = json.loads((path / STATE_FILE).read_text())
            if state["fingerprint"] == self.fingerprint:
                return Checkpoint(path, state)
            console.print(f"maskrun: ignored the checkpoint {path}: another config or code wrote it "
                          f"({state['fingerprint']}, not {self.fingerprint})")
        return None

    def save(self, position: Position, model: torch.nn.Module, phase, scaler: torch.amp.GradScaler, stopping,
             history: dict, rng: dict[str, torch.Tensor], callbacks=()) -> None:
        """Writes `run_dir/checkpoint/step-N` whole or not at all (rank 0 only); `phase` is a maskrun.finetune.Phase,
        `stopping` its EarlyStopping, `rng` the loop's generator states (the order generator's at the epoch's start)."""
        rng = rng | ranks_rng_states()  # every rank's: dropout draws differ between ranks
        if is_writer():
            self.publish(position.step, lambda out: self.write(out, position, model, phase, scaler, stopping,
                                                               history, rng, callbacks))
        if dist.is_initialized():
            dist.barrier()  # no rank goes on (or stops) before the checkpoint is whole

    def write(self, out: Path, position: Position, model, phase, scaler, stopping, history, rng, callbacks) -> None:
        # What the optimizer may have moved: a mask that moves (lisa) switches requires_grad off for what has trained.
        optimized = {id(t) for t in phase.optimizer.trainable_tensors()}
        save_file({name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
                   if p.requires_grad or id(p) in optimized}, out / MODEL_FILE)
        tensors = {f"rng.{name}": state for name, state in rng.items()}
        tensors |= {f"rng.{name}": generator.get_state() for name, generator in self.generators.items()}
        state = {
            "fingerprint": self.fingerprint,
            "position": vars(position),
            "history": history,
            "early_stopping": {"best": stopping.best, "bad_epochs": stopping.bad_epochs},
            "optimizer": encode(phase.optimizer.optimizer.state_dict(), tensors, "optimizer"),
            "scheduler": encode(phase.scheduler.state_dict(), tensors, "scheduler"),
            "scaler": encode(scaler.state_dict(), tensors, "scaler"),
            "callbacks": {type(callback).__name__: encode(callback.state_dict(), tensors, type(callback).__name__)
                          for callback in callbacks if callback.state_dict()},
        }
        save_file(tensors, out / TENSORS_FILE)
        if stopping.best_state is not None:
            save_file({k: v.cpu().contiguous() for k, v in stopping.best_state.items()}, out / BEST_FILE)
        (out / STATE_FILE).write_text(json.dumps(state))

    def publish(self, step: int, write) -> None:
        """`write(tmp)`, fsync, rename to step-N; then the others go."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-step-{step}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        write(tmp)
        for file in tmp.iterdir():
            fsync(file)
        fsync(tmp)
        final = self.directory / f"step-{step}"
        if final.exists():  # another config's checkpoint at the same step: this run's replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        fsync(self.directory)
        for other in self.directory.iterdir():
            if other != final:
                shutil.rmtree(other)

    def restore(self, checkpoint: Checkpoint, model: torch.nn.Module, phase, scaler: torch.amp.GradScaler, stopping,
                history: dict, generators: dict[str, torch.Generator], callbacks=()) -> None:
        """Puts the state of `checkpoint` back into the loop's objects (`phase` already the checkpoint's phase);
        `generators` are the loop's, by the names `save` was given their states under."""
        state, path = checkpoint.state, checkpoint.path
        with torch.no_grad():
            for name, value in load_file(path / MODEL_FILE).items():
                model.get_parameter(name).copy_(value)
        tensors = load_file(path / TENSORS_FILE)
        phase.optimizer.optimizer.load_state_dict(decode(state["optimizer"], tensors))
        phase.scheduler.load_state_dict(decode(state["scheduler"], tensors))
        scaler.load_state_dict(decode(state["scaler"], tensors))
        stopping.best, stopping.bad_epochs = state["early_stopping"]["best"], state["early_stopping"]["bad_epochs"]
        if (path / BEST_FILE).is_file():
            stopping.best_state = load_file(path / BEST_FILE, device=str(next(model.parameters()).device))
        history.clear()
        history.update(state["history"])
        for callback in callbacks:  # those that keep state: a mask that moves
            if type(callback).__name__ in state["callbacks"]:
                callback.load_state_dict(decode(state["callbacks"][type(callback).__name__], tensors))
        for name, generator in (generators | self.generators).items():
            generator.set_state(tensors[f"rng.{name}"])
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.set_rng_state(tensors[f"rng.torch.rank{rank}"])
        if f"rng.cuda.rank{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"])
        self.resumed_from_step = checkpoint.position.step
        console.print(f"maskrun: resumed fine-tuning from {path} (step {self.resumed_from_step})")

    def stop_if_preempted(self, step: int) -> None:
        """After a checkpoint at the end of `step`: the job stops there when a preemption signal asked for it."""
        if self.preempted:
            signal = preemption.received()
            raise preemption.Preempted(f"{signal.name if signal else 'a preemption signal'} received: checkpointed "
                                       f"fine-tuning at step {step} in {self.directory}; rerun the same command to "
                                       "resume")


def discard(run_dir: Path) -> None:
    """A finished job's checkpoints are of no further use."""
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
