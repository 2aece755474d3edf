"""Cluster the rows (neurons) of each tensor by their weight vectors; freeze the less important members of each cluster.

Within a cluster of n rows ranked by importance (mean score of the row, least first; rows of equal
importance in a seeded random order), the row of rank j gets the freezing priority (j + 0.5) / n,
and the cluster's most important row is pushed behind every other row (priority + 1). Selecting
the lowest priorities, whole rows at a time, freezes each cluster in proportion to its size, least
important first, and leaves every cluster a trainable representative unless the ratio is above
1 - clusters/rows. A vector (bias, LayerNorm) is clustered by its entries, each entry being one
neuron.

The frozen rows of a cluster are the first of its ranking; `tied` counts the entries of those
whose importance equals the last frozen row's while a row of that importance stays trainable.
(Rows of equal priority in different clusters are also taken in a random order, but a priority is
a rank within a cluster, not a score, so those draws are not counted.)
"""

import warnings

import numpy as np
import torch

from maskrun.masks import select

NEEDS_SCORES = True
ALLOCATIONS = select.ALLOCATIONS
GRANULARITIES = ("row",)


def build(mcfg, params: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], seed: int) -> select.Selection:
    # Two independent streams: ranking rows within clusters, then the cut's own draws among equal priorities.
    rank_rng, select_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    priorities, clusters = {}, {}
    for name, p in params.items():
        rows = select.as_units(p, "row")
        labels = cluster_rows(rows, mcfg.clusters, seed)
        importance = select.as_units(scores[name], "row").double().mean(1)
        priority = cluster_priority(labels, importance, rank_rng)
        priorities[name] = priority[:, None].expand(rows.shape).reshape(p.shape)
        clusters[name] = labels, importance
    selection = select.freeze_lowest(priorities, mcfg.ratio, mcfg.allocation, "row", select_rng)
    tied = 0
    for name, (labels, importance) in clusters.items():
        frozen_rows = select.as_units(selection.masks[name], "row")
        tied += tied_rows(labels, importance, frozen_rows.all(1)) * frozen_rows.shape[1]
    return select.Selection(selection.masks, tied)


def cluster_rows(rows: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """k-means cluster label of each row (at most one cluster per row)."""
    from sklearn.cluster import KMeans  # imported here: it takes seconds, and only this strategy needs it
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # identical rows can leave fewer distinct clusters
        kmeans = KMeans(n_clusters=min(clusters, len(rows)), n_init=1, random_state=seed)
        return torch.from_numpy(kmeans.fit_predict(rows.detach().cpu().float().numpy())).long()


def cluster_priority(labels: torch.Tensor, importance: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Freezing priority of each row: its rank within its cluster over the cluster size; representatives last."""
    priority = torch.empty(len(labels))
    for cluster in labels.unique():
        members = (labels == cluster).nonzero().squeeze(1)
        members = members[torch.from_numpy(rng.permutation(len(members)))]  # equal importance: a random order
        ranked = members[torch.sort(importance[members], stable=True).indices]
        priority[ranked] = (torch.arange(len(ranked)) + 0.5) / len(ranked)
        priority[ranked[-1]] += 1
    return priority


def tied_rows(labels: torch.Tensor, importance: torch.Tensor, frozen: torch.Tensor) -> int:
    """Frozen rows chosen among rows of equal importance at their cluster's cut."""
    tied = 0
    for cluster in labels.unique():
        members = labels == cluster
        frozen_importance, trainable_importance = importance[members & frozen], importance[members & ~frozen]
        if len(frozen_importance) and len(trainable_importance):
            boundary = frozen_importance.max()
            if bool((trainable_importance == boundary).any()):
                tied += int((frozen_importance == boundary).sum())
    return tied
