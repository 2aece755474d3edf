"""Mask zoo: exact ratios, which entries each strategy freezes, cached scores, analytics."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from conftest import load_metrics, maskrun, run_dirs, task_of
from maskrun.data.tasks import Split, TaskData
from maskrun.data.tokenizer import train_tokenizer
from maskrun.errors import ConfigError
from maskrun.masks import build_mask, mask_summary, neuron_axes
from maskrun.masks.analytics import frozen_share, mask_overlap, parameter_type
from maskrun.masks.scores import compute_scores
from maskrun.masks.select import allocation_groups, as_units, freeze_k_lowest, freeze_lowest, lowest_entries
from maskrun.masks.similarity import cluster_rows
from maskrun.validate import check_mask

CONF = Path(__file__).resolve().parents[1] / "conf" / "mask"
TINY = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=32)


def mask_cfg(strategy: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / f"{strategy}.yaml"), overrides)


@pytest.fixture(scope="module")
def model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(TINY)


@pytest.fixture(scope="module")
def params(model) -> dict[str, torch.Tensor]:
    """The backbone of a tiny BERT classifier: every parameter but the new head."""
    return {n: p.detach() for n, p in model.named_parameters() if not n.startswith(("classifier", "bert.pooler"))}


@pytest.fixture(scope="module")
def scores(params) -> dict[str, torch.Tensor]:
    return {name: p.abs() for name, p in params.items()}


@pytest.fixture(scope="module")
def build(model, params):
    """build_mask on the tiny BERT's backbone."""
    axes = neuron_axes(model, params)
    return lambda mcfg, scores, seed=0: build_mask(mcfg, params, scores, seed, axes)


def flat(masks) -> torch.Tensor:
    return torch.cat([m.flatten() for m in (masks.values() if isinstance(masks, dict) else masks)])


def assert_exact_lowest(scores: list[torch.Tensor], masks: list[torch.Tensor], k: int, tied: int | None = None) -> None:
    """Exactly k frozen, every entry strictly below the k-th lowest score frozen and none strictly above;
    `tied` is the number frozen at that score when some entry of that score stays trainable, else 0."""
    values, frozen = flat(scores), flat(masks)
    assert int(frozen.sum()) == k
    if k == 0:
        assert not tied
        return
    cut = values.kthvalue(k).values
    assert bool(frozen[values < cut].all()) and not bool(frozen[values > cut].any())
    at_cut = values == cut
    if tied is not None:
        assert tied == (int((at_cut & frozen).sum()) if bool((at_cut & ~frozen).any()) else 0)


@pytest.mark.parametrize("strategy", ["random", "importance", "similarity"])
@pytest.mark.parametrize("allocation", ["global", "per_tensor", "per_layer"])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_every_strategy_and_allocation_hits_its_ratio(build, params, scores, strategy, allocation, ratio):
    mcfg = mask_cfg(strategy, ratio=ratio, allocation=allocation)
    selection = build(mcfg, scores)
    masks, summary = selection.masks, mask_summary(mcfg, selection.masks, selection.tied_share)
    assert {n: m.shape for n, m in masks.items()} == {n: p.shape for n, p in params.items()}
    if mcfg.granularity == "element":
        assert summary["frozen"] == round(ratio * summary["eligible"])
    else:  # each allocation unit is within one row of its share
        slack = sum(max(as_units(params[n], "row").shape[1] for n in group)
                    for group in allocation_groups(list(params), allocation))
        assert abs(summary["frozen"] - ratio * summary["eligible"]) <= slack
    assert abs(summary["ratio_actual"] - ratio) <= 0.02


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_row_and_tensor_granularity_freeze_whole_units_close_to_the_ratio(params, scores, granularity):
    masks = freeze_lowest(scores, 0.5, "global", granularity, seed=0).masks
    for name, m in masks.items():
        units = as_units(m, granularity)
        assert torch.equal(units.all(1), units.any(1)), f"{name}: a {granularity} is partly frozen"
    largest_unit = max(as_units(s, granularity).shape[1] for s in scores.values())
    assert abs(int(flat(masks).sum()) - 0.5 * flat(masks).numel()) <= largest_unit


