"""Plots of a sweep, one task at a time: what masking costs in accuracy and what it saves in forgetting."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, also on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ACCURACY, FORGETTING = "task.test.accuracy", "interference.forgetting"
LABELS = {ACCURACY: "test accuracy", FORGETTING: "forgetting (MLM loss after − before)"}


def curves(table: pd.DataFrame):
    """One curve per strategy (and per other swept setting), sorted by ratio."""
    for (strategy, setting), curve in table.groupby(["mask.strategy", "setting"], dropna=False):
        yield f"{strategy} {setting}".strip(), curve.sort_values("mask.ratio")


def metric_vs_ratio(table: pd.DataFrame, metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, curve in curves(table):
        ax.errorbar(curve["mask.ratio"], curve[f"{metric} mean"], yerr=curve[f"{metric} std"].fillna(0),
                    marker="o", capsize=3, label=label)
    ax.set(xlabel="mask ratio (fraction frozen)", ylabel=LABELS[metric], title=f"{LABELS[metric]} vs ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_vs_forgetting(table: pd.DataFrame, front: pd.Series, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, curve in curves(table):
        ax.errorbar(curve[f"{FORGETTING} mean"], curve[f"{ACCURACY} mean"], xerr=curve[f"{FORGETTING} std"].fillna(0),
                    yerr=curve[f"{ACCURACY} std"].fillna(0), fmt="o", capsize=3, label=label)
        for _, row in curve.iterrows():
            ax.annotate(f"{row['mask.ratio']:g}", (row[f"{FORGETTING} mean"], row[f"{ACCURACY} mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    best = table[front].sort_values(f"{FORGETTING} mean")
    ax.plot(best[f"{FORGETTING} mean"], best[f"{ACCURACY} mean"], "k--", lw=1, marker="o", ms=12, mfc="none",
            label="Pareto front")
    ax.set(xlabel=LABELS[FORGETTING] + " (lower is better)", ylabel=LABELS[ACCURACY],
           title="accuracy vs forgetting (labels: ratio)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_plots(sweep_dir: Path, task: str, table: pd.DataFrame, front: pd.Series) -> list[str]:
    """Draws the task's plots into sweep_dir/plots; returns their paths relative to sweep_dir."""
    (sweep_dir / "plots").mkdir(exist_ok=True)
    drawn = []
    for metric, name in ((ACCURACY, "accuracy_vs_ratio"), (FORGETTING, "forgetting_vs_ratio")):
        if table[f"{metric} mean"].notna().any():
            drawn.append(f"plots/{task}_{name}.png")
            metric_vs_ratio(table, metric, sweep_dir / drawn[-1])
    if table[f"{FORGETTING} mean"].notna().any():
        drawn.append(f"plots/{task}_accuracy_vs_forgetting.png")
        accuracy_vs_forgetting(table, front, sweep_dir / drawn[-1])
    return drawn
