"""Captions -> ids: a character vocabulary, tokenizer loading, fixed-length ids. Built or pretrained, the
tokenizer is a BERT-style WordPiece one, so model.py's text encoder is a `BertModel`."""

import os
import string
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import normalizers, pre_tokenizers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from utils import UserError

VOCAB_FILE = "vocab.txt"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] first: id 0 is padding everywhere
MAX_VOCAB = 65536  # ids are stored as uint16

# BertTokenizerFast(do_lower_case=True)'s own normalizer and word splitter: the vocabulary holds the pieces it looks up.
_NORMALIZER = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
_WORD_SPLITTER = pre_tokenizers.BertPreTokenizer()
# Always present so that prompts with letters or digits unseen in training still tokenize without [UNK].
_BASE_PIECES = [*string.ascii_lowercase, *string.digits, *("##" + c for c in string.ascii_lowercase + string.digits),
                *string.punctuation]


def char_pieces(caption: str) -> Iterator[str]:
    """The vocabulary entries a caption needs, split as the Chinese BERTs do: lowercased, each CJK ideograph and
    punctuation mark alone, other runs spelled out ("T恤" -> t 恤, "XL" -> x ##l, "2021" -> 2 ##0 ##2 ##1)."""
    for word, _ in _WORD_SPLITTER.pre_tokenize_str(_NORMALIZER.normalize_str(caption)):
        yield word[0]
        for char in word[1:]:
            yield "##" + char


def has_text(caption: str) -> bool:
    """False for a caption of nothing but spaces and control characters: it would tokenize to no words."""
    return next(char_pieces(caption), None) is not None


def build_char_vocab(captions: Iterable[str]) -> list[str]:
    """The special tokens, then the captions' pieces in code point order: any order of the captions gives one file."""
    pieces = set(_BASE_PIECES)
    for caption in captions:
        pieces.update(char_pieces(caption))
    pieces.difference_update(SPECIAL_TOKENS)
    vocab = [*SPECIAL_TOKENS, *sorted(pieces)]
    if len(vocab) > MAX_VOCAB:
        raise UserError(f"the captions hold {len(vocab)} distinct pieces; ids must fit in uint16 ({MAX_VOCAB})")
    return vocab


def write_vocab(vocab: Sequence[str], path: str | os.PathLike) -> None:
    """BERT's vocab.txt format: one token per line, the line number is the id."""
    if any("\n" in token or "\r" in token or not token for token in vocab):
        raise ValueError("vocabulary tokens must be non-empty and hold no line breaks")
    Path(path).write_text("".join(token + "\n" for token in vocab), encoding="utf-8")


def read_vocab(path: str | os.PathLike) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


def load_tokenizer(spec: str, data_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from meta.json's "tokenizer" value or prepare's --text_tokenizer: "vocab.txt" (the file in
    `data_dir`), a path to a vocab.txt or a tokenizer folder, or a Hugging Face name. Padding must be id 0."""
    path = Path(data_dir) / VOCAB_FILE if spec == VOCAB_FILE and data_dir is not None else Path(spec)
    if path.is_dir() and not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        path = path / VOCAB_FILE  # a folder with BERT's vocab.txt alone
        if not path.is_file():
            raise UserError(f"{path}: no such vocabulary file")
    if spec == VOCAB_FILE and not path.exists():
        raise UserError(f"{path}: no vocabulary file (was prepare.py run into {data_dir}?)")
    if path.is_file() and path.name != VOCAB_FILE:
        raise UserError(f"{path}: a vocabulary file must be named {VOCAB_FILE} (BERT's format)")
    try:
        # A vocab.txt is loaded through its folder: transformers 5 ignores BertTokenizerFast(vocab_file=...) and
        # silently builds an empty vocabulary, while from_pretrained(folder) reads vocab.txt in every version.
        tokenizer = (BertTokenizerFast.from_pretrained(str(path.parent)) if path.is_file()
                     else AutoTokenizer.from_pretrained(spec))
    except (OSError, ValueError) as e:  # what transformers raises for a name it cannot find offline
        raise UserError(f"cannot load the tokenizer {spec!r}: {str(e).splitlines()[0]} (a Hugging Face name must be "
                        "downloaded once while online; or pass a local folder)") from None
    if path.is_file() and len(tokenizer) != len(read_vocab(path)):
        raise UserError(f"{path}: loaded {len(tokenizer)} tokens, the file has {len(read_vocab(path))}")
    if tokenizer.pad_token_id != 0:
        raise UserError(f"tokenizer {spec!r} pads with id {tokenizer.pad_token_id}; the data format needs padding id 0 "
                        "(BERT-style tokenizers such as bert-base-chinese or chinese-roberta-wwm-ext have it)")
    if len(tokenizer) > MAX_VOCAB:
        raise UserError(f"tokenizer {spec!r} has {len(tokenizer)} tokens; ids must fit in uint16 ({MAX_VOCAB})")
    return tokenizer


def tokenize_captions(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], text_len: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (uint16 ids [N, text_len] right-padded with 0, full token counts [N] before truncation). Ids
    include [CLS] ... [SEP]; a caption longer than `text_len` is cut, keeping its [SEP] (`counts > text_len`)."""
    full = tokenizer(list(captions), truncation=False)["input_ids"] if captions else []  # it fails on an empty batch
    counts = np.array([len(row) for row in full], dtype=np.int64)
    long_rows = np.flatnonzero(counts > text_len)
    if len(long_rows):
        cut = tokenizer([captions[i] for i in long_rows], truncation=True, max_length=text_len)["input_ids"]
        for i, row in zip(long_rows, cut, strict=True):
            full[i] = row
    ids = np.zeros((len(captions), text_len), dtype=np.uint16)
    for i, row in enumerate(full):
        ids[i, : len(row)] = row
    return ids, counts
