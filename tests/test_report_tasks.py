"""Reports of generative tasks from hand-written metrics.json files: each task is chosen on, matched at, plotted and
named by its own metric (causal_lm: learning, the drop of the held-out task loss; instruction: exact match), with
its loss and perplexity beside it; classification keeps accuracy, also in the same sweep."""

import io
import json
import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.figure import Figure
from rich.console import Console

from maskrun.report import run as run_report
from maskrun.report import sweep
from maskrun.report.compare import method_fronts, pareto_front
from maskrun.report.plots import draw_accuracy_vs_forgetting, draw_method_fronts, draw_metric_vs_share
from maskrun.report.sweep import aggregate, summary_table, write_sweep_report
from maskrun.report.task_metric import TASK_METRICS
from test_compare import FULL, MASK, between, methods_jobs
from test_report import write_sweep

LEARNING, EXACT_MATCH = TASK_METRICS["learning"], TASK_METRICS["exact_match"]
LOSS_BEFORE = 3.0  # held-out task loss of the pretrained model
TASKS = {"causal_lm": "python_code", "instruction": "arithmetic"}


def task_results(task_type: str, value: float) -> dict:
    """One split's task results with `value` as the type's metric; the loss falls as the metric rises."""
    if task_type == "causal_lm":
        loss = LOSS_BEFORE - value
        return {"loss": loss, "perplexity": math.exp(loss), "loss_before": LOSS_BEFORE, "learning": value}
    loss = LOSS_BEFORE * (1 - value)
    return {"loss": loss, "perplexity": math.exp(loss), "exact_match": value}


def on_task(metrics: dict, task_type: str) -> dict:
    """The job of `metrics` (a classification job) on a task of `task_type`: its validation and test accuracies
    become that type's metric, in the task block the task seam writes."""
    task = metrics["task"]
    metrics["task"] = {
        "name": TASKS[task_type], "type": task_type, "metric": {"causal_lm": "learning"}.get(task_type, "exact_match"),
        "split_sizes": {"train": 200, "validation": 40, "test": 40},
        "validation": task_results(task_type, task["validation"]["accuracy"]),
        "test": task_results(task_type, task["test"]["accuracy"])}
    return metrics


def generative_jobs(task_type: str, full: dict = FULL) -> list[dict]:
    """test_compare's full and mask jobs, on a generative task: their fronts and levels are known there."""
    return [on_task(job, task_type) for job in methods_jobs(full)]


def test_a_causal_lm_sweep_chooses_matches_and_names_validation_learning(tmp_path):
    write_sweep(tmp_path, generative_jobs("causal_lm"))
    write_sweep_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    lines = report.splitlines()
    # As in test_compare: full's front runs 0.70-0.80, the mask's 0.60-0.76, where the headline compares.
    full_at_top = (between(0.12, 0.20, 0.6), between(0.10, 0.30, 0.6))  # (test, validation) forgetting
    assert lines[2] == ("**Matched accuracy on python_code**: at validation learning 0.7600, the highest every "
                        "method reaches, mask/importance forgets least: validation forgetting 0.1700 (test 0.2900), "
                        f"against full {full_at_top[1]:.4f} (test {full_at_top[0]:.4f}).")
    spread = pd.Series([FULL[1e-3].validation_accuracy - 0.01, FULL[1e-3].validation_accuracy + 0.01]).std()
    assert (f"**Best setting** (highest mean validation learning): full finetune.lr=0.001: validation learning "
            f"0.8000 ± {spread:.4f}; reported on test: learning 0.8000 ± {spread:.4f}, forgetting 0.2000 ± "
            f"{spread:.4f}.") in lines
    assert ("**Pareto front** (no other setting has both higher validation learning and lower validation forgetting): "
            in report)
    assert "In this task learning is the drop of the held-out task loss" in report
    assert ("| method | strategy | ratio | realized | setting | seeds | validation learning | test learning | "
            "test loss | test perplexity | validation forgetting | test forgetting | KL task | CKA | drift L2 |") in lines
    assert "| validation learning | full | mask/importance |" in lines
    # The task's loss and perplexity are reported beside learning: each the mean over the seeds' own numbers.
    point = MASK[0.9]
    losses = [LOSS_BEFORE - (point.test_accuracy + spread) for spread in (-0.01, 0.01)]
    row = next(line for line in lines if line.startswith("| mask | importance | 0.9 |"))
    assert f"| {sum(losses) / 2:.4f} ± {pd.Series(losses).std():.4f} |" in row
    assert f"| {sum(map(math.exp, losses)) / 2:.4f} ± {pd.Series(losses).map(math.exp).std():.4f} |" in row
    # "accuracy" names only the matched-accuracy comparison (its heading is a contract), never a number.
    assert "accuracy" not in report.replace("Matched accuracy", "")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        f"python_code_{name}.png" for name in ("forgetting_vs_ratio", "learning_vs_forgetting", "learning_vs_ratio",
                                               "method_fronts")]
    assert "task.test.loss" in pd.read_csv(tmp_path / "summary.csv").columns