@pytest.mark.parametrize("freeze", ["least_important", "most_important"])
def test_importance_freezes_exactly_the_lowest_and_draws_among_ties(build, params, freeze):
    generator = torch.Generator().manual_seed(1)
    tied = {name: torch.randint(0, 5, p.shape, generator=generator).float() for name, p in params.items()}
    ranked = [s if freeze == "least_important" else -s for s in tied.values()]
    k = round(0.4 * sum(p.numel() for p in params.values()))
    mcfg = mask_cfg("importance", ratio=0.4, freeze=freeze)
    masks = [flat(build(mcfg, tied, seed).masks) for seed in range(100)]
    for m in masks:
        assert_exact_lowest(ranked, [m], k)
    values = flat(ranked)
    at_cut = (values == values.kthvalue(k).values).nonzero().squeeze(1)
    first, last = at_cut[:len(at_cut) // 2], at_cut[len(at_cut) // 2:]  # the tie group in parameter order
    share = [float(torch.stack([m[half] for m in masks]).float().mean()) for half in (first, last)]
    assert 0 < share[0] < 1 and abs(share[0] - share[1]) < 0.02, f"ties not drawn uniformly: {share}"
    assert torch.equal(flat(build(mcfg, tied, seed=0).masks), masks[0]) and not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("kind", ["ties", "normal", "negative zero"])
def test_global_selection_is_exact_on_large_inputs(kind):
    generator = torch.Generator().manual_seed(2)
    sizes = [300_000, 7, 200_001]
    if kind == "ties":
        scores = [torch.randint(-3, 4, (n,), generator=generator).float() for n in sizes]
    elif kind == "normal":
        scores = [torch.randn(n, generator=generator) for n in sizes]
    else:
        scores = [torch.randint(0, 2, (n,), generator=generator).float() * torch.tensor(-0.0) for n in sizes]
    for k in (0, 1, 123_457, 250_000, sum(sizes) - 1, sum(sizes)):
        masks, tied = lowest_entries(scores, k, np.random.default_rng(0))
        assert_exact_lowest(scores, masks, k, tied)


@pytest.mark.parametrize("bracket", [(5.0, 6.0), (-6.0, -5.0), (0.0, 0.0)])
def test_a_bracket_that_misses_the_threshold_still_gives_the_exact_mask(bracket):
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    tied = freeze_k_lowest([(values.numpy(), mask.numpy())], 4321, bracket, np.random.default_rng(0))
    assert_exact_lowest([values], [mask], 4321, tied)


def test_layers_freezes_whole_bottom_layers_first(build, params):
    bottom_up = ["embeddings", "encoder.layer.0.", "encoder.layer.1."]
    sizes = [sum(p.numel() for n, p in params.items() if part in n) for part in bottom_up]
    for ratio in (0.0, 0.2, 0.5, 0.8, 0.95, 1.0):
        selection = build(mask_cfg("layers", ratio=ratio), None)
        masks = selection.masks
        frozen_layers = []
        for part in bottom_up:
            layer = [m for n, m in masks.items() if part in n]
            assert all(bool(m.all()) or not bool(m.any()) for m in layer) and len({bool(m.all()) for m in layer}) == 1
            frozen_layers.append(bool(layer[0].all()))
        assert frozen_layers == sorted(frozen_layers, reverse=True), f"r={ratio}: not a bottom-up prefix {frozen_layers}"
        prefix_totals = [sum(sizes[:i]) for i in range(4)]
        best = min(prefix_totals, key=lambda t: abs(t - ratio * sum(sizes)))
        summary = mask_summary(mask_cfg("layers", ratio=ratio), masks, selection.tied_share)
        assert summary["frozen"] == best and summary["tied_share"] == 0.0


def test_similarity_leaves_every_cluster_a_trainable_member(build, params, scores):
    mcfg = mask_cfg("similarity", ratio=0.6, clusters=4)
    selection = build(mcfg, scores)
    masks = selection.masks
    assert abs(mask_summary(mcfg, masks, selection.tied_share)["ratio_actual"] - 0.6) <= 0.02
    for name, p in params.items():
        labels = cluster_rows(as_units(p, "row"), mcfg.clusters, seed=0)
        row_frozen = as_units(masks[name], "row").all(1)
        for cluster in labels.unique():
            assert not bool(row_frozen[labels == cluster].all()), f"{name}: cluster {int(cluster)} entirely frozen"


def test_similarity_freezes_less_important_rows_of_a_cluster_first():
    rows = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)  # two obvious clusters
    importance = torch.tensor([[4.0, 4], [1, 1], [3, 3], [2, 2], [8, 8], [5, 5], [7, 7], [6, 6]])
    masks = build_mask(mask_cfg("similarity", ratio=0.5, clusters=2), {"w": rows}, {"w": importance}, 0, {"w": 0}).masks
    assert as_units(masks["w"], "row").all(1).tolist() == [False, True, False, True, False, True, False, True]


