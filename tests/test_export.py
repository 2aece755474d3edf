"""maskrun-export RUN_DIR --to peft: the run's trainable entries as a PEFT adapter that reproduces finetuned/."""

import json
import shutil
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import load_metrics, maskrun, run_cli

EXPORT = [sys.executable, "-m", "maskrun.export"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("export")
    maskrun(["experiment=smoke", "hydra.run.dir=run"], cwd)
    return cwd / "run"


@pytest.fixture(scope="module")
def exported(run_dir):
    result = run_cli([str(run_dir), "--to", "peft"], run_dir.parent, command=EXPORT)
    assert result.returncode == 0, result.stderr
    return run_dir / "peft"


def load_both(run_dir, adapter_dir):
    """The fine-tuned model, and the pretrained checkpoint under the same task model with the adapter loaded."""
    import transformers
    from peft import PeftModel

    config = transformers.AutoConfig.from_pretrained(run_dir / "finetuned")
    model_class = getattr(transformers, config.architectures[0])
    base = model_class.from_pretrained(load_metrics(run_dir)["artifacts"]["pretrained"], config=config)
    return (model_class.from_pretrained(run_dir / "finetuned").eval(),
            PeftModel.from_pretrained(base, adapter_dir).eval())


def test_the_adapter_reproduces_the_fine_tuned_logits(run_dir, exported):
    from transformers import AutoTokenizer

    from maskrun.data import load_task

    dataset = OmegaConf.load(run_dir / ".hydra" / "config.yaml").dataset
    texts = load_task(dataset, dataset.split_seed).test.texts
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "finetuned")
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
    finetuned, adapted = load_both(run_dir, exported)
    with torch.no_grad():
        expected, got = finetuned(**batch).logits, adapted(**batch).logits
        with adapted.disable_adapter():
            base_logits = adapted(**batch).logits
    assert (expected - got).abs().max().item() <= 1e-5
    assert (expected - base_logits).abs().max().item() > 1e-3  # the adapter is what makes the difference


def test_the_adapter_holds_the_trainable_entries_sparsely(run_dir, exported):
    """Each Super-Tuning layer's indices cover exactly its trainable entries, padded with frozen ones of value 0."""
    config = json.loads((exported / "adapter_config.json").read_text())
    summary = json.loads((exported / "maskrun_export.json").read_text())
    assert config["peft_type"] == "SUPERTUNING" and config["target_modules"]
    assert "classifier" in config["modules_to_save"]
    masks = load_file(run_dir / "mask.safetensors")
    adapter = load_file(exported / "adapter_model.safetensors")
    for module in config["target_modules"]:
        trainable = ~masks[f"{module}.weight"].flatten()
        indices = adapter[f"base_model.model.{module}.supertuning_indices"].long()
        values = adapter[f"base_model.model.{module}.supertuning_values"]
        assert indices.unique().numel() == indices.numel()
        assert trainable[indices].sum() == trainable.sum()  # every trainable entry is in
        assert torch.all(values[~trainable[indices]] == 0)  # the padding adds nothing
    assert summary["sparse_entries"] == sum(int((~masks[f"{m}.weight"]).sum()) for m in config["target_modules"])


def test_out_writes_elsewhere(run_dir, tmp_path):
    result = run_cli([str(run_dir), "--to", "peft", "--out", str(tmp_path / "adapter")], tmp_path, command=EXPORT)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def edited_run(run_dir, tmp_path, **changes):
    """A copy of the run's metrics.json and mask with `changes` to its metrics, as another run would have them."""
    copy = tmp_path / "edited"
    copy.mkdir()
    shutil.copyfile(run_dir / "mask.safetensors", copy / "mask.safetensors")
    metrics = load_metrics(run_dir)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            metrics[section][field] = value
        else:
            metrics[section] = value
    (copy / "metrics.json").write_text(json.dumps(metrics))
    return copy


@pytest.mark.parametrize("changes, expected", [
    ({"status": "failed", "error": "RuntimeError: out of memory"}, "is a failed run (RuntimeError: out of memory)"),
    ({"method": {"name": "lora"}, "artifacts__adapter": "adapter"}, "is a method=lora run"),
    ({"artifacts__finetuned": None}, "has no finetuned/ model"),
])
def test_runs_that_cannot_be_exported_are_refused(run_dir, tmp_path, changes, expected):
    refused = edited_run(run_dir, tmp_path, **changes)
    result = run_cli([str(refused), "--to", "peft"], tmp_path, command=EXPORT)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("maskrun-export: error: ") and expected in line
    if changes.get("method", {}).get("name") == "lora":
        assert str(refused / "adapter") in line
    assert not (refused / "peft").exists()