def test_the_fronts_are_chosen_on_validation_learning_not_on_test(tmp_path):
    """full 1e-2 has lower validation learning than 1e-3 and more forgetting: off the front, though its test is not."""
    table = aggregate(summary_table(write_sweep(tmp_path, generative_jobs("causal_lm"))))
    front = table[pareto_front(table, LEARNING)]
    assert set(front["dial"]) == {"finetune.lr=0.0001", "finetune.lr=0.001", "mask.ratio=0.9", "mask.ratio=0.5"}
    fronts = method_fronts(table, LEARNING)
    assert list(fronts["full"]["dial"]) == ["finetune.lr=0.0001", "finetune.lr=0.001"]  # in order of learning


def test_the_learning_plots_name_their_axes_and_place_points_at_validation_learning(tmp_path):
    table = aggregate(summary_table(write_sweep(tmp_path, generative_jobs("causal_lm"))))
    fig, axes = plt.subplots(1, 3)
    draw_method_fronts(axes[0], method_fronts(table, LEARNING), [0.7, 0.76], LEARNING)
    draw_accuracy_vs_forgetting(axes[1], table, pareto_front(table, LEARNING), LEARNING)
    draw_metric_vs_share(axes[2], table, LEARNING.test)
    fronts = {container.get_label(): container for container in axes[0].containers}
    assert list(fronts["full"].lines[0].get_xdata()) == pytest.approx([0.70, 0.80])
    assert axes[0].get_xlabel() == "validation learning (drop of task loss) (chooses and matches)"
    assert axes[0].get_title().endswith("dotted: the learning levels compared")
    assert axes[1].get_ylabel() == "validation learning (drop of task loss)"
    assert axes[1].get_title() == "learning vs forgetting (labels: dial value)"
    assert axes[2].get_ylabel() == "test learning (drop of task loss)"
    (mask_curve,) = axes[2].containers  # mask settings only, at their test learning
    assert sorted(mask_curve.lines[0].get_ydata()) == pytest.approx(sorted(p.test_accuracy for p in MASK.values()))
    plt.close(fig)


def test_an_instruction_sweep_is_reported_in_exact_match(tmp_path):
    """Without full's lowest learning rate no exact match lies on both fronts (see test_compare)."""
    write_sweep(tmp_path, generative_jobs("instruction", full={lr: p for lr, p in FULL.items() if lr != 1e-4}))
    write_sweep_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert report.splitlines()[2] == (
        "**Matched accuracy on arithmetic**: no validation exact match lies on every method's front (their ranges: "
        "full 0.8000–0.8000, mask/importance 0.6000–0.7600), so no method can be said to forget least at an "
        "exact-match rate every method reaches.")
    assert ("| validation exact match | test exact match | test loss | test perplexity | validation forgetting |"
            in report)
    assert "| validation exact match | full | mask/importance |" in report
    assert "accuracy" not in report.replace("Matched accuracy", "")
    assert (tmp_path / "plots" / "arithmetic_exact_match_vs_forgetting.png").stat().st_size > 0


