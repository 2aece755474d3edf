"""Every option of every config group composes into a config the pipeline accepts."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from maskrun.errors import ConfigError
from maskrun.validate import check_config, compose_jobs

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
                    ("model", "hf"): "model.name_or_path", ("mask", "file"): "mask.path",
                    # generative tasks need a decoder, and the default model is an encoder
                    ("dataset", "python_code"): "needs a decoder", ("dataset", "arithmetic"): "needs a decoder"}


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


def test_a_preset_sweep_expands_into_every_job_and_the_command_line_wins():
    jobs = compose_jobs("maskrun.conf", "config", ["experiment=ratio_sweep"], multirun=True)
    settings = {(job.mask.strategy, job.mask.ratio, job.seed) for job in jobs}
    assert len(jobs) == len(settings) == 2 * 6 * 3
    assert {s for s, _, _ in settings} == {"random", "importance"} and {r for _, r, _ in settings} >= {0.0, 0.9}

    narrowed = compose_jobs("maskrun.conf", "config", ["experiment=ratio_sweep", "mask.ratio=0.2,0.4", "seed=7"],
                            multirun=True)
    assert {(job.mask.ratio, job.seed) for job in narrowed} == {(0.2, 7), (0.4, 7)} and len(narrowed) == 4


def test_a_preset_from_the_users_config_dir_composes(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - smoke\nhydra:\n  sweeper:\n    params:\n      mask.ratio: 0.3,0.6\n")
    jobs = compose_jobs("maskrun.conf", "config", ["experiment=mine"], multirun=True, config_dir=str(tmp_path))
    assert sorted(job.mask.ratio for job in jobs) == [0.3, 0.6]
    assert all(job.model.hidden_size == 32 for job in jobs)  # the smoke preset came along
