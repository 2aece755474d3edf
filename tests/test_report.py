"""The sweep report from job dirs alone: aggregation over seeds, choices on validation, the realized share,
the Pareto front, failed and unfinished jobs."""

import json
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from maskrun.report import cli
from maskrun.report.plots import draw_metric_vs_share
from maskrun.report.compare import pareto_front
from maskrun.report.sweep import aggregate, summary_table, write_sweep_report


class Result(NamedTuple):
    validation_accuracy: float
    test_accuracy: float
    validation_forgetting: float
    test_forgetting: float
    realized: float  # mask.ratio_actual


# (strategy, ratio, seed) -> Result. Validation and test disagree: importance 0.3 is best on test, random 0.3 on
# validation, and on test importance 0.3 also beats random 0.3 on forgetting, so only validation puts both on the front.
RESULTS = {
    ("random", 0.3, 0): Result(0.72, 0.70, 0.30, 0.30, 0.3), ("random", 0.3, 1): Result(0.74, 0.74, 0.34, 0.34, 0.3),
    ("random", 0.9, 0): Result(0.60, 0.60, 0.10, 0.10, 0.9), ("random", 0.9, 1): Result(0.62, 0.62, 0.12, 0.12, 0.9),
    ("importance", 0.3, 0): Result(0.71, 0.75, 0.20, 0.20, 0.3),
    ("importance", 0.3, 1): Result(0.73, 0.77, 0.22, 0.22, 0.3),
    ("importance", 0.9, 0): Result(0.58, 0.58, 0.15, 0.15, 0.88),  # beaten by random 0.9
    ("importance", 0.9, 1): Result(0.60, 0.60, 0.17, 0.17, 0.90),
}


def ok_metrics(strategy: str, ratio: float, seed: int, result: Result) -> dict:
    return {
        "status": "ok", "error": None, "seed": seed,
        "overrides": [f"mask={strategy}", f"mask.ratio={ratio}", f"seed={seed}", "experiment=smoke"],
        "choices": {"mask": strategy, "model": "tiny_bert"},
        "task": {"name": "rotten_tomatoes", "metric": "accuracy",
                 "validation": {"accuracy": result.validation_accuracy, "macro_f1": result.validation_accuracy,
                                "step": 36, "epoch": 2},
                 "test": {"accuracy": result.test_accuracy, "macro_f1": result.test_accuracy}},
        "interference": {"forgetting": result.test_forgetting, "cka": 0.9, "drift_l2": 1.0,
                         "validation": {"heldout_texts": 64, "heldout_overlap": 0, "pretrain_loss_before": 6.0,
                                        "pretrain_loss_after": 6.0 + result.validation_forgetting,
                                        "forgetting": result.validation_forgetting}},
        "mask": {"strategy": strategy, "ratio": ratio, "ratio_actual": result.realized},
    }


def write_sweep(sweep_dir: Path, jobs: list[dict]) -> Path:
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    for num, metrics in enumerate(jobs):
        (sweep_dir / str(num) / ".hydra").mkdir(parents=True)
        (sweep_dir / str(num) / "metrics.json").write_text(json.dumps(metrics))
    return sweep_dir


def mean_over_seeds(measure: str) -> dict[tuple[str, float], float]:
    seeds = {}
    for (strategy, ratio, _), result in RESULTS.items():
        seeds.setdefault((strategy, ratio), []).append(getattr(result, measure))
    return {setting: sum(values) / len(values) for setting, values in seeds.items()}


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """A partial sweep: eight finished jobs, one failed, one that never wrote metrics.json."""
    jobs = [ok_metrics(*key, result) for key, result in RESULTS.items()]
    jobs.append({"status": "failed", "error": "FloatingPointError: fine-tuning loss became nan at step 3",
                 "overrides": ["mask=random", "mask.ratio=0.5", "seed=0", "experiment=smoke"], "task": None, "interference": None, "mask": None})
    write_sweep(tmp_path, jobs)
    (tmp_path / "9" / ".hydra").mkdir(parents=True)
    (tmp_path / "9" / ".hydra" / "overrides.yaml").write_text("- mask=random\n- mask.ratio=0.9\n- seed=2\n- experiment=smoke\n")
    return tmp_path


