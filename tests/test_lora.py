"""method=lora (HF PEFT): it trains as a plain PEFT LoRA loop does, its adapter and merged model are what
they claim to be, and what cannot work is refused before any work."""

import math
import re
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config,
                          GPT2ForSequenceClassification, get_scheduler)

from conftest import BAD, GOOD, load_metrics, maskrun, task_of
from maskrun.batching import collate, encode
from maskrun.cli import CONFIG_MODULE, check_command_line
from maskrun.data.tasks import Split, TaskData
from maskrun.errors import ConfigError
from maskrun.finetune import finetune
from maskrun.methods import build_method
from maskrun.methods.base import Context
from maskrun.methods.lora import adapt
from maskrun.models import load_task_model
from maskrun.validate import compose_jobs

CPU = torch.device("cpu")
# A task model on a masked-LM checkpoint: its pooler and classifier are new, so they are the head.
HEAD_MODULES = ["bert.pooler.dense", "classifier"]


@pytest.fixture(scope="module")
def task() -> TaskData:
    texts, labels = (GOOD + BAD) * 4, ([1] * len(GOOD) + [0] * len(BAD)) * 4
    return TaskData("toy", "classification", ["bad", "good"], train=Split(texts, labels),
                    validation=Split(GOOD + BAD, [1] * 4 + [0] * 4), test=Split(GOOD + BAD, [1] * 4 + [0] * 4))


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, tokenizer):
    """A tiny masked-LM checkpoint, as the pretrain stage writes one."""
    out = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id)
    BertForMaskedLM(config).save_pretrained(out)
    return out


def task_model(pretrained_dir, task):
    torch.manual_seed(0)  # the head's initialisation, as the pipeline seeds it
    return load_task_model(pretrained_dir, task.num_labels)


def lora_config(*overrides: str):
    """The packaged config with method=lora, its training sized for the toy task."""
    (cfg,) = compose_jobs(CONFIG_MODULE, "config", ["method=lora", *overrides], multirun=False)
    return OmegaConf.merge(cfg, {"finetune": {"epochs": 2, "batch_size": 8, "max_length": 16, "lr": 1e-2},
                                 "optimizer": {"weight_decay": 0.1}})


def lora_method(cfg, pretrained_dir, tokenizer, run_dir):
    return build_method(cfg, Context(cfg, pretrained_dir, run_dir, tokenizer, corpus=None, device=CPU, scores=None))


def plain_peft_lora(cfg, model, tokenizer, task) -> torch.nn.Module:
    """The loop a PEFT user writes: LoRA on every linear layer but the head, which trains whole; AdamW without
    decay on biases and norms, linear warmup and decay, clipping; the same seed and data order as maskrun."""
    fcfg, ocfg, mcfg = cfg.finetune, cfg.optimizer, cfg.method
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, LoraConfig(r=mcfg.rank, lora_alpha=mcfg.alpha, lora_dropout=mcfg.dropout,
                                             target_modules="all-linear", modules_to_save=HEAD_MODULES))
    torch.manual_seed(cfg.seed)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for name, p in trainable if p.ndim < 2]  # the HF Trainer's rule: vectors never decay
    decay = [p for name, p in trainable if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": ocfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=fcfg.lr, betas=tuple(ocfg.betas),
                                  eps=ocfg.eps)
    steps = math.ceil(len(task.train.texts) / fcfg.batch_size) * fcfg.epochs
    scheduler = get_scheduler(fcfg.scheduler, optimizer, num_warmup_steps=math.ceil(fcfg.warmup_ratio * steps),
                              num_training_steps=steps)
    ids, labels = encode(tokenizer, task.train.texts, fcfg.max_length), torch.tensor(task.train.labels)
    order_generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(fcfg.epochs):
        order = torch.randperm(len(ids), generator=order_generator).tolist()
        for start in range(0, len(order), fcfg.batch_size):
            rows = order[start:start + fcfg.batch_size]
            model(**collate(tokenizer, [ids[i] for i in rows]), labels=labels[rows]).loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], fcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return model.merge_and_unload()


