"""The sweep report: summary.csv, report.md and plots/*.png in the sweep dir, and a rich table.

It reads only the job dirs' metrics.json files, so it can be rebuilt at any time, also for a
crashed or partial sweep: a job dir that Hydra started but that holds no metrics.json is a row
with status `incomplete`.
"""

import json
from pathlib import Path

import pandas as pd
import yaml
from rich.table import Table

from maskrun.masks.analytics import mask_overlap
from maskrun.progress import console
from maskrun.report import plots

REALIZED = plots.REALIZED
VALIDATION_ACCURACY, VALIDATION_FORGETTING = plots.VALIDATION_ACCURACY, plots.VALIDATION_FORGETTING
TEST_ACCURACY, TEST_FORGETTING = plots.TEST_ACCURACY, plots.TEST_FORGETTING
METRICS = {  # column of summary.csv: its name in the report. Validation chooses, test is reported.
    VALIDATION_ACCURACY: "validation accuracy",
    TEST_ACCURACY: "test accuracy",
    "task.test.macro_f1": "test macro-F1",
    VALIDATION_FORGETTING: "validation forgetting",
    TEST_FORGETTING: "test forgetting",
    "interference.cka": "CKA",
    "interference.drift_l2": "drift L2",
}
SETTING = ["task.name", "mask.strategy", "mask.ratio", "setting"]  # one group of seeds; mask.ratio as requested
CHOOSING = ("Settings are chosen on validation metrics: the best setting has the highest mean validation accuracy, "
            "and the Pareto front is drawn on validation accuracy and validation forgetting. Test metrics are "
            "reported beside them and never used to choose.")
RATIOS = ("`ratio` is the requested `mask.ratio`, `realized` the share of eligible entries actually frozen "
          "(`mask.ratio_actual`, mean over seeds); the plots place each setting at its realized share.")


