"""Plots of a sweep, one task at a time: what masking costs in the task's metric (accuracy, learning or exact match:
maskrun.report.task_metric) and what it saves in forgetting, and how every method's metric–forgetting front compares.

In the plots against the frozen share, each mask setting sits at the share of entries its masks
actually froze (whole layers or whole tensors can realize much less or more than the requested
ratio; a mask that moves while training, at the share it froze per step), labelled with the requested ratio. Elsewhere points are labelled with their method's dial
value (a mask's dial is its requested ratio).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, also on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from maskrun.report.task_metric import ACCURACY, TASK_METRICS, TaskMetric  # noqa: E402

REALIZED = "mask.ratio_actual"
VALIDATION_FORGETTING, TEST_FORGETTING = "interference.validation.forgetting", "interference.forgetting"
BENCHMARK_FORGETTING = "interference.benchmark_forgetting"  # maskrun.benchmarks: mean score drop
LABELS = {  # axis label of each plotted column of summary.csv
    **{metric.validation: f"validation {metric.axis}" for metric in TASK_METRICS.values()},
    **{metric.test: f"test {metric.axis}" for metric in TASK_METRICS.values()},
    VALIDATION_FORGETTING: "validation forgetting (pretraining loss after − before)",
    TEST_FORGETTING: "test forgetting (pretraining loss after − before)",
    BENCHMARK_FORGETTING: "benchmark forgetting (mean score before − after)",
}


def curves(table: pd.DataFrame):
    """One curve per method label (per strategy for masks) and per other swept setting, in order of realized share."""
    for (label, setting), curve in table.groupby(["label", "setting"], dropna=False):
        yield f"{label} {setting}".strip(), curve.sort_values([f"{REALIZED} mean", "mask.ratio"])


def label_dial_values(ax, curve: pd.DataFrame, x: str, y: str) -> None:
    """Each point's dial value (a mask's requested ratio) beside it; settings on the same point share one label."""
    for (px, py), points in curve.groupby([x, y], sort=False):
        ax.annotate(",".join(dial.partition("=")[2] for dial in points["dial"]), (px, py), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")


def draw_metric_vs_share(ax, table: pd.DataFrame, metric: str) -> None:
    """Mask settings only: the other methods freeze nothing, so they have no share to be placed at."""
    for label, curve in curves(table[table["method"] == "mask"]):
        ax.errorbar(curve[f"{REALIZED} mean"], curve[f"{metric} mean"], xerr=curve[f"{REALIZED} std"].fillna(0),
                    yerr=curve[f"{metric} std"].fillna(0), marker="o", capsize=3, label=label)
        label_dial_values(ax, curve, f"{REALIZED} mean", f"{metric} mean")
    ax.set(xlabel="realized frozen share (labels: requested ratio)", ylabel=LABELS[metric],
           title="per strategy, at the share its masks froze")
    ax.legend(fontsize=8)


def draw_accuracy_vs_forgetting(ax, table: pd.DataFrame, front: pd.Series, metric: TaskMetric = ACCURACY) -> None:
    """On the validation metrics, where the front is chosen."""
    x, y = f"{VALIDATION_FORGETTING} mean", f"{metric.validation} mean"
    for label, curve in curves(table):
        ax.errorbar(curve[x], curve[y], xerr=curve[f"{VALIDATION_FORGETTING} std"].fillna(0),
                    yerr=curve[f"{metric.validation} std"].fillna(0), fmt="o", capsize=3, label=label)
        label_dial_values(ax, curve, x, y)
    best = table[front].sort_values(x)
    ax.plot(best[x], best[y], "k--", lw=1, marker="o", ms=12, mfc="none", label="Pareto front")
    ax.set(xlabel=LABELS[VALIDATION_FORGETTING] + ", lower is better", ylabel=LABELS[metric.validation],
           title=f"{metric.name} vs forgetting (labels: dial value)")
    ax.legend(fontsize=8)


def draw_method_fronts(ax, fronts: dict[str, pd.DataFrame], levels: list[float], metric: TaskMetric = ACCURACY,
                       forgetting: str = TEST_FORGETTING) -> None:
    """Each method's front at its validation metric (where fronts are chosen and matched) and its `forgetting`
    (reported: test forgetting, or benchmark forgetting), with the std over seeds of both as error bars; dotted lines
    at the metric's levels compared."""
    x, y = f"{metric.validation} mean", f"{forgetting} mean"
    for label, front in fronts.items():
        ax.errorbar(front[x], front[y], xerr=front[f"{metric.validation} std"].fillna(0),
                    yerr=front[f"{forgetting} std"].fillna(0), marker="o", capsize=3, label=label)
        label_dial_values(ax, front, x, y)
    for level in levels:
        ax.axvline(level, color="grey", ls=":", lw=0.8)
    ax.set(xlabel=f"{LABELS[metric.validation]} (chooses and matches)", ylabel=f"{LABELS[forgetting]}, lower is better")
    ax.set_title(f"each method's front (labels: dial value)\ndotted: the {metric.name} levels compared", fontsize=9)
    ax.legend(fontsize=8)


def sweep_plots(sweep_dir: Path, task: str, table: pd.DataFrame, front: pd.Series, metric: TaskMetric) -> list[str]:
    """Draws the task's plots into sweep_dir/plots, named after its metric (e.g. <task>_learning_vs_ratio.png);
    returns their paths relative to sweep_dir."""
    (sweep_dir / "plots").mkdir(exist_ok=True)
    drawn = []
    masks = table[table["method"] == "mask"]
    for column, name in ((metric.test, f"{metric.key}_vs_ratio"), (TEST_FORGETTING, "forgetting_vs_ratio")):
        if masks[f"{column} mean"].notna().any():
            drawn.append(save(sweep_dir, f"plots/{task}_{name}.png", draw_metric_vs_share, table, column))
    if front.any():
        drawn.append(save(sweep_dir, f"plots/{task}_{metric.key}_vs_forgetting.png", draw_accuracy_vs_forgetting,
                          table, front, metric))
    return drawn


def method_fronts_plot(sweep_dir: Path, task: str, fronts: dict[str, pd.DataFrame], levels: list[float],
                       metric: TaskMetric, forgetting: str = TEST_FORGETTING) -> str:
    """Draws plots/<task>_method_fronts.png (test forgetting) or <task>_method_fronts_benchmarks.png (benchmark
    forgetting); returns its path relative to sweep_dir."""
    (sweep_dir / "plots").mkdir(exist_ok=True)
    name = "method_fronts" if forgetting == TEST_FORGETTING else "method_fronts_benchmarks"
    return save(sweep_dir, f"plots/{task}_{name}.png", draw_method_fronts, fronts, levels, metric, forgetting)


def save(sweep_dir: Path, path: str, draw, *args) -> str:
    """One figure drawn by draw(ax, *args), saved at sweep_dir/path; returns path."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    draw(ax, *args)
    fig.tight_layout()
    fig.savefig(sweep_dir / path, dpi=110)
    plt.close(fig)
    return path
