"""Bad input is refused before any work: exit 2, one line `maskrun: error: <what> (<how to fix>)`,
a few help lines at most, never a traceback, and nothing written (the cache least of all).

Most cases go through `maskrun.cli.main` in this process (the same boundary the command runs);
a sample runs the real command to show the same holds end to end.
"""

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from maskrun import cli
from maskrun.cache import Cache
from maskrun.data.checks import check_dataset_file
from maskrun.errors import ConfigError
from maskrun.report import cli as report_cli

ERROR_LINE = re.compile(r"^maskrun: error: .+ \(.+\)$")
MAX_HELP_LINES = 3


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory holding a populated default cache (outputs/.cache); PATH finds no tools (no srun)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    cache = Cache(tmp_path / "outputs" / ".cache")
    cache.fetch("pretrain", {"seed": 0}, lambda out: (out / "model.safetensors").write_bytes(b"weights"))
    cache.close()
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "an_empty_dir").mkdir()
    rows = {"text": [f"review number {i}" for i in range(60)], "label": ["good", "bad"] * 30}
    write_parquet(tmp_path / "reviews.parquet", rows)
    write(tmp_path / "reviews.jsonl.json", "\n".join(json.dumps({"text": t, "label": y})
                                                    for t, y in zip(rows["text"], rows["label"])))
    (tmp_path / "presets" / "experiment").mkdir(parents=True)
    (tmp_path / "presets" / "experiment" / "bad_sweep.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      mask.ratio: 0.3,1.5\n")
    return tmp_path


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def assert_refused(code, stderr: str, reason: str, before: dict, root: Path) -> list[str]:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert ERROR_LINE.match(lines[0]), lines[0]
    assert reason in lines[0], lines[0]
    assert len(lines) <= 1 + MAX_HELP_LINES and "Traceback" not in stderr and "search path" not in stderr
    assert snapshot(root) == before, "refused input must not write anything"
    return lines


