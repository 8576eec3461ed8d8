import base64
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    TAMING_TINY,
    b64,
    encoded,
    good_rows,
    random_image,
    requires_fixtures,
    write_dataset,
    write_lines,
)
from conftest import TINY_F4_SIZE as SIZE
from PIL import Image
from transformers import BertTokenizerFast

import prepare
from data import BadRowError, decode_base64, image_from_base64, open_image, read_text_tsv, read_tsv
from text import SPECIAL_TOKENS, load_tokenizer, tokenize_captions, write_vocab
from vqgan import images_to_tensor, load_vqgan

OUTPUTS = [*prepare.output_names(), "meta.json", "vocab.txt"]


def run_prepare(capsys, data_dir: Path, out_dir: Path, ckpt: Path, *extra: str) -> tuple[int, str]:
    argv = ["--data_dir", str(data_dir), "--vqgan_ckpt", str(ckpt), "--out_dir", str(out_dir)]
    argv += ["--image_size", str(SIZE), "--batch_size", "4", "--num_workers", "0", *extra]
    rc = prepare.main(argv)
    return rc, capsys.readouterr().err


def read_rejects(out_dir: Path) -> list[tuple[str, int, str, str]]:
    rows = []
    for line in (out_dir / "rejects.tsv").read_text(encoding="utf-8").splitlines():
        source, line_no, img_id, reason = line.split("\t")
        rows.append((source, int(line_no), img_id, reason.split(":")[0]))
    return rows


