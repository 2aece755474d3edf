"""Checks of a composed config that run before any work: every message says what and how to fix it."""

import contextlib
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import torch
from hydra import compose, version
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maskrun.benchmarks import check_benchmarks
from maskrun.checks import in_range, is_number, non_negative_int, one_of, positive_int
from maskrun.data.corpus import check_corpus, load_corpus
from maskrun.data.packaged import packaged_file
from maskrun.data.tasks import check_task, load_task, task_type
from maskrun.errors import ConfigError
from maskrun.loggers import TRACKERS
from maskrun.masks import STRATEGIES, check_moving, moves, selected, selection_record
from maskrun.methods import METHODS
from maskrun.masks.importance import FREEZE
from maskrun.masks.scores import FISHER, SCORES

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("fp32", "bf16", "fp16")
SECTIONS = ("model", "dataset", "mask", "method", "optimizer", "pretrain", "finetune", "eval")
ABSENT = object()
WORD = re.compile(r"\w+|[^\w\s]")  # what the tokenizer's BERT pre-tokenizer splits text into
SCRATCH_FAMILIES = ("bert", "gpt2")
CONTROLS = ("scratch",)


def compose_jobs(config_module: str, config_name: str, overrides: list[str], multirun: bool,
                 config_dir: str | None = None) -> list[DictConfig]:
    """The composed config of every job the command line describes (one, or each job of a sweep)."""
    if config_dir and not os.path.isdir(config_dir):
        raise ConfigError(f"--config-dir {config_dir} is not a directory", "give a directory of config groups, e.g. --config-dir myconf")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        if not multirun and any(o.is_sweep_override() for o in parsed):
            raise ConfigError(f"{' '.join(overrides)} describes several runs", "add -m to run them as a sweep")
        groups = config_groups(Path(str(files(config_module)))) | (config_groups(Path(config_dir)) if config_dir else set())
        keys = [o.get_key_element() for o in parsed]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:  # Hydra would silently keep only the last one
            raise ConfigError(f"{repeated[0]} is given more than once", f"give it once; combine presets as {repeated[0]}=[a,b]")
        with hydra_configs(config_module, config_dir):
            jobs = sweep_jobs(config_name, overrides, parsed) if multirun else [overrides]
            configs = [compose(config_name, job, return_hydra_config=True) for job in jobs]
            for job in jobs:
                check_added_keys(config_name, job, groups)
            return configs
    except MissingConfigException as err:
        raise unknown_option(err, config_module, config_dir) from None
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse override: {first_line(err)}", "write key=value, e.g. mask.ratio=0.5") from None
    except (HydraException, OmegaConfBaseException) as err:
        match = re.search(r"Could not override '([^']+)'", str(err))
        if match:
            raise ConfigError(f"unknown key '{match.group(1)}'", "check the spelling; maskrun --cfg job lists every key") from None
        match = re.search(r"An item is already at '([^']+)'|Multiple values for (\S+)\.", str(err))
        if match:
            key = match.group(1) or match.group(2)
            raise ConfigError(f"+{key} adds what already exists", f"drop the '+': {key}=<value>") from None
        raise ConfigError(first_line(err), "see maskrun --help") from None


def config_groups(root: Path) -> set[str]:
    """Every config group under `root`, nested ones as Hydra names them (e.g. experiment/methods)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_dir() and not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts)}


@contextlib.contextmanager
def hydra_configs(config_module: str, config_dir: str | None):
    """Hydra set up as `maskrun` sets it up: the packaged configs, and --config-dir's before them."""
    search_path = create_automatic_config_search_path(None, None, f"pkg://{config_module}")
    if config_dir:
        search_path.prepend("command-line", f"file://{os.path.abspath(config_dir)}", anchor=SearchPathQuery(provider="schema"))
    saved = get_gh_backup()
    version.setbase("1.3")
    Hydra.create_main_hydra2("maskrun", search_path)
    try:
        yield
    finally:
        restore_gh_from_backup(saved)


