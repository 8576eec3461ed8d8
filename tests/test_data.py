"""data.py: reading MUGE TSVs and decoding their images, exactly as prepare.py, generate.py and evaluate.py do."""

import base64
import contextlib
import io
import json
import multiprocessing
import resource
import struct
import zlib

import numpy as np
import pytest
from conftest import TINY_F4_SIZE as SIZE
from conftest import encoded, random_image, write_lines
from PIL import EpsImagePlugin, Image

import data
from data import (
    BadRowError,
    decode_base64,
    image_from_base64,
    open_image,
    read_captions,
    read_text_tsv,
    read_tsv,
)
from utils import UserError


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size and holds almost nothing: what a decompression bomb looks like on open."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(
        b"IEND", b"")


def gray16_png(side: int) -> bytes:
    """A side x side 16-bit greyscale PNG written row by row, so making it never holds the pixels: a bright band
    on the left, black elsewhere."""
    row = b"\x00" + b"\xea\x60" * (side // 8) + b"\x00\x00" * (side - side // 8)
    z = zlib.compressobj(1)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# A minimal EPS document: Pillow's EPS plugin would accept it and run Ghostscript to draw it.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n0 0 moveto 10 10 lineto stroke\n%%EOF\n"


# --- reading TSVs ----------------------------------------------------------------------------------------------


def test_tsv_reading_handles_bom_crlf_blank_lines_and_concatenated_files(tmp_path):
    path = tmp_path / "t.tsv"
    write_lines(path, ["a\tone", "", "b\ttwo  ", "  ", "c\tthree\textra", "\tno id", "d\tfour", "notab"], "\r\n",
                bom=True)
    path.write_bytes(path.read_bytes() + b"\xef\xbb\xbfe\tfive\r\n")  # a second file appended, with its own BOM
    rows = list(read_tsv(path))
    assert [(r.line_no, r.img_id, r.value) for r in rows if r.error is None] == [
        (1, "a", b"one"),
        (3, "b", b"two"),
        (5, "c", b"three\textra"),  # the first tab splits; the rest is the value
        (7, "d", b"four"),
        (9, "e", b"five"),  # the BOM does not cost the row
    ]
    assert [(r.line_no, r.error.reason) for r in rows if r.error] == [(6, "empty img_id"), (8, "malformed line")]


def test_overlong_line_is_one_rejected_row(tmp_path):
    path = tmp_path / "t.tsv"
    write_lines(path, ["a\t" + "x" * 5000, "b\tfine"])
    rows = list(read_tsv(path, max_line_bytes=1000))
    assert [(r.line_no, r.img_id, r.error and r.error.reason) for r in rows] == [
        (1, "a", "line too long"),
        (2, "b", None),
    ]


def test_img_ids_with_control_or_line_break_characters_are_bad(tmp_path):
    # Each would split its line in train.ids.txt for some reader (\r, str.splitlines on U+2028, \x1c, \x85).
    path = tmp_path / "t.tsv"
    bad = ["a\rb", "a\u2028b", "a\x1cb", "a\x85b", "a\x00b"]
    path.write_bytes("".join(f"{i}\tvalue\n" for i in [*bad, "ok"]).encode("utf-8") + b"raw\x85\tvalue\n")
    rows = list(read_tsv(path))
    assert [(r.line_no, r.error and r.error.reason) for r in rows] == [
        *[(n, "bad img_id") for n in range(1, 6)],
        (6, None),
        (7, "bad img_id"),  # not UTF-8
    ]
    assert all(r.img_id.isprintable() and r.value == b"" for r in rows if r.error)  # safe to write in rejects.tsv


def test_captions_keep_spaces_tabs_and_full_width_punctuation(tmp_path):
    path = tmp_path / "t.tsv"
    write_lines(path, ["a\t  abercrombie fitch 【新款】！T恤\u3000", "b\t\u3000 ", "c\t", "d\t红色\tT恤 "])
    rows = list(read_text_tsv(path))
    assert rows[0].caption == "abercrombie fitch 【新款】！T恤" and rows[0].error is None
    assert [r.error.reason for r in rows[1:3]] == ["empty caption", "empty caption"]
    assert (rows[3].caption, rows[3].error) == ("红色 T恤", None)  # a tab inside a caption is a space
    path.write_bytes(b"a\t\xff\xfe broken\nb\tfine\n")  # one bad line of two: that row only
    assert [r.error and r.error.reason for r in read_text_tsv(path)] == ["caption is not UTF-8", None]


def test_read_captions_first_id_wins_and_rejected_captions_stay_known(tmp_path):
    path = tmp_path / "t.tsv"
    write_lines(path, ["a\t红色T恤", "b\t\x01\x02", "a\t又一个", "notab", "c\t蓝色"])
    captions, rejects = read_captions(path)
    assert {k: (c.line_no, c.caption, c.error and c.error.reason) for k, c in captions.items()} == {
        "a": (1, "红色T恤", None),
        "b": (2, "\x01\x02", "empty caption"),  # kept, so that its image row can say why it has no caption
        "c": (5, "蓝色", None),
    }
    assert [(line, img_id, e.reason) for line, img_id, e in rejects] == [
        (2, "b", "empty caption"),
        (3, "a", "duplicate img_id"),
        (4, "notab", "malformed line"),
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ("a\t红色\nb\t蓝色\n".encode("utf-16"), "is UTF-16"),  # with its little-endian BOM
        (b"\xfe\xff" + "a\t红色\nb\t蓝色\n".encode("utf-16-be"), "is UTF-16"),
        (b"a\tone\rb\ttwo\rc\tthree\r", "CR-only line ends"),  # small: the whole file is one line
        (b"a\tone\r" * 20000, "CR-only line ends"),  # larger than the first read
    ],
    ids=["utf16-le", "utf16-be", "cr-only-small", "cr-only-large"],
)
def test_files_that_are_not_line_separated_utf8_are_refused(tmp_path, content, message):
    path = tmp_path / "t.tsv"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        list(read_tsv(path))


