"""The sweep report from job dirs alone: aggregation over seeds, the Pareto front, failed and unfinished jobs."""

import json
from pathlib import Path

import pandas as pd
import pytest

from maskrun.report import cli
from maskrun.report.sweep import aggregate, pareto_front, summary_table, write_sweep_report

# (strategy, ratio, seed) -> (test accuracy, forgetting)
RESULTS = {
    ("random", 0.3, 0): (0.70, 0.30), ("random", 0.3, 1): (0.74, 0.34),
    ("random", 0.9, 0): (0.60, 0.10), ("random", 0.9, 1): (0.62, 0.12),
    ("importance", 0.3, 0): (0.75, 0.20), ("importance", 0.3, 1): (0.77, 0.22),
    ("importance", 0.9, 0): (0.58, 0.15), ("importance", 0.9, 1): (0.60, 0.17),  # beaten by random 0.9
}


def ok_metrics(strategy: str, ratio: float, seed: int) -> dict:
    accuracy, forgetting = RESULTS[strategy, ratio, seed]
    return {
        "status": "ok", "error": None, "seed": seed,
        "overrides": [f"mask={strategy}", f"mask.ratio={ratio}", f"seed={seed}", "experiment=smoke"],
        "choices": {"mask": strategy, "model": "tiny_bert"},
        "task": {"name": "rotten_tomatoes", "metric": "accuracy", "test": {"accuracy": accuracy, "macro_f1": accuracy}},
        "interference": {"forgetting": forgetting, "cka": 0.9, "drift_l2": 1.0},
        "mask": {"strategy": strategy, "ratio": ratio},
    }


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """A partial sweep: eight finished jobs, one failed, one that never wrote metrics.json."""
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    jobs = [ok_metrics(*key) for key in RESULTS]
    jobs.append({"status": "failed", "error": "FloatingPointError: fine-tuning loss became nan at step 3",
                 "overrides": ["mask=random", "mask.ratio=0.5", "seed=0", "experiment=smoke"], "task": None, "interference": None, "mask": None})
    for num, metrics in enumerate(jobs):
        (tmp_path / str(num) / ".hydra").mkdir(parents=True)
        (tmp_path / str(num) / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "9" / ".hydra").mkdir(parents=True)
    (tmp_path / "9" / ".hydra" / "overrides.yaml").write_text("- mask=random\n- mask.ratio=0.9\n- seed=2\n- experiment=smoke\n")
    return tmp_path


def test_summary_has_one_row_per_job_with_every_metric_flattened(sweep_dir):
    summary = summary_table(sweep_dir)
    assert list(summary["job"]) == [str(n) for n in range(10)]
    assert list(summary["status"]) == ["ok"] * 8 + ["failed", "incomplete"]
    assert summary.loc[0, "task.test.accuracy"] == RESULTS["random", 0.3, 0][0]
    assert summary.loc[0, "choices.mask"] == "random"
    assert json.loads(summary.loc[9, "overrides"]) == ["mask=random", "mask.ratio=0.9", "seed=2", "experiment=smoke"]


def test_aggregate_is_mean_and_std_over_seeds_per_strategy_and_ratio(sweep_dir):
    table = aggregate(summary_table(sweep_dir)).set_index(["mask.strategy", "mask.ratio"])
    assert len(table) == 4 and (table["seeds"] == 2).all()
    accuracies = [RESULTS["importance", 0.3, seed][0] for seed in (0, 1)]
    assert table.loc[("importance", 0.3), "task.test.accuracy mean"] == pytest.approx(pd.Series(accuracies).mean())
    assert table.loc[("importance", 0.3), "task.test.accuracy std"] == pytest.approx(pd.Series(accuracies).std())
    assert (table["setting"] == "").all()  # only mask, ratio and seed vary


def test_pareto_front_keeps_only_settings_not_beaten_on_both_axes(sweep_dir):
    table = aggregate(summary_table(sweep_dir))
    front = table[pareto_front(table)]
    assert set(zip(front["mask.strategy"], front["mask.ratio"])) == {("importance", 0.3), ("random", 0.9)}


def test_report_lists_best_setting_failed_jobs_and_draws_plots(sweep_dir):
    write_sweep_report(sweep_dir)
    report = (sweep_dir / "report.md").read_text()
    assert "**Best setting** (highest mean test accuracy): importance r=0.3" in report
    assert "fine-tuning loss became nan" in report and "| 9 | incomplete |" in report
    assert "| importance | 0.3 | – | 2 | 0.7600 ± 0.0141 |" in report
    plots = sorted(p.name for p in (sweep_dir / "plots").iterdir())
    assert plots == [f"rotten_tomatoes_{name}.png" for name in ("accuracy_vs_forgetting", "accuracy_vs_ratio", "forgetting_vs_ratio")]
    assert len(pd.read_csv(sweep_dir / "summary.csv")) == 10


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
