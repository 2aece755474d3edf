"""Every stage's key holds a fingerprint of the maskrun source it runs: an edit, committed or not, recomputes
from the first stage it can affect, and never reuses what other code computed."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_metrics, run_dirs
from maskrun import stages

SOURCE = Path(stages.__file__).resolve().parent
CONF = SOURCE.parent / "conf"


def copy_of_maskrun(root: Path) -> Path:
    """A runnable copy of the maskrun package (its configs included), outside any git checkout."""
    package = root / "maskrun"
    shutil.copytree(SOURCE, package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(CONF, package / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    return package


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer holds {old!r}"
    path.write_text(text.replace(old, new))


def fingerprints(monkeypatch, package_root: Path) -> dict[str, str]:
    monkeypatch.setattr(stages, "PACKAGE_ROOT", package_root)
    stages.code_fingerprint.cache_clear()
    try:
        return {stage: stages.code_fingerprint(modules) for stage, modules in stages.STAGE_CODE.items()}
    finally:
        stages.code_fingerprint.cache_clear()


@pytest.mark.parametrize("module, changed", [
    ("evaluate.py", {"result"}),  # interference, measured after fine-tuning; the task types score themselves
    ("masks/random.py", {"mask", "result"}),
    ("data/tokenizer.py", {"tokenizer", "result"}),
    # evaluation measures the pretraining objective, and a causal_lm task packs its text as pretraining does (in the
    # selection pass too)
    ("pretrain.py", {"pretrain", "scores", "selection", "scratch", "result"}),
    ("methods/lora.py", {"result"}),
    ("report/sweep.py", set()),  # the sweep report reads results; no stage runs it
])
def test_an_edit_changes_the_fingerprint_of_exactly_the_stages_that_run_it(tmp_path, monkeypatch, module, changed):
    package = copy_of_maskrun(tmp_path)
    before = fingerprints(monkeypatch, package)
    with (package / module).open("a") as f:
        f.write("\n# an edit\n")
    after = fingerprints(monkeypatch, package)
    assert {stage for stage in before if before[stage] != after[stage]} == changed


def test_every_stage_declares_code_that_exists_and_follows_its_imports():
    for stage, modules in stages.STAGE_CODE.items():
        closure = stages.import_closure(modules)
        assert all(stages.module_file(name).is_file() for name in closure), stage
        assert set(modules) <= closure
    assert "maskrun.models" in stages.import_closure(("maskrun.pretrain",))  # a plain import
    assert "maskrun.models" in stages.import_closure(("maskrun.masks.scores",))  # an import inside a function
    assert "maskrun.masks.random" in stages.import_closure(("maskrun.masks",))  # `from package import module`


def run_copy(package_root: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_root.parent), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "maskrun.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def test_an_uncommitted_edit_is_recomputed_from_the_first_stage_it_affects(tmp_path):
    """The same settings and cache, run by the code as it is and by a copy whose evaluation was edited."""
    original, edited = copy_of_maskrun(tmp_path / "original"), copy_of_maskrun(tmp_path / "edited")
    edit(edited / "evaluate.py", '"forgetting": None if loss_before is None else loss_after - loss_before',
         '"forgetting": 12345.0')
    args = ["experiment=smoke", "pretrain.steps=2", "finetune.epochs=1", "dataset.max_examples=120",
            f"cache_dir={tmp_path / 'cache'}"]
    for package in (original, edited):
        run_copy(package, [*args, f"hydra.run.dir={tmp_path / 'runs' / package.parent.name}"], tmp_path)
    first, second = (load_metrics(tmp_path / "runs" / name) for name in ("original", "edited"))
    assert first["cache"]["result"] == "miss" and first["interference"]["forgetting"] != 12345.0
    assert second["cache"]["result"] == "miss" and second["interference"]["forgetting"] == 12345.0
    # Evaluation runs in no stage before the result: those are reused.
    assert {second["cache"][stage] for stage in ("tokenizer", "pretrain", "scores", "mask")} <= {"hit", "skipped"}
    assert first["versions"]["source"] != second["versions"]["source"]
    assert first["interference"]["pretrain_loss_before"] == second["interference"]["pretrain_loss_before"]


def test_resume_in_the_same_run_dir_reruns_a_job_that_other_code_finished(tmp_path):
    original, edited = copy_of_maskrun(tmp_path / "original"), copy_of_maskrun(tmp_path / "edited")
    edit(edited / "evaluate.py", '"forgetting": None if loss_before is None else loss_after - loss_before',
         '"forgetting": 12345.0')
    args = ["experiment=smoke", "pretrain.steps=2", "finetune.epochs=1", "dataset.max_examples=120",
            f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    run_copy(original, args, tmp_path)
    reused = run_copy(original, args, tmp_path)
    assert "reused finished run" in reused.stdout + reused.stderr
    rerun = run_copy(edited, args, tmp_path)
    assert "reused finished run" not in rerun.stdout + rerun.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["interference"]["forgetting"] == 12345.0
    assert run_dirs(tmp_path / "run") == [tmp_path / "run"]


def test_files_named_by_path_count_by_their_content(tmp_path):
    """A user's task file edited in place, or a corpus read in another encoding, is another input."""
    from hydra import compose, initialize_config_module

    task_file, corpus_file = tmp_path / "task.csv", tmp_path / "corpus.txt"
    task_file.write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(40)))
    corpus_file.write_bytes("café naïve\n".encode("utf-8") * 3)
    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", ["dataset=csv", f"dataset.path={task_file}", f"dataset.corpus_path={corpus_file}",
                                 "mask.score=gradient"])
        latin = compose("config", ["dataset=csv", f"dataset.path={task_file}", f"dataset.corpus_path={corpus_file}",
                                   "dataset.encoding=latin-1"])
    keys = lambda: (stages.scores(cfg, cfg.mask, tmp_path), stages.result(cfg), stages.tokenizer(cfg))
    before = keys()
    task_file.write_text("text,label\n" + "".join(f"text {i},{i % 3 == 0}\n" for i in range(40)))
    after = keys()
    assert before[0] != after[0] and before[1] != after[1]
    assert before[2] == after[2]  # the tokenizer reads the corpus, not the task
    assert stages.tokenizer(cfg) != stages.tokenizer(latin)


def test_python_code_is_keyed_by_the_python_whose_standard_library_it_reads(monkeypatch):
    from hydra import compose, initialize_config_module

    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", ["model=tiny_gpt", "dataset=python_code"])
    here, version = stages.task(cfg.dataset), platform.python_version()
    monkeypatch.setattr(stages.platform, "python_version", lambda: "0.0.0")
    assert here["python"] == version and stages.task(cfg.dataset)["python"] == "0.0.0"
