"""Benchmark: what a sweep costs beyond the work it must do.

A 5-ratio smoke sweep (`maskrun -m experiment=smoke mask.ratio=...`, fresh cache) against that
work done by separate runs alone: one cold run (process start, tokenizer, pretrain, fine-tune,
eval, its report) plus, for the 4 other ratios, a warm run's own time (`timing.total_s`: data,
cache hits, mask, fine-tune, eval; no process start). Their ratio is the sweep's overhead
(target ≤ 1.1): Hydra, per-job reports, the sweep report, and any stage computed twice.

Sweep and runs alone alternate, repeat by repeat, so load on the machine hits both alike;
the ratio is of the medians. The last line printed is JSON.

    .venv/bin/python scripts/bench_sweep.py [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATIOS = ["0.1", "0.3", "0.5", "0.7", "0.9"]
MASKRUN = [sys.executable, "-m", "maskrun.cli"]


def maskrun(args: list[str], cwd: Path) -> float:
    """Runs the command; returns its wall time in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run([*MASKRUN, *args, "experiment=smoke"], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"bench_sweep: maskrun {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return elapsed


def sweep(workdir: Path) -> tuple[float, float]:
    """Wall time of the sweep, and the summed own time of its jobs (the rest is the sweep's overhead)."""
    workdir.mkdir()
    wall_s = maskrun(["-m", f"mask.ratio={','.join(RATIOS)}", f"cache_dir={workdir / 'cache'}",
                      f"hydra.sweep.dir={workdir / 'sweep'}"], workdir)
    jobs = [json.loads((workdir / "sweep" / str(num) / "metrics.json").read_text()) for num in range(len(RATIOS))]
    return wall_s, sum(job["timing"]["total_s"] for job in jobs)


def runs_alone(workdir: Path) -> tuple[float, float]:
    """Wall time of the cold run, and the summed own time of the 4 warm runs."""
    workdir.mkdir()
    cold_s = maskrun([f"mask.ratio={RATIOS[0]}", f"cache_dir={workdir / 'cache'}", f"hydra.run.dir={workdir / RATIOS[0]}"],
                     workdir)
    warm_s = 0.0
    for ratio in RATIOS[1:]:
        maskrun([f"mask.ratio={ratio}", f"cache_dir={workdir / 'cache'}", f"hydra.run.dir={workdir / ratio}"], workdir)
        warm_s += json.loads((workdir / ratio / "metrics.json").read_text())["timing"]["total_s"]
    return cold_s, warm_s


def rounded(seconds: list[float]) -> list[float]:
    return [round(s, 2) for s in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    sweep_s, jobs_s, cold_s, warm_s = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for repeat in range(repeats):
            wall, jobs = sweep(Path(tmp) / f"sweep-{repeat}")
            sweep_s.append(wall)
            jobs_s.append(jobs)
            cold, warm = runs_alone(Path(tmp) / f"alone-{repeat}")
            cold_s.append(cold)
            warm_s.append(warm)
            print(f"repeat {repeat}: sweep {wall:.1f} s (its jobs {jobs:.1f} s); "
                  f"alone: cold run {cold:.1f} s + 4 warm runs {warm:.1f} s", flush=True)
    alone_s = [cold + warm for cold, warm in zip(cold_s, warm_s)]
    result = {"ratio": round(statistics.median(sweep_s) / statistics.median(alone_s), 3), "target": 1.1,
              "sweep_s": rounded(sweep_s), "sweep_jobs_s": rounded(jobs_s), "alone_s": rounded(alone_s),
              "cold_run_s": rounded(cold_s), "warm_runs_s": rounded(warm_s), "ratios": RATIOS}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
