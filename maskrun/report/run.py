"""The run's human report: report.md, plots/*.png, and a rich table in the terminal, in the task's own metric
(accuracy, learning or exact match: maskrun.report.task_metric) and the other test numbers of its task type."""

import json
from pathlib import Path

from rich.table import Table

from maskrun.masks import tied_share_warning
from maskrun.masks.analytics import mask_report
from maskrun.progress import console
from maskrun.report.interference import plot_interference_per_layer
from maskrun.report.task_metric import TaskMetric, task_metric


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def run_metric(metrics: dict) -> TaskMetric:
    return task_metric((metrics.get("task") or {}).get("metric"))


def task_numbers(metric: TaskMetric, results: dict) -> list[tuple[str, str]]:
    """The metric and the task type's other numbers in `results` (a split's task results), by name."""
    return [(metric.name, fmt(results.get(metric.key)))] + [(name, fmt(results.get(key)))
                                                            for key, name in metric.beside.items()]


def key_numbers(metrics: dict) -> list[tuple[str, str]]:
    task, interference, mask = metrics.get("task") or {}, metrics.get("interference") or {}, metrics.get("mask") or {}
    test, method = task.get("test") or {}, metrics.get("method") or {}
    dial = method.get("dial") or {}
    return [
        ("status", metrics["status"]),
        ("method", f"{method.get('name', 'mask')} ({dial['key']}={dial['value']})" if dial else method.get("name", "mask")),
        ("mask", f"{mask.get('strategy', '–')} r={fmt(mask.get('ratio'), 2)} (actual {fmt(mask.get('ratio_actual'))})"),
        *((f"test {name}", value) for name, value in task_numbers(run_metric(metrics), test)),
        ("forgetting", fmt(interference.get("forgetting"))),
        ("KL on task inputs", fmt(interference.get("kl_task"), 6)),
        ("CKA", fmt(interference.get("cka"))),
        ("drift L2", fmt(interference.get("drift_l2"))),
        *([("benchmark forgetting", f"{fmt(interference['benchmark_forgetting'])} ± "
                                    f"{fmt(interference.get('benchmark_forgetting_stderr'))}")]
          if "benchmark_forgetting" in interference else []),
        ("cache", " ".join(f"{k}:{v}" for k, v in metrics.get("cache", {}).items())),
        ("total time", f"{fmt(metrics['timing'].get('total_s'), 1)} s"),
    ]


def print_summary(run_dir: Path, metrics: dict) -> None:
    table = Table(title=f"maskrun · {run_dir}", show_header=False)
    for name, value in key_numbers(metrics):
        table.add_row(name, value)
    if metrics.get("error"):
        table.add_row("error", metrics["error"])
    table.add_row("report", str(run_dir / "report.md"))
    console.print(table)


def plot_curves(run_dir: Path, history: dict, pretrain_history: list, metric: TaskMetric) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (run_dir / "plots").mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if pretrain_history:
        axes[0].plot([h["step"] for h in pretrain_history], [h["loss"] for h in pretrain_history], lw=0.8)
    axes[0].set(title="pretraining (MLM) loss", xlabel="step", ylabel="loss")
    axes[1].plot([h["step"] for h in history["train"]], [h["loss"] for h in history["train"]], lw=0.8, label="train loss")
    axes[1].set(title="fine-tuning", xlabel="step", ylabel="loss")
    if history["validation"]:
        twin = axes[1].twinx()
        twin.plot([h["step"] for h in history["validation"]], [h[metric.key] for h in history["validation"]],
                  "o-", color="C1", label=f"validation {metric.axis}")
        twin.set_ylabel(f"validation {metric.axis}")
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "loss_curves.png", dpi=110)
    plt.close(fig)
    return ["plots/loss_curves.png"]


def controls_lines(controls: dict | None, metric: TaskMetric) -> list[str]:
    if not controls:
        return []
    gain = controls["pretraining_gain"]
    verdict = "pretraining helped" if gain > 0 else "pretraining did not help: the model fine-tuned from random init did as well or better"
    scratch = ", ".join(f"{name} {value}" for name, value in task_numbers(metric, controls["scratch"]["test"]))
    return ["", "## Controls", "",
            f"Same task model fine-tuned from random initialisation: test {scratch}. Pretraining gain "
            f"({metric.name} − scratch's) {gain:+.4f}: {verdict}."]


def sequential_lines(sequential: dict | None) -> list[str]:
    if not sequential:
        return []
    after_a, after_b = sequential["task_a_after_a"], sequential["task_a_after_b"]
    return ["", "## Sequential fine-tuning", "",
            f"{sequential['task_a']} (task A), then {sequential['task_b']} (task B, "
            f"{'a fresh mask' if sequential['remask'] else 'the same mask'}; its test accuracy "
            f"{fmt(sequential['task_b_test']['accuracy'])}).", "",
            "| task A test | accuracy | macro-F1 |", "|---|---|---|",
            f"| after A | {fmt(after_a['accuracy'])} | {fmt(after_a['macro_f1'])} |",
            f"| after B | {fmt(after_b['accuracy'])} | {fmt(after_b['macro_f1'])} |", "",
            f"Retention (after B − after A): {sequential['retention']:+.4f}."]


