"""The whole arrow on decoders with every generative task type: tiny_gpt built here, and hub-style Llama and
Qwen2 checkpoints used as they are (pretrain.steps=0) with their own LM heads; methods apply to them too."""

import math

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import assert_frozen_entries_exact, load_metrics, maskrun, run_cli, run_dirs

SMALL_CODE = ["dataset.max_examples=12"]  # standard-library files: a smoke-sized domain shift
SMALL_ARITHMETIC = ["dataset.num_examples=200"]


def run(cwd, args: list[str]) -> dict:
    maskrun(args, cwd)
    (run_dir,) = run_dirs(cwd / "outputs")
    return load_metrics(run_dir) | {"run_dir": run_dir}


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict:
    """The smoke variants of both presets, as a user runs them."""
    return {name: run(tmp_path_factory.mktemp(name), [f"experiment=[smoke,{name}]", *extra])
            for name, extra in (("code_shift", SMALL_CODE), ("instruct", SMALL_ARITHMETIC))}


def assert_learning_and_forgetting(metrics: dict, task_type: str, metric: str):
    assert metrics["status"] == "ok", metrics["error"]
    task = metrics["task"]
    assert (task["type"], task["metric"]) == (task_type, metric)
    for split in ("validation", "test"):
        result = task[split]
        assert math.isfinite(result["loss"]) and result["perplexity"] == pytest.approx(math.exp(result["loss"]))
        assert metric in result
    assert metrics["interference"]["forgetting"] is not None and metrics["interference"]["kl_task"] is not None
    assert metrics["interference"]["validation"]["forgetting"] is not None


def test_code_shift_learns_code_and_measures_forgetting_of_prose(presets):
    metrics = presets["code_shift"]
    assert_learning_and_forgetting(metrics, "causal_lm", "learning")
    test = metrics["task"]["test"]
    assert test["learning"] == pytest.approx(test["loss_before"] - test["loss"]) and test["learning"] > 0
    assert metrics["mask"]["ratio_actual"] == pytest.approx(0.5, abs=1e-3)  # the default mask: importance, 0.5
    assert_frozen_entries_exact(metrics["run_dir"])
    assert "learning" in (metrics["run_dir"] / "report.md").read_text()


def test_instruct_records_exact_match_of_greedy_generations(presets):
    metrics = presets["instruct"]
    assert_learning_and_forgetting(metrics, "instruction", "exact_match")
    assert 0.0 <= metrics["task"]["test"]["exact_match"] <= 1.0
    assert metrics["task"]["test"]["prompts_cut"] == 0.0  # the preset's window holds every word problem
    assert_frozen_entries_exact(metrics["run_dir"])


@pytest.mark.parametrize("decoder", ["tiny_llama_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("dataset, extra, task_type, metric", [
    ("arithmetic", SMALL_ARITHMETIC, "instruction", "exact_match"),
    ("python_code", SMALL_CODE, "causal_lm", "learning"),
])
def test_a_hub_style_decoder_used_as_is_runs_every_generative_task_under_a_gradient_mask(request, tmp_path, decoder, dataset, extra,
                                                                    task_type, metric):
    source = request.getfixturevalue(decoder)
    metrics = run(tmp_path, ["experiment=smoke", "model=hf", f"model.name_or_path={source}", "pretrain.steps=0",
                             f"dataset={dataset}", *extra, "mask=importance", "mask.score=gradient", "mask.ratio=0.5"])
    assert_learning_and_forgetting(metrics, task_type, metric)
    assert metrics["mask"]["score"] == "gradient"  # the gradient of the task's own loss, through the decoder
    masks, _, _ = assert_frozen_entries_exact(metrics["run_dir"])
    # The task trains the checkpoint's own LM head: pretrained, so maskable; tied (Qwen2) it is the embedding.
    assert ("lm_head.weight" in masks) == (decoder == "tiny_llama_dir")
    assert metrics["mask"]["head_parameters"] == []


def test_lora_on_an_instruction_task_saves_an_adapter_of_the_causal_lm(tmp_path):
    metrics = run(tmp_path, ["experiment=[smoke,instruct]", *SMALL_ARITHMETIC, "method=lora"])
    assert_learning_and_forgetting(metrics, "instruction", "exact_match")
    assert metrics["method"]["head_modules"] == [] and metrics["method"]["trainable"] < metrics["method"]["model_entries"]
    base = AutoModelForCausalLM.from_pretrained(metrics["artifacts"]["pretrained"])
    merged = PeftModel.from_pretrained(base, metrics["run_dir"] / "adapter").merge_and_unload().state_dict()
    finetuned = AutoModelForCausalLM.from_pretrained(metrics["run_dir"] / "finetuned").state_dict()
    assert all((merged[name] - finetuned[name]).abs().max() <= 1e-6 for name in finetuned)


def test_replay_on_a_causal_lm_task_replays_through_the_task_model(tmp_path):
    metrics = run(tmp_path, ["experiment=[smoke,code_shift]", *SMALL_CODE, "method=replay", "method.share=0.5"])
    assert_learning_and_forgetting(metrics, "causal_lm", "learning")
    assert_frozen_entries_exact(metrics["run_dir"])


@pytest.mark.parametrize("overrides, message", [
    (["dataset=python_code"], "needs a decoder with its causal LM head"),
    (["dataset=arithmetic", "model=minilm"], "needs a decoder with its causal LM head"),
    (["experiment=[smoke,instruct]", "eval.max_new_tokens=0"], "eval.max_new_tokens"),
    (["experiment=[smoke,code_shift]", "eval.controls=[scratch]"], "eval.controls=[scratch]"),
    (["experiment=[smoke,instruct,sequential]"], "experiment=sequential"),
    (["experiment=[smoke,instruct]", "finetune.gradient_checkpointing=maybe"], "finetune.gradient_checkpointing"),
    (["experiment=[smoke,instruct]", "eval.answer_pattern='The answer is: .*'"], "has 0 groups"),
    (["experiment=[smoke,instruct]", "eval.answer_pattern='(unclosed'"], "not a valid regex"),
    (["experiment=[smoke,instruct]", "eval.max_new_tokens=40"], "exceed the model's 128 positions"),
])
def test_what_a_task_type_cannot_do_is_refused_before_any_work(tmp_path, overrides, message):
    result = run_cli(overrides, tmp_path)
    assert result.returncode == 2, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("maskrun: error:") and message in first
    assert not (tmp_path / "outputs").exists()
