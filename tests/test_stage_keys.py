"""Every stage's key holds a fingerprint of the maskrun source it runs: an edit, committed or not, recomputes
from the first stage it can affect, and never reuses what other code computed."""

import ast
import graphlib
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
    clear_source_caches()
    try:
        return {stage: stages.code_fingerprint(modules) for stage, modules in stages.STAGE_CODE.items()}
    finally:
        clear_source_caches()


def clear_source_caches() -> None:
    for cached in (stages.code_fingerprint, stages.code_of, stages.maskrun_imports):
        cached.cache_clear()


def changed_stages(monkeypatch, package: Path, module: str, change) -> set[str]:
    """The stages whose code fingerprint `change` (of the file's text) alters when applied to `module`."""
    before = fingerprints(monkeypatch, package)
    path = package / module
    changed = change(path.read_text())
    assert changed != path.read_text()
    path.write_text(changed)
    after = fingerprints(monkeypatch, package)
    return {stage for stage in before if before[stage] != after[stage]}


def add_code(text: str) -> str:
    return text + "\nAN_EDIT = 1\n"


def add_comment(text: str) -> str:
    first_def = text.index("\ndef ") + 1
    return text[:first_def] + "# an edit\n" + text[first_def:]


def reword_docstrings(text: str) -> str:
    """Every docstring (the module's, its classes' and functions') one line longer."""
    lines = text.splitlines(keepends=True)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, stages.DOCUMENTED) and ast.get_docstring(node) is not None:
            first = node.body[0].lineno - 1
            lines[first] = lines[first].replace('"""', '"""Reworded.\n' + " " * node.body[0].col_offset, 1)
    return "".join(lines)


def modules(package: Path) -> list[str]:
    return sorted(str(path.relative_to(package)) for path in package.rglob("*.py") if "conf" not in path.parts)


def module_name(relative_path: str) -> str:
    parts = Path(relative_path).with_suffix("").parts
    return ".".join(("maskrun",) + (parts[:-1] if parts[-1] == "__init__" else parts))


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
    assert changed_stages(monkeypatch, copy_of_maskrun(tmp_path), module, add_code) == changed


# What checks, drives, tracks or reports a job computes nothing a stage caches: editing it reruns nothing.
JOB_CODE = ["validate.py", "job.py", "cli.py", "provenance.py", "report/run.py",
            *(f"loggers/{name}" for name in modules(SOURCE / "loggers"))]


@pytest.mark.parametrize("module", JOB_CODE)
def test_editing_the_code_around_the_stages_changes_no_stage_key(tmp_path, monkeypatch, module):
    assert changed_stages(monkeypatch, copy_of_maskrun(tmp_path), module, add_code) == set()


@pytest.mark.parametrize("change", [add_comment, reword_docstrings])
@pytest.mark.parametrize("module", ["pretrain.py", "finetune.py", "masks/__init__.py", "pipeline.py"])
def test_comments_and_docstrings_change_no_stage_key(tmp_path, monkeypatch, module, change):
    assert changed_stages(monkeypatch, copy_of_maskrun(tmp_path), module, change) == set()


def test_the_imports_of_maskrun_form_no_circle():
    """An import circle would tie each stage's key to the code of whatever imports it (its callers, their
    checks and reports): every maskrun module's imports, those inside functions too, must form a DAG."""
    graph = {module_name(path): set(stages.maskrun_imports(module_name(path))) for path in modules(SOURCE)}
    assert len(graph) > 50 and graph["maskrun.pipeline"]
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import circle: {' -> '.join(err.args[1])}")


def test_no_stage_runs_the_code_that_checks_drives_tracks_or_reports_a_job():
    job_code = {module_name(path) for path in JOB_CODE} | {module_name(f"report/{path}") for path in
                                                           modules(SOURCE / "report")}
    for stage, stage_modules in stages.STAGE_CODE.items():
        assert stages.import_closure(stage_modules) & job_code == set(), stage


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


def test_a_job_finished_before_an_edit_of_its_checks_or_its_report_is_reused(tmp_path):
    """Another run dir, the same settings and cache, run by a copy whose config checks and run report were edited:
    the result is the cached one, and the edited report shows it."""
    original, edited = copy_of_maskrun(tmp_path / "original"), copy_of_maskrun(tmp_path / "edited")
    edit(edited / "validate.py", "add -m to run them as a sweep", "add -m to sweep over them")
    edit(edited / "report/run.py", 'f"# maskrun run · {run_dir.name}"', 'f"# maskrun run: {run_dir.name}"')
    args = ["experiment=smoke", "pretrain.steps=2", "finetune.epochs=1", "dataset.max_examples=120",
            f"cache_dir={tmp_path / 'cache'}"]
    for package in (original, edited):
        run_copy(package, [*args, f"hydra.run.dir={tmp_path / 'runs' / package.parent.name}"], tmp_path)
    first, second = (load_metrics(tmp_path / "runs" / name) for name in ("original", "edited"))
    assert first["cache"]["result"] == "miss" and "reused_result" not in first
    assert second["cache"]["result"] == "hit" and second["reused_result"]
    assert second["task"] == first["task"] and second["versions"]["source"] == first["versions"]["source"]
    assert (tmp_path / "runs" / "edited" / "report.md").read_text().startswith("# maskrun run: edited")


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


def test_a_mask_is_the_same_whichever_task_type_ran_first_on_the_checkpoint(tmp_path, tiny_llama_dir):
    """A classification task may train a new head but not the LM head, an instruction task the LM head: the mask
    stage is keyed by the tensors it is drawn over, so an instruction run never reuses a classification run's mask."""
    from safetensors.torch import load_file

    from conftest import maskrun

    checkpoint = ["experiment=smoke", "model=hf", f"model.name_or_path={tiny_llama_dir}", "pretrain.steps=0",
                  "mask=random", "mask.ratio=0.5", "finetune.epochs=1", "eval.heldout_texts=20"]
    classification = [*checkpoint, "dataset.max_examples=60"]
    instruction = [*checkpoint, "dataset=arithmetic", "dataset.num_examples=60"]

    def masks(*jobs: list[str], cwd: Path) -> list[dict]:
        """The masks of `jobs` run one after another on one cache."""
        cwd.mkdir()
        found = []
        for number, args in enumerate(jobs):
            maskrun([*args, f"hydra.run.dir=runs/{number}"], cwd)
            metrics = load_metrics(cwd / "runs" / str(number))
            found.append(load_file(cwd / "runs" / str(number) / "mask.safetensors") | {"ratio": metrics["mask"]})
        return found

    (alone,) = masks(instruction, cwd=tmp_path / "alone")
    classified, after_classification = masks(classification, instruction, cwd=tmp_path / "after")
    assert "lm_head.weight" in alone and "lm_head.weight" not in classified
    assert alone.keys() == after_classification.keys()
    assert all(alone[name].equal(after_classification[name]) for name in alone if name != "ratio")
    assert after_classification["ratio"]["ratio_actual"] == alone["ratio"]["ratio_actual"]