def read_split(out_dir: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    meta = json.loads((out_dir / "meta.json").read_text())
    ids = (out_dir / f"{split}.ids.txt").read_text(encoding="utf-8").splitlines()
    codes = np.fromfile(out_dir / f"{split}.img.bin", dtype=np.uint16).reshape(len(ids), -1)
    tokens = np.fromfile(out_dir / f"{split}.txt.bin", dtype=np.uint16).reshape(len(ids), meta["text_len"])
    return ids, codes, tokens


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size and holds almost nothing: what a decompression bomb looks like on open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --- data.py: reading TSVs --------------------------------------------------------------------------------------


def test_tsv_reading_handles_bom_crlf_blank_lines_and_resumes(tmp_path):
    path = tmp_path / "t.tsv"
    write_lines(path, ["a\tone", "", "b\ttwo  ", "  ", "c\tthree\textra", "\tno id", "d\tfour"], "\r\n", bom=True)
    rows = list(read_tsv(path))
    assert [(r.line_no, r.img_id, r.value) for r in rows if r.error is None] == [
        (1, "a", b"one"),
        (3, "b", b"two"),
        (7, "d", b"four"),
    ]
    assert [(r.line_no, r.error.reason) for r in rows if r.error] == [(5, "malformed line"), (6, "empty img_id")]
    resumed = list(read_tsv(path, rows[1].end_offset, rows[1].line_no))
    assert [r.line_no for r in resumed] == [5, 6, 7]


def test_overlong_line_is_one_rejected_row(tmp_path):
    path = tmp_path / "t.tsv"
    write_lines(path, ["a\t" + "x" * 5000, "b\tfine"])
    rows = list(read_tsv(path, max_line_bytes=1000))
    assert [(r.line_no, r.img_id, r.error and r.error.reason) for r in rows] == [
        (1, "a", "line too long"),
        (2, "b", None),
    ]


def test_captions_keep_spaces_and_full_width_punctuation(tmp_path):
    path = tmp_path / "t.tsv"
    write_lines(path, ["a\t  abercrombie fitch 【新款】！T恤\u3000", "b\t\u3000 ", "c\t"])
    rows = list(read_text_tsv(path))
    assert rows[0].caption == "abercrombie fitch 【新款】！T恤" and rows[0].error is None
    assert [r.error.reason for r in rows[1:]] == ["empty caption", "empty caption"]
    path.write_bytes(b"a\t\xff\xfe broken\nb\tfine\n")
    assert [r.error and r.error.reason for r in read_text_tsv(path)] == ["caption is not UTF-8", None]


# --- data.py: images ---------------------------------------------------------------------------------------------


def test_base64_standard_urlsafe_and_unpadded():
    data = bytes(range(256)) * 3 + b"\xfb\xff"
    standard = base64.b64encode(data)
    urlsafe = base64.urlsafe_b64encode(data).rstrip(b"=")
    assert b"-" in urlsafe or b"_" in urlsafe
    assert decode_base64(standard) == decode_base64(urlsafe) == data
    for field, reason in [(b"", "empty image field"), (b"@@@@", "invalid base64"), (b"abcde", "invalid base64")]:
        with pytest.raises(BadRowError) as e:
            decode_base64(field)
        assert e.value.reason == reason


def test_transparent_modes_are_composited_on_white():
    rgba = Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 0))
    la = Image.new("LA", (SIZE, SIZE), (0, 0))
    palette = Image.new("P", (SIZE, SIZE), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.paste(1, (0, 0, SIZE // 2, SIZE))
    for image in (rgba, la, palette):
        pixels = np.asarray(open_image(encoded(image, transparency=0) if image.mode == "P" else encoded(image)))
        assert pixels.shape == (SIZE, SIZE, 3)
        assert (pixels[:, SIZE // 2 :] == 255).all(), image.mode
    assert (np.asarray(open_image(encoded(palette, transparency=0)))[:, 0] == (200, 10, 10)).all()


def test_gray_cmyk_and_16_bit_images():
    gray = np.asarray(open_image(encoded(Image.new("L", (SIZE, SIZE), 77))))
    assert (gray == 77).all()
    cmyk = np.asarray(open_image(encoded(Image.new("CMYK", (SIZE, SIZE), (0, 0, 0, 0)), "JPEG", quality=95)))
    assert cmyk.mean() > 250
    sixteen = np.full((SIZE, SIZE), 32896, dtype=np.uint16)  # 128 * 257
    sixteen[0, 0] = 65535
    image16 = Image.fromarray(sixteen)
    assert image16.mode == "I;16"
    pixels = np.asarray(open_image(encoded(image16)))
    assert pixels[0, 0].tolist() == [255, 255, 255] and (pixels[1:] == 128).all()  # scaled, not clipped at 255


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    opened = open_image(encoded(image, "JPEG", exif=exif.tobytes(), quality=95))
    pixels = np.asarray(opened).astype(int)
    assert opened.size == (20, 40)
    assert pixels[:20, :, 0].mean() > 200 and pixels[20:, :, 2].mean() > 200  # red on top


def test_pad_and_crop_of_non_square_images():
    wide = Image.new("RGB", (64, 32), (250, 250, 250))
    wide.paste((0, 0, 0), (24, 8, 40, 24))
    padded = image_from_base64(base64.b64encode(encoded(wide)), SIZE, "pad")
    assert padded.shape == (SIZE, SIZE, 3)
    assert (padded[:8] == 250).all() and (padded[-8:] == 250).all()  # padding takes the background colour
    assert padded[16, 16].max() < 10  # the whole product is still there
    stripes = Image.new("RGB", (96, 32), (255, 0, 0))
    stripes.paste((0, 255, 0), (32, 0, 64, 32))
    cropped = image_from_base64(base64.b64encode(encoded(stripes)), SIZE, "crop")
    assert (cropped[:, 2:-2] == (0, 255, 0)).all()


def test_square_image_is_not_resampled():
    image = random_image(3)
    assert np.array_equal(image_from_base64(base64.b64encode(encoded(image)), SIZE), np.asarray(image))


@pytest.mark.parametrize(
    "data, max_pixels, reason",
    [
        (b"hello, not an image", 10**6, "not an image"),
        (encoded(random_image(1))[:300], 10**6, "truncated or corrupt image"),
        (encoded(random_image(1), "JPEG")[:400], 10**6, "truncated or corrupt image"),
        (encoded(Image.new("L", (100, 100))), 5000, "decompression bomb"),  # our cap
        (png_header_only(20000, 20000), 10**9, "decompression bomb"),  # Pillow's own DecompressionBombError
    ],
    ids=["garbage", "truncated-png", "truncated-jpeg", "max-pixels", "pillow-bomb"],
)
def test_unusable_images_raise_bad_row(data, max_pixels, reason):
    with pytest.raises(BadRowError) as e:
        open_image(data, max_pixels)
    assert e.value.reason == reason


# --- prepare.py -------------------------------------------------------------------------------------------------


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: prepare.py" in out and "--val_fraction" in out


def test_no_arguments_prepares_the_demo(tmp_path, monkeypatch):
    # Shrink the demo so the whole default path runs in a moment; everything else is the real thing.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    real_write = prepare.demo.write_dataset
    monkeypatch.setattr(prepare.demo, "write_dataset", lambda out, image_size: real_write(
        out, n_train=24, n_val=8, n_test=4, image_size=image_size))
    assert prepare.main([]) == 0
    meta = json.loads((tmp_path / "data/demo/meta.json").read_text())
    assert meta["image_size"] == 64 and meta["code_grid"] == [8, 8] and meta["text_len"] == 32
    assert meta["splits"]["train"]["rows"] == 24 and meta["splits"]["val"]["rows"] == 8
    assert meta["test_prompts"].endswith("data/demo_src/T2I_test.text.tsv")
    # Run again: the source is kept and the finished prepare is a no-op.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()}
    assert prepare.main([]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()}


def test_bad_rows_are_skipped_and_listed(tmp_path, capsys, vqgan_ckpt):
    good = good_rows(6)
    odd = {  # valid but unusual images: all kept
        "rgba": encoded(Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))),
        "gray16": encoded(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))),
        "cmyk": encoded(Image.new("CMYK", (40, 24), (0, 50, 0, 0)), "JPEG"),
        "wide": encoded(random_image(9, (70, 20)), "JPEG"),
    }
    img_lines = [f"{i}\t{img}" for i, img, _ in good[:3]]
    img_lines += [f"{name}\t{b64(data)}" for name, data in odd.items()]
    img_lines += [
        "",  # blank line
        f"urlsafe\t{base64.urlsafe_b64encode(encoded(random_image(7))).decode().rstrip('=')}",
        "badb64\t@@@not base64@@@",
        "emptyimg\t",
        f"notimg\t{b64(b'just some text')}",
        f"trunc\t{b64(encoded(random_image(8))[:200])}",
        f"bomb\t{b64(png_header_only(20000, 20000))}",
        f"{good[0][0]}\t{good[4][1]}",  # repeated img_id: the first occurrence wins
        "nocaption\t" + good[5][1],
        "three\tfields\there",
        "notabatall",
        f"emptycap\t{good[3][1]}",
    ]
    img_lines += [f"{i}\t{img}" for i, img, _ in good[3:5]]
    captions = {i: cap for i, _, cap in good} | {name: "透明背景 Ｔ恤【新款】！ 2021" for name in odd}
    captions |= {"urlsafe": "abercrombie fitch 短袖", "badb64": "a", "emptyimg": "b", "notimg": "c", "trunc": "d"}
    captions |= {"bomb": "e", "emptycap": "  \u3000 "}
    text_lines = [f"{i}\t{c}" for i, c in reversed(captions.items()) if i != good[5][0]]
    text_lines += [f"{good[1][0]}\tsecond caption for the same id", "noimage\t有字无图"]
    data_dir = tmp_path / "muge"
    data_dir.mkdir()
    write_lines(data_dir / "T2I_train.img.tsv", img_lines, "\r\n", bom=True)
    write_lines(data_dir / "T2I_train.text.tsv", text_lines, "\r\n", bom=True)

    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt, "--val_fraction", "0")
    assert rc == 0, err
    rejects = read_rejects(tmp_path / "out")
    by_id = {(source, img_id): reason for source, _, img_id, reason in rejects}
    img = "T2I_train.img.tsv"
    expected = {
        (img, "badb64"): "invalid base64",
        (img, "emptyimg"): "empty image field",
        (img, "notimg"): "not an image",
        (img, "trunc"): "truncated or corrupt image",
        (img, "bomb"): "decompression bomb",
        (img, "nocaption"): "no caption row",
        (img, "three"): "malformed line",
        (img, "notabatall"): "malformed line",
        (img, "emptycap"): "caption rejected",
    }
    for key, reason in expected.items():
        assert by_id.get(key) == reason, (key, rejects)
    reasons = [reason for *_, reason in rejects]
    assert reasons.count("image rejected") == 5  # the caption rows of badb64, emptyimg, notimg, trunc, bomb
    assert reasons.count("duplicate img_id") == 2  # one in each file
    assert reasons.count("no image row") == 1
    assert reasons.count("empty caption") == 1
    lines = {(source, img_id): line for source, line, img_id, _ in rejects}
    assert lines[("T2I_train.img.tsv", "badb64")] == 10  # physical line numbers, blank line counted
    assert lines[("T2I_train.img.tsv", good[0][0])] == 15  # the repeated id is the later row
    assert len(rejects) == len(set((s, line) for s, line, *_ in rejects))  # one row per skipped line

    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    ids, codes, tokens = read_split(tmp_path / "out", "train")
    assert ids == [good[0][0], good[1][0], good[2][0], *odd, "urlsafe", good[3][0], good[4][0]]  # image-file order
    assert meta["splits"] == {"train": {"rows": len(ids)}, "val": {"rows": 0}}
    assert sum(meta["rejects"].values()) == len(rejects)
    assert meta["code_grid"] == [8, 8] and codes.shape == (len(ids), 64) and codes.max() < 64
    tokenizer = load_tokenizer(meta["tokenizer"], tmp_path / "out")
    pieces = tokenizer.convert_ids_to_tokens([int(t) for t in tokens[ids.index("rgba")] if t])
    assert pieces == ["[CLS]", *"透明背景ｔ恤【新款】！", "2", "##0", "##2", "##1", "[SEP]"]
    assert "rejected rows" in err and "invalid base64" in err


