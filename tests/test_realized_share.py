"""Before any work, a sweep names the requested ratios that realize the same frozen share, computed from the
parameter shapes by the mask code itself, where shapes alone decide it."""

import pytest
from omegaconf import OmegaConf

from maskrun.cli import CONFIG_MODULE
from maskrun.validate import compose_jobs, realized_share, realized_share_warnings


def sweep(*overrides: str):
    return compose_jobs(CONFIG_MODULE, "config", list(overrides), multirun=True)


def shares(configs) -> list[float]:
    return [realized_share(*(OmegaConf.to_yaml(cfg[section]) for section in ("model", "pretrain", "mask")))
            for cfg in configs]


def test_layers_sweep_warns_once_for_the_ratios_that_freeze_the_same_layers():
    configs = sweep("experiment=smoke", "mask=layers", "mask.ratio=0.1,0.3,0.9", "seed=0,1")
    assert realized_share_warnings(configs) == [
        "mask=layers: mask.ratio=0.1,0.3 all realize a frozen share of 0.000 (whole layers only)"]


def test_importance_sweep_says_nothing():
    assert realized_share_warnings(sweep("experiment=smoke", "mask=importance", "mask.ratio=0.1,0.3")) == []


def test_layers_on_the_default_model_freeze_nothing_then_the_embeddings_then_layer_0():
    configs = sweep("mask=layers", "mask.ratio=0.1,0.3,0.5,0.7,0.9")
    model = configs[0].model
    h, inner = model.hidden_size, model.intermediate_size
    # Entries of BERT's word, position and 2 token-type embeddings with their LayerNorm, and of one layer:
    # query, key, value and output projections, the MLP's two matrices, two LayerNorms.
    embeddings = (model.vocab_size + model.max_position_embeddings + 2) * h + 2 * h
    layer = 4 * (h * h + h) + (h * inner + inner) + (inner * h + h) + 2 * 2 * h
    total = embeddings + model.num_layers * layer
    assert shares(configs) == pytest.approx([0, 0, embeddings / total, embeddings / total, (embeddings + layer) / total])
    assert realized_share_warnings(configs) == [
        "mask=layers: mask.ratio=0.1,0.3 all realize a frozen share of 0.000; "
        f"mask.ratio=0.5,0.7 all realize a frozen share of {embeddings / total:.3f} (whole layers only)"]


def test_whole_tensors_per_tensor_freeze_nothing_up_to_half_and_everything_above():
    configs = sweep("mask.allocation=per_tensor", "mask.granularity=tensor", "mask.ratio=0.3,0.5,0.51")
    assert shares(configs) == [0.0, 0.0, 1.0]
    assert realized_share_warnings(configs) == [
        "mask=importance: mask.ratio=0.3,0.5 all realize a frozen share of 0.000 "
        "(whole tensors only, each frozen entirely or not at all)"]


def test_each_group_of_jobs_that_differ_only_in_ratio_and_seed_gets_its_own_line():
    configs = sweep("experiment=smoke", "mask=layers", "mask.ratio=0.1,0.3", "finetune.lr=0.001,0.0001")
    assert realized_share_warnings(configs) == [
        f"mask=layers finetune.lr={lr}: mask.ratio=0.1,0.3 all realize a frozen share of 0.000 (whole layers only)"
        for lr in ("0.001", "0.0001")]


@pytest.mark.parametrize("steps, has_pooler", [(0, True), (5, False)])
def test_a_pretrained_model_is_masked_on_what_its_checkpoint_holds(steps, has_pooler):
    """Used as is, MiniLM's checkpoint is its task model's backbone (with a pooler); pretrained on, it is the
    masked LM's (without one)."""
    from maskrun.models import backbone_shapes

    (cfg,) = sweep("model=minilm", f"pretrain.steps={steps}")
    names = backbone_shapes(cfg.model, cfg.pretrain)
    assert any("pooler" in name for name in names) == has_pooler
    assert "bert.embeddings.word_embeddings.weight" in names
