"""The head: what the pretrained checkpoint does not hold trains at every ratio, and metrics.json names it."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import load_metrics, maskrun, run_dirs


def test_at_ratio_one_exactly_the_recorded_head_parameters_train(tmp_path):
    maskrun(["experiment=smoke", "mask.ratio=1"], tmp_path)
    (run_dir,) = run_dirs(tmp_path / "outputs")
    metrics = load_metrics(run_dir)
    pretrained = load_file(Path(metrics["artifacts"]["pretrained"]) / "model.safetensors")
    finetuned = load_file(run_dir / "finetuned" / "model.safetensors")
    changed = {name for name, tensor in finetuned.items()
               if name not in pretrained or not torch.equal(tensor, pretrained[name])}

    head = metrics["mask"]["head_parameters"]
    assert metrics["status"] == "ok" and metrics["mask"]["ratio_actual"] == 1.0
    assert changed == set(head)
    assert metrics["mask"]["head_entries"] == sum(finetuned[name].numel() for name in head)
    # Pretrained by masked LM, a BERT has no pooler in its checkpoint: the new pooler trains with the classifier.
    assert head == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