BAD_COMMAND_LINES = [
    (["mask.ratio=1.5"], "mask.ratio=1.5 is not a number in [0, 1]"),
    (["mask.ratio=-0.1"], "mask.ratio=-0.1 is not a number in [0, 1]"),
    (["mask.ratio=half"], "mask.ratio='half'"),
    (["mask.ratio=nan"], "mask.ratio=nan"),
    (["mask.ratio=[0.5]"], "mask.ratio=[0.5]"),
    (["model=gpt5"], "unknown model 'gpt5'"),
    (["mask=magic"], "unknown mask 'magic'"),
    (["optimizer=lion"], "unknown optimizer 'lion'"),
    (["mask.ratioo=0.5"], "unknown key 'mask.ratioo'"),
    (["+learning_rate=0.1"], "unknown key 'learning_rate'"),
    (["++mask.extra=1"], "unknown key 'mask.extra'"),
    (["+seed=4"], "+seed adds what already exists"),
    (["-m", "mask.ratio=0.1,0.5,7"], "mask.ratio=7"),
    (["-m", "seed=0,1", "finetune.batch_size=16,0"], "finetune.batch_size=0"),
    (["mask.ratio=0.1,0.5"], "describes several runs"),
    (["finetune.batch_size=0"], "finetune.batch_size=0"),
    (["pretrain.batch_size=0"], "pretrain.batch_size=0"),
    (["finetune.epochs=0"], "finetune.epochs=0"),
    (["device=cuda:7"], "device=cuda:7 does not exist"),
    (["device=tpu"], "device='tpu' is not a device"),
    (["cache_dir=a_file"], "cache_dir=a_file is not writable"),
    (["cache_dir=a_file/cache"], "cache_dir=a_file/cache is not writable"),
    (["cache_dir=/proc/maskrun-cache"], "cache_dir=/proc/maskrun-cache is not writable"),
    (["hydra.run.dir=/proc/maskrun-run"], "hydra.run.dir=/proc/maskrun-run is not writable"),
    (["finetune.max_length=4096"], "exceeds the model's 128 positions"),
    (["pretrain.max_length=2"], "pretrain.max_length=2"),
    (["dataset.corpus_max_texts=3"], "too few for model.vocab_size=8000"),
    (["dataset.max_examples=5"], "splits into train 4, validation 0, test 1 examples"),
    (["finetune.lr=-1"], "finetune.lr=-1 must be a positive number"),
    (["pretrain.lr=inf"], "pretrain.lr=inf must be a positive number"),
    (["seed=abc"], "seed='abc'"),
    (["finetune=fast"], "replaces the whole finetune section"),
    (["model.hidden_size=33"], "not a multiple of model.num_heads"),
    (["model.dropout=1.5"], "model.dropout=1.5"),
    (["finetune.scheduler=exponential"], "finetune.scheduler='exponential'"),
    (["mask.include=['(']"], "is not a valid regex"),
    (["save_model=sometimes"], "save_model='sometimes'"),
    (["dataset.validation_fraction=0.5", "dataset.test_fraction=0.5"], "leave no training data"),
    (["dataset=arithmetic", "dataset.chat_template=chatml"], "dataset.chat_template='chatml' is not auto or false"),
    (["-m", "--config-dir", "presets", "experiment=bad_sweep"], "mask.ratio=1.5 is not a number in [0, 1]"),
    (["--config-dir", "no_such_dir"], "--config-dir no_such_dir is not a directory"),
    (["pretrain.warmup_steps=-1"], "pretrain.warmup_steps=-1 must be a whole number >= 0"),
    (["mask.include=[nomatch]"], "leave no backbone parameter to mask"),
    (["mask.exclude=[.*]"], "leave no backbone parameter to mask"),
    (["model=tiny_gpt", "mask.include=[attention]"], "leave no backbone parameter to mask"),  # GPT-2 says attn
    (["model=hf", "model.name_or_path=/no/such/model"], "model.name_or_path=/no/such/model does not exist"),
    (["model=hf", "model.name_or_path=an_empty_dir"], "model.name_or_path=an_empty_dir cannot be loaded"),
    (["model.dtype=fp16"], "model.dtype='fp16' is not supported"),
    (["model=tiny_gpt", "model.objective=mlm"], "model.family=gpt2 has no mlm head"),
    (["model=tiny_gpt", "model.vocab_size=200"], "model.vocab_size=200 leaves no room for merges"),
    (["model=tiny_gpt", "finetune.input_mask_prob=0.1"], "byte-level tokenizer has none"),
    (["dataset.train_size=100000000"], "dataset.train_size=100000000 exceeds the 8925 training examples"),
    (["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0", "seed=0,1"], "hydra.launcher.n_jobs=0"),
    (["-m", "hydra/launcher=slurm", "seed=0,1"], "srun is not on this machine's PATH"),
    (["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=0"], "hydra.launcher.timeout_min=0"),
    (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    (["optimizer.betas=[nan,0.999]"], "optimizer.betas=[nan, 0.999] must be two numbers in [0, 1)"),
    (["optimizer.betas=0.9"], "optimizer.betas=0.9 must be two numbers in [0, 1)"),
    (["optimizer.eps=nan"], "optimizer.eps=nan must be a positive number"),
    (["optimizer.eps=-1"], "optimizer.eps=-1 must be a positive number"),
    (["finetune.max_grad_norm=nan"], "finetune.max_grad_norm=nan must be a positive number or null"),
    (["optimizer=sgd", "optimizer.nesterov=maybe"], "optimizer.nesterov='maybe' is not true or false"),
    (["--cfg", "jobb"], "invalid choice: 'jobb'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("argv, reason", BAD_COMMAND_LINES, ids=[" ".join(a) for a, _ in BAD_COMMAND_LINES])
def test_bad_command_line_is_refused_before_any_work(workdir, monkeypatch, capsys, argv, reason):
    before = snapshot(workdir)
    monkeypatch.setattr(sys, "argv", ["maskrun", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert_refused(exit_info.value.code, capsys.readouterr().err, reason, before, workdir)


def test_unknown_option_lists_the_valid_ones(workdir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["maskrun", "mask=magic"])
    with pytest.raises(SystemExit):
        cli.main()
    line, *help_lines = capsys.readouterr().err.strip().splitlines()
    options = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "mask").glob("*.yaml"))
    assert all(option in line for option in options)
    assert help_lines == [f"  mask options: {', '.join(options)}"]


REAL_COMMAND_SAMPLE = [
    (["-m", "mask=importance,magic"], "unknown mask 'magic'"),
    (["cache_dir=a_file"], "cache_dir=a_file is not writable"),
]


@pytest.mark.parametrize("argv, reason", REAL_COMMAND_SAMPLE, ids=[" ".join(a) for a, _ in REAL_COMMAND_SAMPLE])
def test_the_real_command_refuses_the_same_way(workdir, argv, reason):
    before = snapshot(workdir)
    result = run_cli(argv, workdir, timeout=120)
    assert_refused(result.returncode, result.stderr, reason, before, workdir)


# Dataset files: the checks the data loader runs on a user's file (dataset.path and friends).

def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def write_parquet(path: Path, rows: dict) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table(rows), path)
    return path


BAD_DATASET_FILES = [
    ("missing", lambda d: d / "nope.csv", "does not exist"),
    ("empty", lambda d: write(d / "empty.csv", ""), "is empty"),
    ("header only", lambda d: write(d / "header.csv", "text,label\n"), "holds no rows"),
    ("ragged csv", lambda d: write(d / "ragged.csv", "text,label\ngood,pos\na,b,neg\n"), "row 3 has 3 fields"),
    ("bad csv quoting", lambda d: write(d / "quote.csv", 'text,label\n"open quote" x,pos\n'), "is not valid CSV"),
    ("invalid json", lambda d: write(d / "bad.json", '[{"text": "a", "label": 1},'), "is not valid JSON"),
    ("json not records", lambda d: write(d / "list.json", "[1, 2, 3]"), "is not a list of records"),
    ("wrong encoding", lambda d: write(d / "latin.csv", "text,label\ncaf\xe9,pos\nbad,neg\n".encode("latin-1")),
     "is not valid utf-8"),
    ("no text column", lambda d: write(d / "cols.csv", "sentence,label\na,pos\nb,neg\n"), "no column 'text'"),
    ("no label column", lambda d: write(d / "cols.json", json.dumps([{"text": "a", "y": 1}, {"text": "b", "y": 0}])),
     "no column 'label'"),
    ("one class", lambda d: write(d / "one.csv", "text,label\na,pos\nb,pos\n"), "one class only"),
    ("float labels", lambda d: write(d / "float.json", json.dumps([{"text": "a", "label": 0.5}, {"text": "b", "label": 1.5}])),
     "neither an int nor a string"),
    ("list labels", lambda d: write(d / "lists.jsonl", '{"text": "a", "label": [1]}\n{"text": "b", "label": [0]}\n'),
     "neither an int nor a string"),
    ("fractional labels in csv", lambda d: write(d / "scores.csv", "text,label\na,0.25\nb,0.75\n"), "is a fractional number"),
    ("empty text", lambda d: write(d / "blank.csv", "text,label\na,pos\n  ,neg\n"), "record 2 has an empty text"),
    ("mixed labels", lambda d: write(d / "mixed.json", json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": "neg"}])),
     "mix ints and strings"),
    ("parquet without labels", lambda d: write_parquet(d / "t.parquet", {"text": ["a", "b"], "y": [0, 1]}),
     "no column 'label'"),
    ("not parquet", lambda d: write(d / "fake.parquet", "text,label\na,pos\n"), "is not valid Parquet"),
    ("unknown format", lambda d: write(d / "data.xlsx", "x"), "cannot tell the format"),
]


@pytest.mark.parametrize("make, reason", [(m, r) for _, m, r in BAD_DATASET_FILES], ids=[n for n, _, _ in BAD_DATASET_FILES])
def test_bad_dataset_file_is_refused(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_dataset_file(path, None, "text", "label", "utf-8")
    assert reason in str(err.value) and str(path) in str(err.value)
    assert err.value.fix  # every message says how to fix it


def test_unknown_encoding_name_is_refused(tmp_path):
    path = write(tmp_path / "ok.csv", "text,label\na,pos\nb,neg\n")
    with pytest.raises(ConfigError, match="dataset.encoding='klingon'"):
        check_dataset_file(path, None, "text", "label", "klingon")


@pytest.mark.parametrize("name, content", [
    ("ok.csv", 'text,label\n"a, quoted",pos\nb,neg\n'),
    ("ok.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'),
    ("ok.json", json.dumps([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])),
    ("lines.json", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'),  # JSON Lines under .json
    ("excel.csv", "\ufefftext,label\na,pos\nb,neg\n"),  # a byte order mark before the header
    ("ids.csv", "text,label\na,1\nb,0\nc,2.0\n"),
])
def test_good_dataset_files_pass(tmp_path, name, content):
    check_dataset_file(write(tmp_path / name, content), None, "text", "label", "utf-8")


def test_maskrun_report_refuses_a_dir_that_is_no_run_or_sweep(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    for path in (tmp_path / "notes", tmp_path / "missing"):
        with pytest.raises(SystemExit) as exit_info:
            report_cli.main([str(path)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"maskrun-report: error: {path} is neither a run dir nor a sweep dir (")


@pytest.mark.parametrize("argv", [
    ["-m", "seed=range(2)", "experiment=smoke", "mask=none,random"],
    ["++seed=3", "+hydra.job.env_set.TOKENIZERS_PARALLELISM=false"],
    ["optimizer=sgd", "++optimizer.momentum=0.5", "mask.include=[encoder]"],
    ["experiment=smoke", "dataset.max_examples=12", "device=cpu", "cache_dir=new/cache/dir"],
    ["experiment=smoke", "dataset=parquet", "dataset.path=reviews.parquet"],
    ["experiment=smoke", "dataset=json", "dataset.path=reviews.jsonl.json"],  # JSON Lines under .json
])
def test_good_command_lines_pass_and_write_nothing(workdir, argv):
    before = snapshot(workdir)
    cli.check_command_line(argv)
    assert snapshot(workdir) == before