def test_a_single_row_ending_in_cr_is_not_cr_only(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_bytes(b"a\tone\r")
    assert [(r.img_id, r.value, r.error) for r in read_tsv(path)] == [("a", b"one", None)]


def test_a_gbk_captions_file_is_refused_naming_a_line(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_bytes(b"x\tascii only\n" + "".join(f"id{i}\t红色T恤 XL码 {i}号\n" for i in range(5)).encode("gbk"))
    with pytest.raises(UserError, match=r"5 of 6 captions are not UTF-8 \(the first on line 2\).*GBK"):
        list(read_text_tsv(path))


# --- images ------------------------------------------------------------------------------------------------------


def test_base64_standard_urlsafe_and_unpadded():
    raw = bytes(range(256)) * 3 + b"\xfb\xff"
    standard = base64.b64encode(raw)
    urlsafe = base64.urlsafe_b64encode(raw).rstrip(b"=")
    assert b"-" in urlsafe or b"_" in urlsafe
    assert decode_base64(standard) == decode_base64(urlsafe) == raw
    half = len(standard) // 2
    stray_tab = standard[:half] + b"\t" + standard[half:]  # not silently joined back together
    for field, reason in [(b"", "empty image field"), (b"@@@@", "invalid base64"), (b"abcde", "invalid base64"),
                          (stray_tab, "invalid base64")]:
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
    # Every 16-bit value, in more rows than one conversion strip: scaled (65535 -> 255, not clipped at 255) and
    # rounded to nearest, exactly as float division would.
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    image16 = Image.fromarray(np.concatenate([values, values[:44]]))
    assert image16.mode == "I;16"
    pixels = np.asarray(open_image(encoded(image16)))
    expected = np.round(values.astype(np.float64) / 257).astype(np.uint8)
    assert pixels.shape == (300, 256, 3) and (pixels == pixels[..., :1]).all()
    assert np.array_equal(pixels[:256, :, 0], expected) and np.array_equal(pixels[256:, :, 0], expected[:44])


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
    "payload, max_decode_mb, reason",
    [
        (b"hello, not an image", 384, "not an image"),
        (encoded(random_image(1))[:300], 384, "truncated or corrupt image"),
        (encoded(random_image(1), "JPEG")[:400], 384, "truncated or corrupt image"),
        (encoded(Image.new("L", (100, 100))), 0.01, "decompression bomb"),  # our cap
        (png_header_only(20000, 20000), 10**6, "decompression bomb"),  # Pillow's own DecompressionBombError
    ],
    ids=["garbage", "truncated-png", "truncated-jpeg", "max-decode-mb", "pillow-bomb"],
)
def test_unusable_images_raise_bad_row(payload, max_decode_mb, reason):
    with pytest.raises(BadRowError) as e:
        open_image(payload, max_decode_mb)
    assert e.value.reason == reason


def test_the_decode_bound_counts_bytes_not_pixels():
    # The same 256 x 256 pixels: 5 bytes each to decode as 8-bit grey, 7 as 16-bit grey, 11 as RGBA. A bound
    # of 0.5 MB (8 bytes a pixel) lets the greys through and stops the RGBA; a pixel count could not.
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    gray8 = encoded(Image.fromarray(pixels))
    gray16 = encoded(Image.fromarray(pixels.astype(np.uint16) * 257))
    rgba = encoded(Image.fromarray(np.stack([pixels] * 4, axis=-1), "RGBA"))
    assert np.array_equal(np.asarray(open_image(gray8, 0.5))[..., 0], pixels)
    assert np.array_equal(np.asarray(open_image(gray16, 0.5))[..., 0], pixels)
    with pytest.raises(BadRowError, match="256x256 RGBA pixels would take 1 MB") as e:
        open_image(rgba, 0.5)
    assert e.value.reason == "decompression bomb"
    assert open_image(rgba, 0.7).size == (256, 256)


@pytest.mark.parametrize("payload", [EPS, encoded(random_image(1), "PPM"), encoded(random_image(1), "ICO")],
                         ids=["eps", "ppm", "ico"])
def test_formats_outside_the_allow_list_are_not_images(monkeypatch, payload):
    # Pillow's EPS plugin hands the file to Ghostscript: an untrusted row must never reach it.
    Image.init()
    calls = []
    factory, accept = Image.OPEN["EPS"]
    monkeypatch.setitem(Image.OPEN, "EPS", (factory, lambda prefix: calls.append("accept") or accept(prefix)))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: calls.append("open"))
    with pytest.raises(BadRowError) as e:
        open_image(payload)
    assert e.value.reason == "not an image" and calls == []
    # Without the allow-list Pillow would take each of them: the EPS would reach its plugin.
    if payload is EPS:
        with contextlib.suppress(Exception):
            Image.open(io.BytesIO(payload))
        assert "open" in calls
    else:
        assert Image.open(io.BytesIO(payload)).format in ("PPM", "ICO")


