"""Reading MUGE-style TSVs and turning their base64 images into square RGB arrays.

The rules here are the ones prepare.py applies to every training image; generate.py and evaluate.py use the
same functions so that a prompt file or a real validation image is read exactly as prepare read it.

A MUGE TSV has one row per line, `img_id \\t value`, where the value is a caption (`*.text.tsv`) or a base64
image (`*.img.tsv`). Files may start with a UTF-8 BOM, use CRLF line ends and hold blank lines.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import struct
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BOM = b"\xef\xbb\xbf"
# MUGE images are about 100 KB of base64; a line this long is a broken file (a missing newline), and reading it
# whole would defeat the bounded memory of streaming.
MAX_LINE_BYTES = 64 * 1024 * 1024
# Decoded pixels are held per worker: 40 M RGB pixels are 120 MB. Far above any product photo.
MAX_IMAGE_PIXELS = 40_000_000
RESIZE_MODES = ("pad", "crop")
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# Errors of a whole line: the img_id read from such a line cannot be trusted either.
LINE_ERRORS = frozenset({"line too long", "malformed line", "img_id is not UTF-8", "empty img_id"})


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
    value: bytes  # the second field, stripped; empty when `error` is set
    error: BadRowError | None
    end_offset: int  # byte offset just past this line: where to resume reading


class TextRow(NamedTuple):
    line_no: int
    img_id: str
    caption: str  # stripped of surrounding whitespace
    error: BadRowError | None


def read_tsv(
    path: str | os.PathLike, start_offset: int = 0, start_line: int = 0, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[TsvRow]:
    """Stream the rows of a two-column TSV, one line in memory at a time; blank lines are skipped.

    Unusable lines come back with `error` set instead of raising, so that one bad line costs one row. To resume,
    pass a row's `end_offset` and `line_no` as `start_offset` and `start_line`.
    """
    with open(path, "rb") as f:
        f.seek(start_offset)
        line_no = start_line
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            line_no += 1
            too_long = len(line) > max_line_bytes
            if too_long:
                _skip_rest_of_line(f)
            if line_no == 1 and line.startswith(BOM):
                line = line[len(BOM) :]
            end_offset = f.tell()
            if too_long:
                error = BadRowError("line too long", f"more than {max_line_bytes} bytes")
                yield TsvRow(line_no, _printable_id(line.split(b"\t", 1)[0]), b"", error, end_offset)
                continue
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            yield _split_row(line, line_no, end_offset)


def read_text_tsv(path: str | os.PathLike) -> Iterator[TextRow]:
    """Stream `img_id \\t caption` rows with captions decoded; empty or undecodable captions carry an error."""
    for row in read_tsv(path):
        if row.error is not None:
            yield TextRow(row.line_no, row.img_id, "", row.error)
            continue
        try:
            caption = row.value.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            yield TextRow(row.line_no, row.img_id, "", BadRowError("caption is not UTF-8", str(e)))
            continue
        error = None if caption else BadRowError("empty caption")
        yield TextRow(row.line_no, row.img_id, caption, error)


def _split_row(line: bytes, line_no: int, end_offset: int) -> TsvRow:
    fields = line.split(b"\t")
    if len(fields) != 2:
        error = BadRowError("malformed line", f"expected img_id<TAB>value, found {len(fields)} field(s)")
        return TsvRow(line_no, _printable_id(fields[0]), b"", error, end_offset)
    try:
        img_id = fields[0].decode("utf-8").strip()
    except UnicodeDecodeError:
        return TsvRow(line_no, _printable_id(fields[0]), b"", BadRowError("img_id is not UTF-8"), end_offset)
    if not img_id:
        return TsvRow(line_no, "", b"", BadRowError("empty img_id"), end_offset)
    return TsvRow(line_no, img_id, fields[1].strip(), None, end_offset)


def _skip_rest_of_line(f: io.BufferedReader) -> None:
    while chunk := f.readline(1 << 20):
        if chunk.endswith(b"\n"):
            return


def _printable_id(field: bytes) -> str:
    # For reports only: whatever stands where the img_id should be, short and on one line.
    return field[:64].decode("utf-8", errors="replace").strip().replace("\r", " ")


# --- images ----------------------------------------------------------------------------------------------------


def decode_base64(field: bytes) -> bytes:
    """Standard or URL-safe base64, with or without its `=` padding."""
    data = field.strip()
    if not data:
        raise BadRowError("empty image field")
    data = data.translate(_URLSAFE_TO_STANDARD)
    data += b"=" * (-len(data) % 4)
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise BadRowError("invalid base64", str(e)) from None


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded image bytes -> a fully decoded RGB image, EXIF orientation applied, transparency over white."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it; our own `max_pixels` check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadRowError("decompression bomb", str(e)) from None
    except UnidentifiedImageError:
        raise BadRowError("not an image", f"{len(data)} bytes in no format Pillow reads") from None
    except _PILLOW_READ_ERRORS as e:
        raise BadRowError("truncated or corrupt image", str(e) or type(e).__name__) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadRowError("decompression bomb", f"{width}x{height} pixels is more than {max_pixels}")
    try:
        image.load()
    except _PILLOW_READ_ERRORS as e:
        raise BadRowError("truncated or corrupt image", str(e) or type(e).__name__) from None
    return to_rgb(_apply_exif_orientation(image))


# Pillow reports truncated and corrupt files with all of these, depending on the format.
_PILLOW_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # A corrupt EXIF block should not cost a good picture: keep it as stored.
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha and transparency composited on white, 16-bit scaled down, CMYK converted."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _to_8bit_gray(image)
    if "transparency" in image.info and image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise BadRowError("unsupported image mode", f"{image.mode}: {e}") from None


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips 16-bit values at 255 instead of scaling them.
    # Float images have no agreed range: they are taken as 0..255. Integer ones as 16-bit: 65535 -> 255.
    values = np.asarray(image, dtype=np.float64)
    scaled = values if image.mode == "F" else values / 257.0
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))


def fit_to_square(image: Image.Image, size: int, resize: str = "pad") -> Image.Image:
    """An RGB image as `size` x `size`.

    "pad" scales the longer side to `size` and fills the rest with the picture's own background (the median
    colour of the edges next to the padding), so the whole product stays; "crop" scales the shorter side and
    cuts the centre square. An image that is already `size` x `size` is returned untouched (no resampling).
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
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.LANCZOS)
    if (new_width, new_height) == (size, size):
        return image
    canvas = Image.new("RGB", (size, size), _edge_colour(image, pad_sides=new_width < size))
    canvas.paste(image, ((size - new_width) // 2, (size - new_height) // 2))
    return canvas


def _edge_colour(image: Image.Image, pad_sides: bool) -> tuple[int, int, int]:
    pixels = np.asarray(image)
    edges = (pixels[:, 0], pixels[:, -1]) if pad_sides else (pixels[0], pixels[-1])
    median = np.median(np.concatenate(edges), axis=0)
    return tuple(int(v) for v in np.round(median))


def image_from_base64(field: bytes, size: int, resize: str = "pad", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A base64 image field -> uint8 [size, size, 3], exactly as prepare.py feeds the VQGAN; raises BadRowError."""
    image = fit_to_square(open_image(decode_base64(field), max_pixels), size, resize)
    return np.asarray(image, dtype=np.uint8)