def sweep_jobs(config_name: str, overrides: list[str], parsed: list) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper splits them: a preset's `hydra.sweeper.params` first,
    then the command line (which wins for a key given in both)."""
    sweep_config = compose(config_name, [o.input_line for o in parsed if not o.is_sweep_override()],
                           return_hydra_config=True)
    params = OmegaConf.select(sweep_config, "hydra.sweeper.params") or {}
    preset = [f"{key}={value}" for key, value in params.items()]
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(preset + overrides), None)[0]


def check_added_keys(config_name: str, job: list[str], groups: set[str]) -> None:
    """`+key` / `++key` may add a config group or a Hydra setting, or set a key that exists; a new
    plain key would be silently ignored by every stage."""
    parsed = OverridesParser.create().parse_overrides(job)
    added = [(line, o.key_or_group) for line, o in zip(job, parsed) if o.is_add() or o.is_force_add()]
    plain = [(line, key) for line, key in added if key not in groups and not key.startswith(("hydra.", "hydra/"))]
    if not plain:
        return
    without = compose(config_name, [line for line in job if line not in {line for line, _ in plain}])
    for _, key in plain:
        if OmegaConf.select(without, key, default=ABSENT) is ABSENT:
            raise ConfigError(f"unknown key '{key}'", "check the spelling; maskrun --cfg job lists every key")


def unknown_option(err: MissingConfigException, config_module: str, config_dir: str | None) -> ConfigError:
    text = str(err)
    # Hydra lists a group's options for a single choice ("Could not find"), not for one in a list ("Could not load").
    match = re.search(r"Could not (?:find|load) '([^']+)/([^'/]*)'", text)
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    if not match:
        return ConfigError(first_line(err), "see maskrun --help")
    group, name = match.groups()
    options = options or group_options(group, config_module, config_dir)
    return ConfigError(f"unknown {group} '{name}'", f"choose one of: {', '.join(options)}",
                       help_lines=(f"{group} options: {', '.join(options)}",))


def group_options(group: str, config_module: str, config_dir: str | None) -> list[str]:
    """The options of a config group: its yaml files in the packaged configs and in --config-dir."""
    roots = [Path(str(files(config_module)))] + ([Path(config_dir)] if config_dir else [])
    return sorted({p.stem for root in roots for p in (root / group).glob("*.yaml")})


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def check_config(cfg: DictConfig, multirun: bool = False) -> None:
    try:
        check_top_level(cfg)
        check_mask(cfg.mask)
        check_selection_pass(cfg)
        check_model(cfg.model, cfg.pretrain, cfg.finetune)
        if cfg.mask.strategy == "file":
            check_mask_file(OmegaConf.to_yaml(cfg.model), OmegaConf.to_yaml(cfg.pretrain), OmegaConf.to_yaml(cfg.mask))
        if cfg.mask.include or cfg.mask.exclude:
            check_mask_selects(OmegaConf.to_yaml(cfg.model), OmegaConf.to_yaml(cfg.pretrain), tuple(cfg.mask.include or ()), tuple(cfg.mask.exclude or ()))
        check_method(cfg)  # after the model: a method may read the model's parameter names
        if moves(cfg.mask):  # after the method: a moving mask needs method=mask; it reads the model's layers
            check_moving(cfg, eligible_shapes(cfg))
        check_training(cfg)
        check_dataset(cfg.dataset)
        check_task_type(cfg)
        check_task_splits(OmegaConf.to_yaml(cfg.dataset))
        if cfg.model.get("vocab_size"):  # a vocabulary trained on the corpus (a pretrained model brings its own)
            check_corpus_vocabulary(cfg.dataset, cfg.model.vocab_size)
        for control in cfg.eval.controls:
            one_of(control, CONTROLS, "eval.controls")
        check_posthoc_reset(cfg.eval.posthoc_reset, cfg.mask)
        check_benchmarks(cfg)
        if cfg.sequential.dataset:
            check_dataset(cfg.sequential.dataset)
        check_device(str(cfg.device))
        check_loggers(cfg)
        check_processes(cfg)
    except (TypeError, ValueError, KeyError, AttributeError, OmegaConfBaseException) as err:
        # A value of the wrong shape (a list for a number, a section set to a string) trips a check.
        raise ConfigError(f"malformed configuration: {first_line(err)}", "maskrun --cfg job shows every key and its value") from None
    if multirun:
        check_launcher(cfg.hydra.launcher)
    check_writable(Path(cfg.cache_dir), "cache_dir")
    output_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    check_writable(Path(OmegaConf.select(cfg, output_key)), output_key)


def check_loggers(cfg: DictConfig) -> None:
    """Every chosen tracker is one maskrun logs to (not only a config file), and its library is installed."""
    for name in cfg.get("logger") or {}:
        one_of(name, sorted(TRACKERS), "logger")
        tracker = TRACKERS[name]
        if importlib.util.find_spec(tracker.LIBRARY) is None:
            raise ConfigError(f"logger={name} needs the {tracker.PACKAGE} package, which is not installed",
                              f"pip install {tracker.PACKAGE}, or pip install 'maskrun[trackers]'")


def check_launcher(launcher: DictConfig) -> None:
    """What the launcher itself would only find out after the sweep dir is made, with a traceback."""
    target = str(launcher.get("_target_", ""))
    if target.endswith("JoblibLauncher") and (not isinstance(launcher.n_jobs, int) or launcher.n_jobs == 0):
        raise ConfigError(f"hydra.launcher.n_jobs={launcher.n_jobs!r} is not a number of parallel jobs",
                          "e.g. hydra.launcher.n_jobs=2 (the number of GPUs), or -1 for one per CPU core")
    if "submitit" in target:
        positive_int(launcher.timeout_min, "hydra.launcher.timeout_min")
        if launcher.get("array_parallelism") is not None:
            positive_int(launcher.array_parallelism, "hydra.launcher.array_parallelism")
    if target.endswith("SlurmLauncher") and shutil.which("srun") is None:
        raise ConfigError("hydra/launcher=slurm needs SLURM, and srun is not on this machine's PATH",
                          "submit from a SLURM login node, or try the same path here with hydra/launcher=submitit_local")


def realized_share_warnings(configs: list[DictConfig]) -> list[str]:
    """One line per group of a sweep's jobs (jobs that differ only in mask.ratio and seed) in which different
    requested ratios realize the same frozen share. Only settings whose share the parameter shapes alone
    decide are looked at; such a sweep still runs, but its repeated ratios train the same mask."""
    groups: dict[str, list[DictConfig]] = {}
    for cfg in configs:
        if whole_units(cfg.mask):
            groups.setdefault(setting_without_ratio(cfg), []).append(cfg)
    common = set.intersection(*(set(cfg.hydra.overrides.task) for cfg in configs)) if configs else set()
    lines = []
    for jobs in groups.values():
        ratios_by_share: dict[float, set[float]] = {}
        for cfg in jobs:
            share = realized_share(OmegaConf.to_yaml(cfg.model), OmegaConf.to_yaml(cfg.pretrain), OmegaConf.to_yaml(cfg.mask))
            ratios_by_share.setdefault(share, set()).add(cfg.mask.ratio)
        repeated = [f"mask.ratio={','.join(f'{r:g}' for r in sorted(ratios))} all realize a frozen share of {share:.3f}"
                    for share, ratios in sorted(ratios_by_share.items()) if len(ratios) > 1]
        if repeated:
            lines.append(f"{group_label(jobs[0], common)}: {'; '.join(repeated)} ({whole_units(jobs[0].mask)})")
    return lines


def whole_units(mask: DictConfig) -> str | None:
    """What the mask freezes as a whole where the parameter shapes alone decide its frozen share, else None.

    mask=layers freezes the whole bottom layers that come closest to the ratio, and per_tensor allocation
    at tensor granularity freezes each tensor entirely or not at all, whatever the scores. Elsewhere the
    share follows the ratio to within an entry or a row, or depends on the scores.
    """
    if mask.strategy == "layers":
        return "whole layers only"
    if mask.allocation == "per_tensor" and mask.granularity == "tensor":
        return "whole tensors only, each frozen entirely or not at all"
    return None


def setting_without_ratio(cfg: DictConfig) -> str:
    """The job's config without mask.ratio, seed and Hydra's own settings: equal for the jobs of one group."""
    setting = OmegaConf.to_container(cfg)  # unresolved: interpolations compare as written
    for key in ("hydra", "seed"):
        setting.pop(key, None)
    setting["mask"].pop("ratio")
    return json.dumps(setting, sort_keys=True)


def group_label(cfg: DictConfig, common_overrides: set[str]) -> str:
    """mask=<strategy> and the job's overrides, other than mask.ratio and seed, that not every job of the sweep has."""
    own = [o for o in cfg.hydra.overrides.task
           if o not in common_overrides and o.split("=", 1)[0].lstrip("+~") not in ("mask", "mask.ratio", "seed")]
    return " ".join([f"mask={cfg.mask.strategy}", *own])


