"""Ties: exactly tied scores are frozen in a seeded random order, never by position; tied_share records them.

Also: calibration covers the whole training split, so no token the task uses is tied at a zero score.
"""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from maskrun import masks
from maskrun.cache import Cache
from maskrun.data.tasks import Split, TaskData
from maskrun.data.tokenizer import train_tokenizer
from maskrun.masks import scores, select, similarity
from maskrun.report import run as run_report
from conftest import task_of

CONF = Path(__file__).resolve().parents[1] / "conf" / "mask"
SEEDS = range(120)


def mask_cfg(strategy: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / f"{strategy}.yaml"), overrides)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in (tensors.values() if isinstance(tensors, dict) else tensors)])


def frozen_rate(selections) -> torch.Tensor:
    """How often each entry was frozen over the selections (one per seed), in the order of `flat`."""
    return torch.stack([flat(s.masks) for s in selections]).float().mean(0)


@pytest.mark.parametrize("sizes, below, tied", [
    ([30_000, 20_000], 0.2, 0.6),  # a bracket around several scores
    ([200_000, 100_000], 0.05, 0.9),  # a mass of tied scores fills the bracket: the all-equal path
])
def test_ties_are_drawn_uniformly_across_tensors_and_chunks(monkeypatch, sizes, below, tied):
    monkeypatch.setattr(select, "CHUNK", 7_000)  # many chunks per tensor, as in a large model
    generator = torch.Generator().manual_seed(0)
    values = {f"t{i}": torch.bucketize(torch.rand(n, generator=generator), torch.tensor([below, below + tied])).float()
              for i, n in enumerate(sizes)}
    k = round(0.5 * sum(sizes))
    selections = [select.freeze_lowest(values, 0.5, "global", "element", seed) for seed in SEEDS]
    flat_values = flat(values)
    expected = (k - int((flat_values == 0).sum())) / int((flat_values == 1).sum())
    for selection in selections:
        frozen = flat(selection.masks)
        assert int(frozen.sum()) == k and bool(frozen[flat_values == 0].all()) and not bool(frozen[flat_values == 2].any())
        assert selection.tied == int((frozen & (flat_values == 1)).sum())
    rate = frozen_rate(selections)
    for part in (*torch.tensor_split(torch.arange(sum(sizes)), 8), torch.arange(sizes[0]), sizes[0] + torch.arange(sizes[1])):
        part_tied = part[flat_values[part] == 1]
        assert abs(float(rate[part_tied].mean()) - expected) < 0.01, "tied entries not frozen uniformly"
    again = select.freeze_lowest(values, 0.5, "global", "element", SEEDS[0])
    assert torch.equal(flat(again.masks), flat(selections[0].masks))
    assert not torch.equal(flat(selections[1].masks), flat(selections[0].masks))


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_rows_and_tensors_of_equal_score_are_frozen_in_a_random_order(granularity):
    # Ten 4x3 tensors: rows (or tensors) of mean score 0 and 1 alternate, so every score is a tie group.
    values = {f"t{i}": torch.tensor([[float((i + row) % 2)] * 3 for row in range(4)]) for i in range(10)}
    if granularity == "tensor":
        values = {name: torch.full_like(v, float(i % 2)) for i, (name, v) in enumerate(values.items())}
    selections = [select.freeze_lowest(values, 0.3, "global", granularity, seed) for seed in SEEDS]
    score = flat(values)
    for selection in selections:
        frozen = flat(selection.masks)
        assert int(frozen.sum()) == 36 and not bool(frozen[score == 1].any())
        assert selection.tied == 36 and selection.tied_share == 1.0
    rate = frozen_rate(selections)
    halves = torch.tensor_split(torch.arange(score.numel()), 2)
    shares = [float(rate[half[score[half] == 0]].mean()) for half in halves]
    assert all(abs(share - 0.6) < 0.06 for share in shares), f"lower scores not drawn uniformly: {shares}"


def test_units_with_equal_remainders_take_the_extra_entry_in_a_random_order():
    values = {f"t{i}": torch.arange(3.0) for i in range(4)}  # each tensor's quota is 1.5 entries
    counts = torch.tensor([[int(m.sum()) for m in select.freeze_lowest(values, 0.5, "per_tensor", "element", seed)
                            .masks.values()] for seed in SEEDS])
    assert bool((counts.sum(1) == 6).all()) and set(counts.flatten().tolist()) == {1, 2}
    assert all(abs(share - 0.5) < 0.15 for share in (counts == 2).float().mean(0).tolist())


