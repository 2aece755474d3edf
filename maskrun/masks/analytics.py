"""Mask analytics: where a mask freezes (per layer, per parameter type) and how much two masks agree."""

import itertools
import json
import re
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

from maskrun.masks.select import layer_of, layer_order

PARAMETER_TYPES = ("embeddings", "attention", "MLP", "LayerNorm", "bias", "other")


def parameter_type(name: str) -> str:
    """One of PARAMETER_TYPES; LayerNorm and bias take precedence over the block a tensor sits in."""
    if re.search(r"LayerNorm|layer_norm|(^|\.)ln_", name):
        return "LayerNorm"
    if name.endswith("bias"):
        return "bias"
    if layer_of(name) == "embeddings":
        return "embeddings"
    if re.search(r"attention|attn", name):
        return "attention"
    if re.search(r"intermediate|\.output\.|mlp", name):
        return "MLP"
    return "other"


def frozen_share(masks: dict[str, torch.Tensor]) -> dict[str, list[dict]]:
    """Frozen and eligible entries, and their share, per layer (bottom to top) and per parameter type."""
    def tally(key) -> list[dict]:
        counts = {}
        for name, m in masks.items():
            frozen, eligible = counts.get(key(name), (0, 0))
            counts[key(name)] = (frozen + int(m.sum()), eligible + m.numel())
        return [{"name": group, "frozen": f, "eligible": e, "share": f / e} for group, (f, e) in counts.items()]

    per_layer = sorted(tally(layer_of), key=lambda row: layer_order(row["name"]))
    per_type = sorted(tally(parameter_type), key=lambda row: PARAMETER_TYPES.index(row["name"]))
    return {"layer": per_layer, "type": per_type}


def plot_frozen_share(shares: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (group, rows) in zip(axes, shares.items()):
        ax.bar([row["name"] for row in rows], [row["share"] for row in rows])
        ax.set(title=f"frozen share per {group}", ylim=(0, 1), ylabel="frozen / eligible")
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mask_report(run_dir: Path) -> list[str]:
    """Markdown lines for the run report (tables and plots/mask_frozen_share.png) from the run's mask.safetensors."""
    shares = frozen_share(load_file(run_dir / "mask.safetensors"))
    plot_frozen_share(shares, run_dir / "plots" / "mask_frozen_share.png")
    lines = []
    for group, rows in shares.items():
        lines += ["", f"| {group} | frozen | eligible | share |", "|---|---:|---:|---:|"]
        lines += [f"| {row['name']} | {row['frozen']:,} | {row['eligible']:,} | {row['share']:.3f} |" for row in rows]
    return lines + ["", "![plots/mask_frozen_share.png](plots/mask_frozen_share.png)"]


def mask_label(mask: dict) -> str:
    """A strategy as a sweep compares it: e.g. 'importance/gradient', 'random/per_tensor/row'."""
    parts = [mask["strategy"], mask.get("score")]
    parts += [mask.get("allocation") if mask.get("allocation") != "global" else None,
              mask.get("granularity") if mask.get("granularity") not in ("element", None) else None]
    return "/".join(p for p in parts if p)


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float | None:
    """|A ∩ B| / |A ∪ B| of the frozen entries over the tensors both masks cover; None if neither freezes any."""
    names = [name for name in a if name in b]
    both = sum(int((a[n] & b[n]).sum()) for n in names)
    either = sum(int((a[n] | b[n]).sum()) for n in names)
    return both / either if either else None


def mask_overlap(run_dirs: list[Path]) -> list[dict]:
    """Jaccard overlap between the frozen sets of different strategies at the same ratio, for a sweep report.

    Reads each run dir's metrics.json and mask.safetensors (runs that failed or have no mask are
    skipped). Two runs are compared when they share the requested ratio and the seed (so the same
    pretrained checkpoint) but differ in strategy label (see `mask_label`). Returns one row per
    (ratio, strategy a, strategy b), a < b, sorted: {"ratio", "a", "b", "jaccard", "pairs"} where
    jaccard is the mean over the pairs of runs compared (one per shared seed; None if neither
    froze anything) and pairs counts them. Random masks at ratio r overlap by about r / (2 - r).
    """
    runs = []
    for run_dir in map(Path, run_dirs):
        metrics_path, mask_path = run_dir / "metrics.json", run_dir / "mask.safetensors"
        if not (metrics_path.exists() and mask_path.exists()):
            continue
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("status") == "ok" and metrics.get("mask"):
            runs.append((metrics["mask"]["ratio"], metrics["seed"], mask_label(metrics["mask"]), mask_path))
    masks = {path: load_file(path) for *_, path in runs}
    pairs = {}
    for (ratio, seed, label_a, path_a), (ratio_b, seed_b, label_b, path_b) in itertools.combinations(sorted(runs), 2):
        if ratio != ratio_b or seed != seed_b or label_a == label_b:
            continue
        pairs.setdefault((ratio, *sorted((label_a, label_b))), []).append(jaccard(masks[path_a], masks[path_b]))
    rows = []
    for (ratio, label_a, label_b), values in sorted(pairs.items()):
        known = [v for v in values if v is not None]
        rows.append({"ratio": ratio, "a": label_a, "b": label_b,
                     "jaccard": statistics.mean(known) if known else None, "pairs": len(values)})
    return rows