@functools.lru_cache(maxsize=None)  # per model and mask setting: the seeds of a sweep share them
def realized_share(model_yaml: str, pretrain_yaml: str, mask_yaml: str) -> float:
    """The frozen share the mask code realizes on this model, built on stand-ins of the parameters' shapes."""
    from maskrun.masks import build_mask, mask_summary, selected

    mask = OmegaConf.create(mask_yaml)
    # A zero broadcast to a shape holds no memory. Where the shapes decide the share, the values of weights and
    # scores, and the seed, change nothing: the stand-ins serve as both, and seed 0 as any seed.
    stand_ins = {name: torch.zeros(()).expand(shape) for name, shape in backbone_shapes(model_yaml, pretrain_yaml).items()
                 if selected(name, mask.include, mask.exclude)}
    selection = build_mask(mask, stand_ins, stand_ins, 0, axes={name: 0 for name in stand_ins})  # whole tensors: any axis
    return mask_summary(mask, selection.masks, selection.tied_share)["ratio_actual"]


def backbone_shapes(model_yaml: str, pretrain_yaml: str) -> dict[str, torch.Size]:
    from maskrun import models

    return models.backbone_shapes_of(model_yaml, pretrain_yaml)


def eligible_shapes(cfg: DictConfig) -> dict[str, torch.Size]:
    """The shapes of the parameters the mask group may select, by name."""
    shapes = backbone_shapes(OmegaConf.to_yaml(cfg.model), OmegaConf.to_yaml(cfg.pretrain))
    return {name: shape for name, shape in shapes.items() if selected(name, cfg.mask.include, cfg.mask.exclude)}


