"""Mask zoo II, the static strategies: lt_sft and movement (chosen by a cached fine-tuning pass), spectrum (per-matrix
SNR), hft (half of each layer's attention and FFN matrices); their validation, their stage, and the sweep report."""

import math
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import assert_frozen_entries_exact, load_metrics, maskrun, run_dirs, task_of
from maskrun import stages
from maskrun.errors import ConfigError
from maskrun.finetune import finetune
from maskrun.masks import build_mask, neuron_axes, selected
from maskrun.masks.analytics import parameter_type
from maskrun.masks.selection_pass import StepLimitReached, StopAfter, run_selection_pass
from maskrun.masks.spectrum import signal_to_noise
from maskrun.models import pretrained_names
from maskrun.validate import check_mask, check_selection_pass
from test_masks import TINY, mask_cfg, model, params, tiny_checkpoint  # noqa: F401 (fixtures)

STATIC = ("lt_sft", "movement", "spectrum", "hft")
CONF = Path(str(files("maskrun.conf")))


def build(model, params, mcfg, scores=None, seed=0):
    """The masks of the eligible tensors of `params`, as the pipeline builds them (mask.include/exclude applied)."""
    eligible = {n: p for n, p in params.items() if selected(n, mcfg.include, mcfg.exclude)}
    return build_mask(mcfg, eligible, scores, seed, neuron_axes(model, eligible)).masks


@pytest.mark.parametrize("strategy", ["lt_sft", "movement"])
def test_a_selection_pass_strategy_freezes_exactly_the_lowest_scores(model, params, strategy):
    generator = torch.Generator().manual_seed(1)
    scores = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}  # distinct, signed
    masks = build(model, params, mask_cfg(strategy, ratio=0.3), scores)
    frozen = torch.cat([masks[n].flatten() for n in params])
    values = torch.cat([scores[n].flatten() for n in params])
    k = round(0.3 * values.numel())
    assert int(frozen.sum()) == k
    assert values[frozen].max() < values[~frozen].min()


