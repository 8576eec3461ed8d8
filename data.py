"""Reading MUGE-style TSVs (`img_id \\t caption` or `img_id \\t base64 image`) and turning images into square RGB
arrays. prepare.py, generate.py and evaluate.py all read through here, so a row reads the same everywhere."""

import base64
import binascii
import contextlib
import io
import json
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from text import has_text
from utils import UserError

BOM = b"\xef\xbb\xbf"
# MUGE images are about 100 KB of base64; a line this long is a broken file (a missing newline), and reading it
# whole would defeat the bounded memory of streaming.
MAX_LINE_BYTES = 64 * 1024 * 1024
# The formats product photos come in. Pillow's other plugins (EPS runs Ghostscript, for one) never see an
# untrusted row.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# What decoding one image may cost, per worker: about twice its decoded pixels (the decoder's copy and one
# conversion) plus the RGB result. 40 M RGB pixels, or a 16-bit grey image of 55 M, fit.
MAX_DECODE_MB = 384
RESIZE_MODES = ("pad", "crop")
# prepare.py --flip stores a mirrored training picture under its img_id with this suffix
FLIP_SUFFIX = "#flip"
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# Errors of a whole line: the img_id read from such a line cannot be trusted either.
LINE_ERRORS = frozenset({"line too long", "malformed line", "bad img_id", "empty img_id"})


class BadRowError(ValueError):
    """A row that cannot be used. `reason` is a short fixed phrase (for counting); `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail

    def __reduce__(self) -> tuple:
        # Exceptions pickle their message only; decode workers send reason and detail back apart.
        return BadRowError, (self.reason, self.detail)


class TsvRow(NamedTuple):
    line_no: int  # 1-based physical line, blank lines included, so `sed -n <line_no>p` shows it
    img_id: str
    value: bytes  # the rest of the line after the first tab, stripped; empty when `error` is set
    error: BadRowError | None


class TextRow(NamedTuple):
    line_no: int
    img_id: str
    caption: str  # stripped of surrounding whitespace; a tab inside it becomes a space
    error: BadRowError | None


def read_tsv(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[TsvRow]:
    """Stream the rows of a two-column TSV, one line in memory at a time; blank lines, BOMs and CRs are dropped.

    A bad line comes back with `error` set, so that it costs one row; UTF-16 or CR-only files are a UserError."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise UserError(f"{path} is UTF-16: convert it to UTF-8, e.g. `iconv -f UTF-16 -t UTF-8`")
        # A CR before the end with no LF anywhere: CR-only line ends, in a small file (wholly in `head`) too.
        if b"\n" not in head and b"\r" in head.rstrip(b"\r"):
            raise UserError(f"{path} has CR-only line ends: convert them, e.g. `tr '\\r' '\\n'`")
        f.seek(0)
        line_no = 0
        while line := f.readline(max_line_bytes + 1):
            line_no += 1
            if len(line) > max_line_bytes:
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                error = BadRowError("line too long", f"more than {max_line_bytes} bytes")
                yield TsvRow(line_no, _printable_id(line.split(b"\t", 1)[0]), b"", error)
                continue
            line = line.removeprefix(BOM).rstrip(b"\r\n")
            if line.strip():
                yield _split_row(line, line_no)


def _split_row(line: bytes, line_no: int) -> TsvRow:
    raw_id, tab, value = line.partition(b"\t")

    def bad(*reason: str) -> TsvRow:
        return TsvRow(line_no, _printable_id(raw_id), b"", BadRowError(*reason))

    if not tab:
        return bad("malformed line", "no tab after the img_id")
    try:
        img_id = raw_id.decode("utf-8").strip()
    except UnicodeDecodeError:
        return bad("bad img_id", "not UTF-8")
    if not img_id:
        return TsvRow(line_no, "", b"", BadRowError("empty img_id"))
    # A line break (\r, U+2028, \x1c, ...) inside an id would split its line in every list of ids written.
    if not img_id.isprintable():
        return bad("bad img_id", "control or line-break characters")
    return TsvRow(line_no, img_id, value.strip(), None)


