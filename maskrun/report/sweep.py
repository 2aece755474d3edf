"""The sweep report: summary.csv, report.md and plots/*.png in the sweep dir, and a rich table.

It reads only the job dirs' metrics.json files, so it can be rebuilt at any time, also for a
crashed or partial sweep: a job dir that Hydra started but that holds no metrics.json is a row
with status `incomplete`. Jobs of different methods are never merged: each is a setting of its
method, and the methods are compared at matched validation accuracy (maskrun.report.compare).

Each task is reported in its own metric, the one its jobs recorded as `task.metric` (accuracy for
classification, learning for causal_lm, exact match for instruction: maskrun.report.task_metric).
"""

import contextlib
import json
import math
import numbers
from pathlib import Path

import pandas as pd
import yaml
from rich.table import Table

from maskrun.masks.analytics import mask_overlap
from maskrun.progress import console
from maskrun.report import compare, plots
from maskrun.report.task_metric import ACCURACY, TaskMetric, task_metric

REALIZED = plots.REALIZED
VALIDATION_FORGETTING, TEST_FORGETTING = plots.VALIDATION_FORGETTING, plots.TEST_FORGETTING
BENCHMARK_FORGETTING = plots.BENCHMARK_FORGETTING
INTERFERENCE = {  # column of summary.csv: its name in the report
    VALIDATION_FORGETTING: "validation forgetting",
    TEST_FORGETTING: "test forgetting",
    "interference.kl_task": "KL task",
    "interference.cka": "CKA",
    "interference.drift_l2": "drift L2",
    BENCHMARK_FORGETTING: "benchmark forgetting",
}
# One group of seeds: a method at one value of its dial (`dial`, e.g. finetune.lr=0.001; a mask job's is its requested
# mask.ratio) under one mask and other swept settings.
SETTING = ["task.name", "method", "mask.strategy", "mask.ratio", "dial", "setting"]
CHOOSING = ("Settings are chosen on validation metrics: the best setting has the highest mean validation {metric}, "
            "the Pareto fronts are drawn on validation {metric} and validation forgetting, and methods are matched "
            "at validation {metric}. Test metrics are reported beside them and never used to choose.")
RATIOS = ("`ratio` is the requested `mask.ratio`, `realized` the share of eligible entries actually frozen "
          "(`mask.ratio_actual`; for a mask that moves while training, such as child_tuning or lisa, the mean share "
          "frozen per step, `mask.step_frozen_share`; mean over seeds); the plots place each setting at its realized "
          "share.")
STEP_FROZEN = "mask.step_frozen_share"  # a moving mask's realized share (maskrun.masks.dynamic)


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
    overrides_file, hydra_file = job_dir / ".hydra" / "overrides.yaml", job_dir / ".hydra" / "hydra.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    choices = yaml.safe_load(hydra_file.read_text())["hydra"]["runtime"]["choices"] if hydra_file.exists() else {}
    return {"status": "incomplete", "error": "no metrics.json: the job did not finish", "overrides": overrides,
            "choices": {group: choice for group, choice in choices.items() if not group.startswith("hydra")}}


def summary_table(sweep_dir: Path) -> pd.DataFrame:
    """One row per job: job dir, overrides, choices, status, error and every metric, flattened; its method, the
    method's dial and trainable share."""
    dirs = job_dirs(sweep_dir)
    jobs = [load_job(d) for d in dirs]
    frame = pd.json_normalize(jobs) if jobs else pd.DataFrame(columns=["status", "error", "overrides"])
    frame.insert(0, "job", [str(d.relative_to(sweep_dir)) for d in dirs])
    overrides = [job.get("overrides") or [] for job in jobs]
    add_method_columns(frame)
    frame["setting"] = varying_overrides(overrides, list(frame["method.dial.key"]), list(column(frame, "finetune.lr")))
    for name in frame.columns:  # lists (overrides, labels, ...) as one JSON cell each
        if frame[name].map(lambda v: isinstance(v, list)).any():
            frame[name] = frame[name].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    return frame


def task_metrics(summary: pd.DataFrame) -> dict[str, TaskMetric]:
    """Each task's metric, as its finished jobs recorded it (a task's jobs share one task type)."""
    ok = summary[summary["status"] == "ok"]
    return {task: task_metric(key) for task, key in zip(column(ok, "task.name"), column(ok, "task.metric"))}


