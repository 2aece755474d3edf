"""Masks that move during fine-tuning (mask=child_tuning, mask=lisa): exact at every step, seeded, recorded."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, \
    LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from conftest import BAD, GOOD, assert_frozen_entries_exact, load_metrics, maskrun, run_dirs, task_of
from maskrun.cli import CONFIG_MODULE
from maskrun.data.tasks import Split, TaskData
from maskrun.errors import ConfigError
from maskrun.finetune import Callback, finetune
from maskrun.masks import moving_mask
from maskrun.masks.dynamic import transformer_layers
from maskrun.validate import check_config, compose_jobs

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIMIZERS = {
    "adamw": {"name": "adamw", "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8},
    "sgd_momentum": {"name": "sgd", "weight_decay": 0.1, "momentum": 0.9, "nesterov": False},
}
STRATEGIES = {  # lisa: one of two layers at a time, a new draw every other step
    "child_tuning": {"ratio": 0.5},
    "lisa": {"active_layers": 1, "interval": 2},
}


@pytest.fixture(scope="module")
def task() -> TaskData:
    texts, labels = (GOOD + BAD) * 4, ([1] * len(GOOD) + [0] * len(BAD)) * 4
    split = Split(texts, labels)
    return TaskData("toy", "classification", ["bad", "good"], train=split, validation=Split(GOOD + BAD, [1] * 4 + [0] * 4),
                    test=split)


def tiny_model(tokenizer) -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id))


def backbone(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.startswith("bert.") and "pooler" not in name]


def mask_cfg(strategy: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / "mask" / f"{strategy}.yaml"), STRATEGIES[strategy], overrides)


def training_configs(optimizer: str):
    fcfg = OmegaConf.merge(OmegaConf.load(CONF / "config.yaml").finetune,
                           {"epochs": 2, "batch_size": 8, "max_length": 16, "lr": 1e-2})
    return fcfg, OmegaConf.create(OPTIMIZERS[optimizer])


class StepChecker(Callback):
    """Placed after the moving mask: sees each step's mask, and checks the step against it."""

    def __init__(self, moving):
        self.moving, self.steps, self.frozen_entries, self.moved_entries = moving, 0, 0, 0
        self.lisa_inactive_params = 0

    def on_step_begin(self, step, model, optimizer):
        self.frozen = {name: mask.clone() for name, mask in self.moving.frozen_now().items()}
        self.values = {name: p.detach().clone() for name, p in self.moving.params.items()}
        self.state = {name: {key: t.clone() for key, t in optimizer.optimizer.state.get(p, {}).items()}
                      for name, p in self.moving.params.items()}

    def on_step_end(self, step, model, optimizer, record):
        self.steps += 1
        states = optimizer.optimizer.state
        for name, param in self.moving.params.items():
            frozen = self.frozen[name]
            assert torch.equal(param.detach()[frozen], self.values[name][frozen]), f"{name} moved where frozen at step {step}"
            for key, t in states.get(param, {}).items():
                if t.shape == param.shape:  # one value per entry: no moment or momentum update where frozen
                    before = self.state[name].get(key, torch.zeros_like(t))
                    assert torch.equal(t[frozen], before[frozen]), f"{name} {key} updated where frozen at step {step}"
            self.frozen_entries += int(frozen.sum())
            self.moved_entries += int((param.detach() != self.values[name]).sum())
        # optimizer state only for what can train: lisa's inactive layers have none, and no gradient either
        for param, state in states.items():
            assert not state or param.requires_grad
        inactive = [p for p in self.moving.params.values() if not p.requires_grad]
        assert all(p not in states and p.grad is None for p in inactive)
        self.lisa_inactive_params += len(inactive)


def train(strategy: str, optimizer: str, tokenizer, task, seed: int = 0):
    model = tiny_model(tokenizer)
    names = backbone(model)
    moving = moving_mask(mask_cfg(strategy), model, names, seed)
    checker = StepChecker(moving)
    fcfg, ocfg = training_configs(optimizer)
    frozen = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in model.named_parameters() if name in names}
    finetune(model, task_of(task, tokenizer, fcfg.max_length), frozen, fcfg, ocfg, torch.device("cpu"), seed,
             callbacks=[moving, checker])
    return model, moving, checker


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_entry_frozen_at_a_step_does_not_change_in_it(strategy, optimizer, tokenizer, task):
    model, moving, checker = train(strategy, optimizer, tokenizer, task)
    assert checker.steps == 8 and checker.frozen_entries > 0 and checker.moved_entries > 0
    eligible = sum(p.numel() for p in moving.params.values())
    if strategy == "lisa":  # a layer sat out steps in which weight decay alone would have moved it
        assert checker.lisa_inactive_params > 0
    else:
        assert 0.4 < checker.frozen_entries / (checker.steps * eligible) < 0.6


