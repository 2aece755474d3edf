"""Task data of every task type: classification, causal_lm (python_code, a file's text column) and instruction
(arithmetic, a file's prompt and response columns, a verbalized classification task)."""

import hashlib
import json
import re
import sys
from collections import Counter
from importlib.resources import files

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from maskrun import cli
from maskrun.data import arithmetic
from maskrun.data.dedup import text_key
from maskrun.data.python_code import python_code_documents, stdlib_files, stdlib_folder
from maskrun.errors import ConfigError
from maskrun.data.tasks import TASK_TYPES, check_task, load_task, task_type

ERROR_LINE = re.compile(r"^maskrun: error: .+ \(.+\)$")
TEST_SUITE_FOLDERS = {"test", "tests", "idle_test"}


def dataset(name: str, **overrides):
    """A packaged dataset config as a run composes it, with `overrides`."""
    return OmegaConf.merge(OmegaConf.load(files("maskrun.conf") / "dataset" / f"{name}.yaml"), overrides)


def loaded(dcfg):
    check_task(dcfg)
    return load_task(dcfg, dcfg.split_seed)


def splits(task):
    return task.train, task.validation, task.test


def all_texts(task) -> list[str]:
    return [text for split in splits(task) for text in split.texts]


def write_records(path, records: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(record) for record in records))
    return str(path)


QUESTIONS = [{"query": f"What is {i} plus {i}?", "answer": str(2 * i), "source": "made up"} for i in range(60)]
REPEATS = [{"query": "what is 3 plus 3", "answer": "a repeat"}, {"query": "WHAT IS 7 PLUS 7 ?!", "answer": "another"}]
DOCUMENTS = [f"document {i}: " + "lorem ipsum " * (i % 5) for i in range(50)]


def json_instructions(tmp_path):
    return dataset("json", task_type="instruction", path=write_records(tmp_path / "qa.jsonl", QUESTIONS + REPEATS),
                   prompt_column="query", response_column="answer")


def csv_documents(tmp_path):
    path = tmp_path / "docs.csv"
    pd.DataFrame({"body": DOCUMENTS + [DOCUMENTS[3].upper()], "id": range(51)}).to_csv(path, index=False)
    return dataset("csv", task_type="causal_lm", path=str(path), text_column="body")


# (dataset config, the task type a run trains)
CONFIGS = {
    "classification sms_spam": (lambda tmp_path: dataset("sms_spam"), "classification"),
    "causal_lm python_code": (lambda tmp_path: dataset("python_code"), "causal_lm"),
    "causal_lm csv": (csv_documents, "causal_lm"),
    "instruction arithmetic": (lambda tmp_path: dataset("arithmetic"), "instruction"),
    "instruction json": (json_instructions, "instruction"),
    "instruction verbalized bbc_news": (lambda tmp_path: dataset("bbc_news", verbalize=True), "instruction"),
}


@pytest.mark.parametrize("make, expected_type", CONFIGS.values(), ids=CONFIGS.keys())
def test_each_task_type_is_deduplicated_and_its_splits_are_disjoint(tmp_path, make, expected_type):
    dcfg = make(tmp_path)
    task = loaded(dcfg)
    assert task.task_type == task_type(dcfg) == expected_type
    keys = [[text_key(text) for text in split.texts] for split in splits(task)]
    assert all(len(k) == len(set(k)) > 0 for k in keys), "a repeated text within a split"
    train, validation, test = map(set, keys)
    assert not train & validation and not train & test and not validation & test
    assert [len(split) for split in splits(task)] == [task.split_sizes[s] for s in ("train", "validation", "test")]
    for split in splits(task):
        assert (split.labels is not None) == (expected_type == "classification")
        assert (split.responses is not None) == (expected_type == "instruction")
        assert all(len(values) == len(split) for values in (split.labels, split.responses) if values is not None)
    assert bool(task.label_names) == (expected_type == "classification")


