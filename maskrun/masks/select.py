"""Exact selection: turn scores into a mask whose frozen share is the requested ratio.

Lower score = frozen first; ties are broken by position (parameter order, then flat index), so
the same scores always give the same mask. `allocation` says over which entries one threshold
applies (all of them, each tensor, each layer); `granularity` says what is frozen as a whole
(an entry, a row = one output neuron, a tensor). Counts are exact: at element granularity
exactly round(ratio * eligible) entries are frozen, each allocation unit within one entry of
its share; at row or tensor granularity each unit is within one row or tensor of its share.

Global element selection over a model's ~10^8 entries never concatenates or sorts them. A
strided sample brackets the k-th lowest score between two values. One pass over the tensors,
chunk by chunk, freezes every entry below the bracket and keeps the positions of the few inside
it; the k-th lowest score is the right order statistic of those, and the inside entries below
it, then those equal to it in position order, are frozen too. Temporaries are bounded by the
chunk size plus the bracket.
"""

import math
import re

import numpy as np
import torch

ALLOCATIONS = ("global", "per_tensor", "per_layer")
GRANULARITIES = ("element", "row", "tensor")

CHUNK = 1 << 22  # entries per step of a pass: bounds its temporaries to a few MB at any model size
SAMPLE_STRIDE = 61  # a prime, so that the sample does not lock onto row or head boundaries
MIN_SAMPLE = 4096  # below this many sampled entries the bracket is simply everything


def freeze_lowest(scores: dict[str, torch.Tensor], ratio: float, allocation: str = "global",
                  granularity: str = "element") -> dict[str, torch.Tensor]:
    """One bool mask per tensor of `scores`, True where frozen: the lowest-scoring share `ratio`."""
    masks = {}
    groups = allocation_groups(list(scores), allocation)
    sizes = [sum(scores[name].numel() for name in group) for group in groups]
    if granularity == "element":
        for group, k in zip(groups, apportion(sizes, ratio)):
            masks |= dict(zip(group, lowest_entries([scores[name] for name in group], k)))
    else:
        for group, size in zip(groups, sizes):
            masks |= lowest_units({name: scores[name] for name in group}, ratio * size, granularity)
    return masks


def allocation_groups(names: list[str], allocation: str) -> list[list[str]]:
    """The sets of tensors that share one threshold, each in parameter order."""
    if allocation == "global":
        return [names]
    if allocation == "per_tensor":
        return [[name] for name in names]
    if allocation == "per_layer":
        layers = {}
        for name in names:
            layers.setdefault(layer_of(name), []).append(name)
        return list(layers.values())
    raise ValueError(f"unknown allocation {allocation!r}")


