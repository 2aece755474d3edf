"""The tokenizer: a pretrained model's own, or one trained on the pretraining corpus for a model built from scratch.

The family built decides which (TRAINERS; the cache key, maskrun.stages.tokenizer, holds it): BERT-style
encoders get a WordPiece tokenizer, GPT-2-style decoders a byte-level BPE one, as GPT-2 has.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# GPT-2's end of text begins and ends each document; a padding token of its own keeps real ends in the labels.
END_OF_TEXT, PADDING = "<|endoftext|>", "<|pad|>"
BYTE_LEVEL_SPECIALS = [PADDING, END_OF_TEXT]
BYTE_LEVEL_BASE = len(pre_tokenizers.ByteLevel.alphabet()) + len(BYTE_LEVEL_SPECIALS)  # the vocabulary before merges


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


def prepare_tokenizer(source: str | None, texts: list[str], vocab_size: int, out_dir: Path,
                      family: str = "bert") -> None:
    """Saves a pretrained model's own tokenizer (given a padding token if it lacks one), or trains the one of
    `family` (a model built from scratch)."""
    if source is None:
        TRAINERS[family](texts, vocab_size, out_dir)
        return
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:  # GPT-2-style tokenizers have none; batches and classification need one
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """BERT's WordPiece: lowercased, [CLS] text [SEP]; characters never seen in training become [UNK]."""
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


def train_byte_level_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """GPT-2's byte-level BPE: every byte is in the vocabulary, so no text (code, any script) is unknown.

    Encoding adds the end-of-text token in front (the start of a document, as in pretraining blocks); the
    pieces decode back to the exact text. BPE merges are chosen by count with ties broken by the pieces'
    ids, and the byte alphabet fixes those ids, so one corpus gives one vocabulary in every process.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BYTE_LEVEL_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    end_id = tokenizer.token_to_id(END_OF_TEXT)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{END_OF_TEXT} $A", pair=f"{END_OF_TEXT} $A $B", special_tokens=[(END_OF_TEXT, end_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=PADDING)
    fast.save_pretrained(out_dir)


TRAINERS = {"bert": train_tokenizer, "gpt2": train_byte_level_tokenizer}