def test_codes_and_tokens_equal_direct_encoding(tmp_path, capsys, vqgan_ckpt):
    rows = good_rows(10)
    data_dir = write_dataset(tmp_path / "muge", rows)
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt, "--val_fraction", "0", "--text_len", "8")
    assert rc == 0, err
    ids, codes, tokens = read_split(tmp_path / "out", "train")
    assert ids == [i for i, _, _ in rows]
    pixels = np.stack([np.asarray(random_image(i)) for i in range(10)])
    vq = load_vqgan(vqgan_ckpt)
    # prepare encodes batches of 4; the same batches here, so nothing but the pipeline can differ
    expected = torch.cat([vq.encode(images_to_tensor(pixels[i : i + 4])) for i in range(0, 10, 4)])
    assert np.array_equal(codes, expected.reshape(10, -1).numpy())
    tokenizer = load_tokenizer("vocab.txt", tmp_path / "out")
    expected_tokens, counts = tokenize_captions(tokenizer, [c for _, _, c in rows], 8)
    assert np.array_equal(tokens, expected_tokens)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["captions_truncated"] == int((counts > 8).sum()) > 0
    assert tokens[:, -1].min() == tokenizer.sep_token_id  # truncated captions keep their closing [SEP]


@requires_fixtures
def test_256px_codes_equal_the_taming_fixture_encoding(tmp_path, capsys):
    ckpt = TAMING_TINY / "checkpoints" / "last.ckpt"
    rows = [(f"img{i}", b64(encoded(random_image(i, (256, 256)))), f"商品{i}") for i in range(3)]
    data_dir = write_dataset(tmp_path / "muge", rows)
    argv = ["--data_dir", str(data_dir), "--vqgan_ckpt", str(ckpt), "--out_dir", str(tmp_path / "out")]
    assert prepare.main([*argv, "--batch_size", "3", "--num_workers", "0", "--val_fraction", "0"]) == 0
    ids, codes, _ = read_split(tmp_path / "out", "train")
    pixels = np.stack([np.asarray(random_image(i, (256, 256))) for i in range(3)])
    expected = load_vqgan(ckpt).encode(images_to_tensor(pixels))  # x / 127.5 - 1 of the very pixels
    assert np.array_equal(codes, expected.reshape(3, 256).numpy())
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["code_grid"], meta["codebook_size"], meta["image_size"]) == ([16, 16], 1024, 256)