def test_method_lora_trains_as_a_plain_peft_loop(pretrained_dir, tokenizer, task, tmp_path):
    cfg = lora_config()
    method = lora_method(cfg, pretrained_dir, tokenizer, tmp_path)
    model = method.prepare(task_model(pretrained_dir, task))
    finetune(model, task_of(task, tokenizer, cfg.finetune.max_length), {}, cfg.finetune, cfg.optimizer, CPU, cfg.seed,
             method.extra_loss)
    ours = method.finish(model).state_dict()
    plain = plain_peft_lora(cfg, task_model(pretrained_dir, task), tokenizer, task).state_dict()

    assert ours.keys() == plain.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], plain[name], rtol=0, atol=1e-5, msg=name)
    # Both trained: the merged query moved from its pretrained value; the embeddings, never adapted, did not.
    pretrained = load_file(pretrained_dir / "model.safetensors")
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert (ours[query] - pretrained[query]).abs().max() > 1e-3
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(ours[embeddings], pretrained[embeddings])


def test_adapter_initialisation_ignores_the_global_rng(pretrained_dir, tokenizer, task, tmp_path):
    initial = []
    for left_by_earlier_stages in (1, 2):
        model = task_model(pretrained_dir, task)
        torch.manual_seed(left_by_earlier_stages)
        model = lora_method(lora_config(), pretrained_dir, tokenizer, tmp_path).prepare(model)
        initial.append({name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name})
    assert initial[0] and initial[0].keys() == initial[1].keys()
    for name in initial[0]:
        assert torch.equal(initial[0][name], initial[1][name]), name


@pytest.mark.parametrize("targets, adapted_suffixes", [
    ("[query,value]", ("attention.self.query", "attention.self.value")),
    # The regex matches the head's pooler too: it trains whole and is never adapted.
    (".*dense", ("attention.output.dense", "intermediate.dense", "output.dense")),
])
def test_targets_and_head(pretrained_dir, tokenizer, task, tmp_path, targets, adapted_suffixes):
    cfg = lora_config(f"method.target_modules={targets}")
    method = lora_method(cfg, pretrained_dir, tokenizer, tmp_path)
    model = method.prepare(task_model(pretrained_dir, task))

    adapted = sorted(model.base_model.targeted_module_names)
    assert adapted == sorted(f"bert.encoder.layer.0.{suffix}" for suffix in adapted_suffixes)
    assert method.record()["head_modules"] == HEAD_MODULES
    assert method.record()["adapted_modules"] == len(adapted_suffixes)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    head_copies = [name for name in trainable if ".modules_to_save." in name]
    assert sorted(head_copies) == sorted(f"base_model.model.{module}.modules_to_save.default.{kind}"
                                         for module in HEAD_MODULES for kind in ("weight", "bias"))
    assert all("lora_" in name for name in trainable if name not in head_copies)