def layer_of(name: str) -> str:
    """'embeddings', 'layer N' for the N-th transformer block, or 'other' (e.g. the pooler)."""
    block = re.search(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.", name)
    if block:
        return f"layer {block.group(1)}"
    if re.search(r"embed|\bwte\b|\bwpe\b", name):
        return "embeddings"
    return "other"


def layer_order(layer: str) -> tuple[int, int]:
    """Bottom to top: embeddings, layer 0, layer 1, ..., then everything else."""
    if layer == "embeddings":
        return (0, 0)
    if layer.startswith("layer "):
        return (1, int(layer.split()[1]))
    return (2, 0)


def apportion(sizes: list[int], ratio: float) -> list[int]:
    """Whole counts per unit summing to round(ratio * total), each within one of ratio * size (largest remainder)."""
    quotas = [ratio * size for size in sizes]
    counts = [math.floor(q) for q in quotas]
    extra = round(ratio * sum(sizes)) - sum(counts)
    by_remainder = sorted(range(len(sizes)), key=lambda i: counts[i] - quotas[i])  # stable: ties by position
    for i in by_remainder[:extra]:
        counts[i] += 1
    return [min(c, size) for c, size in zip(counts, sizes)]


def closest_prefix(sizes: list[int], target: float) -> int:
    """How many leading units to take so that their total size is closest to target (fewer on a tie)."""
    totals = np.concatenate([[0], np.cumsum(sizes)])
    return int(np.argmin(np.abs(totals - target)))


def lowest_units(scores: dict[str, torch.Tensor], target: float, granularity: str) -> dict[str, torch.Tensor]:
    """Freeze whole rows (or tensors), lowest mean score first, until the frozen entries come closest to target."""
    units = {name: as_units(s, granularity) for name, s in scores.items()}
    unit_scores = torch.cat([u.float().mean(1) for u in units.values()])
    unit_sizes = np.concatenate([np.full(len(u), u.shape[1]) for u in units.values()])
    order = torch.sort(unit_scores, stable=True).indices
    frozen_units = torch.zeros(len(order), dtype=torch.bool)
    frozen_units[order[:closest_prefix(unit_sizes[order.numpy()], target)]] = True
    masks = {}
    for (name, u), unit_mask in zip(units.items(), frozen_units.split([len(u) for u in units.values()])):
        masks[name] = unit_mask[:, None].expand(u.shape).reshape(scores[name].shape)
    return masks


def as_units(s: torch.Tensor, granularity: str) -> torch.Tensor:
    """A 2-D view, one unit per row: a matrix's output neurons; a vector's entries (its neurons); or the whole tensor."""
    if granularity == "tensor":
        return s.reshape(1, -1)
    return s.reshape(s.shape[0], -1) if s.dim() > 1 else s.reshape(-1, 1)


def lowest_entries(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Masks of exactly the k lowest entries over all `scores`, ties broken by position."""
    values = [s.detach().cpu().float().contiguous().view(-1).numpy() for s in scores]
    total = sum(v.size for v in values)
    if k == 0 or k >= total:
        return [torch.full(s.shape, k > 0) for s in scores]
    masks = [torch.empty(v.size, dtype=torch.bool) for v in values]  # the pass below writes every entry
    pieces = [(v[i:i + CHUNK], m.numpy()[i:i + CHUNK]) for v, m in zip(values, masks) for i in range(0, v.size, CHUNK)]
    freeze_k_lowest(pieces, k, sample_bracket(values, k, total))
    return [m.view(s.shape) for m, s in zip(masks, scores)]


def sample_bracket(values: list[np.ndarray], k: int, total: int) -> tuple[float, float]:
    """Two scores that very likely enclose the k-th lowest: sample quantiles a few standard errors apart."""
    sample = np.concatenate([v[::SAMPLE_STRIDE] for v in values])
    if sample.size < MIN_SAMPLE:
        return -math.inf, math.inf
    rank = k / total * sample.size
    margin = 6 * math.sqrt(rank * (1 - rank / sample.size)) + 2
    lo, hi = (min(max(int(r), 0), sample.size - 1) for r in (rank - margin, rank + margin + 1))
    part = np.partition(sample, [lo, hi])
    return float(part[lo]), float(part[hi])


def freeze_k_lowest(pieces: list[tuple[np.ndarray, np.ndarray]], k: int, bracket: tuple[float, float]) -> None:
    """Write masks of exactly the k lowest entries of the (scores, mask) pieces, in one pass when the bracket holds.

    The pass freezes every entry below the bracket and keeps the positions and scores of those inside
    it; the k-th lowest score is the right order statistic of the kept ones. A bracket that missed
    is widened to that side and the pass repeated, so the result is exact whatever the sample said.
    """
    lo, hi = bracket
    scratch = np.empty(max(v.size for v, _ in pieces), dtype=bool)  # reused: fresh pages per chunk cost more
    while True:
        below, inside = 0, []
        for v, mask in pieces:
            np.less(v, lo, out=mask)
            below += np.count_nonzero(mask)
            in_bracket = np.less_equal(v, hi, out=scratch[:v.size])
            in_bracket ^= mask
            # An all-equal bracket (a mass of tied scores) keeps counts only: the ties are placed below.
            positions = np.flatnonzero(in_bracket) if lo < hi else np.count_nonzero(in_bracket)
            inside.append(positions)
        n_inside = sum(np.size(p) if lo < hi else p for p in inside)
        if k < below:
            lo, hi = -math.inf, lo
        elif k > below + n_inside:
            lo, hi = hi, math.inf
        else:
            break
    if lo == hi:
        freeze_ties(pieces, lo, k - below)
        return
    kept = [v[p] for (v, _), p in zip(pieces, inside)]
    rank = k - below - 1
    threshold = np.partition(np.concatenate(kept), rank)[rank] if rank >= 0 else -math.inf
    ties = k - below - sum(np.count_nonzero(s < threshold) for s in kept)
    for (_, mask), positions, s in zip(pieces, inside, kept):
        mask[positions[s < threshold]] = True
        tied = positions[s == threshold][:ties]
        mask[tied] = True
        ties -= tied.size


def freeze_ties(pieces: list[tuple[np.ndarray, np.ndarray]], value: float, count: int) -> None:
    """Freeze the first `count` entries equal to `value`, in position order."""
    for v, mask in pieces:
        if count == 0:
            break
        tied = np.flatnonzero(v == value)[:count]
        mask[tied] = True
        count -= tied.size