def test_a_json_instruction_set_reads_its_columns_and_keeps_the_first_of_a_repeated_prompt(tmp_path):
    task = loaded(json_instructions(tmp_path))
    assert task.split_sizes["duplicates_dropped"] == len(REPEATS)
    answers = {q["query"]: " " + q["answer"] for q in QUESTIONS}
    pairs = [(prompt, response) for split in splits(task) for prompt, response in zip(split.texts, split.responses)]
    assert sorted(pairs) == sorted(answers.items())
    # a plain random split by the fractions: no labels to stratify by
    assert (len(task.validation), len(task.test)) == (round(0.1 * len(QUESTIONS)), round(0.2 * len(QUESTIONS)))


def test_a_csv_text_column_gives_one_document_per_row(tmp_path):
    task = loaded(csv_documents(tmp_path))
    assert sorted(all_texts(task)) == sorted(d.strip() for d in DOCUMENTS)
    assert task.split_sizes["duplicates_dropped"] == 1


def test_max_examples_and_train_size_are_seeded_random_subsets_of_a_generative_task():
    capped = loaded(dataset("arithmetic", max_examples=500))
    small = loaded(dataset("arithmetic", max_examples=500, train_size=100))
    assert [len(split) for split in splits(capped)] == [500 - 50 - 100, 50, 100]
    assert set(all_texts(capped)) <= set(all_texts(loaded(dataset("arithmetic"))))
    assert len(small.train) == 100 and set(small.train.texts) <= set(capped.train.texts)
    assert small.validation.texts == capped.validation.texts and small.test.texts == capped.test.texts
    assert loaded(dataset("arithmetic", max_examples=500, train_size=100)).train.texts == small.train.texts
    assert loaded(dataset("arithmetic", max_examples=500, split_seed=1)).train.texts != capped.train.texts


def test_python_code_is_the_standard_librarys_own_source_one_document_per_file():
    root = stdlib_folder()
    relative = [path.relative_to(root).as_posix() for path in stdlib_files()]
    assert relative == sorted(relative)
    assert {"os.py", "json/__init__.py", "collections/__init__.py", "email/message.py"} <= set(relative)
    assert not any((TEST_SUITE_FOLDERS | {"site-packages"}) & set(path.split("/")[:-1]) for path in relative)
    task = loaded(dataset("python_code", max_examples=None))
    assert (root / "os.py").read_text(encoding="utf-8") in all_texts(task)
    assert len(all_texts(task)) + task.split_sizes["duplicates_dropped"] == len(python_code_documents())


def test_python_code_skips_test_suites_installed_packages_and_files_that_are_not_utf8(tmp_path):
    kept = {"a.py": "import os\n", "pkg/__init__.py": "x = 1\n", "pkg/mod.py": "def f():\n    return 2\n"}
    skipped = {"test/test_a.py": "import a\n", "pkg/tests/test_mod.py": "import pkg\n", "notes.txt": "not code\n",
               "idlelib/idle_test/test_x.py": "pass\n", "site-packages/lib.py": "y = 2\n"}
    for name, text in (kept | skipped).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "latin.py").write_bytes("# -*- coding: latin-1 -*-\nname = 'café'\n".encode("latin-1"))
    assert python_code_documents(tmp_path) == list(kept.values())


@pytest.mark.parametrize("difficulty", arithmetic.LEVELS)
def test_arithmetic_answers_are_what_the_numbers_in_the_problem_give(difficulty):
    level = arithmetic.LEVELS[difficulty]
    for problem in arithmetic.problems(300, difficulty, seed=0):
        answer = eval(problem.expression)  # Python's own arithmetic on the problem's numbers
        assert answer == int(answer) >= 0 and problem.response == f" {int(answer)}"
        assert problem.prompt.endswith("\nAnswer:") and "\n" not in problem.prompt[:-len("\nAnswer:")]
        numbers = re.findall(r"\d+", problem.prompt)
        assert Counter(numbers) == Counter(re.findall(r"\d+", problem.expression))
        assert len(re.findall(r"[-+*/]", problem.expression)) == level.operations
        assert max(map(int, numbers)) <= level.high
        if "years" not in problem.prompt:  # amounts are in the level's range (ages stay 1-99 at every difficulty)
            assert max(map(int, numbers)) >= level.low


