"""The whole arrow end to end on the smoke preset: the artifact contract of DESIGN §4."""

import json

import pytest
import torch

from conftest import assert_frozen_entries_exact, load_metrics, maskrun, run_dirs

METRICS_KEYS = {"status", "error", "overrides", "choices", "seed", "device", "task", "interference", "mask",
                "cache", "artifacts", "timing", "memory"}


def test_smoke_run_writes_every_artifact(smoke_run):
    metrics = load_metrics(smoke_run)
    assert METRICS_KEYS <= metrics.keys()
    assert metrics["status"] == "ok" and metrics["error"] is None
    assert metrics["choices"]["mask"] == "importance" and metrics["choices"]["experiment"] == "smoke"
    assert "optimizer.weight_decay=0.1" in metrics["overrides"]
    assert metrics["finetune"] == {"lr": 1e-3, "resumed_from_step": None}  # the learning rate it trained at
    test = metrics["task"]["test"]
    assert 0.0 <= test["accuracy"] <= 1.0 and 0.0 <= test["macro_f1"] <= 1.0
    interference = metrics["interference"]
    assert interference["forgetting"] == pytest.approx(
        interference["pretrain_loss_after"] - interference["pretrain_loss_before"])
    assert 0.0 < interference["cka"] <= 1.0 + 1e-9 and interference["drift_l2"] > 0
    assert metrics["cache"] == {"tokenizer": "miss", "pretrain": "miss", "scores": "miss", "mask": "miss", "result": "miss"}
    assert metrics["artifacts"]["mask"] == "mask.safetensors" and metrics["artifacts"]["finetuned"] == "finetuned"
    assert metrics["artifacts"]["adapter"] is None and not (smoke_run / "adapter").exists()  # method=lora's
    assert metrics["timing"]["total_s"] > 0 and metrics["memory"]["optimizer_state_bytes"] > 0
    for path in ("mask.safetensors", "finetuned/model.safetensors", "finetuned/config.json", "report.md",
                 "plots/loss_curves.png", "history.json"):
        assert (smoke_run / path).is_file(), path
    assert "test accuracy" in (smoke_run / "report.md").read_text()


def test_smoke_run_freezes_exactly_half_of_the_backbone(smoke_run):
    masks, pretrained, finetuned = assert_frozen_entries_exact(smoke_run)
    mask = load_metrics(smoke_run)["mask"]
    eligible = sum(m.numel() for m in masks.values())
    assert set(masks) == set(pretrained) & set(finetuned)  # the backbone, never the new head
    assert mask["eligible"] == eligible and mask["frozen"] == int(0.5 * eligible)
    assert mask["ratio_actual"] == pytest.approx(0.5, abs=1 / eligible)
    # Importance by magnitude: every frozen entry is no larger than every trainable one.
    scores = torch.cat([pretrained[n].abs().flatten() for n in masks])
    flags = torch.cat([masks[n].flatten() for n in masks])
    assert scores[flags].max() <= scores[~flags].min()


def test_ratio_sweep_pretrains_once_and_freezes_exactly(tmp_path):
    maskrun(["-m", "experiment=smoke", "mask.ratio=0.0,0.5,0.9", "optimizer.weight_decay=0.1"], tmp_path)
    runs = run_dirs(tmp_path / "outputs")
    metrics = [load_metrics(r) for r in runs]
    assert [m["status"] for m in metrics] == ["ok"] * 3
    assert sorted(m["cache"]["pretrain"] for m in metrics) == ["hit", "hit", "miss"]
    assert len({m["artifacts"]["pretrained"] for m in metrics}) == 1
    for run_dir, m in zip(runs, metrics):
        masks, _, _ = assert_frozen_entries_exact(run_dir)
        eligible = sum(t.numel() for t in masks.values())
        assert m["mask"]["frozen"] == int(m["mask"]["ratio"] * eligible)
    assert json.loads((runs[0] / "history.json").read_text())["train"]
