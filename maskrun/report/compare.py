"""Methods compared across a sweep's jobs: which interference measure tracks forgetting, and how much each
method forgets at the same validation accuracy.

A method's points are its settings (one per dial value, mean over seeds); its front is the points that no
other point of the same method beats on both validation accuracy and validation forgetting. Fronts are
compared at common validation accuracy levels by linear interpolation along each front, never beyond it.
Validation chooses; test forgetting is reported beside.

"Accuracy" here is the task's metric (`metric`, maskrun.report.task_metric): accuracy, learning or exact match,
higher is better in each; "matched accuracy" is the project's name for the comparison whatever the metric.
"""

import numpy as np
import pandas as pd

from maskrun.report.plots import BENCHMARK_FORGETTING, TEST_FORGETTING, VALIDATION_FORGETTING
from maskrun.report.task_metric import ACCURACY, TaskMetric

# Column of summary.csv: its name in the report. Each is correlated with test forgetting across the ok jobs.
MEASURES = {
    "interference.kl_task": "KL on task inputs (kl_task)",
    "interference.cka": "CKA",
    "interference.drift_l2": "drift L2",
    "trainable_share": "trainable share",
    BENCHMARK_FORGETTING: "benchmark forgetting",
}
MIN_JOBS_FOR_CORRELATION = 3  # two jobs always rank-correlate at ±1
LEVELS = 6
NOT_REACHED = "not reached"


def method_label(method: str, strategy: str) -> str:
    """`mask/<strategy>` for masking (one curve per strategy), the method's name otherwise, with its mask if it has one.
    A mask job with strategy none stays `mask/none`: only a method=full job is full fine-tuning."""
    if method == "mask":
        return f"mask/{strategy}"
    return method if strategy == "none" else f"{method}+mask/{strategy}"


def spearman(x: pd.Series, y: pd.Series) -> tuple[float, int]:
    """Spearman's rank correlation over the jobs that recorded both (ties get their average rank), and their count;
    NaN when fewer than MIN_JOBS_FOR_CORRELATION jobs or a constant measure leave nothing to rank."""
    pairs = pd.concat([pd.to_numeric(x, errors="coerce"), pd.to_numeric(y, errors="coerce")], axis=1).dropna()
    if len(pairs) < MIN_JOBS_FOR_CORRELATION:
        return float("nan"), len(pairs)
    ranks = pairs.rank()
    return float(ranks.iloc[:, 0].corr(ranks.iloc[:, 1])), len(pairs)


def correlations(ok_jobs: pd.DataFrame) -> list[tuple[str, float, int]]:
    """(measure, Spearman ρ with test forgetting, jobs) for each interference measure."""
    missing = pd.Series(index=ok_jobs.index, dtype=float)  # a measure no job recorded
    forgetting = ok_jobs.get(TEST_FORGETTING, missing)
    return [(name, *spearman(ok_jobs.get(column, missing), forgetting)) for column, name in MEASURES.items()]


def pareto_front(table: pd.DataFrame, metric: TaskMetric = ACCURACY) -> pd.Series:
    """True for the settings no other setting beats on both validation accuracy (higher) and validation
    forgetting (lower); a setting without either is not on it."""
    acc, forget = table[f"{metric.validation} mean"], table[f"{VALIDATION_FORGETTING} mean"]
    dominated = [((acc >= a) & (forget <= f) & ((acc > a) | (forget < f))).any() for a, f in zip(acc, forget)]
    return ~pd.Series(dominated, index=table.index) & acc.notna() & forget.notna()


def method_fronts(table: pd.DataFrame, metric: TaskMetric = ACCURACY) -> dict[str, pd.DataFrame]:
    """Each method label's front over its own points, in order of validation accuracy; labels without one are left
    out (they recorded no validation forgetting)."""
    fronts = {}
    for label, points in table.groupby("label", sort=True):
        front = points[pareto_front(points, metric)].sort_values(f"{metric.validation} mean")
        if not front.empty:
            fronts[label] = front
    return fronts


def accuracy_range(front: pd.DataFrame, metric: TaskMetric) -> tuple[float, float]:
    accuracy = front[f"{metric.validation} mean"]
    return float(accuracy.min()), float(accuracy.max())


def common_accuracy(fronts: dict[str, pd.DataFrame], metric: TaskMetric) -> tuple[float, float] | None:
    """The validation accuracies every front spans: from the highest front minimum to the lowest front maximum (the
    highest accuracy every method reaches); None when no accuracy lies on every front."""
    low = max(accuracy_range(front, metric)[0] for front in fronts.values())
    high = min(accuracy_range(front, metric)[1] for front in fronts.values())
    return (low, high) if low <= high else None