def test_arithmetic_problems_come_from_the_split_seed_alone():
    first, again = loaded(dataset("arithmetic")), loaded(dataset("arithmetic"))
    assert [(s.texts, s.responses) for s in splits(first)] == [(s.texts, s.responses) for s in splits(again)]
    other = all_texts(loaded(dataset("arithmetic", split_seed=1)))
    assert len(set(other) & set(all_texts(first))) < 0.05 * len(other)
    harder = all_texts(loaded(dataset("arithmetic", difficulty=2)))
    assert not set(harder) & set(all_texts(first))


@pytest.mark.parametrize("name, prefix, suffix", [("rotten_tomatoes", "Review: ", "\nSentiment:"),
                                                  ("sms_spam", "Message: ", "\nCategory:"),
                                                  ("bbc_news", "Article: ", "\nTopic:")])
def test_a_verbalized_task_holds_the_classification_splits_texts_as_prompts(name, prefix, suffix):
    settings = {"max_examples": 600, "train_size": 200}
    plain = loaded(dataset(name, **settings))
    verbal = loaded(dataset(name, **settings, verbalize=True))
    assert (plain.task_type, verbal.task_type, verbal.label_names) == ("classification", "instruction", [])
    for p, v in zip(splits(plain), splits(verbal)):
        assert v.texts == [prefix + text + suffix for text in p.texts]
        assert v.responses == [" " + plain.label_names[y] for y in p.labels]
    assert verbal.split_sizes == plain.split_sizes


def digest(task) -> str:
    parts = [task.label_names, {name: [split.texts, split.labels] for name, split in zip(("train", "validation", "test"), splits(task))},
             task.split_sizes]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# Taken from main at 66a51e6, before task types existed: classification's texts, labels and sizes in each split.
RECORDED = [("rotten_tomatoes", {}, "d9ba55daf0f06d6d9b486274c0e220bce8d0b0c22f0a8ff2df09829de74378a3"),
            ("rotten_tomatoes", {"max_examples": 2000, "train_size": 300, "split_seed": 3},
             "b6222effdb945ff29b21a301e3e868da27d510eef536987133dc5801e0220cde"),
            ("sms_spam", {}, "ed0e63abed23f9619cb9d2c6cdf3c3134ce14f85dfadd18d6fc9739a44045c85"),
            ("bbc_news", {"train_size": 500, "split_seed": 1}, "941742f73ce1b5a9a81662212640c39ed439b04992bf34e7435c12aea0d903d0")]


@pytest.mark.parametrize("name, overrides, recorded", RECORDED, ids=[f"{n} {o}" for n, o, _ in RECORDED])
def test_classification_splits_are_unchanged(name, overrides, recorded):
    assert digest(loaded(dataset(name, **overrides))) == recorded


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_records(tmp_path / "qa.jsonl", QUESTIONS)
    return tmp_path


