"""Every option of every config group composes into a config the pipeline accepts."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from maskrun.errors import ConfigError
from maskrun.validate import check_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_OPTIONS = [
    (group.name, option.stem)
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__"))
    for option in sorted(group.glob("*.yaml"))
]


def test_every_group_has_options():
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {"model", "dataset", "mask", "optimizer", "experiment"} <= groups


# Options that point at the user's own data or model: they compose, and name what they still need.
NEEDS_USER_INPUT = {("dataset", "csv"): "dataset.path", ("dataset", "json"): "dataset.path",
                    ("dataset", "parquet"): "dataset.path", ("dataset", "hub"): "dataset.hub_name",
                    ("model", "hf"): "model.name_or_path"}


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_option_composes_and_validates(group, option, tmp_path):
    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", [f"{group}={option}", f"cache_dir={tmp_path}/cache"], return_hydra_config=True)
    if group != "experiment":
        assert cfg[group] is not None
    if (group, option) in NEEDS_USER_INPUT:
        with pytest.raises(ConfigError, match=re.escape(NEEDS_USER_INPUT[group, option])):
            check_config(cfg)
    else:
        check_config(cfg)


def test_defaults_are_importance_at_half():
    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config")
    assert cfg.mask.strategy == "importance" and cfg.mask.ratio == 0.5 and cfg.mask.score == "magnitude"
    assert cfg.model.name == "tiny_bert" and cfg.dataset.name == "rotten_tomatoes" and cfg.optimizer.name == "adamw"