def matrix_with_singular_values(s: torch.Tensor, n: int, m: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    return u[:, :len(s)] @ torch.diag(s) @ v[:, :len(s)].T


def test_spectrum_snr_follows_the_marchenko_pastur_formula():
    s = torch.tensor([9.0, 7.0, 2.0, 1.5, 1.2, 1.0, 0.8, 0.5], dtype=torch.float64)
    weight = matrix_with_singular_values(s, 8, 12, seed=0)
    values = np.sort(s.numpy())[::-1]
    q75, q25 = np.percentile(values, [75, 25])  # numpy's default is linear interpolation too
    bound = (q75 - q25) / 1.349 * (1 + math.sqrt(8 / 12))
    expected = values[values > bound].sum() / values[values <= bound].sum() / values[0]
    assert 0 < (values > bound).sum() < len(values)  # the example has signal and noise
    assert signal_to_noise(weight) == pytest.approx(expected, rel=1e-9)
    assert signal_to_noise(weight.T) == pytest.approx(expected, rel=1e-9)  # the orientation does not matter
    assert signal_to_noise(torch.zeros(4, 6)) == 0.0


def test_spectrum_freezes_the_lowest_snr_matrices_whole_and_vectors_last(model, params):
    generator = torch.Generator().manual_seed(0)
    noisy = {n: torch.randn(p.shape, generator=generator) if p.dim() == 2 else p for n, p in params.items()}
    # One matrix made of strong low-rank signal: the highest SNR, so the last matrix to freeze.
    signal = "bert.encoder.layer.1.attention.self.query.weight"
    noisy[signal] = 10 * torch.outer(torch.randn(16, generator=generator), torch.randn(16, generator=generator)) \
        + 0.01 * noisy[signal]
    mcfg = mask_cfg("spectrum", ratio=0.5)
    masks = build(model, noisy, mcfg)
    eligible = sum(m.numel() for m in masks.values())
    frozen = sum(int(m.sum()) for m in masks.values())
    assert all(bool(m.all()) or not bool(m.any()) for m in masks.values())  # whole tensors
    assert abs(frozen - 0.5 * eligible) <= max(m.numel() for m in masks.values()) / 2  # the closest whole-tensor cut
    assert not any(n.startswith("bert.embeddings.word") for n in masks)  # Spectrum trains the embeddings
    snr = {n: signal_to_noise(noisy[n]) for n in masks if noisy[n].dim() == 2}
    frozen_snr = [snr[n] for n in snr if masks[n].all()]
    trainable_snr = [snr[n] for n in snr if not masks[n].any()]
    assert frozen_snr and trainable_snr and max(frozen_snr) <= min(trainable_snr)
    assert not masks[signal].any()
    assert not any(masks[n].any() for n in masks if noisy[n].dim() == 1)  # vectors rank after every matrix
    everything = build(model, noisy, mask_cfg("spectrum", ratio=1.0))
    assert all(bool(m.all()) for m in everything.values())


def test_hft_freezes_half_of_each_layers_attention_and_ffn_modules_at_random(model, params):
    mcfg = mask_cfg("hft", ratio=0.5)
    masks = build(model, params, mcfg, seed=0)
    assert not any(parameter_type(n) in ("embeddings", "LayerNorm") for n in masks)  # not eligible: they train
    for layer in range(TINY.num_hidden_layers):
        prefix = f"bert.encoder.layer.{layer}."
        attention = [f"{prefix}attention.self.{m}" for m in ("query", "key", "value")]
        attention.append(f"{prefix}attention.output.dense")
        ffn = [f"{prefix}intermediate.dense", f"{prefix}output.dense"]
        for modules, frozen_count in ((attention, 2), (ffn, 1)):
            states = [bool(masks[f"{m}.weight"].all()) for m in modules]
            assert sum(states) == frozen_count
            for module, state in zip(modules, states):
                assert torch.equal(masks[f"{module}.weight"], torch.full_like(masks[f"{module}.weight"], state))
                assert torch.equal(masks[f"{module}.bias"], torch.full_like(masks[f"{module}.bias"], state))
    choices = {tuple(bool(m.any()) for m in build(model, params, mcfg, seed=seed).values()) for seed in range(8)}
    assert len(choices) > 1, "the choice does not depend on the seed"
    again = build(model, params, mcfg, seed=0)
    assert all(torch.equal(masks[n], again[n]) for n in masks)


def test_hft_apportions_an_odd_category_over_layers():
    """Three FFN matrices per layer at r=0.5 (LLaMA's case): layers freeze 1 or 2, 3 of 6 in all over two layers."""
    params = {f"model.layers.{layer}.mlp.{m}.weight": torch.zeros(4, 4)
              for layer in range(2) for m in ("gate_proj", "up_proj", "down_proj")}
    masks = build_mask(mask_cfg("hft", ratio=0.5), params, None, 3, {n: 0 for n in params}).masks
    per_layer = [sum(bool(masks[f"model.layers.{layer}.mlp.{m}.weight"].all()) for m in ("gate_proj", "up_proj",
                                                                                          "down_proj"))
                 for layer in range(2)]
    assert sorted(per_layer) == [1, 2]


@pytest.mark.parametrize("strategy, override, key", [
    ("spectrum", {"granularity": "element"}, "mask.granularity"),
    ("spectrum", {"allocation": "per_tensor"}, "mask.allocation"),
    ("hft", {"allocation": "global"}, "mask.allocation"),
    ("hft", {"granularity": "row"}, "mask.granularity"),
    ("lt_sft", {"select_epochs": 0}, "mask.select_epochs"),
    ("movement", {"select_steps": 1.5}, "mask.select_steps"),
])
def test_combinations_that_make_no_sense_are_refused(strategy, override, key):
    with pytest.raises(ConfigError, match=key):
        check_mask(mask_cfg(strategy, **override))
    check_mask(mask_cfg(strategy))


@pytest.mark.parametrize("strategy, overrides, refused", [
    ("movement", ["finetune.precision=fp16"], "fp16"),  # its loss scale would weigh the summed gradients
    ("lt_sft", ["finetune.precision=fp16"], None),
    ("lt_sft", ["experiment=sequential", "sequential.remask=true"], "sequential.remask"),  # no pass on task B
    ("hft", ["experiment=sequential", "sequential.remask=true"], None),
])
def test_what_a_selection_pass_cannot_do_is_refused(strategy, overrides, refused):
    from hydra import compose, initialize_config_module

    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", [f"mask={strategy}", *overrides])
    if refused:
        with pytest.raises(ConfigError, match=refused):
            check_selection_pass(cfg)
    else:
        check_selection_pass(cfg)


def test_one_sgd_step_records_its_move_and_its_movement_score(tiny_checkpoint):
    """With plain SGD and one step, W_1 = W_0 - lr * g: the pass records moved = |W_1 - W_0| and
    movement = -W_0 * g = W_0 * (W_1 - W_0) / lr, W_1 being the weights of the same first step taken here."""
    pretrained, data, tokenizer = tiny_checkpoint
    task = task_of(data, tokenizer)
    config = OmegaConf.load(CONF / "config.yaml")
    fcfg = OmegaConf.merge(config.finetune, {"batch_size": 8, "max_length": 16, "scheduler": "constant",
                                             "warmup_ratio": 0.0, "max_grad_norm": None, "epochs": 1})
    ocfg = OmegaConf.merge(OmegaConf.load(CONF / "optimizer" / "sgd.yaml"), {"momentum": 0.0})
    names = pretrained_names(pretrained)
    records = run_selection_pass(mask_cfg("movement", select_steps=1), fcfg, ocfg, pretrained, names, task,
                                 torch.device("cpu"), seed=0)
    torch.manual_seed(0)
    model = task.load_model(pretrained)
    with pytest.raises(StepLimitReached):
        finetune(model, task, {}, fcfg, ocfg, torch.device("cpu"), 0, callbacks=[StopAfter(1)])
    before = load_file(pretrained / "model.safetensors")
    after = {name: p.detach() for name, p in model.named_parameters() if name in names}
    moved, movement = records["moved"], records["movement"]
    assert set(moved) == set(movement) == set(after) and "bert.encoder.layer.0.attention.self.query.weight" in moved
    assert any(bool((m > 0).any()) for m in moved.values())
    eps = torch.finfo(torch.float32).eps
    for name, w1 in after.items():
        w0, step = before[name], after[name] - before[name]
        assert torch.equal(moved[name], step.abs()), name
        # W_1 - W_0 in float32 is off from lr * g by up to an ulp of the larger weight, which |W_0| / lr scales.
        tolerance = w0.abs() * eps * (w0.abs() + step.abs()) / fcfg.lr + 1e-5 * movement[name].abs()
        assert bool(((movement[name] - w0 * step / fcfg.lr).abs() <= tolerance).all()), name
    two_steps = run_selection_pass(mask_cfg("movement", select_steps=2), fcfg, ocfg, pretrained, names, task,
                                   torch.device("cpu"), seed=0)
    assert any(not torch.equal(two_steps["moved"][n], moved[n]) for n in moved)
    again = run_selection_pass(mask_cfg("movement", select_steps=1), fcfg, ocfg, pretrained, names, task,
                               torch.device("cpu"), seed=0)
    assert all(torch.equal(again["movement"][n], movement[n]) for n in movement), "not deterministic"


def test_the_selection_stage_key_holds_what_shapes_the_pass_and_not_the_strategy():
    config = OmegaConf.load(CONF / "config.yaml")
    config.dataset = OmegaConf.load(CONF / "dataset" / "rotten_tomatoes.yaml")
    config.optimizer = OmegaConf.load(CONF / "optimizer" / "adamw.yaml")

    def key(strategy="lt_sft", **changes):
        cfg = OmegaConf.merge(config, {"mask": OmegaConf.load(CONF / "mask" / f"{strategy}.yaml")}, changes)
        return stages.selection(cfg, Path("pretrained-entry"))

    base = key()
    assert key("movement") == base and key(mask={"ratio": 0.9}) == base  # one pass serves both strategies, any ratio
    for changes in ({"mask": {"select_epochs": 2}}, {"mask": {"select_steps": 5}}, {"finetune": {"lr": 3e-4}},
                    {"optimizer": {"weight_decay": 0.5}}, {"seed": 1}, {"dataset": {"max_examples": 10}}):
        assert key(**changes) != base, changes


@pytest.fixture(scope="module")
def static_sweep(tmp_path_factory) -> list[Path]:
    cwd = tmp_path_factory.mktemp("static")
    maskrun(["-m", "experiment=smoke", f"mask={','.join(STATIC)}", "mask.ratio=0.5", "optimizer.weight_decay=0.1",
             "hydra.sweep.dir=sweep"], cwd)
    return run_dirs(cwd / "sweep")


def test_the_static_strategies_realize_their_ratio_and_keep_frozen_entries_exact(static_sweep):
    assert len(static_sweep) == len(STATIC)
    seen = set()
    for run_dir in static_sweep:
        metrics = load_metrics(run_dir)
        mask = metrics["mask"]
        assert metrics["status"] == "ok"
        seen.add(mask["strategy"])
        masks, _, _ = assert_frozen_entries_exact(run_dir)
        assert mask["frozen"] == sum(int(m.sum()) for m in masks.values())
        target = mask["ratio"] * mask["eligible"]
        if mask["granularity"] == "element":
            assert mask["frozen"] == round(target)
        else:  # whole tensors (hft: with their bias): within one unit of the target
            unit = max(m.numel() for m in masks.values())
            assert abs(mask["frozen"] - target) <= unit
        if mask["strategy"] in ("lt_sft", "movement"):
            assert metrics["cache"]["selection"] in ("hit", "miss")
    assert seen == set(STATIC)
    passes = [load_metrics(d)["cache"].get("selection") for d in static_sweep]
    assert sorted(p for p in passes if p) == ["hit", "miss"], "lt_sft and movement share one selection pass"


def test_the_sweep_report_compares_the_new_strategies(static_sweep):
    report = (static_sweep[0].parent / "report.md").read_text()
    overlap = report.split("## Mask overlap")[1]
    for strategy in STATIC:
        assert f"| mask/{strategy} |" in report.split("## Matched accuracy")[1], strategy
        assert f" {strategy}" in overlap, strategy
    assert overlap.count("| 0.5 |") == math.comb(len(STATIC), 2)


def test_the_movement_score_of_a_bf16_model_is_taken_in_float32():
    """W * dL/dW multiplied in bf16 would round every product to 8 bits, which ties distinct scores."""
    from maskrun.masks.selection_pass import MovementScores

    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 32, generator=generator).to(torch.bfloat16))
    grad = torch.randn(32, 32, generator=generator).to(torch.bfloat16)
    movement = MovementScores({"w": weight})
    (weight * grad).sum().backward()
    movement.remove()
    assert torch.equal(movement.scores["w"], -(weight.detach().float() * grad.float()))


