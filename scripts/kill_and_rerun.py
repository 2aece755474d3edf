"""Fault drill: SIGKILL a smoke sweep at a random moment, rerun it, and check what the rerun produced.

    python scripts/kill_and_rerun.py WORKDIR [--seed N]

Then also starts two copies of one run at once against a fresh cache. Checks: every rerun job is ok,
every frozen entry of every fine-tuned model equals its pretrained value bit for bit, jobs finished
before the kill match their rerun exactly, and each cache entry was computed once.
"""

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

SWEEP = ["-m", "experiment=smoke", "mask.ratio=0.1,0.5,0.9", "seed=0,1"]
VARYING = ("timing", "memory", "cache", "artifacts", "overrides", "lease", "reused_result")  # not results


def maskrun(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "maskrun.cli", *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def jobs(sweep_dir: Path) -> dict[str, dict]:
    """metrics.json of each finished job, by its overrides."""
    found = {}
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        found[" ".join(metrics["overrides"])] = {**metrics, "dir": path.parent}
    return found


def frozen_entries_exact(run_dir: Path, pretrained_dir: Path) -> bool:
    mask = load_file(run_dir / "mask.safetensors")
    finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
    pretrained = load_file(pretrained_dir / "model.safetensors")
    return all(torch.equal(finetuned[name][m], pretrained[name][m]) for name, m in mask.items())


def numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in (*VARYING, "dir")}


def same_result(a: dict, b: dict) -> bool:
    same_numbers = numbers(a) == numbers(b)
    same_weights = all((a["dir"] / f).read_bytes() == (b["dir"] / f).read_bytes()
                       for f in ("mask.safetensors", "finetuned/model.safetensors"))
    return same_numbers and same_weights


def kill_and_rerun(workdir: Path, rng: random.Random) -> bool:
    cache = workdir / "cache"
    common = [*SWEEP, f"cache_dir={cache}"]
    # A random moment, whatever the machine's speed: after a random number of finished jobs, plus up to 3 s.
    finished, extra_s = rng.randrange(6), rng.uniform(0, 3)
    start = time.perf_counter()
    killed = maskrun([*common, f"hydra.sweep.dir={workdir / 'killed'}"], workdir)
    while len(jobs(workdir / "killed")) < finished and killed.poll() is None:
        time.sleep(0.1)
    time.sleep(extra_s)
    if killed.poll() is not None:
        print("the sweep ended before the kill: nothing tested")
        return False
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = jobs(workdir / "killed")
    print(f"killed the sweep after {time.perf_counter() - start:.1f} s ({finished} jobs done + {extra_s:.1f} s): "
          f"{len(before)} of 6 jobs had finished")

    start = time.perf_counter()
    rerun = maskrun([*common, f"hydra.sweep.dir={workdir / 'rerun'}"], workdir)
    _, stderr = rerun.communicate()
    after = jobs(workdir / "rerun")
    print(f"rerun: exit {rerun.returncode} in {time.perf_counter() - start:.0f} s, "
          f"{sum(m['status'] == 'ok' for m in after.values())} of {len(after)} jobs ok")
    exact = all(frozen_entries_exact(m["dir"], Path(m["artifacts"]["pretrained"])) for m in after.values())
    matching = all(same_result(m, after[key]) for key, m in before.items())
    pretrain_entries = [p for p in (cache / "pretrain").iterdir() if p.is_dir() and not p.name.startswith(".")]
    pretrain_misses = sum(m["cache"].get("pretrain") == "miss" for m in after.values())
    print(f"frozen entries exact in every job: {exact}")
    reused = sum(m["cache"].get("result") == "hit" for m in after.values())
    print(f"jobs finished before the kill identical to their rerun: {matching} ({len(before)} compared, "
          f"{reused} rerun jobs copied from the cache's results)")
    print(f"pretrain entries in the cache: {len(pretrain_entries)} (2 seeds); pretrain misses in the rerun: {pretrain_misses}")
    return rerun.returncode == 0 and len(after) == 6 and exact and matching and len(pretrain_entries) == 2


def concurrent_runs(workdir: Path) -> bool:
    common = ["experiment=smoke", f"cache_dir={workdir / 'shared-cache'}"]
    runs = [maskrun([*common, f"hydra.run.dir={workdir / f'concurrent{i}'}"], workdir) for i in range(2)]
    codes = [run.wait() for run in runs]
    caches = [json.loads((workdir / f"concurrent{i}" / "metrics.json").read_text())["cache"] for i in range(2)]
    misses = {stage: sum(c[stage] == "miss" for c in caches) for stage in caches[0]}
    print(f"two runs started at once: exit codes {codes}, misses per stage {misses}")
    return codes == [0, 0] and all(n == 1 for n in misses.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill moment (default: random)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ok = kill_and_rerun(args.workdir, random.Random(args.seed)) & concurrent_runs(args.workdir)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