def test_meta_json_follows_the_data_contract(tmp_path, capsys, vqgan_ckpt):
    data_dir = write_dataset(tmp_path / "muge", good_rows(8))
    write_lines(data_dir / "T2I_test.text.tsv", ["t1\t测试"])
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt, "--val_fraction", "0.5")
    assert rc == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    for key in ["image_size", "code_grid", "codebook_size", "text_len", "tokenizer", "text_vocab_size", "pad_id"]:
        assert key in meta
    for key in ["vqgan_ckpt", "vqgan_sha256", "resize", "splits", "rejects", "captions_truncated", "versions"]:
        assert key in meta
    assert meta["tokenizer"] == "vocab.txt" and meta["pad_id"] == 0 and meta["resize"] == "pad"
    assert meta["test_prompts"] == str((data_dir / "T2I_test.text.tsv").resolve())
    assert meta["vqgan_ckpt"] == str(vqgan_ckpt.resolve()) and len(meta["vqgan_sha256"]) == 64
    assert meta["command"].startswith("python prepare.py --data_dir")
    assert meta["text_vocab_size"] == len((tmp_path / "out" / "vocab.txt").read_text().splitlines())
    for split in ("train", "val"):
        n = meta["splits"][split]["rows"]
        codes = np.memmap(tmp_path / "out" / f"{split}.img.bin", dtype=np.uint16, mode="r")
        assert codes.size == n * 64 and n > 0