def accuracy_levels(fronts: dict[str, pd.DataFrame], metric: TaskMetric) -> list[float]:
    """LEVELS evenly spaced validation accuracies from the lowest to the highest on any front, and the accuracy the
    headline compares at; a method whose front does not span a level shows "not reached" there."""
    low = min(accuracy_range(front, metric)[0] for front in fronts.values())
    high = max(accuracy_range(front, metric)[1] for front in fronts.values())
    compared = headline_level(fronts, metric)
    return sorted(set(np.linspace(low, high, LEVELS).tolist()) | ({compared} if compared is not None else set()))


def headline_level(fronts: dict[str, pd.DataFrame], metric: TaskMetric) -> float | None:
    """The highest accuracy every front spans; else the highest all but the lowest-reaching fronts span."""
    shared = fronts if common_accuracy(fronts, metric) is not None else reaching_most(fronts, metric)
    return common_accuracy(shared, metric)[1] if shared else None


def at_accuracy(front: pd.DataFrame, level: float, column: str, metric: TaskMetric = ACCURACY) -> float | None:
    """The column's mean linearly interpolated along the front at validation accuracy `level`; None outside the
    front's accuracy range (no extrapolation). Front points of equal accuracy count as their mean."""
    low, high = accuracy_range(front, metric)
    if not low <= level <= high:
        return None
    points = front.groupby(f"{metric.validation} mean")[f"{column} mean"].mean()
    return float(np.interp(level, points.index, points.values))


def least_forgetting(fronts: dict[str, pd.DataFrame], level: float, metric: TaskMetric) -> str:
    """Which front forgets least at validation accuracy `level` (validation forgetting; test beside), against the rest."""
    forgetting = {label: (at_accuracy(front, level, VALIDATION_FORGETTING, metric),
                          at_accuracy(front, level, TEST_FORGETTING, metric))
                  for label, front in fronts.items()}
    best = min(forgetting, key=lambda label: forgetting[label][0])
    others = " and ".join(f"{label} {validation:.4f} (test {test:.4f})" for label, (validation, test) in
                          forgetting.items() if label != best)
    validation, test = forgetting[best]
    return f"{best} forgets least: validation forgetting {validation:.4f} (test {test:.4f}), against {others}"


def reaching_most(fronts: dict[str, pd.DataFrame], metric: TaskMetric) -> dict[str, pd.DataFrame]:
    """The fronts left when those that stop lowest in accuracy are set aside, one at a time, until the rest share an
    accuracy; empty when fewer than two would be left."""
    kept = dict(fronts)
    while len(kept) > 2 and common_accuracy(kept, metric) is None:
        del kept[min(kept, key=lambda label: accuracy_range(kept[label], metric)[1])]
    return kept if common_accuracy(kept, metric) is not None else {}


def headline(task: str, fronts: dict[str, pd.DataFrame], labels: list[str], unfinished: list[str] = (),
             metric: TaskMetric = ACCURACY) -> str:
    """One sentence: which method forgets least (validation forgetting, test beside) at the highest validation
    accuracy every method reaches, or why that cannot be said (and then, when most methods do share an accuracy,
    which of those forgets least there). Methods none of whose jobs finished are named as left out."""
    start = f"**Matched accuracy on {task}**: "
    if unfinished:
        start += f"({', '.join(unfinished)}: no job finished, left out) "
    if not fronts:
        return start + (f"no method can be compared at matched {metric.name}: no setting recorded both validation "
                        f"{metric.name} and validation forgetting.")
    if len(labels) == 1:
        return start + (f"only one method ({labels[0]}) ran, so there is nothing to compare it with at matched "
                        f"{metric.name}.")
    left_out = [label for label in labels if label not in fronts]
    if left_out:
        return start + (f"{', '.join(left_out)} recorded no validation forgetting, so not every method can be compared "
                        f"at matched {metric.name}.")
    common = common_accuracy(fronts, metric)
    if common is not None:
        return start + (f"at validation {metric.name} {common[1]:.4f}, the highest every method reaches, "
                        f"{least_forgetting(fronts, common[1], metric)}.")
    spans = ", ".join(f"{label} {low:.4f}–{high:.4f}" for label, (low, high) in
                      ((label, accuracy_range(front, metric)) for label, front in fronts.items()))
    sentence = (f"no validation {metric.name} lies on every method's front (their ranges: {spans}), so no method can "
                f"be said to forget least at {metric.indefinite} every method reaches")
    most = reaching_most(fronts, metric)
    if not most:
        return start + sentence + "."
    level = common_accuracy(most, metric)[1]
    below = ", ".join(label for label in fronts if label not in most)
    return start + (f"{sentence}; at validation {metric.name} {level:.4f}, the highest all but {below} reach, "
                    f"{least_forgetting(most, level, metric)}.")