def test_a_sweep_over_task_types_reports_each_task_in_its_own_metric(tmp_path, monkeypatch):
    write_sweep(tmp_path, [*methods_jobs(), *generative_jobs("causal_lm")])
    summary = write_sweep_report(tmp_path)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[2].startswith("**Matched accuracy on python_code**: at validation learning 0.7600, the highest")
    assert lines[3].startswith("**Matched accuracy on rotten_tomatoes**: at validation accuracy 0.7600, the highest")
    assert ("Settings are chosen on validation metrics: the best setting has the highest mean validation accuracy or "
            "learning,") in "\n".join(lines)
    assert "| validation accuracy | test accuracy | test macro-F1 | validation forgetting |" in "\n".join(lines)
    assert "| validation learning | test learning | test loss | test perplexity |" in "\n".join(lines)

    terminal = io.StringIO()
    monkeypatch.setattr(sweep, "console", Console(file=terminal, width=400))
    sweep.print_sweep_table(tmp_path, summary)
    tables = terminal.getvalue().split("maskrun sweep · ")
    code, tomatoes = (next(t for t in tables if t.startswith(task)) for task in ("python_code", "rotten_tomatoes"))
    assert "validation learning" in code and "test learning" in code and "accuracy" not in code
    assert "test loss" not in code  # the terminal leaves the type's other numbers to report.md
    assert "validation accuracy" in tomatoes and "learning" not in tomatoes


@pytest.mark.parametrize("task_type", TASKS)
def test_the_run_report_shows_the_tasks_metric_loss_perplexity_and_its_validation_curve(tmp_path, monkeypatch,
                                                                                         task_type):
    metric = LEARNING if task_type == "causal_lm" else EXACT_MATCH
    test, scratch = task_results(task_type, 0.7), task_results(task_type, 0.2)
    metrics = {"status": "ok", "error": None, "choices": {"dataset": TASKS[task_type]}, "overrides": [], "seed": 0,
               "device": "cpu", "timing": {"total_s": 1.0},
               "task": {"name": TASKS[task_type], "type": task_type, "metric": metric.key,
                        "split_sizes": {"train": 200, "validation": 40, "test": 40},
                        "validation": task_results(task_type, 0.6), "test": test},
               "controls": {"scratch": {"test": scratch}, "pretraining_gain": 0.7 - 0.2}}
    curve = [0.1, 0.4, 0.6]  # the validation metric after each epoch
    history = {"train": [{"step": step, "epoch": 0, "loss": 2.0} for step in (1, 2, 3)],
               "validation": [{"step": step, "epoch": step - 1, **task_results(task_type, value)}
                              for step, value in zip((1, 2, 3), curve)]}
    (tmp_path / "history.json").write_text(json.dumps(history))
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: saved.append(figure))

    run_report.write_run_report(tmp_path, metrics)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert f"| test {metric.name} | 0.7000 |" in lines
    assert f"| test loss | {test['loss']:.4f} |" in lines and f"| test perplexity | {test['perplexity']:.4f} |" in lines
    assert f"{TASKS[task_type]}: a {task_type} task, split sizes {{'train': 200, 'validation': 40, 'test': 40}}. " \
           f"Its {metric.meaning}." in lines
    assert f"| split | {metric.name} | loss | perplexity |" in lines
    assert f"| test | 0.7000 | {test['loss']:.4f} | {test['perplexity']:.4f} |" in lines
    assert (f"Same task model fine-tuned from random initialisation: test {metric.name} 0.2000, loss "
            f"{scratch['loss']:.4f}, perplexity {scratch['perplexity']:.4f}. Pretraining gain ({metric.name} − "
            "scratch's) +0.5000: pretraining helped.") in lines
    (figure,) = saved
    validation_axis = figure.axes[2]  # the fine-tuning panel's twin
    assert list(validation_axis.lines[0].get_ydata()) == curve
    assert validation_axis.get_ylabel() == f"validation {metric.axis}"
