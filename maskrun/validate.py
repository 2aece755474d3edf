"""Checks of a composed config that run before any work: every message says what and how to fix it."""

import os
import re
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maskrun.data.corpus import CORPORA
from maskrun.data.packaged import packaged_file
from maskrun.data.tasks import TASKS
from maskrun.errors import ConfigError
from maskrun.masks import STRATEGIES
from maskrun.masks.importance import FREEZE
from maskrun.masks.scores import FISHER, SCORES

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("fp32", "bf16", "fp16")


def compose_jobs(config_module: str, config_name: str, overrides: list[str], multirun: bool) -> list[DictConfig]:
    """The composed config of every job the command line describes (one, or each job of a sweep)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = BasicSweeper.split_arguments(parsed, None)[0] if multirun else [overrides]
        if not multirun and any(o.is_sweep_override() for o in parsed):
            raise ConfigError(f"{' '.join(overrides)} describes several runs", "add -m to run them as a sweep")
        with initialize_config_module(config_module, version_base="1.3"):
            return [compose(config_name, job, return_hydra_config=True) for job in jobs]
    except MissingConfigException as err:
        raise unknown_option(err) from None
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse override: {first_line(err)}", "write key=value, e.g. mask.ratio=0.5") from None
    except (HydraException, OmegaConfBaseException) as err:
        match = re.search(r"Could not override '([^']+)'", str(err))
        if match:
            raise ConfigError(f"unknown key '{match.group(1)}'", "check the spelling; maskrun --cfg job lists every key") from None
        raise ConfigError(first_line(err), "see maskrun --help") from None


def unknown_option(err: MissingConfigException) -> ConfigError:
    text = str(err)
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    if not match:
        return ConfigError(first_line(err), "see maskrun --help")
    group, name = match.groups()
    return ConfigError(f"unknown {group} '{name}'", f"choose one of: {', '.join(options)}",
                       help_lines=(f"{group} options: {', '.join(options)}",))


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def check_config(cfg: DictConfig) -> None:
    check_mask(cfg.mask)
    for section, keys in {"pretrain": ("batch_size",), "finetune": ("batch_size", "epochs", "grad_accum", "max_length"),
                          "eval": ("batch_size", "heldout_texts")}.items():
        for key in keys:
            positive_int(cfg[section][key], f"{section}.{key}")
    non_negative_int(cfg.pretrain.steps, "pretrain.steps")
    positive_int(cfg.pretrain.max_length, "pretrain.max_length")
    for key in ("finetune.lr", "pretrain.lr"):
        value = OmegaConf.select(cfg, key)
        if not is_number(value) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a positive number", f"e.g. {key}=1e-4")
    one_of(cfg.optimizer.name, OPTIMIZERS, "optimizer.name")
    one_of(cfg.finetune.scheduler, SCHEDULERS, "finetune.scheduler")
    check_training(cfg.finetune, cfg.optimizer)
    positions = cfg.model.max_position_embeddings
    for key in ("pretrain.max_length", "finetune.max_length"):
        if OmegaConf.select(cfg, key) > positions:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} exceeds the model's {positions} positions",
                              f"set {key}<={positions} or model.max_position_embeddings higher")
    check_dataset(cfg.dataset)
    check_device(str(cfg.device))
    check_cache_dir(Path(cfg.cache_dir))


def check_mask(mask: DictConfig) -> None:
    if not is_number(mask.ratio) or not 0.0 <= mask.ratio <= 1.0:
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
    for key in ("calib_batches", "calib_batch_size", "clusters"):
        if key in mask:
            positive_int(mask[key], f"mask.{key}")
    for key in ("include", "exclude"):
        for pattern in mask[key] or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"mask.{key} pattern {pattern!r} is not a valid regex: {err}", "fix the pattern") from None


def check_training(fcfg: DictConfig, ocfg: DictConfig) -> None:
    one_of(fcfg.precision, PRECISIONS, "finetune.precision")
    if fcfg.max_grad_norm is not None and (not is_number(fcfg.max_grad_norm) or fcfg.max_grad_norm <= 0):
        raise ConfigError(f"finetune.max_grad_norm={fcfg.max_grad_norm!r} must be a positive number or null",
                          "e.g. finetune.max_grad_norm=1.0, or null for no clipping")
    if not is_number(fcfg.warmup_ratio) or not 0 <= fcfg.warmup_ratio < 1:
        raise ConfigError(f"finetune.warmup_ratio={fcfg.warmup_ratio!r} must be a number in [0, 1)", "e.g. finetune.warmup_ratio=0.1")
    if not is_number(fcfg.input_mask_prob) or not 0 <= fcfg.input_mask_prob < 1:
        raise ConfigError(f"finetune.input_mask_prob={fcfg.input_mask_prob!r} must be a number in [0, 1)",
                          "e.g. finetune.input_mask_prob=0.1")
    if fcfg.early_stopping_patience is not None:
        positive_int(fcfg.early_stopping_patience, "finetune.early_stopping_patience")
    if fcfg.unfreeze_after is not None:
        positive_int(fcfg.unfreeze_after, "finetune.unfreeze_after")
        if fcfg.unfreeze_after >= fcfg.epochs:
            raise ConfigError(f"finetune.unfreeze_after={fcfg.unfreeze_after} leaves no epoch of the {fcfg.epochs} to train unfrozen",
                              "set finetune.unfreeze_after below finetune.epochs, or null")
    if not is_number(ocfg.weight_decay) or ocfg.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay={ocfg.weight_decay!r} must be a number >= 0", "e.g. optimizer.weight_decay=0.01")
    if ocfg.name == "sgd":
        if not is_number(ocfg.momentum) or not 0 <= ocfg.momentum < 1:
            raise ConfigError(f"optimizer.momentum={ocfg.momentum!r} must be a number in [0, 1)", "e.g. optimizer.momentum=0.9")
        if ocfg.nesterov and ocfg.momentum == 0:
            raise ConfigError("optimizer.nesterov=true needs momentum", "set optimizer.momentum=0.9, or optimizer.nesterov=false")


def check_dataset(dataset: DictConfig) -> None:
    one_of(dataset.task, sorted(TASKS), "dataset.task")
    one_of(dataset.corpus, sorted(CORPORA), "dataset.corpus")
    packaged_file(dataset.task)
    packaged_file(dataset.corpus)
    for key in ("validation_fraction", "test_fraction"):
        if not is_number(dataset[key]) or not 0 < dataset[key] < 1:
            raise ConfigError(f"dataset.{key}={dataset[key]!r} must be a number in (0, 1)", f"e.g. dataset.{key}=0.1")
    if dataset.validation_fraction + dataset.test_fraction >= 1:
        raise ConfigError("dataset.validation_fraction + dataset.test_fraction leave no training data", "lower them")


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


def check_cache_dir(path: Path) -> None:
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"cache_dir={path} is not writable", "point cache_dir at a writable directory")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a whole number >= 1", f"e.g. {key}=32")


def non_negative_int(value, key: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key}={value!r} must be a whole number >= 0", f"e.g. {key}=100")


def one_of(value, options, key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not supported", f"choose one of: {', '.join(options)}")