def check_top_level(cfg: DictConfig) -> None:
    for section in SECTIONS:
        if not isinstance(cfg.get(section), DictConfig):
            raise ConfigError(f"{section}={cfg.get(section)!r} replaces the whole {section} section",
                              f"set one key inside it, e.g. {section}.<key>=<value>; maskrun --cfg job lists them")
    non_negative_int(cfg.seed, "seed")
    if not isinstance(cfg.save_model, bool):
        raise ConfigError(f"save_model={cfg.save_model!r} is not true or false", "save_model=true or save_model=false")


def check_model(model: DictConfig, pretrain: DictConfig, finetune: DictConfig) -> None:
    """The shape of a model built from scratch (a pretrained model's own config sets none of these), its dtype,
    and the objective it is pretrained or measured with."""
    from maskrun.data.tokenizer import BYTE_LEVEL_BASE  # keep transformers off the import of this module
    from maskrun.models import DTYPES, OBJECTIVES, check_objective

    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
        if model.get(key) is not None:  # null: the pretrained model's own config decides
            positive_int(model[key], f"model.{key}")
    if "hidden_size" in model and "num_heads" in model and model.hidden_size % model.num_heads:
        raise ConfigError(f"model.hidden_size={model.hidden_size} is not a multiple of model.num_heads={model.num_heads}",
                          "make the hidden size divisible by the number of attention heads")
    if "dropout" in model:
        in_range(model.dropout, "model.dropout", "0.1", 0.0, 1.0, upper_open=True)
    one_of(model.dtype, DTYPES, "model.dtype")
    if model.get("packaged"):
        packaged_file(model.packaged)
    elif model.get("gguf"):
        check_gguf(model.gguf)
    elif model.get("name_or_path") is not None:
        check_model_source(str(model.name_or_path))
    else:
        if model.name == "hf":
            raise ConfigError("model=hf needs model.name_or_path", "give a hub id or a local folder, e.g. model.name_or_path=bert-base-uncased")
        one_of(model.family, SCRATCH_FAMILIES, "model.family")
        one_of(model.objective, OBJECTIVES, "model.objective")  # a pretrained model's own when null
        if model.family == "gpt2" and model.objective != "causal_lm":
            raise ConfigError(f"model.family=gpt2 has no {model.objective} head", "set model.objective=causal_lm")
        if model.family == "gpt2" and finetune.input_mask_prob:
            raise ConfigError("finetune.input_mask_prob replaces tokens by [MASK], and model.family=gpt2's byte-level "
                              "tokenizer has none", "set finetune.input_mask_prob=0")
        if model.family == "gpt2" and model.vocab_size <= BYTE_LEVEL_BASE:
            raise ConfigError(f"model.vocab_size={model.vocab_size} leaves no room for merges above the byte-level "
                              f"tokenizer's {BYTE_LEVEL_BASE} bytes and special tokens", "e.g. model.vocab_size=8000")
        return
    if model.objective is not None:
        one_of(model.objective, OBJECTIVES, "model.objective")
    check_objective(model, pretrain)


@functools.lru_cache(maxsize=None)
def check_model_source(name_or_path: str) -> None:
    """A local model folder, or a hub id whose config can be fetched (or, offline, is in the local Hugging Face cache)."""
    from transformers import AutoConfig

    how = "give a folder holding config.json, or a hub id reachable from here"
    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"model.name_or_path={name_or_path} does not exist", how)
    try:
        AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path={name_or_path} cannot be loaded: {first_line(err).split('. ')[0]}",
                          how) from None


def check_gguf(gguf: DictConfig) -> None:
    """A GGUF checkpoint's packages are installed and its config reads from the file's metadata (no tensor is read)."""
    from maskrun.dequantize import gguf_config, located

    path = located(gguf)
    try:
        gguf_config(path)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"model.gguf file {path} cannot be read: {first_line(err).split('. ')[0]}",
                          "give a GGUF file of an architecture transformers loads (llama, qwen2, gemma3, ...)") from None


