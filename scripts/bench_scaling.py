"""One job in 1 and in 2 processes on the CPU, side by side: correctness and the cost per fine-tuning step.

Runs the real command three times on one shared cache (so the stages before fine-tuning are computed once):
`devices=1`, `devices=2 strategy=ddp` and `devices=2 strategy=fsdp`, with dropout off (each rank would draw its
own dropout masks). For each multi-process run it prints

    max_weight_diff   the largest |difference| of any fine-tuned weight from the 1-process run's
    frozen_exact      every frozen entry bit-identical to the pretrained checkpoint
    step_s            fine-tuning stage seconds per optimizer step (validation after each epoch included)
    step_ratio        step_s / the 1-process run's step_s
    other_s           the job's time outside its stages: reading the data, and for 2 processes starting the workers

Usage: python scripts/bench_scaling.py [--threads 1] [--json] [-- extra overrides...]   (--json: the last line is JSON)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

PRESET = ["experiment=smoke", "model.dropout=0", "device=cpu"]
RUNS = {"1": ["devices=1"], "2_ddp": ["devices=2", "strategy=ddp"], "2_fsdp": ["devices=2", "strategy=fsdp"]}


def run_job(root: Path, name: str, overrides: list[str], threads: int) -> Path:
    run_dir = root / name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "maskrun.cli", *PRESET, *overrides, f"cache_dir={root / 'cache'}",
               f"hydra.run.dir={run_dir}"]
    job = subprocess.run(command, env=env, capture_output=True, text=True)
    if job.returncode != 0:
        sys.exit(f"bench_scaling: {' '.join(overrides)} failed:\n{job.stderr}")
    return run_dir


def frozen_exact(run_dir: Path, metrics: dict) -> bool:
    masks = load_file(run_dir / "mask.safetensors")
    pretrained = load_file(Path(metrics["artifacts"]["pretrained"]) / "model.safetensors")
    finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
    return all(torch.equal(finetuned[name][frozen], pretrained[name][frozen]) for name, frozen in masks.items())


def measure(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = len(json.loads((run_dir / "history.json").read_text())["train"])
    timing = metrics["timing"]
    stages = sum(seconds for stage, seconds in timing.items() if stage != "total_s")
    return {"world_size": metrics["world_size"], "status": metrics["status"], "steps": steps,
            "step_s": timing["finetune"] / steps, "other_s": timing["total_s"] - stages,
            "frozen_exact": frozen_exact(run_dir, metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    parser.add_argument("overrides", nargs="*", help="more overrides for every run, e.g. finetune.epochs=4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_scaling-") as tmp:
        run_dirs = {name: run_job(Path(tmp), name, [*extra, *args.overrides], args.threads)
                    for name, extra in RUNS.items()}
        results = {name: measure(run_dir) for name, run_dir in run_dirs.items()}
        single = load_file(run_dirs["1"] / "finetuned" / "model.safetensors")
        for name, run_dir in run_dirs.items():
            finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
            results[name]["max_weight_diff"] = max((finetuned[k] - single[k]).abs().max().item() for k in single)
            results[name]["step_ratio"] = results[name]["step_s"] / results["1"]["step_s"]
    print(f"{'run':8} {'world':>5} {'steps':>5} {'max_weight_diff':>15} {'frozen_exact':>12} {'step_s':>8} "
          f"{'step_ratio':>10} {'other_s':>8}")
    for name, r in results.items():
        print(f"{name:8} {r['world_size']:>5} {r['steps']:>5} {r['max_weight_diff']:>15.3g} {str(r['frozen_exact']):>12} "
              f"{r['step_s']:>8.4f} {r['step_ratio']:>10.2f} {r['other_s']:>8.1f}")
    print(f"(--threads {args.threads} per process, {os.cpu_count()} CPUs)")
    if args.json:
        print(json.dumps({"threads": args.threads, "cpus": os.cpu_count(), "runs": results}))


if __name__ == "__main__":
    main()
