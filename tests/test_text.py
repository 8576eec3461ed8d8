import collections
import time

import huggingface_hub.constants
import numpy as np
import pytest
from conftest import ROOT
from transformers import BertTokenizerFast

from text import SPECIAL_TOKENS, build_char_vocab, has_text, load_tokenizer, read_vocab, tokenize_captions, write_vocab
from utils import UserError

CAPTIONS_5K = ROOT.parent / "shared" / "data" / "muge_t2i_captions_5k.tsv"
CAPTIONS = ["男女童纯棉短裤2021夏季新款", "韩版 T恤女 XL码", "【新款】Ｔ恤！百搭（白色）", "abercrombie fitch AF男"]


@pytest.fixture
def vocab_dir(tmp_path):
    write_vocab(build_char_vocab(CAPTIONS), tmp_path / "vocab.txt")
    return tmp_path


def pieces(tokenizer, caption: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(caption)["input_ids"])[1:-1]


def test_vocab_is_sorted_deterministic_and_bert_shaped(vocab_dir):
    vocab = read_vocab(vocab_dir / "vocab.txt")
    assert tuple(vocab[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS and vocab[0] == "[PAD]"
    assert vocab[len(SPECIAL_TOKENS) :] == sorted(vocab[len(SPECIAL_TOKENS) :])
    assert build_char_vocab(reversed(CAPTIONS)) == vocab
    assert len(set(vocab)) == len(vocab)


def test_bert_tokenizer_reads_the_vocab_file(vocab_dir):
    ours = load_tokenizer("vocab.txt", vocab_dir)
    plain = BertTokenizerFast.from_pretrained(str(vocab_dir))
    assert ours.pad_token_id == 0 and len(ours) == len(read_vocab(vocab_dir / "vocab.txt"))
    for caption in CAPTIONS:
        assert ours(caption)["input_ids"] == plain(caption)["input_ids"]
        assert ours.unk_token_id not in ours(caption)["input_ids"]


def test_how_latin_digits_and_cjk_are_split(vocab_dir):
    tokenizer = load_tokenizer("vocab.txt", vocab_dir)
    assert pieces(tokenizer, "T恤") == ["t", "恤"]  # lowercased; each CJK character is a token
    assert pieces(tokenizer, "XL") == ["x", "##l"]  # a latin word, one character at a time
    assert pieces(tokenizer, "2021") == ["2", "##0", "##2", "##1"]
    assert pieces(tokenizer, "【新款】Ｔ恤！") == ["【", "新", "款", "】", "ｔ", "恤", "！"]
    assert pieces(tokenizer, "q9") == ["q", "##9"]  # letters and digits unseen in the captions still work


def test_round_trip_gives_back_the_normalized_caption(vocab_dir):
    tokenizer = load_tokenizer("vocab.txt", vocab_dir)
    ids, _ = tokenize_captions(tokenizer, CAPTIONS, 64)
    for row, caption in zip(ids, CAPTIONS, strict=True):
        decoded = tokenizer.decode([int(i) for i in row if i], skip_special_tokens=True)
        assert decoded.replace(" ", "") == caption.lower().replace(" ", "")


def test_fixed_length_ids_padding_and_truncation(vocab_dir):
    tokenizer = load_tokenizer("vocab.txt", vocab_dir)
    ids, counts = tokenize_captions(tokenizer, ["短裤", "男女童纯棉短裤2021夏季新款"], 6)
    assert ids.dtype == np.uint16 and ids.shape == (2, 6)
    assert counts.tolist() == [4, 17]
    assert ids[0, 4:].tolist() == [0, 0]
    assert tokenizer.convert_ids_to_tokens(ids[1].tolist()) == ["[CLS]", "男", "女", "童", "纯", "[SEP]"]


def test_local_tokenizer_folder_and_padding_check(vocab_dir, tmp_path):
    saved = tmp_path / "hf_tokenizer"
    BertTokenizerFast.from_pretrained(str(vocab_dir)).save_pretrained(saved)
    tokenizer = load_tokenizer(str(saved))
    assert tokenizer("T恤")["input_ids"] == load_tokenizer("vocab.txt", vocab_dir)("T恤")["input_ids"]
    bad = tmp_path / "pads_with_unk"
    BertTokenizerFast.from_pretrained(str(vocab_dir), pad_token="[UNK]").save_pretrained(bad)
    with pytest.raises(UserError, match="padding id 0"):
        load_tokenizer(str(bad))
    with pytest.raises(UserError, match="no vocabulary file"):
        load_tokenizer("vocab.txt", tmp_path / "nowhere")


def test_a_plain_vocab_whose_pad_is_not_id_0_is_refused(tmp_path):
    folder = tmp_path / "vocab"
    folder.mkdir()
    write_vocab(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "红"], folder / "vocab.txt")
    for spec in (str(folder), str(folder / "vocab.txt")):  # a folder, or the file itself
        with pytest.raises(UserError, match="pads with id 1"):
            load_tokenizer(spec)
    (folder / "vocab.txt").rename(folder / "words.txt")
    with pytest.raises(UserError, match="must be named vocab.txt"):
        load_tokenizer(str(folder / "words.txt"))


def test_a_misspelt_hugging_face_name_offline_is_a_user_error(monkeypatch):
    # Offline (as without network) it fails at once, with what to do, rather than a transformers traceback.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(UserError, match="cannot load the tokenizer 'bert-base-chinesse'.*local folder"):
        load_tokenizer("bert-base-chinesse")
    assert time.monotonic() - started < 5


def test_write_vocab_writes_one_token_a_line(tmp_path):
    write_vocab([*SPECIAL_TOKENS, "红", "##a"], tmp_path / "vocab.txt")
    assert (tmp_path / "vocab.txt").read_bytes() == "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n红\n##a\n".encode()
    assert list(tmp_path.iterdir()) == [tmp_path / "vocab.txt"]  # nothing else left beside it
    for token in ("two\nlines", "cr\r", ""):  # would shift every later id by a line
        with pytest.raises(ValueError, match="line breaks"):
            write_vocab([*SPECIAL_TOKENS, token], tmp_path / "bad.txt")


@pytest.mark.skipif(not CAPTIONS_5K.is_file(), reason=f"{CAPTIONS_5K} not found (only present in development)")
def test_coverage_and_length_of_real_muge_captions(tmp_path):
    captions = [line.split("\t", 1)[1] for line in CAPTIONS_5K.read_text(encoding="utf-8").splitlines() if line]
    write_vocab(build_char_vocab(captions), tmp_path / "vocab.txt")
    tokenizer = load_tokenizer("vocab.txt", tmp_path)
    ids, counts = tokenize_captions(tokenizer, captions, 64)
    assert len(captions) == 5000
    assert not (ids == tokenizer.unk_token_id).any()  # every character of every caption is in the vocabulary
    # every character survives: the decoded caption is the lowercased original without its spaces
    for row, caption in zip(ids[:500], captions[:500], strict=True):
        decoded = tokenizer.decode([int(i) for i in row if i], skip_special_tokens=True).replace(" ", "")
        assert decoded == "".join(caption.lower().split()) or (row != 0).sum() == 64
    histogram = collections.Counter((c // 8) * 8 for c in counts.tolist())
    print(
        f"\n5k MUGE captions: {len(tokenizer)} vocabulary entries; tokens incl. [CLS]/[SEP]: "
        f"mean {counts.mean():.1f}, p50 {np.percentile(counts, 50):.0f}, p95 {np.percentile(counts, 95):.0f}, "
        f"p99 {np.percentile(counts, 99):.0f}, max {counts.max()}; over 64: {(counts > 64).sum()}\n"
        + "  ".join(f"{k}-{k + 7}: {histogram[k]}" for k in sorted(histogram))
    )
    assert (counts > 64).sum() < 0.01 * len(captions)


def test_has_text_is_false_only_for_spaces_and_control_characters():
    # prepare.py rejects such a caption as empty: it would tokenize to [CLS] [SEP] and nothing else.
    assert not has_text("") and not has_text(" \u3000\t\x01\x7f")
    assert has_text("红") and has_text(" x ") and has_text("！")
