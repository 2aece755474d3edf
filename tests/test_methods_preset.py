"""experiment=methods: every method along its dial over 3 seeds; each job runs the method and dial its setting names,
and a smoke-sized run of it ends in a sweep report that compares the methods at matched accuracy."""

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import maskrun
from maskrun.cli import CONFIG_MODULE
from maskrun.methods import METHODS
from maskrun.validate import compose_jobs

SETTINGS = Path(__file__).resolve().parents[1] / "conf" / "experiment" / "methods"


@pytest.fixture(scope="module")
def preset_jobs():
    return compose_jobs(CONFIG_MODULE, "config", ["experiment=methods"], multirun=True)


def test_the_preset_runs_every_setting_file_over_three_seeds(preset_jobs):
    settings = sorted(path.stem for path in SETTINGS.glob("*.yaml"))
    ran = sorted((job.hydra.overrides.task[0].split("=", 1)[1], job.seed) for job in preset_jobs)
    assert ran == sorted((setting, seed) for setting in settings for seed in (0, 1, 2))
    assert {job.method.name for job in preset_jobs} == set(METHODS)


def test_each_setting_runs_its_method_at_the_dial_value_it_names(preset_jobs):
    for job in preset_jobs:
        setting = job.hydra.overrides.task[0].split("=", 1)[1]
        name, dial = setting.split("_")[0], setting.rsplit("_", 1)[1]
        assert job.method.name == name
        key = METHODS[name].DIAL
        value = OmegaConf.select(job, key)
        assert float(dial.lstrip("arsl")) == pytest.approx(value), (setting, key, value)
        # Only masking freezes entries: every other method of the preset trains without a mask.
        assert (job.mask.strategy != "none") == (name == "mask"), setting
        if name == "mask":
            assert job.mask.strategy == setting.split("_")[1]


def test_a_smoke_sized_methods_sweep_compares_every_method(tmp_path):
    sweep = tmp_path / "sweep"
    points = "full_lr1e-3,lora_r8,mask_importance_r0.6,mask_random_r0.6,l2sp_a1e-4,ewc_s1e5,replay_s0.1"
    maskrun(["-m", "experiment=[smoke,methods]", f"+experiment/methods={points}", "seed=0", "save_model=false",
             f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"], tmp_path)
    summary = pd.read_csv(sweep / "summary.csv")
    assert (summary["status"] == "ok").all() and len(summary) == 7
    assert sorted(summary["method"]) == sorted(["full", "lora", "mask", "mask", "l2sp", "ewc", "replay"])
    report = (sweep / "report.md").read_text()
    assert report.splitlines()[2].startswith("**Matched accuracy on rotten_tomatoes**")
    assert "## Matched accuracy" in report and "## Interference measures vs forgetting" in report
    assert (sweep / "plots" / "rotten_tomatoes_method_fronts.png").is_file()
    lora = json.loads(next(p for p in sweep.glob("*/metrics.json") if '"name": "lora"' in p.read_text()).read_text())
    assert lora["method"]["trainable"] < lora["mask"]["eligible"]