def test_the_selection_stage_key_holds_the_validation_settings_when_they_choose_the_recorded_epoch():
    config = OmegaConf.load(CONF / "config.yaml")
    config.dataset = OmegaConf.load(CONF / "dataset" / "rotten_tomatoes.yaml")
    config.optimizer = OmegaConf.load(CONF / "optimizer" / "adamw.yaml")
    config.mask = OmegaConf.load(CONF / "mask" / "lt_sft.yaml")

    def key(**changes):
        return stages.selection(OmegaConf.merge(config, changes), Path("pretrained-entry"))

    assert key(finetune={"checkpoint_every": 5}) == key()  # how often it checkpoints changes nothing it computes
    assert key(eval={"answer_pattern": "(.*)"}) == key()  # without early stopping validation chooses nothing
    stopping = {"early_stopping_patience": 1}
    for change in ({"answer_pattern": "The answer is: (.*)"}, {"max_new_tokens": 4}):
        assert key(finetune=stopping, eval=change) != key(finetune=stopping), change


@pytest.mark.parametrize("strategy", ["lt_sft", "movement"])
def test_a_tied_selection_pass_mask_is_told_the_remedies_of_its_own_scores(strategy):
    """Calibration settings and mask.score do not change a selection pass's scores: the warning names the pass."""
    from maskrun.masks import tied_share_warning

    warning = tied_share_warning(0.2, strategy)
    assert "mask.select_epochs" in warning and "calib" not in warning and "mask.score" not in warning
    assert "mask.calib_batches" in tied_share_warning(0.2, "importance")
    assert tied_share_warning(0.01, strategy) is None
