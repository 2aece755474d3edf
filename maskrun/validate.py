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

from maskrun.data.corpus import check_corpus
from maskrun.data.packaged import packaged_file
from maskrun.data.tasks import check_task
from maskrun.errors import ConfigError
from maskrun.masks import STRATEGIES

SCORES = ("magnitude",)
FREEZE = ("least_important", "most_important")
ALLOCATIONS = ("global",)
GRANULARITIES = ("element",)
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OBJECTIVES = ("mlm", "causal_lm")
SCRATCH_FAMILIES = ("bert", "gpt2")
CONTROLS = ("scratch",)


def compose_jobs(config_module: str, config_name: str, overrides: list[str], multirun: bool) -> list[DictConfig]:
    """The composed config of every job the command line describes (one, or each job of a sweep)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = BasicSweeper.split_arguments(parsed, None)[0] if multirun else [overrides]
        if not multirun and any(o.is_sweep_override() for o in parsed):
            raise ConfigError(f"{' '.join(overrides)} describes several runs", "add -m to run them as a sweep")
        keys = [o.get_key_element() for o in parsed]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:  # Hydra would silently keep only the last one
            raise ConfigError(f"{repeated[0]} is given more than once", f"give it once; combine presets as {repeated[0]}=[a,b]")
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
    check_model(cfg.model)
    positions = cfg.model.max_position_embeddings
    for key in ("pretrain.max_length", "finetune.max_length"):
        if positions is not None and OmegaConf.select(cfg, key) > positions:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} exceeds the model's {positions} positions",
                              f"set {key}<={positions} or model.max_position_embeddings higher")
    check_dataset(cfg.dataset)
    for control in cfg.eval.controls:
        one_of(control, CONTROLS, "eval.controls")
    if cfg.sequential.dataset:
        check_dataset(cfg.sequential.dataset)
    check_device(str(cfg.device))
    check_cache_dir(Path(cfg.cache_dir))


def check_mask(mask: DictConfig) -> None:
    if not is_number(mask.ratio) or not 0.0 <= mask.ratio <= 1.0:
        raise ConfigError(f"mask.ratio={mask.ratio!r} is not a number in [0, 1]",
                          "0 trains every entry, 1 freezes every eligible entry; e.g. mask.ratio=0.5")
    one_of(mask.strategy, sorted(STRATEGIES), "mask.strategy")
    one_of(mask.score, SCORES, "mask.score")
    one_of(mask.allocation, ALLOCATIONS, "mask.allocation")
    one_of(mask.granularity, GRANULARITIES, "mask.granularity")
    if "freeze" in mask:
        one_of(mask.freeze, FREEZE, "mask.freeze")
    for key in ("include", "exclude"):
        for pattern in mask[key] or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"mask.{key} pattern {pattern!r} is not a valid regex: {err}", "fix the pattern") from None


def check_model(model: DictConfig) -> None:
    one_of(model.objective, OBJECTIVES, "model.objective")
    if model.get("packaged"):
        packaged_file(model.packaged)
    elif model.get("name_or_path") is None:
        if model.name == "hf":
            raise ConfigError("model=hf needs model.name_or_path", "give a hub id or a local folder, e.g. model.name_or_path=bert-base-uncased")
        one_of(model.family, SCRATCH_FAMILIES, "model.family")


def check_dataset(dataset: DictConfig) -> None:
    check_task(dataset)
    check_corpus(dataset)
    if dataset.get("train_size") is not None:
        positive_int(dataset.train_size, "dataset.train_size")
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