def test_val_files_are_the_val_split(tmp_path, capsys, vqgan_ckpt):
    train_rows = good_rows(5)
    data_dir = write_dataset(tmp_path / "muge", train_rows)
    # A training row repeated in the val files stays out of val: val scores must not see trained-on pictures.
    write_dataset(data_dir, [*good_rows(3, prefix="v", seed=50), train_rows[1]], split="val")
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt, "--val_fraction", "0.5")
    assert rc == 0 and "--val_fraction ignored" in err
    assert read_split(tmp_path / "out", "val")[0] == ["v0", "v1", "v2"]
    assert read_split(tmp_path / "out", "train")[0] == [f"id{i}" for i in range(5)]
    assert read_rejects(tmp_path / "out") == [("T2I_val.img.tsv", 4, "id1", "duplicate img_id"),
                                              ("T2I_val.text.tsv", 1, "id1", "image rejected")]


def test_hash_split_is_deterministic_and_unsalted():
    ids = [f"{i:032x}" for i in range(20000)]
    held = [prepare.held_out(i, 0.05) for i in ids]
    assert 0.04 < sum(held) / len(ids) < 0.06
    assert held == [prepare.held_out(i, 0.05) for i in ids]
    # Python's hash() of a str changes per process; the split must not. Pinned values catch a change of hash.
    assert [i for i in ids[:300] if prepare.held_out(i, 0.05)] == PINNED_HELD_OUT


# blake2b-64 of the id, below 0.05 * 2**64: the ids among the first 300 above that go to val.
PINNED_HELD_OUT = [
    f"{n:032x}" for n in (0x0A, 0x12, 0x1D, 0x3D, 0x55, 0x66, 0x68, 0x97, 0x9C, 0xAD, 0xBB, 0xEE, 0xF2, 0x11F, 0x125)
]


def test_all_rows_bad_exits_nonzero_with_a_summary(tmp_path, capsys, vqgan_ckpt):
    rows = [(f"b{i}", "@@@@", "caption") for i in range(3)]
    rc, err = run_prepare(capsys, write_dataset(tmp_path / "muge", rows), tmp_path / "out", vqgan_ckpt)
    assert rc == 1
    assert "no usable training rows" in err and "invalid base64" in err
    assert not (tmp_path / "out" / "meta.json").exists()


def test_input_problems_are_named(tmp_path, capsys, vqgan_ckpt):
    data_dir = tmp_path / "muge"
    data_dir.mkdir()
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt)
    assert rc == 1 and "T2I_train.img.tsv" in err
    write_dataset(data_dir, good_rows(2))
    write_lines(data_dir / "T2I_val.img.tsv", [])
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt)
    assert rc == 1 and "T2I_val.text.tsv" in err


def test_changed_settings_are_refused_and_a_finished_run_is_a_no_op(tmp_path, capsys, vqgan_ckpt):
    data_dir = write_dataset(tmp_path / "muge", good_rows(5))
    out = tmp_path / "out"
    assert run_prepare(capsys, data_dir, out, vqgan_ckpt)[0] == 0
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in OUTPUTS}
    rc, err = run_prepare(capsys, data_dir, out, vqgan_ckpt)
    assert rc == 0 and "nothing to do" in err
    assert before == {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in OUTPUTS}
    rc, err = run_prepare(capsys, data_dir, out, vqgan_ckpt, "--text_len", "16")
    assert rc == 1 and "text_len" in err