@pytest.mark.parametrize("strategy", ["random", "similarity", "importance"])
def test_same_seed_gives_the_same_mask(build, scores, strategy):
    mcfg = mask_cfg(strategy, ratio=0.5)
    first, again = (flat(build(mcfg, scores, seed=7).masks) for _ in range(2))
    assert torch.equal(first, again)
    if strategy == "random":
        assert not torch.equal(first, flat(build(mcfg, scores, seed=8).masks))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny pretrained checkpoint (random MLM model + trained tokenizer) and a small labelled task."""
    out = tmp_path_factory.mktemp("checkpoint")
    words = "good bad film movie great awful plot actor boring fun scene story slow clever".split()
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 5)) for i in range(48)]
    train_tokenizer(texts, 60, out)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(**{**TINY.to_dict(), "vocab_size": 60})).save_pretrained(out)
    labels = [int("good" in t or "great" in t) for t in texts]
    task = TaskData("toy", "classification", ["neg", "pos"], Split(texts, labels), Split(texts[:4], labels[:4]), Split(texts[:4], labels[:4]))
    from transformers import AutoTokenizer

    return out, task, AutoTokenizer.from_pretrained(out)


def test_gradient_scores_are_consistent_with_each_other(tiny_checkpoint):
    checkpoint, task, tokenizer = tiny_checkpoint

    def score(kind: str, **overrides):
        mcfg = mask_cfg("importance", score=kind, calib_batches=3, calib_batch_size=4, **overrides)
        return compute_scores(mcfg, checkpoint, task_of(task, tokenizer), torch.device("cpu"), seed=0)

    weights = load_file(checkpoint / "model.safetensors")
    magnitude, gradient, taylor = score("magnitude"), score("gradient"), score("taylor")
    assert set(gradient) <= set(weights) and "bert.encoder.layer.0.attention.self.query.weight" in gradient
    for name, g in gradient.items():
        assert torch.equal(magnitude[name], weights[name].abs())
        torch.testing.assert_close(taylor[name], weights[name].abs() * g)
    assert any(bool((g > 0).any()) for g in gradient.values())
    assert all(torch.equal(a, b) for a, b in zip(gradient.values(), score("gradient").values())), "not deterministic"
    per_example = score("fisher", fisher="per_example")
    batch_of_one = compute_scores(mask_cfg("importance", score="fisher", fisher="batch", calib_batches=12,
                                           calib_batch_size=1), checkpoint, task_of(task, tokenizer), torch.device("cpu"), 0)
    batch = score("fisher", fisher="batch")
    for name in per_example:  # the same 12 examples: one per batch is per-example Fisher
        torch.testing.assert_close(per_example[name], batch_of_one[name])
    assert any(not torch.allclose(per_example[n], batch[n]) for n in per_example)


@pytest.mark.parametrize("override, key", [
    ({"score": "hessian"}, "mask.score"), ({"allocation": "per_head"}, "mask.allocation"),
    ({"granularity": "column"}, "mask.granularity"), ({"fisher": "diagonal"}, "mask.fisher"),
    ({"calib_batches": 0}, "mask.calib_batches"), ({"calib_batch_size": 2.5}, "mask.calib_batch_size"),
    ({"clusters": 0}, "mask.clusters"), ({"granularity": "element"}, "mask.granularity"),
])
def test_bad_mask_options_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        check_mask(mask_cfg("similarity", **override))
    check_mask(mask_cfg("similarity"))


def test_parameter_types_and_frozen_share_per_layer_and_type():
    names = {"bert.embeddings.word_embeddings.weight": "embeddings", "bert.embeddings.LayerNorm.weight": "LayerNorm",
             "bert.encoder.layer.0.attention.self.query.weight": "attention",
             "bert.encoder.layer.0.attention.output.dense.bias": "bias",
             "bert.encoder.layer.0.intermediate.dense.weight": "MLP", "bert.encoder.layer.0.output.dense.weight": "MLP",
             "bert.encoder.layer.1.output.LayerNorm.bias": "LayerNorm"}
    assert {n: parameter_type(n) for n in names} == names
    masks = {"bert.embeddings.word_embeddings.weight": torch.ones(4, 2, dtype=torch.bool),
             "bert.encoder.layer.0.attention.self.query.weight": torch.tensor([[True, False], [False, False]]),
             "bert.encoder.layer.1.output.LayerNorm.bias": torch.zeros(2, dtype=torch.bool)}
    shares = frozen_share(masks)
    assert [(r["name"], r["frozen"], r["eligible"]) for r in shares["layer"]] == [
        ("embeddings", 8, 8), ("layer 0", 1, 4), ("layer 1", 0, 2)]
    assert {r["name"]: r["share"] for r in shares["type"]} == {"embeddings": 1.0, "attention": 0.25, "LayerNorm": 0.0}


def test_mask_overlap_compares_strategies_at_the_same_ratio_and_seed(tmp_path):
    def run(name, strategy, ratio, seed, frozen, status="ok"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        mask = {"strategy": strategy, "score": "magnitude" if strategy == "importance" else None,
                "allocation": "global", "granularity": "element", "ratio": ratio}
        (run_dir / "metrics.json").write_text(json.dumps({"status": status, "seed": seed, "mask": mask}))
        save_file({"w": torch.tensor(frozen, dtype=torch.bool)}, run_dir / "mask.safetensors")
        return run_dir

    dirs = [run("a", "random", 0.5, 0, [1, 1, 0, 0]), run("b", "importance", 0.5, 0, [1, 0, 1, 0]),
            run("c", "random", 0.5, 1, [0, 0, 1, 1]), run("d", "importance", 0.5, 1, [0, 0, 1, 1]),
            run("e", "layers", 0.25, 0, [1, 0, 0, 0]), run("f", "importance", 0.25, 0, [0, 1, 0, 0]),
            run("g", "random", 0.25, 0, [1, 0, 0, 0], status="failed")]
    assert mask_overlap(dirs) == [
        {"ratio": 0.25, "a": "importance/magnitude", "b": "layers", "jaccard": 0.0, "pairs": 1},
        {"ratio": 0.5, "a": "importance/magnitude", "b": "random", "jaccard": (1 / 3 + 1) / 2, "pairs": 2},
    ]


@pytest.fixture(scope="module")
def gradient_ratio_sweep(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The sweep's working directory (relative artifact paths start there) and its run dirs in job order."""
    cwd = tmp_path_factory.mktemp("scores_sweep")
    maskrun(["-m", "experiment=smoke", "mask.ratio=0.15,0.7", "mask.score=gradient", "pretrain.steps=10", "finetune.epochs=1"],
            cwd)
    return cwd, sorted(run_dirs(cwd / "outputs"), key=lambda d: int(d.name))


