"""Methods compared in the sweep report, from hand-written metrics.json files: the method and dial columns, each
method's front over its dial, forgetting at matched validation accuracy, and which interference measure tracks
forgetting."""

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from scipy.stats import spearmanr

from maskrun.report.compare import at_accuracy, method_fronts
from maskrun.report.plots import draw_method_fronts
from maskrun.report.sweep import aggregate, summary_table, write_sweep_report
from test_report import Result, ok_metrics, write_sweep

ELIGIBLE, HEAD = 1000, 50
SEED_SPREAD = 0.01  # seed 0 is this much below each point, seed 1 as much above: the means are the points


def method_metrics(method: str, dial_key: str, dial_value: float, seed: int, point: Result, strategy: str = "none",
                   trainable: int = ELIGIBLE + HEAD) -> dict:
    """A job of `method` at one dial value, a mask job if method is mask, with the `method` section of metrics.json."""
    ratio = dial_value if method == "mask" else 0.0
    spread = SEED_SPREAD * (2 * seed - 1)
    result = Result(*(value + spread for value in point[:4]), point.realized)
    metrics = ok_metrics(strategy, ratio, seed, result)
    dial_override = [] if method == "mask" else [f"{dial_key}={dial_value}"]
    metrics["overrides"] = [f"method={method}", *metrics["overrides"][:2], *dial_override, *metrics["overrides"][2:]]
    metrics["method"] = {"name": method, "dial": {"key": dial_key, "value": dial_value}, "trainable": trainable,
                         "model_entries": ELIGIBLE + HEAD}
    metrics["mask"] |= {"eligible": ELIGIBLE, "head_entries": HEAD}
    metrics["choices"]["method"] = method
    return metrics


# Points (mean over seeds): validation accuracy, test accuracy, validation forgetting, test forgetting, realized share.
FULL = {1e-4: Result(0.70, 0.70, 0.10, 0.12, 0.0), 1e-3: Result(0.80, 0.80, 0.30, 0.20, 0.0),
        1e-2: Result(0.75, 0.75, 0.35, 0.15, 0.0)}  # 1e-2: beaten by 1e-3 on validation, on the front on test
MASK = {0.9: Result(0.60, 0.60, 0.05, 0.05, 0.9), 0.5: Result(0.76, 0.76, 0.17, 0.29, 0.5)}


def methods_jobs(full: dict = FULL) -> list[dict]:
    """Full fine-tuning at its learning rates and importance masks at their ratios, two seeds each."""
    jobs = [method_metrics("full", "finetune.lr", lr, seed, point) for lr, point in full.items() for seed in (0, 1)]
    jobs += [method_metrics("mask", "mask.ratio", ratio, seed, point, "importance",
                            trainable=round(ELIGIBLE * (1 - ratio)) + HEAD)
             for ratio, point in MASK.items() for seed in (0, 1)]
    return jobs


def between(a: float, b: float, share: float) -> float:
    return a + share * (b - a)


