"""Time global element selection on a bert-base-shaped model and measure its extra peak memory.

    python scripts/bench_masks.py [--json] [--repeats 3]

Builds a randomly initialised BertConfig() model (~110M parameters, no download), scores it by
magnitude, and selects the lowest half of all entries with one global threshold. Alongside, as a
reference, it runs the obvious method (concatenate every score, torch.kthvalue, compare), repeats
interleaved so that a busy machine slows both alike, and prints medians and their ratio.

Extra peak memory is the kernel's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs before each call) minus the resident set just before it. It counts every
byte the selection touches, the returned masks included (1 byte per entry = 0.25x the float32
model), but not the scores, which exist before selection starts. The last line is JSON.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from maskrun.masks.select import freeze_lowest

RATIO = 0.5


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure(select, scores: dict[str, torch.Tensor]) -> tuple[float, int, int]:
    """Seconds, extra peak resident bytes and frozen count of one call of `select(scores)`."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = resident_kib("VmRSS")
    start = time.perf_counter()
    masks = select(scores)
    seconds = time.perf_counter() - start
    extra = (resident_kib("VmHWM") - before) * 1024
    return seconds, extra, sum(int(m.sum()) for m in masks.values())


def concat_kthvalue(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference: one concatenated copy of every score, torch.kthvalue, then a comparison (ties not handled)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = round(RATIO * flat.numel())
    threshold = torch.kthvalue(flat, k).values
    return {name: s <= threshold for name, s in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = BertModel(BertConfig())
    scores = {name: p.detach().abs() for name, p in model.named_parameters()}
    entries = sum(s.numel() for s in scores.values())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    methods = {"maskrun": lambda s: freeze_lowest(s, RATIO, "global", "element", seed=0).masks,
               "concat+kthvalue": concat_kthvalue}
    results = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, select in methods.items():
            results[name].append(measure(select, scores))
    summary = {name: (statistics.median(t for t, _, _ in runs), max(m for _, m, _ in runs)) for name, runs in results.items()}
    assert all(frozen == round(RATIO * entries) for _, _, frozen in results["maskrun"]), "selection count is not exact"

    print(f"{entries:,} entries, model {model_bytes / 2**20:.0f} MiB, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats")
    for name, (seconds, extra) in summary.items():
        print(f"  {name:16s} median {seconds:6.3f} s   extra peak {extra / 2**20:6.0f} MiB = {extra / model_bytes:.2f}x model")
    ours, reference = summary["maskrun"], summary["concat+kthvalue"]
    print(f"  ratio maskrun / reference: time {ours[0] / reference[0]:.2f}, extra peak {ours[1] / reference[1]:.2f}")
    if args.json:
        print(json.dumps({"entries": entries, "global_select_seconds": round(ours[0], 4), "extra_peak_bytes": ours[1],
                          "model_bytes": model_bytes, "reference_seconds": round(reference[0], 4),
                          "reference_extra_peak_bytes": reference[1]}))


if __name__ == "__main__":
    main()
