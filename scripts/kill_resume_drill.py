"""Resume drill: kill -9 a checkpointing smoke run at random steps, rerun it, compare with an uninterrupted run.

    python scripts/kill_resume_drill.py WORKDIR [--seed N] [--kills 3] [--every 1] [--threads 1] [--devices 1]

First one uninterrupted smoke run (no checkpoints). Then, for each of `--kills` distinct steps drawn by a seeded
choice (the seed is printed), a run with finetune.checkpoint_every=E started against a copy of the reference's
cache less its results (so that every stage before fine-tuning is a cache hit, and the result is computed again);
its process group gets SIGKILL a random moment (up to 0.1 s, also seeded) after its checkpoint dir shows that step
has passed, so that the kill lands anywhere in a step or in the writing of a checkpoint; the same command is run
again and must resume. Checks: the rerun is ok and resumed, its fine-tuned weights are byte for byte the
uninterrupted run's, and so are its history and its task and interference numbers. Every process runs with the
same thread count (float sums, hence the last bits, depend on it). `--devices 2` runs every job as two DDP
processes on the CPU (the kill reaches the job and its workers).
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SMOKE = ["experiment=smoke", "device=cpu"]
SAME = ("task", "interference")  # the numbers an interrupted run must reproduce exactly


def maskrun(args: list[str], threads: int) -> subprocess.Popen:
    """The maskrun command in a process group of its own, so that a kill reaches every process it started."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-m", "maskrun.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, what: str) -> None:
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{what} failed with exit {process.returncode}:\n{stderr}")


def checkpointed_steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in (run_dir / "checkpoint").glob("step-*")]


def kill_after(process: subprocess.Popen, run_dir: Path, step: int, delay_s: float) -> int:
    """SIGKILL the process group `delay_s` after a checkpoint at `step` or later exists; the newest step seen then."""
    while process.poll() is None:
        seen = checkpointed_steps(run_dir)
        if seen and max(seen) >= step:
            time.sleep(delay_s)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return max(seen)
        time.sleep(0.02)
    raise SystemExit(f"the run ended before step {step} was checkpointed: nothing tested")


def result_files(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"weights": (run_dir / "finetuned" / "model.safetensors").read_bytes(),
            "history": (run_dir / "history.json").read_bytes(), "metrics": metrics,
            "numbers": {key: metrics[key] for key in SAME}}


def drill(workdir: Path, kill_step: int, delay_s: float, every: int, threads: int, reference: dict,
          cache: Path) -> bool:
    trial_cache = workdir / f"cache-step{kill_step}"
    shutil.copytree(cache, trial_cache, ignore=lambda folder, names: ["result"] if Path(folder) == cache else [])
    run_dir = workdir / f"killed-step{kill_step}"
    command = [*SMOKE, f"cache_dir={trial_cache}", f"hydra.run.dir={run_dir}", f"finetune.checkpoint_every={every}"]
    newest = kill_after(maskrun(command, threads), run_dir, kill_step, delay_s)
    rerun = maskrun(command, threads)
    finish(rerun, f"the rerun after the kill at step {kill_step}")
    resumed = result_files(run_dir)
    resumed_from = resumed["metrics"]["finetune"]["resumed_from_step"]
    checks = {
        "resumed": resumed_from is not None and resumed_from >= kill_step,
        "weights identical": resumed["weights"] == reference["weights"],
        "history identical": resumed["history"] == reference["history"],
        "task and interference identical": resumed["numbers"] == reference["numbers"],
        "checkpoint removed": not (run_dir / "checkpoint").exists(),
    }
    print(f"kill -9 {delay_s:.3f} s after step {kill_step} (newest checkpoint seen: step {newest}), resumed from step "
          f"{resumed_from}: " + ", ".join(f"{name} {ok}" for name, ok in checks.items()))
    return all(checks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill steps (default: drawn and printed)")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--every", type=int, default=1, help="finetune.checkpoint_every of the killed runs")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--devices", type=int, default=1, help="processes per job (strategy=ddp when more than 1)")
    args = parser.parse_args()
    if args.devices > 1:
        SMOKE.extend([f"devices={args.devices}", "strategy=ddp"])
    seed = random.SystemRandom().randrange(2**32) if args.seed is None else args.seed
    args.workdir.mkdir(parents=True, exist_ok=True)

    cache = args.workdir / "cache"
    start = time.perf_counter()
    finish(maskrun([*SMOKE, f"cache_dir={cache}", f"hydra.run.dir={args.workdir / 'reference'}"], args.threads),
           "the uninterrupted run")
    reference = result_files(args.workdir / "reference")
    steps = len(json.loads(reference["history"])["train"])
    print(f"uninterrupted run: {steps} fine-tuning steps, {reference['metrics']['cpu_threads']} threads, "
          f"{time.perf_counter() - start:.0f} s")
    rng = random.Random(seed)
    kill_steps = sorted(rng.sample(range(1, steps), args.kills))
    print(f"kill steps {kill_steps} (seed {seed}), checkpoint every {args.every} steps")
    ok = all([drill(args.workdir, step, rng.uniform(0, 0.1), args.every, args.threads, reference, cache)
              for step in kill_steps])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