def is_sweep_dir(path: Path) -> bool:
    return (path / "multirun.yaml").is_file()  # Hydra writes it when the sweep starts


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job dir of the sweep (Hydra writes .hydra/ into each), in job order."""
    dirs = {p.parent for p in sweep_dir.rglob("metrics.json")} | {p.parent for p in sweep_dir.rglob(".hydra")}
    dirs.discard(sweep_dir)
    return sorted(dirs, key=lambda d: [int(part) if part.isdigit() else part for part in d.relative_to(sweep_dir).parts])


def load_job(job_dir: Path) -> dict:
    if (job_dir / "metrics.json").exists():
        return json.loads((job_dir / "metrics.json").read_text())
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    return {"status": "incomplete", "error": "no metrics.json: the job did not finish", "overrides": overrides}


def summary_table(sweep_dir: Path) -> pd.DataFrame:
    """One row per job: job dir, overrides, choices, status, error and every metric, flattened."""
    dirs = job_dirs(sweep_dir)
    jobs = [load_job(d) for d in dirs]
    frame = pd.json_normalize(jobs) if jobs else pd.DataFrame(columns=["status", "error", "overrides"])
    frame.insert(0, "job", [str(d.relative_to(sweep_dir)) for d in dirs])
    frame["setting"] = varying_overrides([job.get("overrides") or [] for job in jobs])
    for column in frame.columns:  # lists (overrides, labels, ...) as one JSON cell each
        if frame[column].map(lambda v: isinstance(v, list)).any():
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    return frame


def varying_overrides(overrides: list[list[str]]) -> list[str]:
    """Per job, the overrides that differ between jobs other than mask, ratio and seed (e.g. `finetune.lr=...`)."""
    parsed = [dict(o.split("=", 1) for o in job if "=" in o) for job in overrides]
    keys = sorted({k for job in parsed for k in job} - {"mask", "mask.ratio", "seed"})
    varying = [k for k in keys if len({job.get(k) for job in parsed}) > 1]
    return [" ".join(f"{k}={job[k]}" for k in varying if k in job) for job in parsed]


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds of the realized share and each metric, per task × strategy × requested
    ratio (× other swept settings). A metric no job recorded is a column of NaN."""
    ok = summary[summary["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=SETTING)
    columns = [REALIZED, *METRICS]
    numbers = ok[SETTING].join(ok.reindex(columns=columns).apply(pd.to_numeric, errors="coerce"))  # null: NaN
    groups = numbers.groupby(SETTING, dropna=False)[columns]
    table = groups.agg(["mean", "std"])
    table.columns = [f"{metric} {stat}" for metric, stat in table.columns]
    table["seeds"] = groups.size()
    return table.reset_index().sort_values(SETTING)


def pareto_front(table: pd.DataFrame) -> pd.Series:
    """True for the settings no other setting beats on both validation accuracy (higher) and validation
    forgetting (lower); a setting without either is not on it."""
    acc, forget = table[f"{VALIDATION_ACCURACY} mean"], table[f"{VALIDATION_FORGETTING} mean"]
    dominated = [((acc >= a) & (forget <= f) & ((acc > a) | (forget < f))).any() for a, f in zip(acc, forget)]
    return ~pd.Series(dominated, index=table.index) & acc.notna() & forget.notna()


def mean_std(row: pd.Series, metric: str, digits: int = 4) -> str:
    mean, std = row.get(f"{metric} mean"), row.get(f"{metric} std")
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def setting_name(row: pd.Series) -> str:
    name = f"{row['mask.strategy']} r={row['mask.ratio']:g}"
    return f"{name} {row['setting']}" if row["setting"] else name


def task_section(task: str, table: pd.DataFrame, front: pd.Series) -> list[str]:
    lines = [f"## Task {task}", "", "Mean ± std over seeds (completed jobs only). " + RATIOS, "",
             "| strategy | ratio | realized | setting | seeds | " + " | ".join(METRICS.values()) + " |",
             "|---|---|---|---|---|" + "---|" * len(METRICS)]
    for _, row in table.iterrows():
        cells = [row["mask.strategy"], f"{row['mask.ratio']:g}", mean_std(row, REALIZED, digits=3),
                 row["setting"] or "–", str(row["seeds"])]
        lines.append("| " + " | ".join(cells + [mean_std(row, m) for m in METRICS]) + " |")
    return lines + ["", best_setting(table), "", front_line(table, front)]


def best_setting(table: pd.DataFrame) -> str:
    """The setting of highest mean validation accuracy, with its test numbers beside it."""
    accuracy = table[f"{VALIDATION_ACCURACY} mean"]
    if accuracy.isna().all():
        return (f"**Best setting**: none chosen: no job recorded validation accuracy (`{VALIDATION_ACCURACY}`), "
                "and test accuracy is never used to choose.")
    best = table.loc[accuracy.idxmax()]
    return (f"**Best setting** (highest mean validation accuracy): {setting_name(best)}: validation accuracy "
            f"{mean_std(best, VALIDATION_ACCURACY)}; reported on test: accuracy {mean_std(best, TEST_ACCURACY)}, "
            f"forgetting {mean_std(best, TEST_FORGETTING)}.")


def front_line(table: pd.DataFrame, front: pd.Series) -> str:
    """The Pareto front's settings, or why there is none: it needs validation forgetting, never test forgetting."""
    if not front.any():
        return (f"**Pareto front**: none drawn: no setting recorded both validation accuracy and validation forgetting "
                f"(`{VALIDATION_FORGETTING}`), and test forgetting is never used to choose.")
    left_out = int(table[f"{VALIDATION_FORGETTING} mean"].isna().sum())
    note = f" {left_out} setting(s) without validation forgetting are left out." if left_out else ""
    return ("**Pareto front** (no other setting has both higher validation accuracy and lower validation forgetting): "
            + "; ".join(setting_name(row) for _, row in table[front].iterrows()) + "." + note)


def write_sweep_report(sweep_dir: Path) -> pd.DataFrame:
    """Writes summary.csv, report.md and plots/ into the sweep dir; returns the summary."""
    summary = summary_table(sweep_dir)
    summary.to_csv(sweep_dir / "summary.csv", index=False)
    table = aggregate(summary)
    counts = summary["status"].value_counts().to_dict()
    lines = [f"# maskrun sweep · {sweep_dir}", "",
             f"{len(summary)} jobs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".",
             "Every job, with all its metrics: `summary.csv`.", "", CHOOSING, ""]
    for task, task_table in table.groupby("task.name"):
        front = pareto_front(task_table)
        lines += task_section(task, task_table, front)
        lines += [""] + [f"![{plot}]({plot})" for plot in plots.sweep_plots(sweep_dir, task, task_table, front)] + [""]
    lines += overlap_section(job_dirs(sweep_dir))
    failed = summary[summary["status"] != "ok"]
    if not failed.empty:
        lines += ["## Failed jobs", "", "| job | status | overrides | error |", "|---|---|---|---|"]
        lines += [f"| {row['job']} | {row['status']} | `{' '.join(json.loads(row['overrides']))}` | {row['error']} |"
                  for _, row in failed.iterrows()]
    (sweep_dir / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def overlap_section(dirs: list[Path]) -> list[str]:
    """How much the masks of different strategies agree at the same ratio (Jaccard of the frozen sets)."""
    rows = mask_overlap(dirs)
    if not rows:
        return []
    lines = ["## Mask overlap", "", "Jaccard overlap of the frozen entries of two strategies at the same ratio and seed "
             "(random masks at ratio r overlap by about r / (2 − r)).", "",
             "| ratio | strategy a | strategy b | Jaccard | pairs |", "|---|---|---|---|---|"]
    for row in rows:
        jaccard = "–" if row["jaccard"] is None else f"{row['jaccard']:.3f}"
        lines.append(f"| {row['ratio']:g} | {row['a']} | {row['b']} | {jaccard} | {row['pairs']} |")
    return lines + [""]


def print_sweep_table(sweep_dir: Path, summary: pd.DataFrame) -> None:
    """Per task, the report's table (without macro-F1, to fit a terminal), then the jobs that are not ok."""
    metrics = [m for m in METRICS if m != "task.test.macro_f1"]
    for task, table in aggregate(summary).groupby("task.name"):
        view = Table(title=f"maskrun sweep · {task} · {sweep_dir}")
        for column in ["strategy", "ratio", "realized", "setting", "seeds"] + [METRICS[m] for m in metrics]:
            view.add_column(column, overflow="fold")  # wrap, never hide, in a narrow terminal
        for _, row in table.iterrows():
            view.add_row(row["mask.strategy"], f"{row['mask.ratio']:g}", mean_std(row, REALIZED, digits=3),
                         row["setting"] or "–", str(row["seeds"]), *[mean_std(row, m, digits=3) for m in metrics])
        console.print(view)
    for _, row in summary[summary["status"] != "ok"].iterrows():
        console.print(f"[red]job {row['job']} {row['status']}[/red]: {row['error']}")
    console.print(f"report: {sweep_dir / 'report.md'}")
