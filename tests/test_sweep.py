"""Real sweeps through the `maskrun -m` command: parallel jobs share stages, lease devices, resume, isolate failures."""

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPORT, load_metrics, maskrun, run_cli

TINY = ["experiment=smoke", "pretrain.steps=5", "dataset.corpus_max_texts=500", "dataset.max_examples=200",
        "finetune.epochs=1", "eval.heldout_texts=16"]
PARALLEL = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "mask=importance,random", "mask.ratio=0.3,0.9"]


def summary_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def job_metrics(sweep_dir: Path) -> list[dict]:
    return [load_metrics(sweep_dir / str(num)) for num in range(len(summary_rows(sweep_dir)))]


def expected_plots(sweep_dir: Path) -> list[str]:
    """Accuracy and forgetting vs the realized share; accuracy vs forgetting and each method's front only where the
    jobs recorded validation forgetting, on which the fronts are chosen."""
    names = ["accuracy_vs_ratio", "forgetting_vs_ratio"]
    if any(((m["interference"] or {}).get("validation") or {}).get("forgetting") is not None
           for m in job_metrics(sweep_dir)):
        names += ["accuracy_vs_forgetting", "method_fronts"]
    return sorted(f"rotten_tomatoes_{name}.png" for name in names)


@pytest.fixture(scope="session")
def parallel_sweep(tmp_path_factory):
    """The joblib sweep on two declared GPUs with a fresh cache, the same command again, then in another sweep dir."""
    cwd = tmp_path_factory.mktemp("sweep")
    args = ["-m", *TINY, *PARALLEL, f"cache_dir={cwd / 'cache'}"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MASKRUN_FAKE_GPUS", "2")
        first = maskrun([*args, f"hydra.sweep.dir={cwd / 'sweep'}"], cwd)
        before = {num: (cwd / "sweep" / str(num) / "metrics.json").read_text() for num in range(4)}
        again = maskrun([*args, f"hydra.sweep.dir={cwd / 'sweep'}"], cwd)
        elsewhere = maskrun([*args, f"hydra.sweep.dir={cwd / 'elsewhere'}"], cwd)
    return {"dir": cwd / "sweep", "first": first, "again": again, "metrics_before_rerun": before,
            "elsewhere": cwd / "elsewhere", "elsewhere_output": elsewhere, "cache": cwd / "cache"}


def test_parallel_sweep_runs_every_job_and_pretrains_once(parallel_sweep):
    sweep_dir = parallel_sweep["dir"]
    rows = summary_rows(sweep_dir)
    assert [row["status"] for row in rows] == ["ok"] * 4
    assert sorted((row["mask.strategy"], row["mask.ratio"]) for row in rows) == [
        ("importance", "0.3"), ("importance", "0.9"), ("random", "0.3"), ("random", "0.9")]
    assert sorted(m["cache"]["pretrain"] for m in job_metrics(sweep_dir)) == ["hit", "hit", "hit", "miss"]
    assert len({m["artifacts"]["pretrained"] for m in job_metrics(sweep_dir)}) == 1


def test_parallel_jobs_keep_frozen_entries_exact(parallel_sweep):
    for num, metrics in enumerate(job_metrics(parallel_sweep["dir"])):
        run_dir = parallel_sweep["dir"] / str(num)
        pretrained = load_file(Path(metrics["artifacts"]["pretrained"]) / "model.safetensors")
        masks = load_file(run_dir / "mask.safetensors")
        finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
        assert sum(int(m.sum()) for m in masks.values()) == metrics["mask"]["frozen"] > 0
        for name, frozen in masks.items():
            assert torch.equal(finetuned[name][frozen], pretrained[name][frozen]), name


def test_no_two_running_jobs_hold_the_same_gpu(parallel_sweep):
    leases = [m["lease"] for m in job_metrics(parallel_sweep["dir"])]
    assert {lease["gpu"] for lease in leases} <= {"0", "1"}
    for a in leases:
        for b in leases:
            if a is not b and a["gpu"] == b["gpu"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)


def test_sweep_writes_its_report_and_shows_the_table(parallel_sweep):
    sweep_dir = parallel_sweep["dir"]
    report = (sweep_dir / "report.md").read_text()
    assert "## Task rotten_tomatoes" in report
    assert "## Mask overlap" in report and "| 0.3 | importance/magnitude | random |" in report
    assert sorted(p.name for p in (sweep_dir / "plots").glob("*.png")) == expected_plots(sweep_dir)
    assert "maskrun sweep · rotten_tomatoes" in parallel_sweep["first"].stderr


def test_rerun_with_the_same_sweep_dir_reuses_every_finished_job(parallel_sweep):
    sweep_dir = parallel_sweep["dir"]
    assert parallel_sweep["again"].stderr.count("maskrun: reused finished run") == 4
    assert all((sweep_dir / str(num) / "metrics.json").read_text() == text
               for num, text in parallel_sweep["metrics_before_rerun"].items())
    assert [row["status"] for row in summary_rows(sweep_dir)] == ["ok"] * 4


def test_the_same_jobs_in_another_sweep_dir_are_cached_results(parallel_sweep):
    """No stage runs again: each job's results, mask and fine-tuned model come from its `result` cache entry."""
    first, elsewhere = job_metrics(parallel_sweep["dir"]), job_metrics(parallel_sweep["elsewhere"])
    assert parallel_sweep["elsewhere_output"].stderr.count("maskrun: reused the cached result") == 4
    assert [m["cache"]["result"] for m in first] == ["miss"] * 4
    for original, reused in zip(first, elsewhere):
        assert reused["cache"] == {stage: "skipped" if status == "skipped" else "hit"
                                   for stage, status in original["cache"].items()}
    assert len(list((parallel_sweep["cache"] / "result").glob("*/metrics.json"))) == 4
    results = ("status", "task", "interference", "mask", "config_hash", "seed", "versions")
    for num, (original, reused) in enumerate(zip(first, elsewhere)):
        assert {key: reused[key] for key in results} == {key: original[key] for key in results}
        for artifact in ("mask.safetensors", "finetuned/model.safetensors", "history.json"):
            assert (parallel_sweep["elsewhere"] / str(num) / artifact).read_bytes() == \
                (parallel_sweep["dir"] / str(num) / artifact).read_bytes(), artifact
    assert summary_rows(parallel_sweep["elsewhere"]) and (parallel_sweep["elsewhere"] / "report.md").exists()


def test_maskrun_report_rebuilds_the_sweep_report(parallel_sweep):
    sweep_dir = parallel_sweep["dir"]
    expected = (sweep_dir / "summary.csv").read_text()
    for plot in (sweep_dir / "plots").glob("*.png"):
        plot.unlink()
    (sweep_dir / "summary.csv").unlink()
    (sweep_dir / "report.md").unlink()
    result = run_cli([str(sweep_dir)], sweep_dir, command=REPORT)
    assert result.returncode == 0, result.stderr
    assert (sweep_dir / "summary.csv").read_text() == expected
    assert (sweep_dir / "report.md").exists()
    assert sorted(p.name for p in (sweep_dir / "plots").glob("*.png")) == expected_plots(sweep_dir)


def test_a_diverging_job_is_a_failed_row_beside_the_others_on_submitit(tmp_path):
    """Through the submitit launcher (locally): one job's loss becomes NaN, the other finishes."""
    args = ["-m", *TINY, "hydra/launcher=submitit_local", "mask.ratio=0.5", "finetune.lr=1e12,1e-3",
            f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = maskrun(args, tmp_path, expect=1)  # a sweep with a failed job exits 1, after its report
    rows = {row["overrides"]: row for row in summary_rows(tmp_path / "sweep")}
    failed = next(row for overrides, row in rows.items() if "1000000000000.0" in overrides)
    ok = next(row for overrides, row in rows.items() if "finetune.lr=0.001" in overrides)
    assert failed["status"] == "failed" and "FloatingPointError: fine-tuning loss became nan" in failed["error"]
    assert ok["status"] == "ok" and float(ok["task.test.accuracy"]) > 0
    assert "fine-tuning loss became nan" in (tmp_path / "sweep" / "report.md").read_text()
    assert "1 of 2 jobs failed" in result.stderr
    assert list((tmp_path / "sweep" / ".submitit").rglob("*_log.out"))  # logs under the sweep dir


def test_a_sweep_names_ratios_that_realize_the_same_share_then_runs_and_reports_the_realized_share(tmp_path):
    """mask=layers on the smoke model: 0.1 and 0.3 both freeze no layer; the warning comes before any job."""
    sweep_dir = tmp_path / "sweep"
    result = maskrun(["-m", *TINY, "mask=layers", "mask.ratio=0.1,0.3,0.9", f"cache_dir={tmp_path / 'cache'}",
                      f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    realized = {m["mask"]["ratio"]: m["mask"]["ratio_actual"] for m in job_metrics(sweep_dir)}
    assert realized[0.1] == realized[0.3] != realized[0.9]
    warning = (f"maskrun: warning: mask=layers: mask.ratio=0.1,0.3 all realize a frozen share of {realized[0.1]:.3f} "
               "(whole layers only)")
    lines = result.stderr.splitlines()
    assert lines[0] == warning and sum("warning" in line for line in lines) == 1  # once, before the first job
    assert [row["status"] for row in summary_rows(sweep_dir)] == ["ok"] * 3
    report = (sweep_dir / "report.md").read_text()
    for ratio, share in realized.items():
        assert f"| layers | {ratio:g} | {share:.3f} | – | 1 |" in report
