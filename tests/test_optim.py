"""MaskedOptimizer: no gradient for what is frozen whole, state only for what trains, GradScaler steps stay exact,
weight decay by rank."""

from types import SimpleNamespace

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

from maskrun.optim import MaskedOptimizer

ADAMW = SimpleNamespace(name="adamw", weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)


def model_and_masks(ratio: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 2))
    generator = torch.Generator().manual_seed(0)
    masks = {"0.weight": torch.rand(32, 32, generator=generator) < ratio, "0.bias": torch.ones(32, dtype=torch.bool)}
    return model, masks


def train_step(model, optimizer, scaler=None) -> None:
    loss = model(torch.randn(8, 32)).square().mean()
    (loss if scaler is None else scaler.scale(loss)).backward()
    optimizer.step(max_grad_norm=1.0, scaler=scaler)


def test_a_tensor_frozen_whole_gets_no_gradient_and_no_optimizer_slot():
    model, masks = model_and_masks(0.5)
    optimizer = MaskedOptimizer(model, masks, ADAMW, lr=0.1)
    assert not model[0].bias.requires_grad
    assert all(p is not model[0].bias for p in optimizer.trainable_tensors())
    train_step(model, optimizer)
    assert model[0].bias.grad is None


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.5, 0.9, 0.995])
def test_optimizer_state_holds_two_moments_per_trainable_entry_plus_the_smallest_record_of_them(ratio):
    model, masks = model_and_masks(ratio)
    optimizer = MaskedOptimizer(model, masks, ADAMW, lr=0.1)
    train_step(model, optimizer)
    frozen_in_masked = int(masks["0.weight"].sum())
    trainable_in_masked = masks["0.weight"].numel() - frozen_in_masked
    trainable = trainable_in_masked + sum(p.numel() for p in model[1].parameters())
    # The int32 index of the smaller side, or one bit per entry; none for a tensor with nothing frozen.
    record_bytes = min(4 * trainable_in_masked, 4 * frozen_in_masked, masks["0.weight"].numel() // 8) \
        if frozen_in_masked else 0
    steps = 4 * len(optimizer.trainable_tensors())  # one float32 step count per tensor
    assert optimizer.state_bytes() == 2 * 4 * trainable + record_bytes + steps


def test_a_scaled_step_keeps_frozen_entries_and_an_overflowed_step_changes_nothing():
    model, masks = model_and_masks(0.5)
    optimizer = MaskedOptimizer(model, masks, ADAMW, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = model[0].weight.detach().clone()
    frozen = masks["0.weight"]

    train_step(model, optimizer, scaler)
    assert torch.equal(model[0].weight[frozen], before[frozen])
    assert not torch.equal(model[0].weight[~frozen], before[~frozen])

    after_first = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale = scaler.get_scale()
    loss = scaler.scale(model(torch.randn(8, 32)).square().mean())
    loss.backward()
    model[0].weight.grad.view(-1)[(~frozen).flatten().nonzero()[0]] = float("inf")
    optimizer.step(max_grad_norm=1.0, scaler=scaler)
    assert scaler.get_scale() < scale  # the scaler saw the overflow and backed off
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), after_first[name]), f"{name} changed in a skipped step"


# The name list weight decay was decided by before it went by rank: what BERT and GPT-2 must still get.
NAME_RULE_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_")


def tiny_models() -> dict[str, torch.nn.Module]:
    bert = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    gpt2 = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_inner=32, n_positions=32, pad_token_id=0)
    return {"bert_mlm": BertForMaskedLM(bert), "bert_classifier": BertForSequenceClassification(bert),
            "gpt2_lm": GPT2LMHeadModel(gpt2), "gpt2_classifier": GPT2ForSequenceClassification(gpt2)}


def no_decay_names(model: torch.nn.Module, optimizer: MaskedOptimizer) -> set[str]:
    undecayed = {id(p) for group in optimizer.optimizer.param_groups if group["weight_decay"] == 0.0
                 for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in undecayed}


@pytest.mark.parametrize("kind", ["bert_mlm", "bert_classifier", "gpt2_lm", "gpt2_classifier"])
def test_bert_and_gpt2_get_the_same_decay_groups_as_under_the_name_rule(kind):
    model = tiny_models()[kind]
    optimizer = MaskedOptimizer(model, {}, ADAMW, lr=0.1)
    by_name = {name for name, _ in model.named_parameters() if any(tag in name for tag in NAME_RULE_NO_DECAY)}
    assert no_decay_names(model, optimizer) == by_name
    assert [len(group["params"]) for group in optimizer.optimizer.param_groups] == [
        sum(1 for _ in model.parameters()) - len(by_name), len(by_name)]


def test_rmsnorm_gains_never_decay_and_every_matrix_does():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32))
    undecayed = no_decay_names(model, MaskedOptimizer(model, {}, ADAMW, lr=0.1))
    norms = {name for name, _ in model.named_parameters() if name.endswith("norm.weight")}
    assert len(norms) == 5 and undecayed == norms  # two per layer and the final one, all RMSNorm vectors
    assert not any(tag in name for name in norms for tag in NAME_RULE_NO_DECAY)  # the name rule decayed them


def test_a_partly_frozen_parameter_decays_by_its_own_rank_not_its_flat_shadow():
    model, _ = model_and_masks(0.5)
    masks = {name: (torch.arange(p.numel()) % 2 == 0).view(p.shape) for name, p in model.named_parameters()}
    optimizer = MaskedOptimizer(model, masks, ADAMW, lr=0.1)
    decay_of = {id(part.param): group["weight_decay"] for part in optimizer.partial
                for group in optimizer.optimizer.param_groups if any(p is part.shadow for p in group["params"])}
    assert {name: decay_of[id(p)] for name, p in model.named_parameters()} == {
        "0.weight": ADAMW.weight_decay, "0.bias": 0.0, "1.weight": ADAMW.weight_decay, "1.bias": 0.0}