def test_summary_names_each_jobs_method_and_dial_and_keeps_methods_apart(tmp_path):
    old = ok_metrics("importance", 0.5, 0, MASK[0.5])  # a job from before the method section existed
    plain_none = method_metrics("mask", "mask.ratio", 0.0, 0, FULL[1e-3])  # mask=none at ratio 0, but not method=full
    write_sweep(tmp_path, [*methods_jobs(), old, plain_none])
    (tmp_path / "12" / ".hydra").mkdir(parents=True)  # started, never finished
    (tmp_path / "12" / ".hydra" / "overrides.yaml").write_text("- method=full\n- finetune.lr=0.1\n- experiment=smoke\n")
    (tmp_path / "12" / ".hydra" / "hydra.yaml").write_text(  # as Hydra writes it when the job starts
        "hydra:\n  runtime:\n    choices:\n      method: full\n      mask: none\n      hydra/launcher: basic\n")

    summary = summary_table(tmp_path)
    rows = summary.set_index("job")
    assert list(rows.loc[["0", "1", "2"], "method"]) == ["full"] * 3
    assert (rows.loc["0", "method.dial.key"], rows.loc["0", "method.dial.value"], rows.loc["0", "dial"]) == \
        ("finetune.lr", 1e-4, "finetune.lr=0.0001")
    assert rows.loc["0", "setting"] == ""  # the learning rate is full's dial, not another setting
    assert rows.loc["0", "trainable_share"] == 1.0
    mask_job = str(len(FULL) * 2)
    assert rows.loc[mask_job, "trainable_share"] == pytest.approx((100 + HEAD) / (ELIGIBLE + HEAD))  # ratio 0.9
    assert (rows.loc["10", "method"], rows.loc["10", "dial"]) == ("mask", "mask.ratio=0.5")
    assert pd.isna(rows.loc["10", "trainable_share"])  # no method.trainable recorded
    assert (rows.loc["12", "status"], rows.loc["12", "method"]) == ("incomplete", "full")

    write_sweep_report(tmp_path)
    csv = pd.read_csv(tmp_path / "summary.csv", dtype={"job": str}).set_index("job")
    assert csv.loc["1", "method"] == "full" and csv.loc["1", "method.dial.value"] == 1e-4
    table = aggregate(summary)
    labels = table.groupby("label")["seeds"].sum().to_dict()
    assert labels == {"full": 6, "mask/importance": 5, "mask/none": 1}  # ratio 0 under method=mask is not full's
    assert len(table[table["label"] == "full"]) == len(FULL)


def test_each_front_and_the_matched_table_follow_validation_with_test_beside(tmp_path):
    write_sweep(tmp_path, methods_jobs())
    fronts = method_fronts(aggregate(summary_table(tmp_path)))
    assert list(fronts["full"]["dial"]) == ["finetune.lr=0.0001", "finetune.lr=0.001"]  # 1e-2 is beaten on validation
    assert list(fronts["mask/importance"]["dial"]) == ["mask.ratio=0.9", "mask.ratio=0.5"]

    write_sweep_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    lines = report.splitlines()
    # The common accuracies run from 0.70 (full's lowest) to 0.76 (the mask's highest), where the headline compares.
    full_share, mask_share = 0.6, 1.0
    full_at_top = (between(0.12, 0.20, full_share), between(0.10, 0.30, full_share))  # (test, validation)
    mask_at_top = (between(0.05, 0.29, mask_share), between(0.05, 0.17, mask_share))
    # On validation the mask forgets less at 0.76; on test full would: the headline follows validation.
    assert mask_at_top[1] < full_at_top[1] and full_at_top[0] < mask_at_top[0]
    assert lines[2] == ("**Matched accuracy on rotten_tomatoes**: at validation accuracy 0.7600, the highest every "
                        f"method reaches, mask/importance forgets least: validation forgetting {mask_at_top[1]:.4f} "
                        f"(test {mask_at_top[0]:.4f}), against full {full_at_top[1]:.4f} (test {full_at_top[0]:.4f}).")
    assert "## Matched accuracy" in report
    assert "| validation accuracy | full | mask/importance |" in report
    # Six levels over every front's range, 0.60 (the mask's lowest) to 0.80 (full's highest); each cell interpolated
    # along its front, or "not reached" outside it.
    def cell(level, low, high, test, validation):
        if not low <= level <= high + 1e-12:
            return "not reached"
        share = (level - low) / (high - low)
        return f"{between(*test, share):.4f} ({between(*validation, share):.4f})"

    for level in (0.60, 0.64, 0.68, 0.72, 0.76, 0.80):
        full = cell(level, 0.70, 0.80, (0.12, 0.20), (0.10, 0.30))
        mask = cell(level, 0.60, 0.76, (0.05, 0.29), (0.05, 0.17))
        assert f"| {level:.4f} | {full} | {mask} |" in lines, level
    assert ("| full | finetune.lr=0.01 | – | 2 | 0.7500 ± 0.0141 | 0.3500 ± 0.0141 | 0.7500 ± 0.0141 | "
            "0.1500 ± 0.0141 | – |") in lines
    assert (tmp_path / "plots" / "rotten_tomatoes_method_fronts.png").stat().st_size > 0


