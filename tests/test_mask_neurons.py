"""Units: a row is an output neuron whatever the module's layout, and random masks treat every unit alike."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification)
from transformers.pytorch_utils import Conv1D

from conftest import load_metrics, maskrun, run_dirs
from maskrun import masks
from maskrun.masks import select

CONF = Path(__file__).resolve().parents[1] / "conf" / "mask"


def mask_cfg(strategy: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / f"{strategy}.yaml"), overrides)


def conv1d_weights(model: torch.nn.Module) -> list[str]:
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)]


def backbone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefix = model.base_model_prefix + "."
    return {name: p.detach() for name, p in model.named_parameters() if name.startswith(prefix)}


@pytest.fixture(scope="module")
def gpt2() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_inner=40, n_positions=32, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    return GPT2ForSequenceClassification(config)


def test_a_conv1d_weight_has_its_output_neurons_along_its_columns(gpt2):
    axes = masks.neuron_axes(gpt2, backbone(gpt2))
    assert conv1d_weights(gpt2) and all(axes[name] == 1 for name in conv1d_weights(gpt2))
    assert axes["transformer.wte.weight"] == 0 and axes["transformer.h.0.ln_1.weight"] == 0


@pytest.mark.parametrize("strategy, overrides", [
    ("importance", {"granularity": "row"}), ("random", {"granularity": "row"}), ("similarity", {"clusters": 3}),
])
def test_row_masks_of_gpt2_freeze_whole_output_columns(gpt2, strategy, overrides):
    params = backbone(gpt2)
    generator = torch.Generator().manual_seed(0)
    scores = {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}
    selection = masks.build_mask(mask_cfg(strategy, ratio=0.5, **overrides), params, scores, 0,
                                 masks.neuron_axes(gpt2, params))
    assert {n: m.shape for n, m in selection.masks.items()} == {n: p.shape for n, p in params.items()}
    for name in conv1d_weights(gpt2):
        m = selection.masks[name]  # (in, out): a column is one output neuron
        assert torch.equal(m.all(0), m.any(0)), f"{name}: a frozen pattern is not whole output columns"
    assert any(bool(selection.masks[n].any()) and not bool(selection.masks[n].all()) for n in conv1d_weights(gpt2))


def test_the_cli_freezes_whole_output_columns_of_tiny_gpt(tmp_path):
    maskrun(["experiment=smoke", "model=tiny_gpt", "mask.granularity=row", "pretrain.steps=10", "finetune.epochs=1"],
            tmp_path)
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert load_metrics(run_dir)["mask"]["granularity"] == "row"
    frozen = load_file(run_dir / "mask.safetensors")
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "finetuned")
    assert conv1d_weights(model)
    for name in conv1d_weights(model):
        assert torch.equal(frozen[name].all(0), frozen[name].any(0)), f"{name}: not whole output columns"


@pytest.fixture(scope="module")
def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=32))


@pytest.fixture(scope="module")
def bert_params(bert) -> dict[str, torch.Tensor]:
    return {name: p for name, p in backbone(bert).items() if "pooler" not in name}


@pytest.fixture(scope="module")
def random_masks(bert, bert_params):
    """The random strategy's masks of the tiny BERT's backbone."""
    axes = masks.neuron_axes(bert, bert_params)

    def build(granularity: str, ratio: float, seed: int) -> dict[str, torch.Tensor]:
        mcfg = mask_cfg("random", ratio=ratio, granularity=granularity)
        return masks.build_mask(mcfg, bert_params, None, seed, axes).masks
    return build


def test_random_rows_freeze_vector_entries_and_matrix_rows_alike(bert_params, random_masks):
    vectors, matrices = [n for n, p in bert_params.items() if p.dim() == 1], [n for n, p in bert_params.items() if p.dim() == 2]
    frozen = {"vector entries": [], "matrix rows": []}
    for seed in range(100):
        m = random_masks("row", 0.1, seed)
        frozen["vector entries"].append(float(torch.cat([m[n] for n in vectors]).float().mean()))
        frozen["matrix rows"].append(float(torch.cat([select.as_units(m[n], "row").all(1) for n in matrices]).float().mean()))
    shares = {unit: sum(values) / len(values) for unit, values in frozen.items()}
    assert all(abs(share - 0.1) < 0.02 for share in shares.values()), shares


def test_random_tensors_freeze_vectors_and_matrices_alike(bert_params, random_masks):
    rate = {1: [], 2: []}
    for seed in range(300):
        m = random_masks("tensor", 0.3, seed)
        for name, p in bert_params.items():
            rate[p.dim()].append(float(m[name].all()))
    vectors, matrices = (sum(r) / len(r) for r in (rate[1], rate[2]))
    assert abs(vectors - matrices) < 0.05, f"vectors frozen at {vectors:.3f}, matrices at {matrices:.3f}"
