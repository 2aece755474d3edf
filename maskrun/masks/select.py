"""Exact selection: turn scores into a mask whose frozen share is the requested ratio.

Lower score = frozen first. Exactly tied scores are put in a seeded random order, uniform among
the tied entries (or rows, tensors), never in parameter order: the same seed gives the same
mask, and a tie split by the cut is settled by chance, which `Selection.tied` records (the
frozen entries whose score equals the cut's boundary value when the cut splits that tie group).
`allocation` says over which entries one threshold applies (all of them, each tensor, each
layer); `granularity` says what is frozen as a whole (an entry, a row = one output neuron, a
tensor). Tensors come neuron-major: a matrix's rows are its output neurons (see
`maskrun.masks.neuron_axes`). Counts are exact: at element granularity exactly
round(ratio * eligible) entries are frozen, each allocation unit within one entry of its share;
at row or tensor granularity each unit is within one row or tensor of its share.

Global element selection over a model's ~10^8 entries never concatenates or sorts them. A
strided sample brackets the k-th lowest score between two values. One pass over the tensors,
chunk by chunk, freezes every entry below the bracket and keeps the positions of the few inside
it; the k-th lowest score is the right order statistic of those, and the inside entries below
it are frozen too. The entries equal to it that the cut takes are drawn uniformly: their number
per chunk from a multivariate hypergeometric draw, then positions uniformly within each chunk.
Temporaries are bounded by the chunk size plus the bracket.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

ALLOCATIONS = ("global", "per_tensor", "per_layer")
GRANULARITIES = ("element", "row", "tensor")

CHUNK = 1 << 22  # entries per step of a pass: bounds its temporaries to a few MB at any model size
SAMPLE_STRIDE = 61  # a prime, so that the sample does not lock onto row or head boundaries
MIN_SAMPLE = 4096  # below this many sampled entries the bracket is simply everything
MAX_TIED = 10**9  # NumPy's multivariate hypergeometric draw ("marginals") takes fewer items than this


@dataclass
class Selection:
    """A mask per tensor (True = frozen) and how many frozen entries were chosen at random among exact ties."""

    masks: dict[str, torch.Tensor]
    tied: int = 0

    @property
    def tied_share(self) -> float:
        """The share of frozen entries chosen among exactly tied scores; 0.0 when nothing is frozen."""
        frozen = sum(int(m.sum()) for m in self.masks.values())
        return self.tied / frozen if frozen else 0.0


def freeze_lowest(scores: dict[str, torch.Tensor], ratio: float, allocation: str, granularity: str,
                  seed: int | np.random.Generator) -> Selection:
    """One bool mask per tensor of `scores`, True where frozen: the lowest-scoring share `ratio`.

    Ties are drawn from `seed`: a seed, or a generator of a stream the caller has split off its own.
    """
    rng = np.random.default_rng(seed)
    masks, tied = {}, 0
    groups = allocation_groups(list(scores), allocation)
    sizes = [sum(scores[name].numel() for name in group) for group in groups]
    if granularity == "element":
        for group, k in zip(groups, apportion(sizes, ratio, rng)):
            group_masks, group_tied = lowest_entries([scores[name] for name in group], k, rng)
            masks |= dict(zip(group, group_masks))
            tied += group_tied
    else:
        for group, size in zip(groups, sizes):
            selection = lowest_units({name: scores[name] for name in group}, ratio * size, granularity, rng)
            masks |= selection.masks
            tied += selection.tied
    return Selection(masks, tied)


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


def apportion(sizes: list[int], ratio: float, rng: np.random.Generator) -> list[int]:
    """Whole counts per unit summing to round(ratio * total), each within one of ratio * size.

    Largest remainder first; units with equal remainders take the extra entries in a random order.
    """
    quotas = [ratio * size for size in sizes]
    counts = [math.floor(q) for q in quotas]
    extra = round(ratio * sum(sizes)) - sum(counts)
    by_remainder = sorted(rng.permutation(len(sizes)), key=lambda i: counts[i] - quotas[i])  # a stable sort
    for i in by_remainder[:extra]:
        counts[i] += 1
    return [min(c, size) for c, size in zip(counts, sizes)]


def closest_prefix(sizes: list[int], target: float) -> int:
    """How many leading units to take so that their total size is closest to target (fewer on a tie)."""
    totals = np.concatenate([[0], np.cumsum(sizes)])
    return int(np.argmin(np.abs(totals - target)))


def lowest_units(scores: dict[str, torch.Tensor], target: float, granularity: str,
                 rng: np.random.Generator) -> Selection:
    """Freeze whole rows (or tensors), lowest mean score first, until the frozen entries come closest to target.

    Units of equal mean score are taken in a random order; `tied` counts the entries of the frozen
    units whose mean equals the last frozen unit's when a unit of that mean stays trainable.
    """
    units = {name: as_units(s, granularity) for name, s in scores.items()}
    # float64: the mean of a unit whose entries are equal is that value exactly, whatever the unit's width.
    unit_scores = torch.cat([u.double().mean(1) for u in units.values()])
    unit_sizes = np.concatenate([np.full(len(u), u.shape[1]) for u in units.values()])
    shuffled = torch.from_numpy(rng.permutation(len(unit_scores)))
    order = shuffled[torch.sort(unit_scores[shuffled], stable=True).indices]
    n_frozen = closest_prefix(unit_sizes[order.numpy()], target)
    frozen_units = torch.zeros(len(order), dtype=torch.bool)
    frozen_units[order[:n_frozen]] = True
    tied = 0
    if 0 < n_frozen < len(order):
        boundary = unit_scores[order[n_frozen - 1]]
        if unit_scores[order[n_frozen]] == boundary:
            tied = int(unit_sizes[(frozen_units & (unit_scores == boundary)).numpy()].sum())
    masks = {}
    for (name, u), unit_mask in zip(units.items(), frozen_units.split([len(u) for u in units.values()])):
        masks[name] = unit_mask[:, None].expand(u.shape).reshape(scores[name].shape)
    return Selection(masks, tied)


def as_units(s: torch.Tensor, granularity: str) -> torch.Tensor:
    """A 2-D view, one unit per row: a neuron-major matrix's output neurons; a vector's entries; or the whole tensor."""
    if granularity == "tensor":
        return s.reshape(1, -1)
    return s.reshape(s.shape[0], -1) if s.dim() > 1 else s.reshape(-1, 1)


def lowest_entries(scores: list[torch.Tensor], k: int, rng: np.random.Generator) -> tuple[list[torch.Tensor], int]:
    """Masks of exactly the k lowest entries over all `scores` (ties drawn uniformly), and the entries chosen among ties."""
    values = [s.detach().cpu().float().contiguous().view(-1).numpy() for s in scores]
    total = sum(v.size for v in values)
    if k == 0 or k >= total:
        return [torch.full(s.shape, k > 0) for s in scores], 0
    masks = [torch.empty(v.size, dtype=torch.bool) for v in values]  # the pass below writes every entry
    pieces = [(v[i:i + CHUNK], m.numpy()[i:i + CHUNK]) for v, m in zip(values, masks) for i in range(0, v.size, CHUNK)]
    tied = freeze_k_lowest(pieces, k, sample_bracket(values, k, total), rng)
    return [m.view(s.shape) for m, s in zip(masks, scores)], tied


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


def freeze_k_lowest(pieces: list[tuple[np.ndarray, np.ndarray]], k: int, bracket: tuple[float, float],
                    rng: np.random.Generator) -> int:
    """Write masks of exactly the k lowest entries of the (scores, mask) pieces, in one pass when the bracket holds.

    The pass freezes every entry below the bracket and keeps the positions and scores of those inside
    it; the k-th lowest score is the right order statistic of the kept ones. A bracket that missed
    is widened to that side and the pass repeated, so the result is exact whatever the sample said.
    Returns how many of the frozen entries were chosen among ties (0 when the cut splits none).
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
    masks = [mask for _, mask in pieces]
    if lo == hi:
        return freeze_among_ties(inside, lambda i: np.flatnonzero(pieces[i][0] == lo), masks, k - below, rng)
    kept = [v[p] for (v, _), p in zip(pieces, inside)]
    rank = k - below - 1
    if rank < 0:
        return 0
    threshold = np.partition(np.concatenate(kept), rank)[rank]
    for mask, positions, s in zip(masks, inside, kept):
        mask[positions[s < threshold]] = True
    ties = k - below - sum(np.count_nonzero(s < threshold) for s in kept)
    counts = [np.count_nonzero(s == threshold) for s in kept]
    return freeze_among_ties(counts, lambda i: inside[i][kept[i] == threshold], masks, ties, rng)


def freeze_among_ties(counts: list[int], tied_positions: Callable[[int], np.ndarray], masks: list[np.ndarray],
                      n: int, rng: np.random.Generator) -> int:
    """Freeze n entries drawn uniformly from the tied ones; the n chosen, or 0 when every tied entry is taken.

    counts[i] tied entries sit in piece i at tied_positions(i). How many of the n fall in each piece
    is a multivariate hypergeometric draw; within a piece they are drawn uniformly without replacement.
    """
    if sum(counts) >= MAX_TIED:
        raise ValueError(f"{sum(counts):,} entries tie exactly at the cut, more than the {MAX_TIED:,} a uniform draw "
                         f"among them supports (leave the tensors that hold them, e.g. unused embeddings, out with "
                         f"mask.exclude, or use mask.score=magnitude)")
    for i, take in enumerate(rng.multivariate_hypergeometric(counts, n)):
        if take:
            masks[i][rng.choice(tied_positions(i), size=take, replace=False)] = True
    return int(n) if n < sum(counts) else 0
