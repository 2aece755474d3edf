"""What each cached stage depends on, declared once: the settings it reads, the entries it builds on, the code it runs.

A stage's cache key is the hash of its inputs (cache.cache_key). Besides its settings and upstream
entries, every stage's inputs hold

- `code`: a fingerprint of the maskrun source the stage runs: its modules and every maskrun module
  they import, read from the files themselves (committed or not) as syntax trees without their
  docstrings, so that comments, docstrings and layout do not count. An edit recomputes from the first
  stage whose code it touches, and every stage downstream of it, since their keys hold its entry.
  So the imports mirror the stages: what a stage runs imports nothing that only checks, drives,
  tracks or reports a job (maskrun.validate, maskrun.job, maskrun.loggers, maskrun.report), and no
  import circle ties a stage's code to its callers' (tests/test_stage_keys.py holds them to that).
- `libraries`: the versions of the libraries whose numerics the artifacts depend on.

Upstream entries are named by their directory (their own key), so a key never repeats the inputs
of the stages it builds on. Files the settings name by path (a user's corpus or task file, a local
model folder) count by their content, not their name.
"""

import ast
import functools
import hashlib
import json
import platform
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import maskrun
from maskrun import dequantize as gguf_checkpoint
from maskrun.benchmarks import BENCHMARKS
from maskrun.cache import cache_key

PACKAGE_ROOT = Path(maskrun.__file__).resolve().parent
# The eval settings a task's validation result depends on (maskrun.tasks): its batches, and an instruction task's
# generation and answer matching.
VALIDATION_SETTINGS = ("batch_size", "max_new_tokens", "answer_pattern")
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)  # what may open with a docstring
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "scikit-learn", "pandas", "peft")

# The modules each stage runs (the pipeline passes them the corpus and the task, so the data
# modules that load those count too); their maskrun imports are followed.
STAGE_CODE = {
    "dequantize": ("maskrun.dequantize",),
    "tokenizer": ("maskrun.data.tokenizer", "maskrun.data.corpus"),
    "pretrain": ("maskrun.pretrain", "maskrun.data.corpus"),
    "scores": ("maskrun.masks.scores", "maskrun.data.tasks", "maskrun.tasks"),
    "selection": ("maskrun.masks.selection_pass", "maskrun.data.tasks", "maskrun.tasks"),
    "mask": ("maskrun.masks",),
    "scratch": ("maskrun.controls", "maskrun.data.tasks", "maskrun.tasks"),
    "benchmarks": ("maskrun.benchmarks.score",),
    "result": ("maskrun.pipeline", "maskrun.launch"),  # launch: the pipeline in several processes (devices>1)
}


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def training(fcfg) -> dict:
    """The fine-tuning settings that decide what it computes: how often it checkpoints does not."""
    return {key: value for key, value in plain(fcfg).items() if key != "checkpoint_every"}


def stage_inputs(stage: str, **declared) -> dict:
    return {"code": code_fingerprint(STAGE_CODE[stage]), "libraries": library_versions(), **declared}


def corpus(dcfg) -> dict:
    """The pretraining corpus: packaged by name, a user's file by its content and encoding."""
    spec = {"corpus": dcfg.corpus, "max_texts": dcfg.corpus_max_texts, "split_seed": dcfg.split_seed}
    if dcfg.get("corpus_path"):
        spec |= {"corpus_file": file_digest(Path(dcfg.corpus_path)), "encoding": dcfg.get("encoding")}
    return spec


def task(dcfg) -> dict:
    """The task's settings, a user's task file by its content, and python_code by the Python whose standard library
    it reads."""
    spec = {**plain(dcfg), "path": file_digest(Path(dcfg.path)) if dcfg.get("path") else None}
    if dcfg.task == "python_code":
        spec["python"] = platform.python_version()
    return spec


def model(mcfg) -> dict:
    """The model's settings, a local model folder by its files, and a GGUF checkpoint by its dequantized entry."""
    source = mcfg.get("name_or_path")
    spec = {**plain(mcfg), "name_or_path": folder_digest(Path(source)) if source and Path(source).is_dir() else source}
    if mcfg.get("gguf"):
        spec["gguf"] = cache_key("dequantize", dequantize(mcfg))
    return spec


def dequantize(mcfg) -> dict:
    """A GGUF checkpoint by its file's content (the same file in another package or place is the same checkpoint),
    and the version of the library that reads it."""
    return stage_inputs("dequantize", sha256=gguf_checkpoint.digest(mcfg.gguf), gguf=version("gguf"))


def tokenizer(cfg) -> dict:
    """A pretrained model's own tokenizer is keyed by the model; a trained one by its corpus, its size and the family
    it is for (WordPiece or byte-level BPE)."""
    if cfg.model.get("packaged") or cfg.model.get("name_or_path") or cfg.model.get("gguf"):
        return stage_inputs("tokenizer", model=model(cfg.model))
    return stage_inputs("tokenizer", corpus=corpus(cfg.dataset), vocab_size=cfg.model.vocab_size,
                        family=cfg.model.family)


def pretrain(cfg, tokenizer_dir: Path) -> dict:
    return stage_inputs("pretrain", tokenizer=Path(tokenizer_dir).name, model=model(cfg.model),
                        pretrain=plain(cfg.pretrain), corpus=corpus(cfg.dataset), seed=cfg.seed)


def scores(cfg, mcfg, pretrained_dir: Path) -> dict:
    """Scores of kind `mcfg.score` (the mask's, or a method's such as ewc's fisher), by the calibration settings
    of `mcfg`; not the ratio, strategy or allocation: a sweep over those scores once. Magnitude needs no data."""
    declared = {"pretrained": Path(pretrained_dir).name, "score": mcfg.score}
    if mcfg.score != "magnitude":
        declared |= {"task": task(cfg.dataset), "max_length": cfg.finetune.max_length,
                     "calib_batches": mcfg.calib_batches, "calib_batch_size": mcfg.calib_batch_size, "seed": cfg.seed}
    if mcfg.score == "fisher":
        declared["fisher"] = mcfg.fisher
    return stage_inputs("scores", **declared)


