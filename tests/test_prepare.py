"""prepare.py: MUGE TSVs -> memmaps, with bad rows listed rather than fatal and one-line errors for the rest."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
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
from PIL import EpsImagePlugin, Image
from test_data import EPS, png_header_only
from transformers import BertTokenizerFast

import prepare
from data import check_ids, open_split, read_meta
from text import SPECIAL_TOKENS, load_tokenizer, tokenize_captions, write_vocab
from vqgan import images_to_tensor, load_vqgan

OUTPUTS = [f"{split}.{kind}" for split in ("train", "val") for kind in ("img.bin", "txt.bin", "ids.txt")]
OUTPUTS += ["rejects.tsv", "vocab.txt", "meta.json"]
VOLATILE = ("command", "seconds", "peak_memory_gib")  # the meta.json keys that differ between equal runs


def prepare_argv(data_dir: Path, out_dir: Path, ckpt: Path, *extra: str) -> list[str]:
    argv = ["--data_dir", str(data_dir), "--vqgan_ckpt", str(ckpt), "--out_dir", str(out_dir)]
    return argv + ["--image_size", str(SIZE), "--batch_size", "4", "--num_workers", "0", *extra]


def run_prepare(capsys, data_dir: Path, out_dir: Path, ckpt: Path, *extra: str) -> tuple[int, str]:
    rc = prepare.main(prepare_argv(data_dir, out_dir, ckpt, *extra))
    return rc, capsys.readouterr().err


def read_rejects(out_dir: Path) -> list[tuple[str, int, str, str]]:
    rows = []
    for line in (out_dir / "rejects.tsv").read_text(encoding="utf-8").split("\n")[:-1]:
        source, line_no, img_id, reason = line.split("\t")
        rows.append((source, int(line_no), img_id, reason.split(":")[0]))
    return rows


def read_split(out_dir: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    meta = json.loads((out_dir / "meta.json").read_text())
    ids = (out_dir / f"{split}.ids.txt").read_text(encoding="utf-8").split("\n")[:-1]
    codes = np.fromfile(out_dir / f"{split}.img.bin", dtype=np.uint16).reshape(len(ids), -1)
    tokens = np.fromfile(out_dir / f"{split}.txt.bin", dtype=np.uint16).reshape(len(ids), meta["text_len"])
    return ids, codes, tokens


def assert_same_outputs(out: Path, reference: Path) -> None:
    for name in OUTPUTS[:-1]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    meta, reference_meta = (json.loads((d / "meta.json").read_text()) for d in (out, reference))
    for key in VOLATILE:
        meta.pop(key), reference_meta.pop(key)
    assert meta == reference_meta


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    # The progress bar's line (redrawn with \r) may come first; the error is the one other line.
    lines = [line for line in err.split("\n") if line and not line.startswith("\r")]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("prepare.py: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def many_rows(n: int, prefix: str = "id") -> list[tuple[str, str, str]]:
    """n rows from 4 distinct pictures: cheap to make, and enough work that a run takes a while."""
    pictures = good_rows(4, seed=60)
    return [(f"{prefix}{i}", pictures[i % 4][1], f"蓝色连衣裙 {i}") for i in range(n)]


# --- the command line -------------------------------------------------------------------------------------------


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: prepare.py" in out
    for flag in ("--val_fraction", "--max_decode_mb", "--flip", "--resize", "--text_tokenizer", "--num_workers"):
        assert flag in out


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
    # the demo trains on every picture and its mirror image (--flip)
    assert meta["splits"]["train"]["rows"] == 2 * 24 and meta["splits"]["val"]["rows"] == 8
    assert meta["test_prompts"].endswith("data/demo_src/T2I_test.text.tsv")
    # Run again: the source is kept and the finished prepare is a no-op.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()}
    assert prepare.main([]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*") if p.is_file()}


# --- rows: what is kept, what is rejected and why -----------------------------------------------------------------


def test_bad_rows_are_skipped_and_listed(tmp_path, capsys, vqgan_ckpt, monkeypatch):
    # Pillow's EPS plugin runs Ghostscript: record any use of it.
    Image.init()
    eps_calls = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: eps_calls.append(self))
    good = good_rows(6)
    odd = {  # valid but unusual images: all kept
        "rgba": encoded(Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))),
        "gray16": encoded(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))),
        "cmyk": encoded(Image.new("CMYK", (40, 24), (0, 50, 0, 0)), "JPEG"),
        "wide": encoded(random_image(9, (70, 20)), "JPEG"),
    }
    half = len(good[5][1]) // 2
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
        f"straytab\t{good[5][1][:half]}\t{good[5][1][half:]}",  # rejected, not glued back together
        "notabatall",
        f"emptycap\t{good[3][1]}",
        f"eps\t{b64(EPS)}",
    ]
    img_lines += [f"{i}\t{img}" for i, img, _ in good[3:5]]
    captions = {i: cap for i, _, cap in good} | {name: "透明背景 Ｔ恤【新款】！ 2021" for name in odd}
    captions |= {"urlsafe": "abercrombie fitch 短袖", "badb64": "a", "emptyimg": "b", "notimg": "c", "trunc": "d"}
    captions |= {"bomb": "e", "straytab": "f", "eps": "g", "emptycap": "  \u3000 "}
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
        (img, "straytab"): "invalid base64",
        (img, "notabatall"): "malformed line",
        (img, "emptycap"): "caption rejected",
        (img, "eps"): "not an image",
    }
    for key, reason in expected.items():
        assert by_id.get(key) == reason, (key, rejects)
    assert eps_calls == []
    reasons = [reason for *_, reason in rejects]
    # the caption rows of badb64, emptyimg, notimg, trunc, bomb, straytab, eps
    assert reasons.count("image rejected") == 7
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
    assert "rejected lines" in err and "invalid base64" in err


def test_img_ids_with_line_breaks_never_reach_the_id_lists(tmp_path, capsys, vqgan_ckpt):
    # \r, U+2028, \x1c and \x85 each end a line for some reader of train.ids.txt (str.splitlines for one).
    bad_ids = ["bad\rone", "bad\u2028two", "bad\x1cthree", "bad\x85four"]
    picture = good_rows(1, seed=30)[0][1]
    rows = good_rows(4) + [(i, picture, "红色T恤") for i in bad_ids]
    data_dir = write_dataset(tmp_path / "muge", rows)
    # The val files repeat a kept training id, once plainly and once with spaces around it, and a bad id.
    val = good_rows(2, prefix="v", seed=40) + [("id1", picture, "又一个"), (" id2 ", picture, "再一个"),
                                                ("bad\u2028two", picture, "坏")]
    write_dataset(data_dir, val, split="val")
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt)
    assert rc == 0, err
    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text())
    for split, expected in (("train", ["id0", "id1", "id2", "id3"]), ("val", ["v0", "v1"])):
        text = (out / f"{split}.ids.txt").read_text(encoding="utf-8")
        assert text.split("\n")[:-1] == text.splitlines() == expected
        assert meta["splits"][split]["rows"] == len(expected) == read_split(out, split)[1].shape[0]
    rejects = (out / "rejects.tsv").read_text(encoding="utf-8")
    assert rejects.split("\n")[:-1] == rejects.splitlines()  # its img_id column is printable too
    reasons = {(source, line): reason for source, line, _, reason in read_rejects(out)}
    assert [reasons[("T2I_train.img.tsv", line)] for line in (5, 6, 7, 8)] == ["bad img_id"] * 4
    assert [reasons[("T2I_train.text.tsv", line)] for line in (1, 2, 3, 4)] == ["bad img_id"] * 4
    assert [reasons[("T2I_val.img.tsv", line)] for line in (3, 4, 5)] == ["duplicate img_id"] * 2 + ["bad img_id"]


def test_rows_a_tab_or_a_later_bom_used_to_cost(tmp_path, capsys, vqgan_ckpt):
    # Two downloads concatenated (each starting with a BOM) and a caption holding a tab: every row is kept.
    rows = good_rows(6)
    data_dir = tmp_path / "muge"
    data_dir.mkdir()
    bom = "\ufeff"
    captions = {i: cap.replace(" ", "\t", 1) if i == "id4" else cap for i, _, cap in rows}
    (data_dir / "T2I_train.img.tsv").write_text(
        "".join(f"{bom if n in (0, 3) else ''}{i}\t{img}\n" for n, (i, img, _) in enumerate(rows)), encoding="utf-8")
    (data_dir / "T2I_train.text.tsv").write_text(
        "".join(f"{bom if n in (0, 3) else ''}{i}\t{captions[i]}\n" for n, (i, _, _) in enumerate(rows)),
        encoding="utf-8")
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt, "--val_fraction", "0", "--text_len", "16")
    assert rc == 0, err
    ids, _, tokens = read_split(tmp_path / "out", "train")
    assert ids == [i for i, _, _ in rows] and read_rejects(tmp_path / "out") == []
    tokenizer = load_tokenizer("vocab.txt", tmp_path / "out")
    assert np.array_equal(tokens[4], tokenize_captions(tokenizer, ["红色T恤 XL码 4号"], 16)[0][0])


def test_the_decode_bound_is_in_bytes(tmp_path, capsys, vqgan_ckpt):
    # The same 64 x 64 pixels as grey (5 bytes a pixel to decode) and as RGBA (11): a bound between the two
    # keeps one and rejects the other, which no pixel count could.
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    gray = b64(encoded(Image.fromarray(pixels)))
    rgba = b64(encoded(Image.fromarray(np.stack([pixels] * 4, axis=-1), "RGBA")))
    rows = [("gray", gray, "灰色"), ("rgba", rgba, "彩色"), *good_rows(2)]
    data_dir = write_dataset(tmp_path / "muge", rows)
    bound = str(8 * 64 * 64 / 2**20)
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt, "--val_fraction", "0",
                          "--max_decode_mb", bound)
    assert rc == 0, err
    assert read_split(tmp_path / "out", "train")[0] == ["gray", "id0", "id1"]
    assert read_rejects(tmp_path / "out")[0] == ("T2I_train.img.tsv", 2, "rgba", "decompression bomb")


# --- the outputs ----------------------------------------------------------------------------------------------------


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


def test_flip_adds_the_mirrored_training_images(tmp_path, capsys, vqgan_ckpt):
    rows = good_rows(6)
    data_dir = write_dataset(tmp_path / "muge", rows)
    write_dataset(data_dir, good_rows(2, prefix="v", seed=40), split="val")
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt, "--flip")
    assert rc == 0, err
    ids, codes, tokens = read_split(tmp_path / "out", "train")
    # Each batch of 4 is followed by its mirror images; val is never flipped.
    assert ids == ["id0", "id1", "id2", "id3", *[f"id{i}#flip" for i in range(4)], "id4", "id5", "id4#flip",
                   "id5#flip"]
    assert read_split(tmp_path / "out", "val")[0] == ["v0", "v1"]
    pixels = np.stack([np.asarray(random_image(i)) for i in range(6)])
    vq = load_vqgan(vqgan_ckpt)
    for batch, rows_out in ((slice(0, 4), slice(4, 8)), (slice(4, 6), slice(10, 12))):
        mirrored = np.ascontiguousarray(pixels[batch, :, ::-1])
        expected = vq.encode(images_to_tensor(mirrored)).reshape(len(mirrored), -1).numpy()
        assert np.array_equal(codes[rows_out], expected)
    original = [ids.index(f"id{i}") for i in range(6)]
    flipped = [ids.index(f"id{i}#flip") for i in range(6)]
    assert np.array_equal(tokens[flipped], tokens[original])
    assert (codes[flipped] != codes[original]).any(axis=1).all()  # a mirror image is another picture
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["train"]["rows"] == 12 and meta["settings"]["flip"] is True
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt)
    assert rc == 1 and "flip" in err


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
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert not out.with_name("out.partial").exists()
    meta = json.loads((out / "meta.json").read_text())
    for key in ["image_size", "code_grid", "codebook_size", "text_len", "tokenizer", "text_vocab_size", "pad_id"]:
        assert key in meta
    for key in ["vqgan_ckpt", "vqgan_sha256", "resize", "splits", "rejects", "captions_truncated", "versions"]:
        assert key in meta
    assert meta["tokenizer"] == "vocab.txt" and meta["pad_id"] == 0 and meta["resize"] == "pad"
    assert meta["test_prompts"] == str((data_dir / "T2I_test.text.tsv").resolve())
    assert meta["vqgan_ckpt"] == str(vqgan_ckpt.resolve()) and len(meta["vqgan_sha256"]) == 64
    assert meta["command"].startswith("python prepare.py --data_dir")
    assert meta["text_vocab_size"] == len((out / "vocab.txt").read_text().splitlines())
    assert meta["settings"]["max_decode_mb"] == prepare.MAX_DECODE_MB and meta["settings"]["flip"] is False
    # What train.py and evaluate.py read back through data.py.
    assert read_meta(out) == meta
    for split in ("train", "val"):
        n = meta["splits"][split]["rows"]
        codes, text = open_split(out, split, meta)
        assert codes.shape == (n, 64) and text.shape == (n, meta["text_len"]) and n > 0
        check_ids(out, split, (codes, text), meta["codebook_size"], meta["text_vocab_size"])


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


# --- refusals and errors ------------------------------------------------------------------------------------------


def test_all_rows_bad_exits_nonzero_with_a_summary(tmp_path, capsys, vqgan_ckpt):
    rows = [(f"b{i}", "@@@@", "caption") for i in range(3)]
    rc, err = run_prepare(capsys, write_dataset(tmp_path / "muge", rows), tmp_path / "out", vqgan_ckpt)
    assert rc == 1
    assert "prepare.py: error: no usable training rows" in err and "invalid base64" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_input_problems_are_named(tmp_path, capsys, vqgan_ckpt):
    data_dir = tmp_path / "muge"
    data_dir.mkdir()
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt)
    assert_one_line_error(rc, err, "T2I_train.img.tsv")
    write_dataset(data_dir, good_rows(2))
    write_lines(data_dir / "T2I_val.img.tsv", [])
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt)
    assert_one_line_error(rc, err, "T2I_val.text.tsv")
    rc, err = run_prepare(capsys, tmp_path / "nowhere", tmp_path / "out", vqgan_ckpt)
    assert_one_line_error(rc, err, "nowhere", "--data_dir")


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("T2I_train.text.tsv", "".join(f"id{i}\t红色T恤 {i}号\n" for i in range(3)).encode("gbk"),
         ["3 of 3 captions are not UTF-8", "line 1", "GBK"]),
        ("T2I_train.text.tsv", "".join(f"id{i}\t红色T恤\n" for i in range(3)).encode("utf-16"), ["UTF-16"]),
        ("T2I_train.text.tsv", "".join(f"id{i}\t红色T恤\r" for i in range(3)).encode(), ["CR-only line ends"]),
        ("T2I_train.img.tsv", "".join(f"{i}\t{img}\n" for i, img, _ in good_rows(3)).encode("utf-16"), ["UTF-16"]),
    ],
    ids=["gbk-captions", "utf16-captions", "cr-only-captions", "utf16-images"],
)
def test_files_in_another_encoding_are_refused(tmp_path, capsys, vqgan_ckpt, name, content, words):
    data_dir = write_dataset(tmp_path / "muge", good_rows(3))
    (data_dir / name).write_bytes(content)
    rc, err = run_prepare(capsys, data_dir, tmp_path / "out", vqgan_ckpt)
    assert_one_line_error(rc, err, name, *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_changed_settings_are_refused_and_a_finished_run_is_a_no_op(tmp_path, capsys, vqgan_ckpt):
    data_dir = write_dataset(tmp_path / "muge", good_rows(5))
    out = tmp_path / "out"
    assert run_prepare(capsys, data_dir, out, vqgan_ckpt)[0] == 0
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in OUTPUTS}
    rc, err = run_prepare(capsys, data_dir, out, vqgan_ckpt)
    assert rc == 0 and "nothing to do" in err
    assert before == {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in OUTPUTS}
    rc, err = run_prepare(capsys, data_dir, out, vqgan_ckpt, "--text_len", "16", "--resize", "crop")
    assert_one_line_error(rc, err, "changed: resize, text_len")
    os.utime(data_dir / "T2I_train.text.tsv", ns=(1, 1))  # an input replaced since
    rc, err = run_prepare(capsys, data_dir, out, vqgan_ckpt)
    assert_one_line_error(rc, err, "changed: inputs")
    assert before == {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in OUTPUTS}


def test_an_out_dir_that_is_not_a_prepare_output_is_refused(tmp_path, capsys, vqgan_ckpt):
    data_dir = write_dataset(tmp_path / "muge", good_rows(3))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err = run_prepare(capsys, data_dir, out, vqgan_ckpt)
    assert_one_line_error(rc, err, str(out), "not a prepare.py output")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an empty folder is fine
    assert run_prepare(capsys, data_dir, out, vqgan_ckpt)[0] == 0 and (out / "meta.json").is_file()


def _read_only_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out"


def _truncated_ckpt(tmp_path: Path, ckpt: Path) -> Path:
    path = tmp_path / "truncated.pt"
    path.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return path


def _pad_not_zero(tmp_path: Path) -> Path:
    folder = tmp_path / "vocab"
    folder.mkdir()
    write_vocab(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "红", "色"], folder / "vocab.txt")
    return folder


@pytest.mark.parametrize(
    "case, words",
    [
        ("out_dir is a file", ["exists and is not a prepare.py output"]),
        ("broken meta.json", ["meta.json is not valid JSON", "delete"]),
        ("out_dir under a file", ["Not a directory"]),
        ("read-only parent", ["Permission denied"]),
        ("truncated checkpoint", ["truncated.pt", "not a readable PyTorch checkpoint"]),
        ("misspelt tokenizer", ["bert-base-chinesse", "cannot load the tokenizer"]),
        ("padding id not 0", ["pads with id 1", "padding id 0"]),
    ],
)
def test_problems_are_one_line_errors_not_tracebacks(tmp_path, capsys, vqgan_ckpt, monkeypatch, case, words):
    data_dir = write_dataset(tmp_path / "muge", good_rows(2))
    out, ckpt, extra = tmp_path / "out", vqgan_ckpt, []
    if case == "out_dir is a file":
        out.write_text("")
    elif case == "broken meta.json":
        out.mkdir()
        (out / "meta.json").write_text('{"image_size": 2')
    elif case == "out_dir under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    elif case == "read-only parent":
        if os.geteuid() == 0:
            pytest.skip("running as root, which writes into read-only folders: permissions cannot fail here")
        out = _read_only_dir(tmp_path)
    elif case == "truncated checkpoint":
        ckpt = _truncated_ckpt(tmp_path, vqgan_ckpt)
    elif case == "misspelt tokenizer":
        # Offline, as a user without network would be; also keeps the test from waiting on retries.
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        extra = ["--text_tokenizer", "bert-base-chinesse"]
    elif case == "padding id not 0":
        extra = ["--text_tokenizer", str(_pad_not_zero(tmp_path))]
    rc, err = run_prepare(capsys, data_dir, out, ckpt, *extra)
    assert_one_line_error(rc, err, *words)
    assert not (tmp_path / "out.partial").exists()


# --- workers and interruptions ------------------------------------------------------------------------------------


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
    assert_same_outputs(tmp_path / "workers", tmp_path / "inline")
    meta = json.loads((tmp_path / "inline" / "meta.json").read_text())
    assert meta["rejects"] == {"image rejected": 2, "invalid base64": 1, "truncated or corrupt image": 1}


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def start_prepare(argv: list[str], stderr: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with open(stderr, "w") as err:
        return subprocess.Popen([sys.executable, "prepare.py", *argv], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def wait_for(child: subprocess.Popen, ready, what: str, seconds: float = 120) -> None:
    """Poll until `ready()`; fail if the child ends first (it was meant to be stopped partway)."""
    deadline = time.monotonic() + seconds
    while not ready():
        if child.poll() is not None:
            pytest.fail(f"prepare ended (exit {child.returncode}) before {what}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"prepare did not reach {what} in {seconds} s")
        time.sleep(0.005)


def test_kill_9_then_rerun_gives_the_same_bytes(tmp_path, capsys, vqgan_ckpt):
    # Outputs reach the disk a file block at a time (32 rows of 128 bytes of codes in a 4 KB block): enough rows
    # that the first block is written with dozens of rows to go.
    n = 2 * max(4096, os.stat(tmp_path).st_blksize) // (2 * 64) + 36
    rows = many_rows(n)
    rows[4] = (rows[4][0], "@@@@", rows[4][2])  # rejects before and after the kill
    rows[n - 10] = (rows[n - 10][0], "@@@@", rows[n - 10][2])
    data_dir = write_dataset(tmp_path / "muge", rows)
    write_dataset(data_dir, good_rows(6, prefix="v", seed=40), split="val")
    out = tmp_path / "out"
    argv = prepare_argv(data_dir, out, vqgan_ckpt)
    child = start_prepare(argv, tmp_path / "stderr")
    written = out.with_name("out.partial") / "train.img.bin"
    try:
        # The uninterrupted run to compare with, while the child starts up (importing torch takes a while).
        assert run_prepare(capsys, data_dir, tmp_path / "reference", vqgan_ckpt)[0] == 0
        wait_for(child, lambda: written.is_file() and written.stat().st_size > 0, "writing train.img.bin")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not out.exists()  # nothing looks finished: no out_dir, so no meta.json
    assert 0 < written.stat().st_size < (tmp_path / "reference" / "train.img.bin").stat().st_size  # partway

    # The same command again (as the user would type it; meta.json records it) does the job from scratch.
    assert prepare.main(argv) == 0, capsys.readouterr().err
    assert not out.with_name("out.partial").exists()
    assert_same_outputs(out, tmp_path / "reference")
    assert read_split(out, "train")[0][:4] == ["id0", "id1", "id2", "id3"]


def test_a_killed_decode_worker_ends_the_run_with_a_message(tmp_path, vqgan_ckpt):
    data_dir = write_dataset(tmp_path / "muge", many_rows(100))
    out = tmp_path / "out"
    argv = prepare_argv(data_dir, out, vqgan_ckpt)
    argv[argv.index("--num_workers") + 1] = "1"
    child = start_prepare(argv, tmp_path / "stderr")
    try:
        # train.img.bin is opened once the workers run and the model is loaded: decoding is under way.
        wait_for(child, lambda: (out.with_name("out.partial") / "train.img.bin").is_file(), "decoding")
        workers = children(child.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        try:
            rc = child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("prepare hangs after its decode worker was killed")
        assert time.monotonic() - killed <= 10
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    err = (tmp_path / "stderr").read_text()
    assert rc == 1 and "Traceback" not in err, err
    assert "prepare.py: error: " in err and "worker process (image decoding) died" in err
    assert not out.exists() and not out.with_name("out.partial").exists()