QA = ["dataset=json", "dataset.path=qa.jsonl"]
BAD_TASK_DATA = [
    (QA + ["dataset.task_type=instruction"], "has no column 'prompt' (dataset.prompt_column)"),
    (QA + ["dataset.task_type=instruction", "dataset.prompt_column=query", "dataset.response_column=reply"],
     "has no column 'reply' (dataset.response_column)"),
    (QA + ["dataset.task_type=causal_lm", "dataset.text_column=body"], "has no column 'body' (dataset.text_column)"),
    (QA + ["dataset.task_type=instruction", "dataset.prompt_column=null"], "reads dataset.prompt_column, which is not set"),
    (["dataset.task_type=regression"], f"dataset.task_type='regression' is not supported (choose one of: {', '.join(TASK_TYPES)})"),
    (["dataset=python_code", "dataset.task_type=instruction"], "dataset=python_code is a causal_lm task, not instruction"),
    (["model=tiny_gpt", "dataset=python_code", "dataset.max_examples=3"],
     "splits into train 2, validation 0, test 1 examples: too few"),
    (["dataset=arithmetic", "dataset.difficulty=9"], "dataset.difficulty=9 is not a difficulty"),
    (["dataset=arithmetic", "dataset.difficulty=true"], "dataset.difficulty=True is not a difficulty"),
    (["dataset=arithmetic", "dataset.num_examples=0"], "dataset.num_examples=0 must be a whole number >= 1"),
    (["dataset.verbalize=maybe"], "dataset.verbalize='maybe' is not true or false"),
    (["dataset.verbalize=true", "dataset.verbalize_template=Review"], "has no {text}"),
    (QA + ["dataset.task_type=causal_lm", "dataset.verbalize=true"], "dataset.verbalize=true needs a classification dataset"),
]


@pytest.mark.parametrize("argv, reason", BAD_TASK_DATA, ids=[" ".join(a) for a, _ in BAD_TASK_DATA])
def test_bad_task_data_is_refused_before_any_work(workdir, monkeypatch, capsys, argv, reason):
    before = sorted(workdir.rglob("*"))
    monkeypatch.setattr(sys, "argv", ["maskrun", "experiment=smoke", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and ERROR_LINE.match(stderr.splitlines()[0]) and reason in stderr.splitlines()[0], stderr
    assert "Traceback" not in stderr and sorted(workdir.rglob("*")) == before


def test_the_real_command_refuses_a_missing_response_column(workdir):
    result = run_cli(QA + ["dataset.task_type=instruction", "dataset.prompt_column=query"], workdir, timeout=120)
    assert result.returncode == 2 and ERROR_LINE.match(result.stderr.splitlines()[0]), result.stderr
    assert "has no column 'response' (dataset.response_column)" in result.stderr


@pytest.mark.parametrize("argv", [["dataset=python_code"], ["dataset=arithmetic", "dataset.difficulty=4"],
                                  ["dataset=sms_spam", "dataset.verbalize=true"],
                                  QA + ["dataset.task_type=instruction", "dataset.prompt_column=query", "dataset.response_column=answer"]],
                         ids=["python_code", "arithmetic", "verbalized", "json instructions"])
def test_task_data_of_every_type_passes_the_checks_and_writes_nothing(workdir, argv):
    before = sorted(workdir.rglob("*"))
    cli.check_command_line(["experiment=smoke", "model=tiny_gpt", *argv])  # generative tasks need a decoder
    assert sorted(workdir.rglob("*")) == before


def test_no_two_arithmetic_problems_share_numbers_and_formula_in_any_order():
    # Two stories over one computation are one problem: in two splits, training would give the answer away.
    def numbers_and_answer(p):
        return tuple(sorted(re.findall(r"\d+", p.expression))), p.expression.count("+"), p.expression.count("*"), p.response

    for difficulty in arithmetic.LEVELS:
        drawn = arithmetic.problems(4000, difficulty, seed=0)
        assert len(drawn) == 4000
        sums_and_products = [numbers_and_answer(p) for p in drawn if "-" not in p.expression and "/" not in p.expression]
        assert len(sums_and_products) == len(set(sums_and_products))


def test_more_arithmetic_problems_than_a_difficulty_holds_are_refused():
    with pytest.raises(ConfigError, match="dataset.num_examples=20000 exceeds the .* distinct problems"):
        arithmetic.problems(20000, 1, seed=0)


def test_generated_stdlib_data_is_not_code_to_learn():
    files = [str(path) for path in stdlib_files()]
    assert not any("/encodings/" in f or "/pydoc_data/" in f for f in files)