def selection(cfg, pretrained_dir: Path) -> dict:
    """The fine-tuning pass lt_sft and movement choose from: everything that shapes its training, and its length.
    It records the scores of both strategies, so a sweep over the two fine-tunes once. Under early stopping the
    validation results choose the epoch whose weights the pass records, so the settings they are computed with
    count too."""
    declared = {}
    if cfg.finetune.early_stopping_patience is not None:
        declared["validation"] = {key: cfg.eval.get(key) for key in VALIDATION_SETTINGS}
    return stage_inputs("selection", pretrained=Path(pretrained_dir).name, task=task(cfg.dataset),
                        finetune=training(cfg.finetune), optimizer=plain(cfg.optimizer),
                        select_epochs=cfg.mask.select_epochs, select_steps=cfg.mask.select_steps, seed=cfg.seed,
                        **declared)


def mask(cfg, pretrained_dir: Path, scores_dir: Path | None, eligible: dict) -> dict:
    """The mask settings and the tensors it is drawn over, by name and shape: the task type decides which a run may
    train (an instruction task's LM head, a classification task's new head), so two tasks on one checkpoint share
    no mask. mask=file's file counts by its content, not its name (a copy of it is the same mask)."""
    settings = plain(cfg.mask)
    if settings.get("path"):
        settings["path"] = file_digest(Path(settings["path"]))
    return stage_inputs("mask", pretrained=Path(pretrained_dir).name, scores=scores_dir and Path(scores_dir).name,
                        mask=settings, eligible={name: list(p.shape) for name, p in sorted(eligible.items())},
                        seed=cfg.seed)


def scratch(cfg, tokenizer_dir: Path) -> dict:
    """The control depends on everything that shapes the task model's training, but not on the mask."""
    return stage_inputs("scratch", tokenizer=Path(tokenizer_dir).name, seed=cfg.seed, model=model(cfg.model),
                        dataset=task(cfg.dataset), finetune=training(cfg.finetune), optimizer=plain(cfg.optimizer))


def benchmarks(cfg, pretrained_dir: Path, name: str, data: Path) -> dict:
    """The pretrained model's score on one benchmark: by the checkpoint, the benchmark's definition, its data folder
    by its files, how it is scored (items, shots, batches: padding moves the last bits) and lm-eval's version."""
    settings = {key: cfg.eval[key] for key in ("benchmark_limit", "benchmark_fewshot", "benchmark_batch_size")}
    return stage_inputs("benchmarks", pretrained=Path(pretrained_dir).name, benchmark=name,
                        definition=vars(BENCHMARKS[name]), data=folder_digest(data),
                        settings=settings, lm_eval=version("lm_eval"))


def result(cfg) -> dict:
    """Everything that decides a job's results (where the cache lives does not), files named by path included."""
    settings = plain(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "cache_dir")]))
    settings["finetune"] = training(cfg.finetune)
    datasets = [cfg.dataset] + ([cfg.sequential.dataset] if cfg.sequential.dataset else [])
    files = {"model": model(cfg.model), "tasks": [task(d) for d in datasets], "corpora": [corpus(d) for d in datasets]}
    if cfg.mask.get("path"):  # mask=file
        files["mask"] = file_digest(Path(cfg.mask.path))
    return stage_inputs("result", settings=settings, files=files)


def hash_config(cfg) -> str:
    """The key of the job's result: its settings, and the code and libraries that compute it."""
    return cache_key("result", result(cfg))


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def folder_digest(folder: Path) -> str:
    """A model folder by the names, sizes and modification times of its files (weights can be many GB)."""
    listing = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


@functools.cache
def library_versions() -> dict:
    return {name: version(name) for name in LIBRARIES}


@functools.cache
def code_fingerprint(modules: tuple[str, ...]) -> str:
    """sha256 over the code of `modules` and of every maskrun module they import, directly or not."""
    digest = hashlib.sha256()
    for name in sorted(import_closure(modules)):
        digest.update(name.encode() + b"\0" + code_of(name).encode() + b"\0")
    return digest.hexdigest()[:20]


@functools.cache  # read once per process, as the code that runs is
def code_of(name: str) -> str:
    """What module `name` computes: its syntax tree without docstrings, so that comments, docstrings and layout
    do not count."""
    tree = ast.parse(module_file(name).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, DOCUMENTED) and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:]
    return ast.dump(tree)


def import_closure(modules: tuple[str, ...]) -> set[str]:
    seen, pending = set(), list(modules)
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending += maskrun_imports(name)
    return seen


def module_file(name: str) -> Path:
    """The source file of maskrun module `name`: found on disk, never imported."""
    parts = name.split(".")[1:]
    base = PACKAGE_ROOT.joinpath(*parts)
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def is_maskrun_module(name: str) -> bool:
    return name.split(".")[0] == "maskrun" and module_file(name).is_file()


@functools.cache
def maskrun_imports(name: str) -> tuple[str, ...]:
    """The maskrun modules that `name` imports anywhere in its source (also inside functions)."""
    package = name if module_file(name).name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(module_file(name).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            submodules = [f"{base}.{alias.name}" for alias in node.names if is_maskrun_module(f"{base}.{alias.name}")]
            # `from pkg import module` imports the module; any other name comes from pkg itself
            found += submodules + ([base] if len(submodules) < len(node.names) else [])
    return tuple(module for module in found if is_maskrun_module(module))
