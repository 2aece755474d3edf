"""One job in several processes (`devices=2`, gloo on the CPU): the same fine-tuned weights as one process on the
same global batch, frozen entries bit-identical, rank 0 alone writing; a rank that dies fails the job cleanly;
what cannot run exactly is refused before any work."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MASKRUN, assert_frozen_entries_exact, load_metrics, maskrun, run_cli
from maskrun.cache import entry_problem
from maskrun.distributed import METHODS_ACROSS_PROCESSES, Processes

SMOKE = ["experiment=smoke", "model.dropout=0", "device=cpu"]  # dropout off: every rank would draw its own


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def run(tmp_path: Path, cache_dir: Path, overrides: list[str]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    maskrun([*SMOKE, f"cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}", *overrides], tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir) -> Path:
    return run(tmp_path_factory.mktemp("devices1"), cache_dir, ["devices=1"])


def assert_same_weights(run_dir: Path, reference: Path) -> dict[str, torch.Tensor]:
    """The fine-tuned weights of `run_dir` within 1e-5 of `reference`'s; returns them."""
    finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
    expected = load_file(reference / "finetuned" / "model.safetensors")
    assert finetuned.keys() == expected.keys()
    for name, weights in expected.items():
        torch.testing.assert_close(finetuned[name], weights, rtol=0, atol=1e-5,
                                   msg=lambda detail, name=name: f"{name}: {detail}")
    return finetuned


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_fine_tune_as_one(tmp_path, cache_dir, one_process, strategy):
    run_dir = run(tmp_path, cache_dir, ["devices=2", f"strategy={strategy}"])
    metrics, single = load_metrics(run_dir), load_metrics(one_process)
    assert metrics["status"] == "ok" and metrics["world_size"] == 2 and single["world_size"] == 1
    assert_frozen_entries_exact(run_dir)
    finetuned = assert_same_weights(run_dir, one_process)
    pretrained = load_file(f"{metrics['artifacts']['pretrained']}/model.safetensors")
    assert any(not torch.equal(finetuned[name], pretrained[name]) for name in pretrained), "nothing was fine-tuned"
    # the job process holds no model: its memory figures are the ranks' (the largest), not the launcher's
    ranks = metrics["memory"]["peak_by_rank"]
    assert len(ranks) == 2 and metrics["memory"]["peak_rss_mb"] >= max(r["peak_rss_mb"] for r in ranks)
    assert "peak_by_rank" not in single["memory"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_uneven_batches_and_accumulation_match_one_process(tmp_path, cache_dir, strategy):
    # The smoke task's 280 training rows in micro-batches of 9 (5 + 4 rows a rank) and steps of 3: the last
    # step has one micro-batch of 9 rows and one of a single row, which leaves rank 1 a stand-in of weight 0.
    uneven = ["finetune.batch_size=9", "finetune.grad_accum=3", "finetune.epochs=1"]
    single = run(tmp_path / "one", cache_dir, ["devices=1", *uneven])
    double = run(tmp_path / "two", cache_dir, ["devices=2", f"strategy={strategy}", *uneven])
    assert_same_weights(double, single)
    steps = [json.loads((d / "history.json").read_text())["train"] for d in (single, double)]
    assert len(steps[0]) == len(steps[1])
    for one, two in zip(*steps):  # the loss a step records is the global batch's, summed over the ranks
        assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], abs=1e-5)  # FSDP: the norm over every shard


@pytest.mark.parametrize("strategy, method", [(strategy, method) for strategy, methods in METHODS_ACROSS_PROCESSES.items()
                                              for method in methods if method != "mask"])
def test_every_method_a_strategy_accepts_matches_one_process(tmp_path, cache_dir, strategy, method):
    unmasked = [f"method={method}", "mask=none"]
    single = run(tmp_path / "one", cache_dir, ["devices=1", *unmasked])
    double = run(tmp_path / "two", cache_dir, ["devices=2", f"strategy={strategy}", *unmasked])
    assert_same_weights(double, single)
    assert load_metrics(double)["artifacts"] == load_metrics(single)["artifacts"]  # lora's adapter/ too


def test_wholly_frozen_tensors_beside_trainable_ones_in_one_fsdp_unit(tmp_path, cache_dir):
    # mask=layers freezes the embeddings whole (requires_grad off); FSDP's root unit also holds the trainable head.
    layers = ["mask=layers", "model.num_layers=2"]
    single = run(tmp_path / "one", cache_dir, ["devices=1", *layers])
    double = run(tmp_path / "two", cache_dir, ["devices=2", "strategy=fsdp", *layers])
    masks, _, _ = assert_frozen_entries_exact(double)
    assert any(bool(frozen.all()) for frozen in masks.values()) and not all(bool(f.all()) for f in masks.values())
    assert_same_weights(double, single)


def test_a_share_covers_every_row_once():
    rows = list(range(5))
    shares = [Processes(None) for _ in range(3)]
    for rank, processes in enumerate(shares):
        processes.rank, processes.world_size = rank, 3
    assert sorted(i for p in shares for i in p.share(rows)[0]) == rows
    assert sum(p.share(rows)[1] for p in shares) == len(rows)
    lone = Processes(None)
    lone.rank, lone.world_size = 2, 3
    assert lone.share([4, 9]) == ([9], 0)  # no row of its own: a stand-in that counts for nothing


