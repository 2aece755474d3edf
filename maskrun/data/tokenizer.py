"""The tokenizer: a pretrained model's own, or a WordPiece tokenizer trained on the pretraining corpus.

Models built from scratch (BERT- and GPT-2-style alike) share the trained WordPiece tokenizer (its cache key:
maskrun.stages.tokenizer).
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def continuing_pieces(tokenizer: Tokenizer, texts: list[str]) -> list[str]:
    """Every "##c" piece the trainer needs, sorted.

    The WordPiece trainer creates these in hash-map order, so one corpus can give a different
    vocabulary in each process (huggingface/tokenizers#1794). Passing them in as special tokens
    fixes their ids; train_tokenizer makes them ordinary vocabulary again afterwards.
    """
    inner = set()
    for text in texts:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text)):
            inner.update(word[1:])
    return ["##" + c for c in sorted(inner)]


def prepare_tokenizer(source: str | None, texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """Saves a pretrained model's own tokenizer (given a padding token if it lacks one), or trains one."""
    if source is None:
        train_tokenizer(texts, vocab_size, out_dir)
        return
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers have none; batches and classification need one
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    pinned = continuing_pieces(tokenizer, texts)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + pinned, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")

    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    fast.save_pretrained(out_dir)