def test_accuracy_off_a_front_is_not_reached_and_the_headline_says_why(tmp_path):
    """Without its lowest learning rate full's front is one point at 0.80, above the mask's whole front."""
    write_sweep(tmp_path, methods_jobs(full={lr: point for lr, point in FULL.items() if lr != 1e-4}))
    write_sweep_report(tmp_path)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[2] == ("**Matched accuracy on rotten_tomatoes**: no validation accuracy lies on every method's front "
                        "(their ranges: full 0.8000–0.8000, mask/importance 0.6000–0.7600), so no method can be said "
                        "to forget least at an accuracy every method reaches.")
    assert "| 0.6000 | not reached | 0.0500 (0.0500) |" in lines
    assert "| 0.7600 | not reached | 0.2900 (0.1700) |" in lines


def test_a_method_that_stays_below_the_others_is_named_and_the_rest_are_compared(tmp_path):
    """LoRA's front stops at 0.58, below both others: nothing is said at an accuracy every method reaches, but the
    highest accuracy full and the mask share is still compared, naming LoRA as below it."""
    lora = [method_metrics("lora", "method.rank", rank, seed, Result(0.58, 0.58, 0.01 * rank, 0.01 * rank, 0.0))
            for rank in (2, 8) for seed in (0, 1)]
    write_sweep(tmp_path, [*methods_jobs(), *lora])
    write_sweep_report(tmp_path)
    headline = (tmp_path / "report.md").read_text().splitlines()[2]
    assert "lora 0.5800–0.5800" in headline and "so no method can be said to forget least" in headline
    assert headline.endswith("at validation accuracy 0.7600, the highest all but lora reach, mask/importance forgets "
                             f"least: validation forgetting 0.1700 (test 0.2900), against full "
                             f"{between(0.10, 0.30, 0.6):.4f} (test {between(0.12, 0.20, 0.6):.4f}).")


def test_a_method_none_of_whose_jobs_finished_is_named_as_left_out(tmp_path):
    failed = {"status": "failed", "error": "RuntimeError: boom", "seed": 0, "overrides": ["method=lora"],
              "choices": {"method": "lora", "mask": "none"}, "task": None, "interference": None, "mask": None}
    write_sweep(tmp_path, [*methods_jobs(), failed])
    write_sweep_report(tmp_path)
    headline = (tmp_path / "report.md").read_text().splitlines()[2]
    assert headline.startswith("**Matched accuracy on rotten_tomatoes**: (lora: no job finished, left out) at "
                               "validation accuracy 0.7600, the highest every method reaches")


def test_a_presets_setting_files_are_not_settings_of_their_own(tmp_path):
    """experiment=methods names each job's setting file (+experiment/methods=...); what it sets is the dial."""
    jobs = methods_jobs()
    for job in jobs:
        job["overrides"] = [f"+experiment/methods={job['method']['name']}_{job['method']['dial']['value']}",
                            f"seed={job['seed']}", "experiment=methods"]
    write_sweep(tmp_path, jobs)
    summary = summary_table(tmp_path)
    assert (summary["setting"] == "").all()
    assert set(aggregate(summary).groupby("label").size().to_dict().items()) == {("full", 3), ("mask/importance", 2)}


def test_a_setting_files_learning_rate_keeps_its_jobs_apart_from_the_same_dial_at_another(tmp_path):
    """experiment=llm_methods runs LoRA rank 8 at two learning rates, each set in its setting file: two settings of
    one seed each, never one setting of two seeds."""
    jobs = []
    for lr in (1e-3, 3e-3):
        job = method_metrics("lora", "method.rank", 8, 0, FULL[1e-3])
        job["overrides"] = [f"+experiment/llm_methods=lora_r8_lr{lr:g}", "seed=0", "experiment=llm_methods"]
        job["finetune"] = {"lr": lr, "resumed_from_step": None}
        jobs.append(job)
    write_sweep(tmp_path, jobs)
    summary = summary_table(tmp_path)
    assert list(summary["setting"]) == ["finetune.lr=0.001", "finetune.lr=0.003"]
    assert list(aggregate(summary)["seeds"]) == [1, 1]