@functools.lru_cache(maxsize=None)  # the jobs of a sweep share their model
def check_mask_selects(model_yaml: str, pretrain_yaml: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    names = list(backbone_shapes(model_yaml, pretrain_yaml))
    if not any(selected(name, include, exclude) for name in names):
        raise ConfigError(f"mask.include={list(include) or None} and mask.exclude={list(exclude) or None} "
                          f"leave no backbone parameter to mask",
                          f"the names look like {names[0]} ... {names[-1]}")


def check_training(cfg: DictConfig) -> None:
    for section, keys in {"pretrain": ("batch_size",), "finetune": ("batch_size", "epochs", "grad_accum", "max_length"),
                          "eval": ("batch_size", "heldout_texts")}.items():
        for key in keys:
            positive_int(cfg[section][key], f"{section}.{key}")
    non_negative_int(cfg.pretrain.steps, "pretrain.steps")
    non_negative_int(cfg.pretrain.warmup_steps, "pretrain.warmup_steps")
    positive_int(cfg.pretrain.max_length, "pretrain.max_length")
    if cfg.pretrain.max_length < 3:
        raise ConfigError(f"pretrain.max_length={cfg.pretrain.max_length} leaves no room for text between [CLS] and [SEP]",
                          "e.g. pretrain.max_length=64")
    for key, example in (("finetune.lr", "1e-4"), ("pretrain.lr", "1e-3")):
        value = OmegaConf.select(cfg, key)
        if not is_number(value) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a positive number", f"e.g. {key}={example}")
    for key in ("pretrain.weight_decay", "optimizer.weight_decay"):
        value = OmegaConf.select(cfg, key)
        if not is_number(value) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key}={value!r} must be a number >= 0", f"e.g. {key}=0.01")
    in_range(cfg.pretrain.mlm_probability, "pretrain.mlm_probability", "0.15", 0.0, 1.0, lower_open=True, upper_open=True)
    one_of(cfg.optimizer.name, OPTIMIZERS, "optimizer.name")
    one_of(cfg.finetune.scheduler, SCHEDULERS, "finetune.scheduler")
    check_finetune_recipe(cfg.finetune, cfg.optimizer)
    positions = cfg.model.get("max_position_embeddings")
    for key in ("pretrain.max_length", "finetune.max_length"):
        if positions is not None and OmegaConf.select(cfg, key) > positions:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} exceeds the model's {positions} positions",
                              f"set {key}<={positions} or model.max_position_embeddings higher")


def check_mask(mask: DictConfig) -> None:
    if mask.strategy == "file":
        check_mask_path(mask)
    elif not is_number(mask.ratio) or not 0.0 <= mask.ratio <= 1.0:
        raise ConfigError(f"mask.ratio={mask.ratio!r} is not a number in [0, 1]",
                          "0 trains every entry, 1 freezes every eligible entry; e.g. mask.ratio=0.5")
    one_of(mask.strategy, sorted(STRATEGIES), "mask.strategy")
    strategy = STRATEGIES[mask.strategy]
    one_of(mask.score, SCORES, "mask.score")
    for key, supported in (("allocation", strategy.ALLOCATIONS), ("granularity", strategy.GRANULARITIES)):
        if mask[key] not in supported:
            raise ConfigError(f"mask.{key}={mask[key]!r} is not supported by mask={mask.strategy}",
                              f"choose one of: {', '.join(supported)}")
    if "freeze" in mask:
        one_of(mask.freeze, FREEZE, "mask.freeze")
    if "fisher" in mask:
        one_of(mask.fisher, FISHER, "mask.fisher")
    for key in ("calib_batches", "calib_batch_size", "clusters", "select_epochs", "select_steps"):
        # null: the whole training split (calib_batches), the whole of select_epochs (select_steps)
        if key in mask and not (key in ("calib_batches", "select_steps") and mask[key] is None):
            positive_int(mask[key], f"mask.{key}")
    for key in ("include", "exclude"):
        for pattern in mask[key] or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"mask.{key} pattern {pattern!r} is not a valid regex: {err}", "fix the pattern") from None


def check_selection_pass(cfg: DictConfig) -> None:
    """What the strategies that choose after a fine-tuning pass (lt_sft, movement) cannot do."""
    record = selection_record(cfg.mask)
    if record == "movement" and cfg.finetune.precision == "fp16":
        # the movement record sums the pass's gradients, which fp16's loss scale (changing during the pass) multiplies
        raise ConfigError(f"mask={cfg.mask.strategy} accumulates unscaled gradients, and finetune.precision=fp16 "
                          f"scales them", f"use finetune.precision=bf16 or fp32 with mask={cfg.mask.strategy}")
    if record and cfg.sequential.dataset and cfg.sequential.remask:
        raise ConfigError(f"sequential.remask=true rebuilds the mask on task B, and mask={cfg.mask.strategy} would need "
                          f"a selection pass on task B for that", "set sequential.remask=false, or use another mask")


def check_mask_path(mask: DictConfig) -> None:
    """mask=file: a file to read, and no ratio of its own (the file's realized share is recorded)."""
    if mask.get("path") is None:
        raise ConfigError("mask=file needs mask.path", "give a run's mask, e.g. mask.path=outputs/<run>/mask.safetensors")
    if not Path(str(mask.path)).is_file():
        raise ConfigError(f"mask.path={mask.path} is not a file", "give a run's mask.safetensors")
    if mask.ratio is not None:
        raise ConfigError(f"mask=file freezes what the file freezes, and mask.ratio={mask.ratio} asks for a share",
                          "drop mask.ratio: the file's realized share is recorded as the ratio")


