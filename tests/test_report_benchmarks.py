"""Benchmark forgetting in the reports, from hand-written metrics.json files: a column of summary.csv, beside
held-out-loss forgetting in the matched-accuracy tables and fronts, its Spearman correlation with test forgetting,
and the run report's per-benchmark table."""

import pandas as pd
from scipy.stats import spearmanr

from maskrun.report.run import benchmark_lines
from maskrun.report.sweep import write_sweep_report
from test_compare import between, methods_jobs
from test_report import write_sweep


def with_benchmarks(jobs: list[dict]) -> list[dict]:
    """Each job's benchmark forgetting: the full jobs' grows with their test forgetting, the mask jobs' falls."""
    for num, metrics in enumerate(jobs):
        drop = metrics["interference"]["forgetting"] * (1 if metrics["method"]["name"] == "full" else -1) + num / 1000
        metrics["interference"] |= {"benchmark_forgetting": drop, "benchmarks": {
            "arc_easy": {"metric": "acc_norm", "before": 0.5, "after": 0.5 - drop, "delta": -drop, "stderr": 0.03,
                         "delta_stderr": 0.01, "n": 200}}, "benchmark_forgetting_stderr": 0.01}
    return jobs


def test_the_sweep_reports_benchmark_forgetting_beside_held_out_loss_forgetting(tmp_path):
    jobs = with_benchmarks(methods_jobs())
    write_sweep(tmp_path, jobs)
    summary = write_sweep_report(tmp_path)
    assert list(pd.read_csv(tmp_path / "summary.csv")["interference.benchmark_forgetting"]) == \
        [m["interference"]["benchmark_forgetting"] for m in jobs]
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert ("| method | dial | setting | seeds | validation accuracy | validation forgetting | test accuracy | "
            "test forgetting | benchmark forgetting | on front |") in lines
    # Along full's front (lr 1e-4 then 1e-3, validation accuracy 0.70 to 0.80), the mean over seeds of each point.
    full = {lr: sum(m["interference"]["benchmark_forgetting"] for m in jobs
                    if m["method"]["name"] == "full" and m["method"]["dial"]["value"] == lr) / 2 for lr in (1e-4, 1e-3)}
    assert f"| 0.7600 | {between(full[1e-4], full[1e-3], 0.6):.4f} |" in "\n".join(lines)
    assert (tmp_path / "plots" / "rotten_tomatoes_method_fronts_benchmarks.png").stat().st_size > 0
    rho = spearmanr([m["interference"]["benchmark_forgetting"] for m in jobs],
                    [m["interference"]["forgetting"] for m in jobs]).statistic
    assert f"| rotten_tomatoes | benchmark forgetting | {rho:+.3f} | {len(jobs)} |" in lines
    assert len(summary) == len(jobs)


def test_a_sweep_without_benchmarks_shows_no_benchmark_column(tmp_path):
    write_sweep(tmp_path, methods_jobs())
    write_sweep_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "test forgetting | benchmark forgetting |" not in report and "Benchmark forgetting (mean score drop" not in report
    assert "| rotten_tomatoes | benchmark forgetting | – | 0 |" in report  # nothing to correlate


def test_the_run_report_tables_each_benchmark_before_and_after():
    (metrics,) = with_benchmarks(methods_jobs()[:1])
    interference = metrics["interference"]
    lines = benchmark_lines(interference)
    result = interference["benchmarks"]["arc_easy"]
    assert lines[:2] == ["", "## Benchmarks"] and f"{interference['benchmark_forgetting']:.4f}" in lines[3]
    assert "| benchmark | metric | items | before | after | after − before | ± (paired) | stderr of after |" in lines
    assert (f"| arc_easy | acc_norm | 200 | 0.5000 | {result['after']:.4f} | {result['delta']:+.4f} | 0.0100 | "
            "0.0300 |") in lines
    assert benchmark_lines({"forgetting": 0.1}) == []  # eval.benchmarks=[]


def test_a_run_from_before_paired_stderrs_still_renders_its_benchmarks():
    """maskrun-report re-renders old runs: one recorded without delta_stderr shows "–" there, never a KeyError."""
    older = {"benchmarks": {"arc_easy": {"metric": "acc_norm", "before": 0.3, "after": 0.28, "delta": -0.02,
                                         "stderr": 0.01, "n": 100}}, "benchmark_forgetting": 0.02}
    lines = benchmark_lines(older)
    assert lines[-1] == "| arc_easy | acc_norm | 100 | 0.3000 | 0.2800 | -0.0200 | – | 0.0100 |"
    assert "0.0200 ± –." in lines[3]