def metric_columns(metric: TaskMetric) -> dict[str, str]:
    """The report's columns of summary.csv for a task of this metric, and their names. Validation chooses, test is
    reported, beside the task type's other test numbers and the interference measures."""
    return {metric.validation: f"validation {metric.name}", metric.test: f"test {metric.name}",
            **{f"task.test.{key}": f"test {name}" for key, name in metric.beside.items()}, **INTERFERENCE}


def shown_columns(table: pd.DataFrame, columns: dict[str, str]) -> dict[str, str]:
    """The report's columns, less benchmark forgetting where no job scored benchmarks (eval.benchmarks=[])."""
    scored = table[f"{BENCHMARK_FORGETTING} mean"].notna().any()
    return {name: header for name, header in columns.items() if scored or name != BENCHMARK_FORGETTING}


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A summary column as objects, or None in every row when no job recorded it."""
    return frame[name].astype(object) if name in frame else pd.Series(None, index=frame.index, dtype=object)


def dial_cell(key, value) -> str:
    """The dial as `key=value`; empty when the job recorded none."""
    if not isinstance(key, str) or value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{key}={value:g}" if isinstance(value, numbers.Real) else f"{key}={value}"


def add_method_columns(frame: pd.DataFrame) -> None:
    """`method` (metrics.json method.name; a job that failed or did not finish before recording it, its method
    choice; a job from before methods existed ran mask), its dial (`method.dial.key`, `method.dial.value`; a mask
    job's is its requested ratio), the dial as one `key=value` cell (`dial`), and `trainable_share` =
    method.trainable / method.model_entries (every entry of the task model)."""
    frame["method"] = [name if isinstance(name, str) else choice if isinstance(choice, str) else "mask"
                       for name, choice in zip(column(frame, "method.name"), column(frame, "choices.method"))]
    key, value = column(frame, "method.dial.key"), column(frame, "method.dial.value")
    undialled = frame["method"].eq("mask") & key.isna()
    key[undialled], value[undialled] = "mask.ratio", column(frame, "mask.ratio")[undialled]
    frame["method.dial.key"], frame["method.dial.value"] = key, value
    frame["dial"] = [dial_cell(k, v) for k, v in zip(key, value)]
    trainable, total = (pd.to_numeric(column(frame, name), errors="coerce")
                        for name in ("method.trainable", "method.model_entries"))
    frame["trainable_share"] = trainable / total


def varying_overrides(overrides: list[list[str]], dial_keys: list, learning_rates: list) -> list[str]:
    """Per job, the settings that differ between jobs other than the method, its dial, mask, ratio and seed
    (e.g. `finetune.lr=...` of a mask job; for a method=full job the learning rate is its dial). The learning rate
    is the one the job recorded (`finetune.lr`), whether a command line or a setting file set it: a second dial of
    every method."""
    parsed = [parse_overrides(job) for job in overrides]
    for job, lr in zip(parsed, learning_rates):
        if isinstance(lr, numbers.Real) and not math.isnan(lr):
            job["finetune.lr"] = f"{lr:g}"
        elif "finetune.lr" in job:  # a job from before the learning rate was recorded: its override, as recorded ones read
            with contextlib.suppress(ValueError):
                job["finetune.lr"] = f"{float(job['finetune.lr']):g}"
    # A preset and its per-job setting files (+experiment/methods=...) name settings; the columns show what they set.
    keys = sorted(k for k in {k for job in parsed for k in job} - {"method", "mask", "mask.ratio", "seed"}
                  if k.lstrip("+~").split("/")[0] != "experiment")
    varying = [k for k in keys if len({job.get(k) for job in parsed}) > 1]
    return [" ".join(f"{k}={job[k]}" for k in varying if k in job and k != dial_key)
            for job, dial_key in zip(parsed, dial_keys)]


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds of the realized share and each metric of the tasks' types, per task × method ×
    strategy × requested ratio × dial value (× other swept settings), with each setting's method `label`
    (maskrun.report.compare.method_label). A metric no job recorded is a column of NaN."""
    ok = summary[summary["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=[*SETTING, "label"])
    metrics = task_metrics(summary).values()
    columns = [REALIZED, *dict.fromkeys(name for metric in metrics for name in metric_columns(metric))]  # once each
    values = ok[SETTING].join(ok.reindex(columns=columns).apply(pd.to_numeric, errors="coerce"))  # null: NaN
    # A mask that moves freezes mask.ratio of its entries at each step, and next to none at every step: its share is
    # the one it froze per step.
    per_step = pd.to_numeric(column(ok, STEP_FROZEN), errors="coerce")
    values[REALIZED] = per_step.where(per_step.notna(), values[REALIZED])
    groups = values.groupby(SETTING, dropna=False)[columns]
    table = groups.agg(["mean", "std"])
    table.columns = [f"{metric} {stat}" for metric, stat in table.columns]
    table["seeds"] = groups.size()
    table = table.reset_index().sort_values(SETTING)
    table["label"] = [compare.method_label(method, strategy)
                      for method, strategy in zip(table["method"], table["mask.strategy"])]
    return table


def mean_std(row: pd.Series, metric: str, digits: int = 4) -> str:
    mean, std = row.get(f"{metric} mean"), row.get(f"{metric} std")
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def shown_setting(row: pd.Series) -> str:
    """What sets this row apart within its strategy and ratio: the dial of a method other than mask, other settings."""
    parts = [row["dial"] if row["method"] != "mask" else "", row["setting"]]
    return " ".join(part for part in parts if part)


def setting_name(row: pd.Series) -> str:
    mask = f"{row['mask.strategy']} r={row['mask.ratio']:g}"
    if row["method"] == "mask":
        return f"{mask} {row['setting']}".strip()
    with_mask = f" + mask {mask}" if row["mask.strategy"] != "none" else ""
    return f"{row['method']}{with_mask} {shown_setting(row)}".strip()


def task_section(task: str, table: pd.DataFrame, front: pd.Series, metric: TaskMetric) -> list[str]:
    columns = shown_columns(table, metric_columns(metric))
    meaning = f" In this task {metric.meaning}." if metric.meaning else ""
    lines = [f"## Task {task}", "", "Mean ± std over seeds (completed jobs only). " + RATIOS + meaning, "",
             "| method | strategy | ratio | realized | setting | seeds | " + " | ".join(columns.values()) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = [row["method"], row["mask.strategy"], f"{row['mask.ratio']:g}", mean_std(row, REALIZED, digits=3),
                 shown_setting(row) or "–", str(row["seeds"])]
        lines.append("| " + " | ".join(cells + [mean_std(row, m) for m in columns]) + " |")
    return lines + ["", best_setting(table, metric), "", front_line(table, front, metric)]


def best_setting(table: pd.DataFrame, metric: TaskMetric) -> str:
    """The setting of highest mean validation metric, with its test numbers beside it."""
    validation = table[f"{metric.validation} mean"]
    if validation.isna().all():
        return (f"**Best setting**: none chosen: no job recorded validation {metric.name} (`{metric.validation}`), "
                f"and test {metric.name} is never used to choose.")
    best = table.loc[validation.idxmax()]
    return (f"**Best setting** (highest mean validation {metric.name}): {setting_name(best)}: validation {metric.name} "
            f"{mean_std(best, metric.validation)}; reported on test: {metric.name} {mean_std(best, metric.test)}, "
            f"forgetting {mean_std(best, TEST_FORGETTING)}.")


def front_line(table: pd.DataFrame, front: pd.Series, metric: TaskMetric) -> str:
    """The Pareto front's settings, or why there is none: it needs validation forgetting, never test forgetting."""
    if not front.any():
        return (f"**Pareto front**: none drawn: no setting recorded both validation {metric.name} and validation "
                f"forgetting (`{VALIDATION_FORGETTING}`), and test forgetting is never used to choose.")
    left_out = int(table[f"{VALIDATION_FORGETTING} mean"].isna().sum())
    note = f" {left_out} setting(s) without validation forgetting are left out." if left_out else ""
    return (f"**Pareto front** (no other setting has both higher validation {metric.name} and lower validation "
            "forgetting): " + "; ".join(setting_name(row) for _, row in table[front].iterrows()) + "." + note)


MATCHED = ("Each method's points are its settings, one per value of its dial (`finetune.lr` for full, `mask.ratio` "
           "for a mask, whose curves are drawn per strategy), mean ± std over seeds. A method's front is its points "
           "that no other point of the same method beats on both validation {metric} (higher) and validation "
           "forgetting (lower).")
LEVELS = ("Test forgetting at common validation {metric} levels (evenly spaced over every front's range, and the "
          "level the headline compares at), interpolated linearly along each front in order of validation {metric} "
          "(in brackets: validation forgetting, on which the headline chooses). No extrapolation: "
          f"\"{compare.NOT_REACHED}\" means the level lies outside that method's front.")
BENCHMARK_LEVELS = ("Benchmark forgetting (mean score drop over `eval.benchmarks`, before − after) at the same levels, "
                    "interpolated along the same fronts: the fronts are chosen on validation forgetting, and the "
                    "benchmarks, like test data, never choose.")


def matched_section(sweep_dir: Path, task: str, table: pd.DataFrame, fronts: dict[str, pd.DataFrame],
                    metric: TaskMetric) -> list[str]:
    """A task's method points and fronts, its forgetting at common validation metric levels, and their plot."""
    name = metric.name
    shown = shown_columns(table, {metric.validation: f"validation {name}", VALIDATION_FORGETTING: "validation forgetting",
                                  metric.test: f"test {name}", TEST_FORGETTING: "test forgetting",
                                  BENCHMARK_FORGETTING: "benchmark forgetting"})
    lines = [f"### {task}", "", MATCHED.format(metric=name), "",
             "| method | dial | setting | seeds | " + " | ".join(shown.values()) + " | on front |",
             "|---|---|---|---|" + "---|" * (len(shown) + 1)]
    for label, points in table.groupby("label", sort=True):
        on_front = compare.pareto_front(points, metric)
        for index, row in points.iterrows():
            cells = [label, row["dial"] or "–", row["setting"] or "–", str(row["seeds"])]
            cells += [mean_std(row, m) for m in shown]
            lines.append("| " + " | ".join(cells + ["yes" if on_front[index] else "–"]) + " |")
    if not fronts:
        return lines + ["", f"No front: no setting recorded both validation {name} and validation forgetting.", ""]
    levels = compare.accuracy_levels(fronts, metric)
    lines += ["", LEVELS.format(metric=name), "", f"| validation {name} | " + " | ".join(fronts) + " |",
              "|---|" + "---|" * len(fronts)]
    for level in levels:
        cells = [matched_cell(front, level, metric) for front in fronts.values()]
        lines.append(f"| {level:.4f} | " + " | ".join(cells) + " |")
    plot = plots.method_fronts_plot(sweep_dir, task, fronts, levels, metric)
    lines += ["", f"![{plot}]({plot})", ""]
    if BENCHMARK_FORGETTING in shown:
        lines += [BENCHMARK_LEVELS, "", f"| validation {name} | " + " | ".join(fronts) + " |",
                  "|---|" + "---|" * len(fronts)]
        for level in levels:
            cells = [benchmark_cell(front, level, metric) for front in fronts.values()]
            lines.append(f"| {level:.4f} | " + " | ".join(cells) + " |")
        plot = plots.method_fronts_plot(sweep_dir, task, fronts, levels, metric, BENCHMARK_FORGETTING)
        lines += ["", f"![{plot}]({plot})", ""]
    return lines


def matched_cell(front: pd.DataFrame, level: float, metric: TaskMetric) -> str:
    test = compare.at_accuracy(front, level, TEST_FORGETTING, metric)
    if test is None:
        return compare.NOT_REACHED
    return f"{test:.4f} ({compare.at_accuracy(front, level, VALIDATION_FORGETTING, metric):.4f})"


def benchmark_cell(front: pd.DataFrame, level: float, metric: TaskMetric) -> str:
    value = compare.at_accuracy(front, level, BENCHMARK_FORGETTING, metric)
    return compare.NOT_REACHED if value is None else f"{value:.4f}"


def correlation_section(summary: pd.DataFrame) -> list[str]:
    """Per task, Spearman's ρ across the ok jobs of each interference measure with test forgetting."""
    ok = summary[summary["status"] == "ok"]
    if ok.empty:
        return []
    lines = ["## Interference measures vs forgetting", "",
             f"Spearman rank correlation, across the ok jobs of a task, of each interference measure with test "
             f"forgetting (`{TEST_FORGETTING}`); `jobs` counts the jobs that recorded both. CKA is 1 for an unchanged "
             "model, so it tracks forgetting when ρ is near −1, the others when near +1. The trainable share is "
             "`method.trainable / method.model_entries` (every entry of the task model). \"–\": fewer than "
             f"{compare.MIN_JOBS_FOR_CORRELATION} such jobs, or a measure that does not vary.", "",
             "| task | measure | Spearman ρ | jobs |", "|---|---|---|---|"]
    for task, jobs in ok.groupby("task.name"):
        for measure, rho, count in compare.correlations(jobs):
            lines.append(f"| {task} | {measure} | {'–' if pd.isna(rho) else f'{rho:+.3f}'} | {count} |")
    return lines + [""]


def job_labels(summary: pd.DataFrame) -> list[str]:
    """Every job's method label, finished or not (a job that stopped early has its choices only)."""
    strategy = column(summary, "mask.strategy").combine_first(column(summary, "choices.mask")).fillna("none")
    return [compare.method_label(method, strat) for method, strat in zip(summary["method"], strategy)]


def write_sweep_report(sweep_dir: Path) -> pd.DataFrame:
    """Writes summary.csv, report.md and plots/ into the sweep dir; returns the summary."""
    summary = summary_table(sweep_dir)
    summary.to_csv(sweep_dir / "summary.csv", index=False)
    tasks = dict(list(aggregate(summary).groupby("task.name")))
    metrics = task_metrics(summary)
    fronts = {task: compare.method_fronts(table, metrics[task]) for task, table in tasks.items()}
    finished = {label for table in tasks.values() for label in table["label"]}
    unfinished = sorted(set(job_labels(summary)) - finished)
    headlines = [compare.headline(task, fronts[task], sorted(table["label"].unique()), unfinished, metrics[task])
                 for task, table in tasks.items()]
    counts = summary["status"].value_counts().to_dict()
    # The metric names of the finished tasks (none finished: the default task type's, classification's).
    chosen_on = " or ".join(dict.fromkeys(metric.name for metric in metrics.values())) or ACCURACY.name
    lines = [f"# maskrun sweep · {sweep_dir}", "",
             *(headlines or ["No job finished, so no method can be compared."]), "",
             f"{len(summary)} jobs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".",
             "Every job, with all its metrics: `summary.csv`.", "", CHOOSING.format(metric=chosen_on), ""]
    for task, table in tasks.items():
        front = compare.pareto_front(table, metrics[task])
        lines += task_section(task, table, front, metrics[task])
        lines += [""] + [f"![{plot}]({plot})" for plot in plots.sweep_plots(sweep_dir, task, table, front,
                                                                            metrics[task])] + [""]
    if tasks:
        lines += ["## Matched accuracy", ""]
        for task, table in tasks.items():
            lines += matched_section(sweep_dir, task, table, fronts[task], metrics[task])
    lines += correlation_section(summary)
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
    """Per task, the report's table (without the task type's other test numbers and kl_task, to fit a terminal), then
    the jobs that are not ok."""
    metrics = task_metrics(summary)
    for task, table in aggregate(summary).groupby("task.name"):
        metric = metrics[task]
        shown = {name: header for name, header in shown_columns(table, metric_columns(metric)).items()
                 if name not in {f"task.test.{key}" for key in metric.beside} | {"interference.kl_task"}}
        view = Table(title=f"maskrun sweep · {task} · {sweep_dir}")
        for header in ["method", "strategy", "ratio", "realized", "setting", "seeds", *shown.values()]:
            view.add_column(header, overflow="fold")  # wrap, never hide, in a narrow terminal
        for _, row in table.iterrows():
            view.add_row(row["method"], row["mask.strategy"], f"{row['mask.ratio']:g}", mean_std(row, REALIZED, digits=3),
                         shown_setting(row) or "–", str(row["seeds"]), *[mean_std(row, m, digits=3) for m in shown])
        console.print(view)
    for _, row in summary[summary["status"] != "ok"].iterrows():
        console.print(f"[red]job {row['job']} {row['status']}[/red]: {row['error']}")
    console.print(f"report: {sweep_dir / 'report.md'}")