def test_a_local_tokenizer_folder_is_used_as_is(tmp_path, capsys, vqgan_ckpt):
    data_dir = write_dataset(tmp_path / "muge", good_rows(4))
    vocab_dir = tmp_path / "vocab"
    vocab_dir.mkdir()
    write_vocab([*SPECIAL_TOKENS, "t", "恤", "红", "色"], vocab_dir / "vocab.txt")
    folder = tmp_path / "hf_tokenizer"
    BertTokenizerFast.from_pretrained(str(vocab_dir)).save_pretrained(folder)
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt, "--text_tokenizer", str(folder))
    assert rc == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer"] == str(folder.resolve()) and meta["text_vocab_size"] == 9
    assert not (tmp_path / "out" / "vocab.txt").exists()
    tokens = np.fromfile(tmp_path / "out" / "train.txt.bin", dtype=np.uint16).reshape(-1, 64)
    assert tokens[0, :4].tolist() == [2, 7, 8, 5]  # [CLS] 红 色 t ...


def test_workers_give_the_same_bytes_as_inline_decoding(tmp_path, capsys, vqgan_ckpt):
    rows = good_rows(12) + [("bad", "@@@@", "坏"), ("trunc", b64(encoded(random_image(2))[:200]), "截断")]
    data_dir = write_dataset(tmp_path / "muge", rows)
    assert run_prepare(capsys, data_dir, tmp_path / "inline", vqgan_ckpt)[0] == 0
    assert run_prepare(capsys, data_dir, tmp_path / "workers", vqgan_ckpt, "--num_workers", "2")[0] == 0
    for name in OUTPUTS:
        if name != "meta.json":
            assert (tmp_path / "inline" / name).read_bytes() == (tmp_path / "workers" / name).read_bytes(), name
    inline, workers = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("inline", "workers"))
    assert (
        inline["rejects"]
        == workers["rejects"]
        == {
            "image rejected": 2,
            "invalid base64": 1,
            "truncated or corrupt image": 1,
        }
    )
    assert {**inline, "command": ""} == {**workers, "command": ""}  # the command lines differ


@pytest.mark.parametrize("stall_after", [3, 7], ids=["in-train-file", "in-val-file"])
def test_kill_9_then_rerun_gives_the_same_bytes(tmp_path, capsys, vqgan_ckpt, stall_after):
    rows = good_rows(18)
    rows[4] = (rows[4][0], "@@@@", rows[4][2])  # rejects before and after the kill
    rows[15] = (rows[15][0], "@@@@", rows[15][2])
    data_dir = write_dataset(tmp_path / "muge", rows)
    write_dataset(data_dir, good_rows(12, prefix="v", seed=40), split="val")
    assert run_prepare(capsys, data_dir, tmp_path / "reference", vqgan_ckpt)[0] == 0

    out = tmp_path / "out"
    argv = ["--data_dir", str(data_dir), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir", str(out)]
    argv += ["--image_size", str(SIZE), "--batch_size", "4", "--num_workers", "0"]
    env = dict(os.environ, **{prepare.STALL_ENV: str(stall_after)})
    child = subprocess.Popen(
        [sys.executable, "prepare.py", *argv], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        for line in child.stderr:
            if "stalling" in line or time.monotonic() > deadline:
                break
        assert child.poll() is None, "prepare finished before it could be killed"
        state = json.loads((out / prepare.STATE_FILE).read_text())
        assert state["rows"]["train"] > 0  # the rerun continues from a commit, not from scratch
        uncommitted = [n for n, size in state["sizes"].items() if (out / n).stat().st_size > size]
        assert "val.img.bin" in uncommitted if stall_after == 7 else "train.img.bin" in uncommitted
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (out / "meta.json").exists()

    # The same command again (as the user would type it; meta.json records it) finishes the job.
    assert prepare.main(argv) == 0, capsys.readouterr().err
    reference = tmp_path / "reference"
    for name in OUTPUTS:
        if name != "meta.json":
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    meta, reference_meta = (json.loads((d / "meta.json").read_text()) for d in (out, reference))
    assert {**meta, "command": ""} == {**reference_meta, "command": ""}
