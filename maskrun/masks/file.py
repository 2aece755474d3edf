"""A mask given back: a `mask.safetensors` that maskrun wrote (a run dir's, or a cache entry's), read as the mask.

The file is stored in each parameter's own layout, so the strategy reads it as it is (PARAMETER_LAYOUT), not
neuron-major. Its names and shapes must be the eligible parameters' (checked before any work, from the model config,
and again here on the model itself); the ratio recorded is the file's realized frozen share.
"""

from pathlib import Path

import torch
from safetensors import safe_open

from maskrun.masks.select import Selection

NEEDS_SCORES = False
ALLOCATIONS = ("global",)  # the file decides what is frozen where: allocation and granularity do not apply
GRANULARITIES = ("element",)
PARAMETER_LAYOUT = True


def build(mcfg, params: dict[str, torch.Tensor], scores, seed: int) -> Selection:
    masks = read_mask_file(Path(mcfg.path))
    differences = mismatches({name: tuple(m.shape) for name, m in masks.items()},
                             {name: tuple(p.shape) for name, p in params.items()})
    differences += [f"{name} is {m.dtype}, not bool" for name, m in masks.items() if m.dtype != torch.bool][:1]
    if differences:
        raise ValueError(f"mask.path={mcfg.path} does not fit the eligible parameters: {differences[0]}")
    return Selection({name: masks[name] for name in params})


def read_mask_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def file_layout(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and dtype ("BOOL", "F32", ...) in a safetensors file, read from its header alone."""
    with safe_open(path, "pt") as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}


def mismatches(in_file: dict[str, tuple], eligible: dict[str, tuple]) -> list[str]:
    """What differs between the file's tensor shapes and the eligible parameters' shapes, one phrase each."""
    missing = [name for name in eligible if name not in in_file]
    extra = [name for name in in_file if name not in eligible]
    shapes = [name for name in eligible if name in in_file and tuple(in_file[name]) != tuple(eligible[name])]
    return ([f"{len(missing)} eligible parameter(s) missing, e.g. {missing[0]}"] if missing else []) \
        + ([f"{len(extra)} tensor(s) that are not eligible parameters, e.g. {extra[0]}"] if extra else []) \
        + [f"{name} is {list(in_file[name])} in the file, {list(eligible[name])} in the model" for name in shapes[:1]]