@functools.lru_cache(maxsize=None)  # the jobs of a sweep share their model and mask file
def check_mask_file(model_yaml: str, pretrain_yaml: str, mask_yaml: str) -> None:
    """The file's tensors are the eligible parameters, one bool per entry."""
    from safetensors import SafetensorError

    from maskrun.masks.file import file_layout, mismatches

    mask = OmegaConf.create(mask_yaml)
    try:
        layout = file_layout(Path(mask.path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"mask.path={mask.path} is not a safetensors file: {first_line(err)}",
                          "give a mask.safetensors that maskrun wrote") from None
    eligible = {name: tuple(shape) for name, shape in backbone_shapes(model_yaml, pretrain_yaml).items()
                if selected(name, mask.include, mask.exclude)}
    differences = mismatches({name: shape for name, (shape, _) in layout.items()}, eligible)
    differences += [f"{name} holds {dtype}, not BOOL" for name, (_, dtype) in layout.items() if dtype != "BOOL"][:1]
    if differences:
        raise ConfigError(f"mask.path={mask.path} does not fit this model's eligible parameters: {'; '.join(differences)}",
                          "use a mask written for the same model and mask.include/mask.exclude")


def check_posthoc_reset(ratios, mask: DictConfig) -> None:
    """eval.posthoc_reset builds the run's mask strategy at each ratio: it needs a strategy that has ratios."""
    if not OmegaConf.is_list(ratios):
        raise ConfigError(f"eval.posthoc_reset={ratios!r} is not a list of ratios", "e.g. eval.posthoc_reset=[0.25,0.5,0.75]")
    if not ratios:
        return
    for ratio in ratios:
        in_range(ratio, "eval.posthoc_reset ratio", "0.5", 0.0, 1.0)
    if moves(mask):
        raise ConfigError(f"eval.posthoc_reset resets what the run's mask strategy freezes at each ratio, and "
                          f"mask={mask.strategy} moves during fine-tuning, with no mask to build after it",
                          "use a static strategy, e.g. mask=importance")
    if mask.strategy in ("none", "file"):
        what = "freezes nothing at any ratio" if mask.strategy == "none" else "is one fixed mask, with no other ratio"
        raise ConfigError(f"eval.posthoc_reset resets what the run's mask strategy freezes at each ratio, and "
                          f"mask={mask.strategy} {what}",
                          "choose a strategy; for full fine-tuning use method=mask mask=random mask.ratio=0 "
                          "(or mask=importance mask.ratio=0)")


def check_method(cfg: DictConfig) -> None:
    one_of(cfg.method.name, sorted(METHODS), "method.name")
    method = METHODS[cfg.method.name]
    if not method.USES_MASK and cfg.mask.strategy != "none":
        raise ConfigError(f"method={cfg.method.name} trains without a mask, but mask={cfg.mask.strategy} would freeze entries",
                          f"drop the mask override (method={cfg.method.name} sets mask=none), or use method=mask")
    if cfg.sequential.dataset and cfg.method.name != "mask":
        raise ConfigError(f"experiment=sequential runs with method=mask only, not method={cfg.method.name}",
                          "drop the method override for a sequential run")
    method.check(cfg)


def check_task_type(cfg: DictConfig) -> None:
    """What each task type needs of the model and the other settings."""
    kind = task_type(cfg.dataset)
    positive_int(cfg.eval.max_new_tokens, "eval.max_new_tokens")
    if not isinstance(cfg.finetune.gradient_checkpointing, bool):
        raise ConfigError(f"finetune.gradient_checkpointing={cfg.finetune.gradient_checkpointing!r} is not true or false",
                          "e.g. finetune.gradient_checkpointing=true")
    pattern = cfg.eval.answer_pattern
    if pattern is not None:
        try:
            groups = re.compile(pattern).groups
        except (re.error, TypeError) as err:
            raise ConfigError(f"eval.answer_pattern={pattern!r} is not a valid regex: {err}", "fix the pattern") from None
        if groups != 1:
            raise ConfigError(f"eval.answer_pattern={pattern!r} has {groups} groups, not 1",
                              "mark the answer with one group, e.g. 'The answer is: (.*)'")
    if kind == "classification":
        return
    positions = cfg.model.get("max_position_embeddings")
    if kind == "instruction" and positions and cfg.finetune.max_length + cfg.eval.max_new_tokens > positions:
        raise ConfigError(f"finetune.max_length={cfg.finetune.max_length} and eval.max_new_tokens={cfg.eval.max_new_tokens} "
                          f"together exceed the model's {positions} positions, which generation needs",
                          "lower one of them or raise model.max_position_embeddings")
    from maskrun.models import pretraining_objective  # transformers, only for the task types that need it

    if pretraining_objective(cfg.model, cfg.pretrain) != "causal_lm":
        raise ConfigError(f"dataset={cfg.dataset.name} is a {kind} task and needs a decoder with its causal LM head, "
                          f"which model={cfg.model.name} is not", "use model=tiny_gpt, or model=hf with a causal LM")
    if cfg.finetune.input_mask_prob:
        raise ConfigError(f"finetune.input_mask_prob replaces tokens by [MASK], which a {kind} task has no use for",
                          "set finetune.input_mask_prob=0")
    if cfg.sequential.dataset:
        raise ConfigError(f"experiment=sequential fine-tunes classification tasks, and dataset={cfg.dataset.name} is a "
                          f"{kind} task", "drop experiment=sequential")
    if kind == "causal_lm" and "scratch" in cfg.eval.controls:
        raise ConfigError("eval.controls=[scratch] compares task metrics from random initialisation, and a causal_lm "
                          "task's learning is measured from the pretrained model's loss", "set eval.controls=[]")


def check_finetune_recipe(fcfg: DictConfig, ocfg: DictConfig) -> None:
    one_of(fcfg.precision, PRECISIONS, "finetune.precision")
    if fcfg.max_grad_norm is not None and (not is_number(fcfg.max_grad_norm) or not 0 < fcfg.max_grad_norm < math.inf):
        raise ConfigError(f"finetune.max_grad_norm={fcfg.max_grad_norm!r} must be a positive number or null",
                          "e.g. finetune.max_grad_norm=1.0, or null for no clipping")
    in_range(fcfg.warmup_ratio, "finetune.warmup_ratio", "0.1", 0.0, 1.0, upper_open=True)
    if not is_number(fcfg.input_mask_prob) or not 0 <= fcfg.input_mask_prob < 1:
        raise ConfigError(f"finetune.input_mask_prob={fcfg.input_mask_prob!r} must be a number in [0, 1)",
                          "e.g. finetune.input_mask_prob=0.1")
    if fcfg.early_stopping_patience is not None:
        positive_int(fcfg.early_stopping_patience, "finetune.early_stopping_patience")
    if fcfg.checkpoint_every is not None:
        positive_int(fcfg.checkpoint_every, "finetune.checkpoint_every")
    if fcfg.unfreeze_after is not None:
        positive_int(fcfg.unfreeze_after, "finetune.unfreeze_after")
        if fcfg.unfreeze_after >= fcfg.epochs:
            raise ConfigError(f"finetune.unfreeze_after={fcfg.unfreeze_after} leaves no epoch of the {fcfg.epochs} to train unfrozen",
                              "set finetune.unfreeze_after below finetune.epochs, or null")
    if "betas" in ocfg:
        betas = OmegaConf.to_object(ocfg.betas) if OmegaConf.is_list(ocfg.betas) else ocfg.betas
        if not (isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
            raise ConfigError(f"optimizer.betas={betas!r} must be two numbers in [0, 1)", "e.g. optimizer.betas=[0.9,0.999]")
    if "eps" in ocfg and not (is_number(ocfg.eps) and 0 < ocfg.eps < math.inf):
        raise ConfigError(f"optimizer.eps={ocfg.eps!r} must be a positive number", "e.g. optimizer.eps=1e-8")
    if ocfg.name == "sgd":
        if not is_number(ocfg.momentum) or not 0 <= ocfg.momentum < 1:
            raise ConfigError(f"optimizer.momentum={ocfg.momentum!r} must be a number in [0, 1)", "e.g. optimizer.momentum=0.9")
        if not isinstance(ocfg.nesterov, bool):
            raise ConfigError(f"optimizer.nesterov={ocfg.nesterov!r} is not true or false",
                              "optimizer.nesterov=true or optimizer.nesterov=false")
        if ocfg.nesterov and ocfg.momentum == 0:
            raise ConfigError("optimizer.nesterov=true needs momentum", "set optimizer.momentum=0.9, or optimizer.nesterov=false")


def check_dataset(dataset: DictConfig) -> None:
    check_task(dataset)  # a user's file: check_dataset_file
    check_corpus(dataset)
    if dataset.get("train_size") is not None:
        positive_int(dataset.train_size, "dataset.train_size")
    non_negative_int(dataset.split_seed, "dataset.split_seed")
    if dataset.get("chat_template", False) not in ("auto", False):
        raise ConfigError(f"dataset.chat_template={dataset.chat_template!r} is not auto or false",
                          "auto: prompts in the tokenizer's chat template when it has one; false: plain prompts")
    for key in ("corpus_max_texts", "max_examples"):
        if dataset[key] is not None:
            positive_int(dataset[key], f"dataset.{key}")
    for key in ("validation_fraction", "test_fraction"):
        if not is_number(dataset[key]) or not 0 < dataset[key] < 1:
            raise ConfigError(f"dataset.{key}={dataset[key]!r} must be a number in (0, 1)", f"e.g. dataset.{key}=0.1")
    if dataset.validation_fraction + dataset.test_fraction >= 1:
        raise ConfigError("dataset.validation_fraction + dataset.test_fraction leave no training data", "lower them")


@functools.lru_cache(maxsize=None)  # the jobs of a sweep share their dataset
def check_task_splits(dataset_yaml: str) -> None:
    """Split the task as the run will: every split needs examples, and training a classifier needs two classes."""
    dataset = OmegaConf.create(dataset_yaml)
    task = load_task(dataset, dataset.split_seed)
    splits = {name: task.split_sizes[name] for name in ("train", "validation", "test")}
    classification = task.task_type == "classification"
    if 0 in splits.values() or (classification and len(set(task.train.labels)) < 2):
        sizes = ", ".join(f"{name} {size}" for name, size in splits.items())
        classes = f" ({len(task.label_names)} classes)" if classification else ""
        raise ConfigError(f"dataset {dataset.name} splits into {sizes} examples{classes}: too few",
                          "raise dataset.max_examples (null: all) or the split fractions")
    if dataset.get("train_size") and dataset.train_size > splits["train"]:
        raise ConfigError(f"dataset.train_size={dataset.train_size} exceeds the {splits['train']} training examples of {dataset.name}",
                          "lower it, or set dataset.train_size=null for all of them")


def check_corpus_vocabulary(dataset: DictConfig, vocab_size: int) -> None:
    words = distinct_words(OmegaConf.to_yaml(dataset), vocab_size)
    if words < vocab_size:
        raise ConfigError(f"the pretraining corpus has {words} distinct words, too few for model.vocab_size={vocab_size}",
                          "raise dataset.corpus_max_texts (null: all) or lower model.vocab_size")


@functools.lru_cache(maxsize=None)  # the jobs of a sweep share their corpus
def distinct_words(dataset_yaml: str, enough: int) -> int:
    """Distinct words in the corpus's training texts, counting stops at `enough`."""
    words = set()
    for text in load_corpus(OmegaConf.create(dataset_yaml)).train:
        words.update(WORD.findall(text.lower()))
        if len(words) >= enough:
            break
    return len(words)


def check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not match:
        raise ConfigError(f"device={device!r} is not a device", "use auto, cpu, cuda or cuda:N")
    import torch

    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device={device} does not exist: {torch.cuda.device_count()} CUDA device(s) visible",
                          "use device=auto or device=cpu")


def check_processes(cfg: DictConfig) -> None:
    """`devices=N strategy=...`: what several processes cannot yet run exactly is refused, naming the combination."""
    from maskrun import distributed  # torch.distributed: only for the jobs that name it

    positive_int(cfg.devices, "devices")
    one_of(cfg.strategy, distributed.STRATEGIES, "strategy")
    if cfg.devices == 1:
        return
    combination = f"devices={cfg.devices} strategy={cfg.strategy}"
    if str(cfg.device).startswith("cuda:"):
        raise ConfigError(f"device={cfg.device} names one GPU, and {combination} runs on {cfg.devices}",
                          "use device=cuda (the job leases its GPUs) or device=cpu")
    from maskrun.devices import visible_gpus

    gpus = len(visible_gpus()) if str(cfg.device) in ("auto", "cuda") else 0
    if (str(cfg.device) == "cuda" or gpus) and gpus < cfg.devices:
        raise ConfigError(f"{combination} needs {cfg.devices} GPUs and {gpus} are visible",
                          f"use devices={gpus or 1}, or device=cpu")
    fcfg = cfg.finetune
    unsupported = {
        f"method={cfg.method.name}": cfg.method.name not in distributed.METHODS_ACROSS_PROCESSES[cfg.strategy],
        # rows share out a token-mean loss inexactly
        f"dataset={cfg.dataset.name} ({task_type(cfg.dataset)} task)": task_type(cfg.dataset) != "classification",
        f"eval.controls={list(cfg.eval.controls)}": bool(cfg.eval.controls),
        "experiment=sequential": bool(cfg.sequential.dataset),
        "eval.posthoc_reset": bool(cfg.eval.posthoc_reset),  # rank 0 measures alone, and the mask stage is collective
        "finetune.input_mask_prob": bool(fcfg.input_mask_prob),  # each rank would draw its own noise
        "finetune.unfreeze_after": fcfg.unfreeze_after is not None,  # the wrapper fixed what gets gradients
        "finetune.gradient_checkpointing": fcfg.gradient_checkpointing,
        "finetune.early_stopping_patience": cfg.strategy == "fsdp" and fcfg.early_stopping_patience is not None,
        "finetune.precision=fp16": cfg.strategy == "fsdp" and fcfg.precision == "fp16",  # overflow seen per shard
        # the sharded model and optimizer state would need torch.distributed.checkpoint
        "finetune.checkpoint_every": cfg.strategy == "fsdp" and fcfg.checkpoint_every is not None,
    }
    for setting, refused in unsupported.items():
        if refused:
            raise ConfigError(f"{setting} cannot run with {combination} yet", f"drop {setting}, or use devices=1")


def check_writable(path: Path, key: str) -> None:
    """Create (and drop) a nameless file where `path` will be made: the only sure test, even for root."""
    existing = next((p for p in [path, *path.parents] if p.exists()), Path.cwd())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={path} is not writable ({existing}: {err.strerror})",
                          f"point {key} at a writable directory") from None