def test_gpt2_conv1d_adapters_merge_into_the_same_model():
    """GPT-2's Conv1D stores input x output: adapters built or merged the wrong way round would change the logits."""
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                                     pad_token_id=0))
    inputs = torch.randint(1, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.eval()(input_ids=inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns when it has to correct fan_in_fan_out itself
        model = adapt(model, lora_config().method, head=["score"], seed=0).eval()
    assert sorted(model.base_model.targeted_module_names) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapters something to merge
                param.normal_()
        adapted = model(input_ids=inputs).logits
        merged = model.merge_and_unload()(input_ids=inputs).logits
    assert (adapted - before).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("lora_run")
    maskrun(["experiment=smoke", "method=lora", "hydra.run.dir=run"], cwd)
    return cwd


def test_smoke_run_writes_the_adapter_and_the_merged_model(lora_run):
    run_dir = lora_run / "run"
    metrics = load_metrics(run_dir)
    assert metrics["status"] == "ok"
    assert metrics["method"]["name"] == "lora" and metrics["method"]["dial"] == {"key": "method.rank", "value": 8}
    assert metrics["artifacts"]["adapter"] == "adapter" and metrics["artifacts"]["finetuned"] == "finetuned"
    pretrained_dir = metrics["artifacts"]["pretrained"]
    pretrained = load_file(f"{pretrained_dir}/model.safetensors")
    finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
    backbone_entries = sum(tensor.numel() for name, tensor in pretrained.items() if name in finetuned)
    assert metrics["mask"]["head_entries"] < metrics["method"]["trainable"] < backbone_entries

    # finetuned/ is the plain task model with W + (alpha / rank)·B·A in every adapted layer.
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    scale = metrics["method"]["alpha"] / metrics["method"]["rank"]
    adapted = [name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for name in adapter if name.endswith(".lora_A.weight")]
    assert len(adapted) == metrics["method"]["adapted_modules"] > 0
    for module in adapted:
        prefix = f"base_model.model.{module}"
        delta = scale * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
        assert delta.abs().max() > 0, f"{module}: the adapter did not train"
        torch.testing.assert_close(finetuned[f"{module}.weight"], pretrained[f"{module}.weight"] + delta,
                                   rtol=0, atol=1e-6)
    assert not any(part in name for name in finetuned for part in ("lora_", "base_layer", "modules_to_save"))
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(finetuned[embeddings], pretrained[embeddings])

    # adapter/ on the pretrained task model gives the merged model's logits.
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "finetuned")
    batch = tokenizer(GOOD + BAD, padding=True, return_tensors="pt")
    with torch.no_grad():
        base = load_task_model(pretrained_dir, len(metrics["task"]["labels"]))
        from_adapter = PeftModel.from_pretrained(base, run_dir / "adapter").eval()(**batch).logits
        merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "finetuned").eval()(**batch).logits
    torch.testing.assert_close(from_adapter, merged, rtol=0, atol=1e-5)


def test_a_cached_result_restores_the_adapter(lora_run):
    maskrun(["experiment=smoke", "method=lora", "hydra.run.dir=again"], lora_run)
    assert load_metrics(lora_run / "again")["cache"]["result"] == "hit"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (lora_run / "again" / "adapter" / name).read_bytes() == (lora_run / "run" / "adapter" / name).read_bytes()


@pytest.mark.parametrize("overrides, message", [
    (["mask=importance"], "method=lora trains without a mask, but mask=importance would freeze entries"),
    (["finetune.unfreeze_after=1"], "finetune.unfreeze_after=1 would release every pretrained entry"),
    (["method.target_modules=[query,querry]"], "entry 'querry' matches no layer of the backbone"),
    (["method.target_modules=[classifier]"], "entry 'classifier' matches no layer of the backbone"),
    (["model=tiny_gpt", "method.target_modules=[query]"], "entry 'query' matches no layer of the backbone"),
    (["method.target_modules=.*LayerNorm"], "entry '.*LayerNorm' matches no layer of the backbone"),
    (["method.target_modules='query('"], "method.target_modules='query(' is not a valid regex"),
    (["method.target_modules=[]"], "method.target_modules=[] is neither a string nor a list of names"),
    (["method.rank=0"], "method.rank=0 must be a whole number >= 1"),
    (["method.alpha=-1"], "method.alpha=-1 must be a positive number"),
    (["method.dropout=1.0"], "method.dropout=1.0 is not a number in [0, 1)"),
])
def test_refused_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_command_line(["experiment=smoke", "method=lora", *overrides])


@pytest.mark.parametrize("overrides", [[], ["method.target_modules=[query,value]"], ["method.target_modules=.*attention.*"],
                                       ["model=tiny_gpt", "method.target_modules=[c_attn]"]])
def test_accepted(overrides):
    check_command_line(["experiment=smoke", "method=lora", *overrides])


def test_the_command_refuses_a_mask_with_exit_2(tmp_path):
    result = maskrun(["experiment=smoke", "method=lora", "mask=importance"], tmp_path, expect=2)
    assert result.stderr.startswith("maskrun: error: method=lora trains without a mask")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()