def _printable_id(field: bytes) -> str:
    # For reports only: whatever stands where the img_id should be, short and on one line.
    text = field[:64].decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def read_text_tsv(path: str | os.PathLike) -> Iterator[TextRow]:
    """Stream `img_id \\t caption` rows with captions decoded; empty or undecodable captions carry an error.

    A file of which most lines are not UTF-8 is in another encoding: a UserError once it has been read."""
    rows = undecodable = first_bad = 0
    for row in read_tsv(path):
        rows += 1
        caption, error = "", row.error
        if error is None:
            try:
                caption = row.value.decode("utf-8").replace("\t", " ").strip()
                error = None if caption else BadRowError("empty caption")
            except UnicodeDecodeError as e:
                undecodable += 1
                first_bad = first_bad or row.line_no
                error = BadRowError("caption is not UTF-8", str(e))
        yield TextRow(row.line_no, row.img_id, caption, error)
    if undecodable > rows / 2:
        raise UserError(f"{path}: {undecodable} of {rows} captions are not UTF-8 (the first on line {first_bad}): "
                        "the file is in another encoding, GBK or GB18030 most likely; convert it, e.g. "
                        "`iconv -f GB18030 -t UTF-8`")


def read_captions(path: str | os.PathLike) -> tuple[dict[str, TextRow], list[tuple[int, str, BadRowError]]]:
    """All caption rows by img_id (the first of a repeated id wins), and the rejected rows in file order.

    A rejected caption is kept in the dict too, so that its image row can say why it has no caption."""
    captions: dict[str, TextRow] = {}
    rejects: list[tuple[int, str, BadRowError]] = []
    for row in read_text_tsv(path):
        error = row.error
        if error is None and not has_text(row.caption):
            error = BadRowError("empty caption", "nothing but spaces and control characters")
        whole_line = error is not None and error.reason in LINE_ERRORS  # its img_id cannot be trusted
        if not whole_line and row.img_id in captions:
            error = BadRowError("duplicate img_id", f"first at line {captions[row.img_id].line_no}")
        elif not whole_line:
            captions[row.img_id] = row._replace(error=error)
        if error is not None:
            rejects.append((row.line_no, row.img_id, error))
    return captions, rejects


# --- images ----------------------------------------------------------------------------------------------------


def decode_base64(field: bytes) -> bytes:
    """Standard or URL-safe base64, with or without its `=` padding."""
    data = field.strip().translate(_URLSAFE_TO_STANDARD)
    if not data:
        raise BadRowError("empty image field")
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except binascii.Error as e:
        raise BadRowError("invalid base64", str(e)) from None