def test_summary_has_one_row_per_job_with_every_metric_flattened(sweep_dir):
    summary = summary_table(sweep_dir)
    assert list(summary["job"]) == [str(n) for n in range(10)]
    assert list(summary["status"]) == ["ok"] * 8 + ["failed", "incomplete"]
    first = RESULTS["random", 0.3, 0]
    assert summary.loc[0, "task.test.accuracy"] == first.test_accuracy
    assert summary.loc[0, "task.validation.accuracy"] == first.validation_accuracy
    assert summary.loc[0, "interference.validation.forgetting"] == first.validation_forgetting
    assert summary.loc[0, "interference.validation.heldout_texts"] == 64
    assert summary.loc[0, "mask.ratio_actual"] == first.realized
    assert summary.loc[0, "choices.mask"] == "random"
    assert json.loads(summary.loc[9, "overrides"]) == ["mask=random", "mask.ratio=0.9", "seed=2", "experiment=smoke"]


def test_aggregate_is_mean_and_std_over_seeds_per_strategy_and_ratio(sweep_dir):
    table = aggregate(summary_table(sweep_dir)).set_index(["mask.strategy", "mask.ratio"])
    assert len(table) == 4 and (table["seeds"] == 2).all()
    accuracies = [RESULTS["importance", 0.3, seed].test_accuracy for seed in (0, 1)]
    assert table.loc[("importance", 0.3), "task.test.accuracy mean"] == pytest.approx(pd.Series(accuracies).mean())
    assert table.loc[("importance", 0.3), "task.test.accuracy std"] == pytest.approx(pd.Series(accuracies).std())
    realized = mean_over_seeds("realized")
    assert table.loc[("importance", 0.9), "mask.ratio_actual mean"] == pytest.approx(realized["importance", 0.9])
    assert (table["setting"] == "").all()  # only mask, ratio and seed vary


def test_pareto_front_is_chosen_on_validation_accuracy_and_forgetting(sweep_dir):
    table = aggregate(summary_table(sweep_dir))
    front = table[pareto_front(table)]
    # On test, importance 0.3 beats random 0.3 on both axes; on validation, random 0.3 is more accurate.
    assert set(zip(front["mask.strategy"], front["mask.ratio"])) == {("random", 0.3), ("importance", 0.3), ("random", 0.9)}


def test_best_setting_is_chosen_on_validation_with_test_reported_beside_it(sweep_dir):
    validation, test = mean_over_seeds("validation_accuracy"), mean_over_seeds("test_accuracy")
    assert max(validation, key=validation.get) == ("random", 0.3) and max(test, key=test.get) == ("importance", 0.3)
    write_sweep_report(sweep_dir)
    report = (sweep_dir / "report.md").read_text()
    assert ("**Best setting** (highest mean validation accuracy): random r=0.3: validation accuracy 0.7300 ± 0.0141; "
            "reported on test: accuracy 0.7200 ± 0.0283, forgetting 0.3200 ± 0.0283.") in report
    assert "Test metrics are reported beside them and never used to choose." in report
    assert "**Pareto front** (no other setting has both higher validation accuracy and lower validation forgetting): " \
           "importance r=0.3; random r=0.3; random r=0.9." in report


def test_front_without_validation_forgetting_says_so_and_never_uses_test(tmp_path):
    """Jobs from before interference.validation existed, or whose validation forgetting is null."""
    jobs = [ok_metrics(*key, result) for key, result in RESULTS.items()]
    for num, metrics in enumerate(jobs):
        if num % 2:
            metrics["interference"]["validation"]["forgetting"] = None
        else:
            del metrics["interference"]["validation"]
    sweep_dir = write_sweep(tmp_path, jobs)
    write_sweep_report(sweep_dir)
    report = (sweep_dir / "report.md").read_text()
    assert "**Pareto front**: none drawn: no setting recorded both validation accuracy and validation forgetting" in report
    assert report.splitlines()[2] == ("**Matched accuracy on rotten_tomatoes**: no method can be compared at matched "
                                      "accuracy: no setting recorded both validation accuracy and validation forgetting.")
    assert not (sweep_dir / "plots" / "rotten_tomatoes_method_fronts.png").exists()
    assert "**Best setting** (highest mean validation accuracy): random r=0.3" in report
    assert not (sweep_dir / "plots" / "rotten_tomatoes_accuracy_vs_forgetting.png").exists()
    assert (sweep_dir / "plots" / "rotten_tomatoes_forgetting_vs_ratio.png").exists()  # test forgetting, reported