def worker_pids(job_pid: int) -> list[int]:
    """The spawned worker processes of a job (its children that multiprocessing's spawn started)."""
    children = Path(f"/proc/{job_pid}/task/{job_pid}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_a_rank_that_dies_fails_the_job_and_publishes_nothing_half_written(tmp_path):
    args = [*SMOKE, "devices=2", "finetune.epochs=200", f"cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    job = subprocess.Popen(MASKRUN + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "mask.safetensors").exists():  # rank 0 copies the mask just before fine-tuning
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.2)
    workers = worker_pids(job.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = job.communicate(timeout=300)
    metrics = load_metrics(tmp_path / "run")
    assert job.returncode == 1 and metrics["status"] == "failed", stderr
    assert metrics["error"].startswith("WorkerFailed: rank ") and "SIGKILL" in metrics["error"]
    assert metrics["world_size"] == 2
    entries = [p for p in (tmp_path / "cache").glob("*/*") if p.is_dir() and not p.name.startswith(".")]
    assert sorted(p.parent.name for p in entries) == ["mask", "pretrain", "scores", "tokenizer"]  # no result
    assert all(entry_problem(p) is None for p in entries)


def test_sigterm_to_a_job_of_two_processes_checkpoints_both_ranks_and_the_rerun_resumes(tmp_path):
    # The launcher handles SIGTERM in the job process: it must reach the workers as a preemption, not kill them.
    args = [*SMOKE, "devices=2", "finetune.epochs=10", "finetune.checkpoint_every=10",
            f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    job = subprocess.Popen(MASKRUN + args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    checkpoints = tmp_path / "run" / "checkpoint"
    deadline = time.time() + 300
    while not (checkpoints / "step-10").is_dir():
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    stopped = load_metrics(tmp_path / "run")
    assert job.returncode == -signal.SIGTERM, stderr  # passed on to the default handler, as one process does
    assert stopped["status"] == "failed" and stopped["error"].startswith("Preempted: SIGTERM received"), stopped["error"]
    (checkpoint,) = checkpoints.iterdir()
    step = int(checkpoint.name[len("step-"):])
    assert step > 10, "the workers were killed instead of checkpointing the step they were in"
    assert f"checkpointed at step {step}" in stopped["error"]

    maskrun(args, tmp_path)
    resumed = load_metrics(tmp_path / "run")
    assert resumed["status"] == "ok" and resumed["finetune"]["resumed_from_step"] == step


@pytest.mark.parametrize("overrides, refused", [
    (["strategy=fsdp", "method=lora", "mask=none"], "method=lora cannot run with devices=2 strategy=fsdp"),
    (["method=ewc", "mask=none"], "method=ewc cannot run with devices=2 strategy=ddp"),
    (["dataset=arithmetic", "model=tiny_gpt"], "dataset=arithmetic (instruction task) cannot run with devices=2"),
    (["strategy=fsdp", "finetune.precision=fp16"], "finetune.precision=fp16 cannot run with devices=2 strategy=fsdp"),
    (["strategy=fsdp", "finetune.checkpoint_every=2"], "finetune.checkpoint_every cannot run with devices=2 strategy=fsdp"),
    (["eval.posthoc_reset=[0.5]"], "eval.posthoc_reset cannot run with devices=2 strategy=ddp"),
    (["strategy=tp"], "strategy='tp' is not supported"),
])
def test_what_several_processes_cannot_run_exactly_is_refused(tmp_path, overrides, refused):
    result = run_cli(["experiment=smoke", "devices=2", f"cache_dir={tmp_path / 'cache'}", *overrides], tmp_path)
    assert result.returncode == 2 and refused in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists()


def test_a_job_on_gpus_needs_as_many_as_its_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKRUN_FAKE_GPUS", "1")  # run_cli empties CUDA_VISIBLE_DEVICES: one declared GPU is seen
    result = run_cli(["experiment=smoke", "devices=2", f"cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert result.returncode == 2 and "devices=2 strategy=ddp needs 2 GPUs and 1 are visible" in result.stderr


def test_a_job_of_two_processes_leases_two_gpus_once_both_are_free(tmp_path, monkeypatch):
    from filelock import FileLock

    from maskrun import devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(devices.FAKE_GPUS_ENV, "2")
    monkeypatch.setattr(devices, "LOCK_DIR", tmp_path)
    other_job = FileLock(tmp_path / "gpu-0.lock")
    other_job.acquire()
    leased = {}

    def lease_two():
        with devices.gpu_lease("auto", 2, poll_s=0.02) as gpus:
            leased.update(gpus=gpus, visible=os.environ["CUDA_VISIBLE_DEVICES"], at=time.time())

    waiting = threading.Thread(target=lease_two)
    waiting.start()
    time.sleep(0.3)
    assert not leased  # one GPU free is not enough
    released_at = time.time()
    other_job.release()
    waiting.join(timeout=10)
    assert leased["gpus"] == leased["visible"] == "0,1" and leased["at"] >= released_at
