"""mask=file mask.path=...: a mask maskrun wrote, given back as the mask."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_metrics, maskrun

SMOKE = ["experiment=smoke", "mask=importance", "mask.ratio=0.3"]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("mask_file")
    maskrun([*SMOKE, "hydra.run.dir=source"], cwd)
    return cwd / "source"


def file_run(cwd, mask_path, name: str):
    maskrun(["experiment=smoke", "mask=file", f"mask.path={mask_path}", f"hydra.run.dir={name}"], cwd)
    return cwd / name


def test_a_runs_mask_given_back_trains_the_same_model(source_run):
    """Same mask, same seed: the fine-tuned model is bit-identical, and the recorded ratio is the file's share."""
    cwd = source_run.parent
    copy = cwd / "given.safetensors"
    shutil.copyfile(source_run / "mask.safetensors", copy)
    again = file_run(cwd, copy, "again")
    source, given = load_metrics(source_run), load_metrics(again)
    assert given["mask"]["strategy"] == "file"
    assert given["mask"]["ratio"] == given["mask"]["ratio_actual"] == source["mask"]["ratio_actual"]
    assert given["mask"]["frozen"] == source["mask"]["frozen"]
    assert given["task"]["test"] == source["task"]["test"]
    trained, retrained = (load_file(run / "finetuned" / "model.safetensors") for run in (source_run, again))
    for name, tensor in trained.items():
        assert torch.equal(tensor, retrained[name]), name


def test_the_mask_cache_counts_the_file_by_content(source_run):
    cwd = source_run.parent
    first = file_run(cwd, source_run / "mask.safetensors", "first")
    moved = cwd / "elsewhere" / "mask.safetensors"
    moved.parent.mkdir()
    shutil.copyfile(source_run / "mask.safetensors", moved)
    same_content = file_run(cwd, moved, "same_content")
    masks = load_file(moved)
    name = next(iter(masks))
    masks[name].view(-1)[0] = ~masks[name].view(-1)[0]
    save_file(masks, moved)
    edited = file_run(cwd, moved, "edited")
    assert load_metrics(same_content)["cache"]["mask"] == "hit"
    assert load_metrics(edited)["cache"]["mask"] == "miss"
    assert abs(load_metrics(edited)["mask"]["frozen"] - load_metrics(first)["mask"]["frozen"]) == 1


def test_a_mask_that_does_not_fit_is_refused_before_any_work(source_run, tmp_path):
    masks = load_file(source_run / "mask.safetensors")
    as_floats = tmp_path / "floats.safetensors"
    save_file({name: m.float() for name, m in masks.items()}, as_floats)
    missing_one = tmp_path / "missing.safetensors"
    save_file(dict(list(masks.items())[1:]), missing_one)
    cases = [
        (["mask.path=/no/such/mask.safetensors"], "mask.path=/no/such/mask.safetensors is not a file"),
        ([f"mask.path={source_run / 'mask.safetensors'}", "mask.ratio=0.5"], "mask.ratio=0.5 asks for a share"),
        ([f"mask.path={source_run / 'mask.safetensors'}", "model.hidden_size=64"],
         "is [1000, 32] in the file, [1000, 64] in the model"),
        ([f"mask.path={missing_one}"], f"1 eligible parameter(s) missing, e.g. {next(iter(masks))}"),
        ([f"mask.path={as_floats}"], "holds F32, not BOOL"),
        ([f"mask.path={source_run / 'metrics.json'}"], "is not a safetensors file"),
        (["mask.path=null"], "mask=file needs mask.path"),
    ]
    for overrides, expected in cases:
        result = maskrun(["experiment=smoke", "mask=file", *overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                         expect=2)
        first_line = result.stderr.splitlines()[0]
        assert first_line.startswith("maskrun: error: ") and expected in first_line, (overrides, result.stderr)
        assert not (tmp_path / "run").exists()