def test_lisa_always_trains_the_embeddings_and_the_head_and_one_sampled_layer(tokenizer, task):
    model, moving, _ = train("lisa", "adamw", tokenizer, task)
    record = moving.record()
    assert [draw["step"] for draw in record["layer_draws"]] == [1, 3, 5, 7]
    assert all(len(draw["layers"]) == 1 for draw in record["layer_draws"])
    never = set(range(2)) - set(record["layers_activated"])
    frozen = moving.frozen_throughout()
    pretrained = tiny_model(tokenizer).state_dict()
    for name, param in model.named_parameters():
        layer = re.search(r"encoder\.layer\.(\d+)\.", name)
        if layer is None or int(layer.group(1)) not in never:  # embeddings, head, the layers ever sampled
            assert not torch.equal(param.detach(), pretrained[name]), f"{name} never trained"
        else:
            assert bool(frozen[name].all()) and torch.equal(param.detach(), pretrained[name])
    frozen_share = sum(int(m.sum()) for m in frozen.values()) / sum(m.numel() for m in frozen.values())
    assert record["ever_trainable_share"] == pytest.approx(1 - frozen_share)


def test_moving_masks_are_drawn_from_the_seed(tokenizer, task):
    def draws(strategy: str, seed: int):
        _, moving, _ = train(strategy, "adamw", tokenizer, task, seed)
        return moving.record()

    for strategy in STRATEGIES:
        assert draws(strategy, 0) == draws(strategy, 0)
    assert draws("child_tuning", 0)["step_frozen_share"] != draws("child_tuning", 1)["step_frozen_share"]


@pytest.mark.parametrize("rescale", [True, False])
def test_child_tuning_zeroes_the_frozen_gradients_and_rescales_the_kept_ones_as_asked(rescale):
    model = torch.nn.Linear(64, 64)
    moving = moving_mask(mask_cfg("child_tuning", ratio=0.25, rescale=rescale), model, ["weight"], seed=0)
    optimizer = SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    moving.on_step_begin(1, model, optimizer)
    model.weight.sum().backward()
    frozen = moving.frozen_now()["weight"]
    assert torch.equal(model.weight.grad[frozen], torch.zeros(int(frozen.sum())))
    assert torch.equal(model.weight.grad[~frozen], torch.full((int((~frozen).sum()),), 1 / 0.75 if rescale else 1.0))
    moving.on_step_end(1, model, optimizer, {})
    assert not model.weight._backward_hooks  # the gate lasts one step