def test_similarity_ranks_rows_of_equal_importance_in_a_random_order():
    rows = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)  # two obvious clusters, every importance tied
    mcfg = mask_cfg("similarity", ratio=0.25, clusters=2)
    selections = [masks.build_mask(mcfg, {"w": rows}, {"w": torch.zeros(8, 2)}, seed, {"w": 0}) for seed in SEEDS]
    rate = torch.stack([select.as_units(s.masks["w"], "row").all(1) for s in selections]).float().mean(0)
    assert all(abs(r - 0.25) < 0.1 for r in rate.tolist()), f"not uniform among equally important rows: {rate}"
    assert all(s.tied_share == 1.0 for s in selections)
    distinct = masks.build_mask(mcfg, {"w": rows}, {"w": torch.arange(16.0).reshape(8, 2)}, 0, {"w": 0})
    assert distinct.tied_share == 0.0


def test_similarity_draws_its_ranking_and_its_cut_from_independent_streams(monkeypatch):
    """Twelve equally important rows in two fixed clusters of six, five frozen: the fifth is the first of one cluster
    or the other with even odds (both draws once came from one seed's stream, which favoured the first: 0.56)."""
    monkeypatch.setattr(similarity, "cluster_rows", lambda rows, clusters, seed: torch.tensor([0] * 6 + [1] * 6))
    mcfg = mask_cfg("similarity", ratio=5 / 12, clusters=2)
    rows, importance = torch.randn(12, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(12, 3)
    firsts = [int(similarity.build(mcfg, {"w": rows}, {"w": importance}, seed).masks["w"][:6].all(1).sum())
              for seed in range(4000)]
    share = sum(n == 3 for n in firsts) / len(firsts)  # the first cluster took three of the five
    assert abs(share - 0.5) < 4 * (0.25 / len(firsts)) ** 0.5, share


def test_units_of_equal_score_tie_whatever_their_width():
    """A matrix row and a vector entry of the same score are tied (a float32 mean of a wide row is not that score)."""
    scores = {"m": torch.full((6, 32), 1 / 6), "v": torch.full((6,), 1 / 6)}
    runs = [select.freeze_lowest(scores, 0.5, "global", "row", seed) for seed in range(200)]
    vector_rate = sum(float(r.masks["v"].float().mean()) for r in runs) / len(runs)
    row_rate = sum(float(r.masks["m"].all(1).float().mean()) for r in runs) / len(runs)
    assert 0.2 < vector_rate and 0.2 < row_rate, (vector_rate, row_rate)
    assert all(r.tied > 0 for r in runs)


@pytest.mark.parametrize("values, ratio, allocation, granularity, tied", [
    ({"w": [0, 0, 0, 0, 1, 2, 3, 4]}, 0.25, "global", "element", 2),  # half of the zeros: both chosen among four
    ({"w": [0, 0, 0, 0, 1, 2, 3, 4]}, 0.5, "global", "element", 0),  # every zero: no choice made
    ({"w": [0, 1, 1, 1, 2, 2, 3, 4]}, 0.25, "global", "element", 1),  # the 0, then one 1 of three
    ({"w": [[0, 0], [0, 0], [1, 1], [2, 2]]}, 0.25, "global", "row", 2),  # one of two tied rows: its two entries
    ({"a": [0, 0], "b": [0, 0], "c": [1, 1]}, 0.4, "global", "tensor", 2),  # one of two tied tensors
    ({"a": [0, 0, 1, 2], "b": [5, 6, 6, 6]}, 0.25, "per_tensor", "element", 1),  # a zero of a's two; b's only 5
    ({"w": [0, 0, 0, 0]}, 0.0, "global", "element", 0),  # nothing frozen
])
def test_tied_share_counts_the_frozen_entries_chosen_among_ties(values, ratio, allocation, granularity, tied):
    selection = select.freeze_lowest({n: torch.tensor(v, dtype=torch.float) for n, v in values.items()}, ratio,
                                     allocation, granularity, seed=0)
    frozen = sum(int(m.sum()) for m in selection.masks.values())
    assert selection.tied == tied
    assert selection.tied_share == (tied / frozen if frozen else 0.0)


@pytest.fixture
def equal_weights():
    """A linear layer whose weights are all equal: its magnitude scores are one big tie."""
    layer = torch.nn.Linear(4, 6)
    torch.nn.init.constant_(layer.weight, 0.5)
    return layer, {"weight": layer.weight.detach()}


def test_the_mask_cache_keeps_the_tied_share_and_a_high_share_is_logged(tmp_path, caplog, equal_weights):
    layer, params = equal_weights
    cfg = OmegaConf.create({"seed": 0, "mask": mask_cfg("importance", ratio=0.5)})
    magnitude = {"weight": params["weight"].abs()}

    def mask_stage(cache_dir, scores):
        """The pipeline's mask stage: the entry is built on a miss, and its tied share read back either way."""
        entry, status = Cache(cache_dir).fetch("mask", {"scores": scores["weight"].tolist()}, lambda out: masks.write_mask(
            masks.build_mask(cfg.mask, params, scores, cfg.seed, masks.neuron_axes(layer, params)), out))
        return masks.read_tied_share(entry), status

    with caplog.at_level(logging.WARNING):
        tied_share, status = mask_stage(tmp_path, magnitude)
    assert (status, tied_share) == ("miss", 1.0)
    assert "100.0% of the frozen entries" in caplog.text and "mask.calib_batches" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tied_again, status = mask_stage(tmp_path, magnitude)
    assert (status, tied_again) == ("hit", 1.0) and "100.0% of the frozen entries" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tied_share, _ = mask_stage(tmp_path, {"weight": torch.arange(24.0).reshape(6, 4)})
    assert tied_share == 0.0 and "frozen entries" not in caplog.text


@pytest.mark.parametrize("tied_share, warned", [(0.3, True), (0.05, False), (0.0, False)])
def test_the_run_report_warns_when_many_frozen_entries_were_tied(tmp_path, tied_share, warned):
    mask = {"strategy": "importance", "score": "gradient", "allocation": "global", "granularity": "element",
            "ratio": 0.5, "ratio_actual": 0.5, "eligible": 100, "frozen": 50, "trainable": 50, "tied_share": tied_share}
    metrics = {"status": "ok", "error": None, "choices": {"mask": "importance"}, "overrides": [], "seed": 0,
               "device": "cpu", "mask": mask, "timing": {"total_s": 1.0}}
    run_report.write_run_report(tmp_path, metrics)
    report = (tmp_path / "report.md").read_text()
    assert ("**Warning:** 30.0% of the frozen entries were chosen at random among exactly tied scores" in report) is warned
    assert ("mask.calib_batches" in report) is warned


def test_every_token_of_the_training_split_gets_a_gradient_score_by_default(tmp_path):
    """With the default calibration, an embedding row is tied at zero only if its token never occurs in training."""
    rare = [a + b + c for a in "bcdfg" for b in "aeiou" for c in "klmnprst"][:300]  # 300 words, one text each
    texts = [f"the film was {word}" for word in rare]
    train_tokenizer(texts * 3, 2000, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert all(len(tokenizer.tokenize(word)) == 1 for word in rare), "each rare word should be one token"
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    labels = [i % 2 for i in range(len(texts))]
    task = TaskData("toy", "classification", ["neg", "pos"], Split(texts, labels), Split(texts[:4], labels[:4]),
                    Split(texts[:4], labels[:4]))
    gradient = scores.compute_scores(mask_cfg("importance", score="gradient"), tmp_path, task_of(task, tokenizer),
                                     torch.device("cpu"), seed=0)
    present = sorted({i for ids in tokenizer(texts, truncation=True, max_length=16)["input_ids"] for i in ids})
    rows = gradient["bert.embeddings.word_embeddings.weight"][present]
    unscored = [tokenizer.convert_ids_to_tokens(i) for i, row in zip(present, rows) if not bool((row > 0).any())]
    assert not unscored, f"{len(unscored)} tokens of the training split have a zero gradient score: {unscored[:5]}"


def test_a_tie_too_large_to_draw_from_fails_with_a_way_out(monkeypatch):
    monkeypatch.setattr(select, "MAX_TIED", 100)
    with pytest.raises(ValueError, match="tie exactly at the cut.*mask.exclude"):
        select.freeze_lowest({"w": torch.zeros(200)}, 0.5, "global", "element", seed=0)