def _decode_peak_gib(field: bytes, conn) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels = image_from_base64(field, SIZE)
    conn.send(((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20, pixels))


def test_a_large_16_bit_image_decodes_in_bounded_memory():
    # 6300 x 6300 16-bit grey: 79 MB of pixels, under the default bound (about 265 MB by data's own formula).
    # Float64 copies of it (the old scaling) took over 1 GB; the bound promises about twice the pixels plus
    # the RGB copy. Measured in a forked child, whose peak RSS starts at its size at the fork.
    field = base64.b64encode(gray16_png(6300))
    assert data.MAX_DECODE_MB > 6300 * 6300 * 7 / 2**20
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_decode_peak_gib, args=(field, send))
    child.start()
    assert receive.poll(60), "the decoding child sent nothing"
    peak_gib, pixels = receive.recv()
    child.join(10)
    assert child.exitcode == 0
    assert peak_gib * 2**30 <= 0.5e9, f"decoding took {peak_gib:.2f} GiB more"
    assert pixels.shape == (SIZE, SIZE, 3) and pixels[:, :2].min() >= 200 and pixels[:, 8:].max() == 0


def test_reading_back_a_prepare_output_names_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="does not exist: run prepare.py first"):
        data.read_meta(tmp_path / "nowhere")
    with pytest.raises(UserError, match="has no meta.json"):
        data.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"code_grid": [2, 2],')
    with pytest.raises(UserError, match=r"meta.json:1: not valid JSON"):
        data.read_meta(tmp_path)
    meta = {"code_grid": [2, 2], "codebook_size": 16, "text_len": 3, "tokenizer": "vocab.txt", "image_size": "8"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="image_size missing or of the wrong type"):
        data.read_meta(tmp_path)
    meta["image_size"] = 8
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert data.read_meta(tmp_path) == meta

    codes = np.arange(12, dtype=np.uint16).reshape(3, 4)
    codes.tofile(tmp_path / "train.img.bin")
    np.ones((3, 3), dtype=np.uint16).tofile(tmp_path / "train.txt.bin")
    split = data.open_split(tmp_path, "train", meta)
    assert np.array_equal(split[0], codes) and split[1].shape == (3, 3)
    for kind in ("img", "txt"):
        (tmp_path / f"val.{kind}.bin").write_bytes(b"")
    assert data.open_split(tmp_path, "val", meta) is None  # an empty split
    with pytest.raises(UserError, match=r"row 2: id 11 >= codebook_size 10"):
        data.check_ids(tmp_path, "train", split, codebook_size=10, text_vocab_size=5)
    (tmp_path / "val.txt.bin").write_bytes(b"\0" * 6)
    with pytest.raises(UserError, match="different numbers of rows"):
        data.open_split(tmp_path, "val", meta)
    (tmp_path / "val.img.bin").write_bytes(b"\0" * 5)
    with pytest.raises(UserError, match="5 bytes is not a whole number of uint16 rows of 4"):
        data.open_split(tmp_path, "val", meta)
    (tmp_path / "val.img.bin").unlink()
    with pytest.raises(UserError, match="val.img.bin is missing"):
        data.open_split(tmp_path, "val", meta)