def test_the_stack_of_transformer_layers_is_found_in_encoders_decoders_and_mixtures():
    def layers(config_class, model_class, **config):
        with torch.device("meta"):
            model = model_class(config_class(**config))
        return transformer_layers({name: p.shape for name, p in model.named_parameters()})

    small = {"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32}
    bert = layers(BertConfig, BertForSequenceClassification, **small)
    assert len(bert) == 3 and all(name.startswith(f"bert.encoder.layer.{i}.") for i, layer in enumerate(bert) for name in layer)
    gpt2 = layers(GPT2Config, GPT2ForSequenceClassification, n_embd=16, n_layer=3, n_head=2)
    assert len(gpt2) == 3 and gpt2[2][0].startswith("transformer.h.2.")
    llama = layers(LlamaConfig, LlamaForCausalLM, **small)
    assert len(llama) == 3 and all(name.startswith("model.layers.1.") for name in llama[1])
    mixtral = layers(MixtralConfig, MixtralForCausalLM, **small, num_local_experts=4)  # experts: a list in each layer
    assert len(mixtral) == 3 and all(name.startswith("model.layers.0.") for name in mixtral[0])


@pytest.mark.parametrize("overrides, message", [
    (["mask=child_tuning", "method=l2sp"], "under method=mask only"),
    (["mask=lisa", "experiment=sequential"], "experiment=sequential keeps one mask"),
    (["mask=lisa", "finetune.unfreeze_after=1"], "finetune.unfreeze_after"),
    (["mask=child_tuning", "mask.ratio=1"], "mask.ratio=1 freezes every eligible entry"),
    (["mask=child_tuning", "mask.rescale=maybe"], "mask.rescale"),
    (["mask=lisa", "mask.active_layers=3"], "exceeds the model's 2 transformer layers"),
    (["mask=lisa", "mask.interval=0"], "mask.interval"),
    (["mask=lisa", "mask.include=[embeddings]"], "no eligible parameter is in a stack of layers"),
])
def test_what_a_moving_mask_cannot_do_exactly_is_refused_before_any_work(overrides, message):
    (cfg,) = compose_jobs(CONFIG_MODULE, "config", overrides, multirun=False)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(cfg)


def test_a_moving_mask_is_refused_across_several_processes():
    (cfg,) = compose_jobs(CONFIG_MODULE, "config", ["mask=lisa"], multirun=False)
    check_config(cfg)
    with open_dict(cfg):
        cfg.devices = 2  # one job spanning several processes
    with pytest.raises(ConfigError, match="devices=2"):
        check_config(cfg)


@pytest.mark.parametrize("strategy, overrides", [
    ("child_tuning", []),
    ("lisa", ["model.num_layers=2", "mask.active_layers=1", "mask.interval=100"]),  # one draw: one layer never trains
])
def test_a_run_records_what_its_moving_mask_froze_and_moved(strategy, overrides, tmp_path):
    maskrun(["experiment=smoke", f"mask={strategy}", "optimizer.weight_decay=0.1", *overrides], tmp_path)
    (run_dir,) = run_dirs(tmp_path / "outputs")
    metrics = load_metrics(run_dir)
    mask = metrics["mask"]
    assert metrics["status"] == "ok" and mask["strategy"] == strategy and mask["steps"] > 0
    masks, _, _ = assert_frozen_entries_exact(run_dir)  # the entries frozen at every step, still pretrained
    assert mask["ratio_actual"] == mask["frozen"] / mask["eligible"] == sum(int(m.sum()) for m in masks.values()) / mask["eligible"]
    assert mask["ever_trainable_share"] == pytest.approx(1 - mask["ratio_actual"])
    assert 0 < mask["moved_share"] <= mask["ever_trainable_share"]
    # its record of what trained (a bool per entry) is resident while training, and counted
    memory = metrics["memory"]
    assert memory["moving_mask_bytes"] == mask["eligible"] < memory["optimizer_state_bytes"]
    if strategy == "child_tuning":
        assert abs(mask["step_frozen_share"] - 0.5) < 0.01 and mask["ratio_actual"] == 0.0
    else:
        assert mask["layers_activated"] == [draw["layers"][0] for draw in mask["layer_draws"]] and mask["layers"] == 2
        assert 0 < mask["ratio_actual"] < 0.5 and mask["step_frozen_share"] == pytest.approx(mask["ratio_actual"])


class StopBefore(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, step, model, optimizer):
        if step == self.step:
            raise KeyboardInterrupt  # stands for the end of the process


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_run_under_a_moving_mask_resumed_from_a_checkpoint_ends_bit_identical(tmp_path, tokenizer, task, strategy):
    from maskrun.checkpoint import Checkpointing

    fcfg, ocfg = training_configs("adamw")

    def run(directory=None, stop_before=None):
        model = tiny_model(tokenizer)
        moving = moving_mask(mask_cfg(strategy), model, backbone(model), seed=0)
        callbacks = [moving] + ([StopBefore(stop_before)] if stop_before else [])
        finetune(model, task_of(task, tokenizer, fcfg.max_length), {}, fcfg, ocfg, torch.device("cpu"), seed=0,
                 callbacks=callbacks, checkpointing=Checkpointing(directory, 1, "config"))
        return model, moving

    uninterrupted, expected = run()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, stop_before=4)  # lisa: a layer trained at steps 1-2 is inactive at step 3
    resumed, moving = run(tmp_path)

    assert moving.record() == expected.record()
    for (name, param), (_, reference) in zip(resumed.named_parameters(), uninterrupted.named_parameters(), strict=True):
        assert torch.equal(param, reference), f"{name} differs from the uninterrupted run's"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_moving_mask_keeps_no_copy_of_the_weights(strategy, tokenizer):
    """The pretrained weights are on disk: what the mask holds beside the model's own parameters is at most its
    one-bool-per-entry record of what ever trained, never a copy of the weights."""
    model = tiny_model(tokenizer)
    moving = moving_mask(mask_cfg(strategy), model, backbone(model), seed=0)

    def tensors(value):
        if torch.is_tensor(value):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)

    held = [t for key, value in vars(moving).items() if key != "params" for t in tensors(value)]
    assert not any(t.is_floating_point() for t in held)
    eligible = sum(p.numel() for p in moving.params.values())
    assert sum(t.numel() * t.element_size() for t in held) <= eligible