def test_report_lists_requested_and_realized_ratio_failed_jobs_and_draws_plots(sweep_dir):
    write_sweep_report(sweep_dir)
    report = (sweep_dir / "report.md").read_text()
    assert "| method | strategy | ratio | realized | setting | seeds | validation accuracy | test accuracy |" in report
    assert "| mask | importance | 0.3 | 0.300 ± 0.000 | – | 2 | 0.7200 ± 0.0141 | 0.7600 ± 0.0141 |" in report
    assert "| mask | importance | 0.9 | 0.890 ± 0.014 | – | 2 |" in report
    assert "fine-tuning loss became nan" in report and "| 9 | incomplete |" in report
    plots = sorted(p.name for p in (sweep_dir / "plots").iterdir())
    assert plots == [f"rotten_tomatoes_{name}.png" for name in
                     ("accuracy_vs_forgetting", "accuracy_vs_ratio", "forgetting_vs_ratio", "method_fronts")]
    assert len(pd.read_csv(sweep_dir / "summary.csv")) == 10


def test_plots_place_settings_at_the_realized_share_labelled_with_the_requested_ratio(tmp_path):
    """mask=layers on the default model: 0.1 and 0.3 freeze nothing, 0.5 and 0.7 the embeddings."""
    realized = {0.1: 0.0, 0.3: 0.0, 0.5: 0.724, 0.7: 0.724, 0.9: 0.862}
    jobs = []
    for ratio, share in realized.items():  # the more frozen, the lower accuracy and forgetting
        accuracy, forgetting = 0.7 - share / 10, 0.3 - share / 5
        jobs.append(ok_metrics("layers", ratio, 0, Result(accuracy, accuracy, forgetting, forgetting, share)))
    table = aggregate(summary_table(write_sweep(tmp_path, jobs)))
    fig, ax = plt.subplots()
    draw_metric_vs_share(ax, table, "task.test.accuracy")
    (points,) = ax.containers
    assert list(points.lines[0].get_xdata()) == list(realized.values())
    assert sorted(text.get_text() for text in ax.texts) == ["0.1,0.3", "0.5,0.7", "0.9"]
    plt.close(fig)


def test_plots_place_a_moving_mask_at_the_share_it_froze_per_step(tmp_path):
    """child_tuning freezes mask.ratio of its entries at each step and next to none at every step (ratio_actual ~ 0):
    its points sit at step_frozen_share, a static mask's at ratio_actual."""
    jobs = []
    for ratio, per_step in ((0.3, 0.302), (0.7, 0.698)):
        child = ok_metrics("child_tuning", ratio, 0, Result(0.7, 0.7, 0.2, 0.2, 0.0))
        child["mask"]["step_frozen_share"] = per_step
        jobs += [child, ok_metrics("random", ratio, 0, Result(0.7, 0.7, 0.2, 0.2, ratio))]
    table = aggregate(summary_table(write_sweep(tmp_path, jobs))).set_index(["mask.strategy", "mask.ratio"])
    assert table.loc[("child_tuning", 0.3), "mask.ratio_actual mean"] == 0.302
    assert table.loc[("child_tuning", 0.7), "mask.ratio_actual mean"] == 0.698
    assert table.loc[("random", 0.7), "mask.ratio_actual mean"] == 0.7
    fig, ax = plt.subplots()
    draw_metric_vs_share(ax, table.reset_index(), "task.test.accuracy")
    assert [list(c.lines[0].get_xdata()) for c in ax.containers] == [[0.302, 0.698], [0.3, 0.7]]
    plt.close(fig)


def test_other_swept_settings_get_their_own_rows(sweep_dir):
    metrics = json.loads((sweep_dir / "0" / "metrics.json").read_text())
    metrics["overrides"].append("finetune.lr=0.1")
    (sweep_dir / "0" / "metrics.json").write_text(json.dumps(metrics))
    table = aggregate(summary_table(sweep_dir))
    assert sorted(table["setting"].unique()) == ["", "finetune.lr=0.1"]
    assert len(table) == 5


def test_maskrun_report_refuses_a_dir_that_is_neither_run_nor_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"maskrun-report: error: {tmp_path} is neither a run dir nor a sweep dir (")