def test_trainable_share_is_of_the_whole_task_model_whatever_is_eligible(tmp_path):
    narrow = method_metrics("ewc", "method.strength", 1e5, 0, FULL[1e-3], trainable=ELIGIBLE + HEAD)
    narrow["mask"]["eligible"] = 100  # mask.exclude left most of the backbone out of the mask, not out of training
    write_sweep(tmp_path, [narrow])
    assert summary_table(tmp_path).loc[0, "trainable_share"] == 1.0


def test_one_method_alone_has_nothing_to_be_compared_with(tmp_path):
    write_sweep(tmp_path, [method_metrics("full", "finetune.lr", lr, 0, point) for lr, point in FULL.items()])
    write_sweep_report(tmp_path)
    assert (tmp_path / "report.md").read_text().splitlines()[2] == (
        "**Matched accuracy on rotten_tomatoes**: only one method (full) ran, so there is nothing to compare it with "
        "at matched accuracy.")


def test_a_method_without_validation_forgetting_is_named_and_nothing_is_claimed(tmp_path):
    jobs = methods_jobs()
    for metrics in jobs:
        if metrics["method"]["name"] == "mask":
            del metrics["interference"]["validation"]
    write_sweep(tmp_path, jobs)
    write_sweep_report(tmp_path)
    assert (tmp_path / "report.md").read_text().splitlines()[2] == (
        "**Matched accuracy on rotten_tomatoes**: mask/importance recorded no validation forgetting, so not every "
        "method can be compared at matched accuracy.")


def test_interpolation_along_a_front_never_extrapolates():
    front = pd.DataFrame({"task.validation.accuracy mean": [0.6, 0.8, 0.8],
                          "interference.forgetting mean": [0.1, 0.3, 0.5]})  # two points at 0.8 count as their mean
    assert at_accuracy(front, 0.7, "interference.forgetting") == pytest.approx(0.25)
    assert at_accuracy(front, 0.8, "interference.forgetting") == pytest.approx(0.4)
    assert at_accuracy(front, 0.6, "interference.forgetting") == pytest.approx(0.1)
    assert at_accuracy(front, 0.59, "interference.forgetting") is None
    assert at_accuracy(front, 0.81, "interference.forgetting") is None


def test_the_fronts_plot_draws_each_front_with_seed_error_bars(tmp_path):
    write_sweep(tmp_path, methods_jobs())
    fronts = method_fronts(aggregate(summary_table(tmp_path)))
    fig, ax = plt.subplots()
    draw_method_fronts(ax, fronts, [0.7, 0.76])
    drawn = {container.get_label(): container for container in ax.containers}
    assert set(drawn) == {"full", "mask/importance"}
    full_line = drawn["full"].lines[0]
    assert list(full_line.get_xdata()) == pytest.approx([0.70, 0.80])  # validation accuracy: 1e-2 is off the front
    assert list(full_line.get_ydata()) == pytest.approx([0.12, 0.20])  # test forgetting, reported
    assert drawn["full"].has_xerr and drawn["full"].has_yerr
    plt.close(fig)


def test_spearman_correlation_of_each_interference_measure_with_forgetting(tmp_path):
    jobs = methods_jobs()
    for num, metrics in enumerate(jobs):  # measures that order the jobs in other ways, one with ties
        metrics["interference"] |= {"kl_task": (num * 7) % 5 / 10, "cka": 1.0 - (num % 3) / 10, "drift_l2": float(num)}
    jobs[0]["interference"]["kl_task"] = None  # not recorded: that job is left out of kl_task's correlation
    write_sweep(tmp_path, jobs)

    write_sweep_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    forgetting = [m["interference"]["forgetting"] for m in jobs]
    share = [m["method"]["trainable"] / m["method"]["model_entries"] for m in jobs]
    for name, values in (("CKA", [m["interference"]["cka"] for m in jobs]),
                         ("drift L2", [m["interference"]["drift_l2"] for m in jobs]), ("trainable share", share)):
        assert f"| rotten_tomatoes | {name} | {spearmanr(values, forgetting).statistic:+.3f} | {len(jobs)} |" in report
    kl = spearmanr([m["interference"]["kl_task"] for m in jobs[1:]], forgetting[1:]).statistic
    assert f"| rotten_tomatoes | KL on task inputs (kl_task) | {kl:+.3f} | {len(jobs) - 1} |" in report
