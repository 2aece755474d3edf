"""eval.posthoc_reset: the run's mask strategy at other ratios, applied to the fine-tuned deltas after training."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_metrics, maskrun, run_dirs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same smoke run with and without the post-hoc curve, sharing one cache."""
    cwd = tmp_path_factory.mktemp("posthoc")
    maskrun(["experiment=smoke", "mask.ratio=0.5", "hydra.run.dir=plain"], cwd)
    maskrun(["experiment=smoke", "mask.ratio=0.5", "eval.posthoc_reset=[0.5,0.75,1.0]", "hydra.run.dir=posthoc"], cwd)
    return cwd / "plain", cwd / "posthoc"


@pytest.fixture(scope="module")
def posthoc_run(runs):
    return runs[1]


def test_one_record_per_ratio(posthoc_run):
    metrics = load_metrics(posthoc_run)
    rows = metrics["posthoc"]
    assert [row["ratio"] for row in rows] == [0.5, 0.75, 1.0]
    assert [row["ratio_actual"] for row in rows] == pytest.approx([0.5, 0.75, 1.0], abs=1e-3)
    assert "posthoc" in metrics["timing"]
    for row in rows:
        assert set(row["validation"]) >= {"accuracy", "macro_f1"} and set(row["test"]) >= {"accuracy", "macro_f1"}
        assert row["forgetting"] == row["interference"]["forgetting"]


def test_the_runs_own_ratio_resets_nothing(posthoc_run):
    """At the run's own ratio the strategy builds the run's own mask (the same cache entry): the fine-tuned
    model is measured unchanged."""
    metrics = load_metrics(posthoc_run)
    own = metrics["posthoc"][0]
    assert own["mask_cache"] == "hit" and own["reset_entries"] == 0
    assert own["test"] == metrics["task"]["test"]
    assert own["forgetting"] == metrics["interference"]["forgetting"]


def test_reset_counts_the_entries_that_trained(posthoc_run):
    metrics = load_metrics(posthoc_run)
    rows = {row["ratio"]: row for row in metrics["posthoc"]}
    eligible = metrics["mask"]["eligible"]
    assert rows[0.75]["reset_entries"] == round(0.75 * eligible) - metrics["mask"]["frozen"]
    assert rows[1.0]["reset_entries"] == metrics["mask"]["trainable"]


def test_resetting_every_entry_restores_the_pretrained_backbone(posthoc_run):
    """At ratio 1 every eligible entry takes its pretrained value: the backbone is the pretrained one, so nothing
    is forgotten and nothing drifted (the head keeps its fine-tuned weights and is not part of either measure)."""
    row = load_metrics(posthoc_run)["posthoc"][-1]
    assert row["forgetting"] == 0.0
    assert row["interference"]["drift_l2"] == 0.0
    assert row["interference"]["cka"] == pytest.approx(1.0)


def test_the_run_is_the_trained_one(runs):
    """The weights are restored after the curve: the saved model and the run's own numbers are bit-identical to
    the same run's without it (the curve's last ratio, 1, would otherwise leave the pretrained backbone)."""
    plain, posthoc = runs
    saved, saved_beside_curve = (load_file(run / "finetuned" / "model.safetensors") for run in runs)
    assert saved.keys() == saved_beside_curve.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, saved_beside_curve[name]), name
    plain_metrics, posthoc_metrics = load_metrics(plain), load_metrics(posthoc)
    assert "posthoc" not in plain_metrics
    for key in ("task", "interference", "mask"):
        assert plain_metrics[key] == posthoc_metrics[key]


def test_report_has_a_row_per_ratio(posthoc_run):
    report = (posthoc_run / "report.md").read_text()
    section = report.split("## Masks applied after training")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| 0.") or line.startswith("| 1.")]
    assert [row.split("|")[1].strip() for row in rows] == ["0.50", "0.75", "1.00"]


@pytest.mark.parametrize("override, expected", [
    (["eval.posthoc_reset=[0.5,1.5]"], "eval.posthoc_reset ratio=1.5 is not a number in [0, 1]"),
    (["eval.posthoc_reset=0.5"], "eval.posthoc_reset=0.5 is not a list of ratios"),
    (["eval.posthoc_reset=0"], "eval.posthoc_reset=0 is not a list of ratios"),
    (["method=full", "eval.posthoc_reset=[0.5]"], "mask=none freezes nothing at any ratio"),
    (["mask=child_tuning", "eval.posthoc_reset=[0.5]"], "mask=child_tuning moves during fine-tuning"),
])
def test_bad_posthoc_reset_is_refused_before_any_work(tmp_path, override, expected):
    result = maskrun(["experiment=smoke", *override], tmp_path, expect=2)
    assert result.stderr.startswith("maskrun: error: ") and expected in result.stderr.splitlines()[0]
    assert not (tmp_path / "outputs").exists() or not run_dirs(tmp_path / "outputs")


def test_a_strategy_that_chooses_after_a_fine_tuning_pass_builds_its_reset_masks_from_that_pass(tmp_path):
    maskrun(["experiment=smoke", "mask=lt_sft", "mask.ratio=0.25", "eval.posthoc_reset=[0.25,0.75]",
             "hydra.run.dir=lt_sft"], tmp_path)
    metrics = load_metrics(tmp_path / "lt_sft")
    own, more = metrics["posthoc"]
    assert own["mask_cache"] == "hit" and own["reset_entries"] == 0  # the run's own mask, from the same records
    assert more["reset_entries"] == round(0.75 * metrics["mask"]["eligible"]) - metrics["mask"]["frozen"]
