"""Cluster the rows (neurons) of each tensor by their weight vectors; freeze the less important members of each cluster.

Within a cluster of n rows ranked by importance (mean score of the row, least first), the row of
rank j gets the freezing priority (j + 0.5) / n, and the cluster's most important row is pushed
behind every other row (priority + 1). Selecting the lowest priorities, whole rows at a time,
freezes each cluster in proportion to its size, least important first, and leaves every cluster
a trainable representative unless the ratio is above 1 - clusters/rows. A vector (bias,
LayerNorm) is clustered by its entries, each entry being one neuron.
"""

import warnings

import torch

from maskrun.masks import select

NEEDS_SCORES = True
ALLOCATIONS = select.ALLOCATIONS
GRANULARITIES = ("row",)


def build(mcfg, params: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    priorities = {}
    for name, p in params.items():
        rows = select.as_units(p, "row")
        labels = cluster_rows(rows, mcfg.clusters, seed)
        importance = select.as_units(scores[name], "row").float().mean(1)
        priority = cluster_priority(labels, importance)
        priorities[name] = priority[:, None].expand(rows.shape).reshape(p.shape)
    return select.freeze_lowest(priorities, mcfg.ratio, mcfg.allocation, "row")


def cluster_rows(rows: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """k-means cluster label of each row (at most one cluster per row)."""
    from sklearn.cluster import KMeans  # imported here: it takes seconds, and only this strategy needs it
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # identical rows can leave fewer distinct clusters
        kmeans = KMeans(n_clusters=min(clusters, len(rows)), n_init=1, random_state=seed)
        return torch.from_numpy(kmeans.fit_predict(rows.detach().cpu().float().numpy())).long()


def cluster_priority(labels: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Freezing priority of each row: its rank within its cluster over the cluster size; representatives last."""
    priority = torch.empty(len(labels))
    for cluster in labels.unique():
        members = (labels == cluster).nonzero().squeeze(1)
        ranked = members[torch.sort(importance[members], stable=True).indices]
        priority[ranked] = (torch.arange(len(ranked)) + 0.5) / len(ranked)
        priority[ranked[-1]] += 1
    return priority