# Pillow reports truncated and corrupt files with all of these, depending on the format.
_PILLOW_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def open_image(data: bytes, max_decode_mb: float = MAX_DECODE_MB) -> Image.Image:
    """Encoded image bytes -> a fully decoded RGB image, EXIF orientation applied, transparency over white."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it; our own memory bound below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadRowError("decompression bomb", str(e)) from None
    except UnidentifiedImageError:
        raise BadRowError("not an image", f"{len(data)} bytes in none of {', '.join(IMAGE_FORMATS)}") from None
    except _PILLOW_READ_ERRORS as e:
        raise BadRowError("truncated or corrupt image", str(e) or type(e).__name__) from None
    width, height = image.size
    bits = 1 if image.mode == "1" else 16 if "16" in image.mode else 32 if image.mode in ("I", "F") else 8
    needs_mb = width * height * (2 * bits * len(image.getbands()) / 8 + 3) / 2**20
    if needs_mb > max_decode_mb:
        raise BadRowError("decompression bomb", f"{width}x{height} {image.mode} pixels would take {needs_mb:.0f} MB "
                          f"to decode, more than {max_decode_mb:g}")
    try:
        image.load()
    except _PILLOW_READ_ERRORS as e:
        raise BadRowError("truncated or corrupt image", str(e) or type(e).__name__) from None
    with contextlib.suppress(Exception):  # a corrupt EXIF block should not cost a good picture: keep it as stored
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha and transparency composited on white, 16-bit scaled down, CMYK converted."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _to_8bit_gray(image)
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise BadRowError("unsupported image mode", f"{image.mode}: {e}") from None


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips 16-bit values at 255 instead of scaling them: integers are taken as 16-bit
    # (65535 -> 255, rounded in integers), floats as 0..255. In strips of rows, so temporaries stay small.
    gray = np.empty((image.height, image.width), dtype=np.uint8)
    for top in range(0, image.height, 256):
        values = np.asarray(image.crop((0, top, image.width, min(top + 256, image.height))))
        if image.mode == "F":
            gray[top : top + len(values)] = np.clip(np.round(values), 0, 255)
        else:
            quotient, remainder = np.divmod(values, 257)
            gray[top : top + len(values)] = np.clip(quotient + (remainder >= 129), 0, 255)
    return Image.fromarray(gray)


def fit_to_square(image: Image.Image, size: int, resize: str = "pad") -> Image.Image:
    """An RGB image as `size` x `size` (one that already is stays untouched). "pad" scales the longer side to `size`
    and fills the rest with the median colour of the edges beside it; "crop" scales the shorter side, cuts the centre.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, not {resize!r}")
    width, height = image.size
    if (width, height) == (size, size):
        return image
    if resize == "crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
    scale = size / max(width, height)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    image = image.resize((new_width, new_height), Image.Resampling.LANCZOS)
    pixels = np.asarray(image)
    edges = (pixels[:, 0], pixels[:, -1]) if new_width < size else (pixels[0], pixels[-1])
    median = np.median(np.concatenate(edges), axis=0)
    canvas = Image.new("RGB", (size, size), tuple(int(v) for v in np.round(median)))
    canvas.paste(image, ((size - new_width) // 2, (size - new_height) // 2))
    return canvas


def image_from_base64(field: bytes, size: int, resize: str = "pad", max_decode_mb: float = MAX_DECODE_MB
                      ) -> np.ndarray:
    """A base64 image field -> uint8 [size, size, 3], exactly as prepare.py feeds the VQGAN; raises BadRowError."""
    image = fit_to_square(open_image(decode_base64(field), max_decode_mb), size, resize)
    return np.asarray(image, dtype=np.uint8)


# --- prepare.py's outputs --------------------------------------------------------------------------------------


def read_meta(data_dir: str | os.PathLike) -> dict:
    """A prepare.py output dir's meta.json, checked for what train.py and evaluate.py read from it."""
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise UserError(f"data dir {data_dir} does not exist: run prepare.py first, or pass --data_dir")
    if not path.is_file():
        raise UserError(f"{data_dir} has no meta.json, so it is not a prepare.py output dir: run prepare.py "
                        f"--out_dir {data_dir}, or pass the right --data_dir")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    expected = {"code_grid": list, "codebook_size": int, "text_len": int, "tokenizer": str, "image_size": int}
    wrong = [key for key, kind in expected.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        raise UserError(f"{path}: {', '.join(wrong)} missing or of the wrong type; run prepare.py again")
    return meta


def open_split(data_dir: str | os.PathLike, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The (codes [N, rows*cols], text ids [N, text_len]) memmaps of a split, or None when it has no rows."""
    rows, cols = meta["code_grid"]
    counts, arrays = [], []
    for kind, width in (("img", rows * cols), ("txt", meta["text_len"])):
        path = Path(data_dir) / f"{split}.{kind}.bin"
        if not path.is_file():
            raise UserError(f"{path} is missing: run prepare.py again for {data_dir}")
        size = path.stat().st_size
        if size % (2 * width):
            raise UserError(f"{path}: {size} bytes is not a whole number of uint16 rows of {width}")
        counts.append(size // (2 * width))
        arrays.append(np.memmap(path, dtype=np.uint16, mode="r", shape=(counts[-1], width)) if counts[-1] else None)
    if counts[0] != counts[1]:
        raise UserError(f"{data_dir}: {split}.img.bin and {split}.txt.bin hold different numbers of rows")
    return (arrays[0], arrays[1]) if counts[0] else None  # an empty file cannot be memory-mapped


def check_ids(data_dir: str | os.PathLike, split: str, data: tuple[np.ndarray, np.ndarray], codebook_size: int,
              text_vocab_size: int) -> None:
    """Out-of-range ids would crash deep inside an embedding lookup; catch them here by row."""
    for kind, array, limit in (("img", data[0], codebook_size), ("txt", data[1], text_vocab_size)):
        row_max = array.max(axis=1)
        if row_max.max() >= limit:
            row = int(np.argmax(row_max >= limit))
            what = "codebook_size" if kind == "img" else "the text encoder's vocab size"
            raise UserError(f"{data_dir}/{split}.{kind}.bin row {row}: id {row_max[row]} >= {what} {limit}; the data "
                            "and meta.json disagree, run prepare.py again")