def posthoc_lines(metrics: dict, metric: TaskMetric) -> list[str]:
    """One row per ratio of eval.posthoc_reset: the fine-tuned model with that share of its deltas reset."""
    rows = metrics.get("posthoc")
    if not rows:
        return []
    task, interference = metrics.get("task") or {}, metrics.get("interference") or {}
    trained = (f"As trained (mask ratio {fmt((metrics.get('mask') or {}).get('ratio_actual'))}): validation {metric.name} "
               f"{fmt((task.get('validation') or {}).get(metric.key))}, test {fmt((task.get('test') or {}).get(metric.key))}, "
               f"forgetting {fmt(interference.get('forgetting'))}.")
    lines = ["", "## Masks applied after training", "",
             "The entries the run's mask strategy freezes at each ratio, reset to their pretrained values after "
             "fine-tuning (no retraining); entries the run's own mask froze have nothing to reset. " + trained, "",
             f"| reset ratio | actual | entries reset | validation {metric.name} | test {metric.name} | forgetting |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {fmt(row['ratio'], 2)} | {fmt(row['ratio_actual'])} | {row['reset_entries']:,} | "
              f"{fmt(row['validation'].get(metric.key))} | {fmt(row['test'].get(metric.key))} | {fmt(row['forgetting'])} |"
              for row in rows]
    return lines


def benchmark_lines(interference: dict) -> list[str]:
    """One row per benchmark of eval.benchmarks: the pretrained and the fine-tuned model's scores."""
    results = interference.get("benchmarks")
    if not results:
        return []
    lines = ["", "## Benchmarks", "",
             "lm-eval's tasks on the same seeded items before and after fine-tuning. The change's stderr is paired "
             "(over the items' own changes); the score's is the fine-tuned score's. Benchmark forgetting (mean drop, "
             f"before − after): {fmt(interference['benchmark_forgetting'])} ± "
             f"{fmt(interference.get('benchmark_forgetting_stderr'))}.", "",
             "| benchmark | metric | items | before | after | after − before | ± (paired) | stderr of after |",
             "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {name} | {r['metric']} | {r['n']} | {fmt(r['before'])} | {fmt(r['after'])} | {r['delta']:+.4f} | "
                    f"{fmt(r.get('delta_stderr'))} | {fmt(r['stderr'])} |" for name, r in results.items()]


def write_run_report(run_dir: Path, metrics: dict) -> None:
    lines = [f"# maskrun run · {run_dir.name}", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in key_numbers(metrics)]
    if metrics.get("error"):
        lines += ["", f"**Failed:** `{metrics['error']}`"]
    lines += ["", "## Configuration", "", "| group | choice |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(metrics["choices"].items())]
    lines += ["", f"Overrides: `{' '.join(metrics['overrides']) or '(none)'}`  ", f"Seed {metrics['seed']}, device {metrics['device']}."]
    task, metric = metrics.get("task"), run_metric(metrics)
    if task:
        # A classification task names its labels; the generative types name their type and what their metric means.
        kind = f"labels {task['labels']}" if task.get("labels") else f"a {task['type']} task"
        meaning = f" Its {metric.meaning}." if metric.meaning else ""
        names = [name for name, _ in task_numbers(metric, {})]
        lines += ["", "## Task", "", f"{task['name']}: {kind}, split sizes {task['split_sizes']}.{meaning}", "",
                  "| split | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for split in ("validation", "test"):
            if task.get(split):
                lines.append(f"| {split} | " + " | ".join(value for _, value in task_numbers(metric, task[split]))
                             + " |")
    interference = metrics.get("interference")
    if interference:
        lines += ["", "## Interference", "",
                  f"Held-out pretraining-objective loss {fmt(interference['pretrain_loss_before'])} before fine-tuning, "
                  f"{fmt(interference['pretrain_loss_after'])} after: forgetting {fmt(interference['forgetting'])}. "
                  f"Mean linear CKA of hidden states before vs after {fmt(interference['cka'])} (1 = unchanged); "
                  f"weight drift ‖W_ft − W_pre‖ = {fmt(interference['drift_l2'])}; mean KL(pretrained ‖ fine-tuned) of "
                  f"the pretraining head's predictions on the task's test inputs {fmt(interference.get('kl_task'), 6)}."]
        plot = plot_interference_per_layer(run_dir, interference)
        lines += ["", f"![{plot}]({plot})"] + benchmark_lines(interference)
    lines += posthoc_lines(metrics, metric)
    lines += controls_lines(metrics.get("controls"), metric) + sequential_lines(metrics.get("sequential"))
    mask = metrics.get("mask")
    if mask:
        lines += ["", "## Mask", "", f"{mask['frozen']:,} of {mask['eligible']:,} eligible entries frozen "
                  f"(ratio {fmt(mask['ratio_actual'])}, requested {fmt(mask['ratio'], 2)}); {mask['trainable']:,} trainable."]
        warning = tied_share_warning(mask.get("tied_share"), mask.get("strategy"))
        if warning:
            lines += ["", f"**Warning:** {warning}."]
        if (run_dir / "mask.safetensors").exists():
            lines += mask_report(run_dir)
    history_path = run_dir / "history.json"
    if history_path.exists():
        pretrained = (metrics.get("artifacts") or {}).get("pretrained")
        pretrain_history_path = Path(pretrained or "") / "pretrain_history.json"
        pretrain_history = json.loads(pretrain_history_path.read_text()) if pretrained and pretrain_history_path.exists() else []
        for plot in plot_curves(run_dir, json.loads(history_path.read_text()), pretrain_history, metric):
            lines += ["", f"![{plot}]({plot})"]
    lines += ["", f"Timing (s): {metrics['timing']}  ", f"Memory: {metrics.get('memory')}", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