def test_a_ratio_sweep_scores_once_and_freezes_exactly(gradient_ratio_sweep):
    cwd, dirs = gradient_ratio_sweep
    first, second = (load_metrics(d) for d in dirs)
    assert (first["cache"]["scores"], second["cache"]["scores"]) == ("miss", "hit")
    for run_dir, metrics in zip(dirs, (first, second)):
        mask = metrics["mask"]
        assert metrics["status"] == "ok" and mask["score"] == "gradient"
        assert mask["frozen"] == round(mask["ratio"] * mask["eligible"])
        frozen = load_file(run_dir / "mask.safetensors")
        pretrained = load_file(cwd / metrics["artifacts"]["pretrained"] / "model.safetensors")
        finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
        for name, m in frozen.items():
            assert torch.equal(finetuned[name][m], pretrained[name][m]), f"{name}: a frozen entry moved"
        report = (run_dir / "report.md").read_text()
        assert "| embeddings |" in report and (run_dir / "plots" / "mask_frozen_share.png").stat().st_size > 0
    assert math.isclose(second["mask"]["ratio_actual"], 0.7, abs_tol=1 / second["mask"]["eligible"])


def test_a_gradient_mask_draws_among_tied_embedding_rows_whatever_their_token_id(gradient_ratio_sweep):
    cwd, dirs = gradient_ratio_sweep
    (scores_file,) = (cwd / "outputs" / ".cache" / "scores").glob("*/scores.safetensors")
    name = "bert.embeddings.word_embeddings.weight"
    scores = load_file(scores_file)[name]
    for run_dir in dirs:
        tied_share = load_metrics(run_dir)["mask"]["tied_share"]
        assert 0.0 <= tied_share <= 1.0
        assert ("**Warning:**" in (run_dir / "report.md").read_text()) == (tied_share > 0.05)
    frozen = load_file(dirs[0] / "mask.safetensors")[name]  # ratio 0.15: the cut falls among unused rows' zero scores
    assert load_metrics(dirs[0])["mask"]["tied_share"] > 0.05 and not bool(frozen[scores > 0].any())
    half = len(scores) // 2
    lower, upper = (float(frozen[part][scores[part] == 0].float().mean()) for part in (slice(None, half), slice(half, None)))
    assert 0 < min(lower, upper) and max(lower, upper) / min(lower, upper) < 1.25, (lower, upper)
