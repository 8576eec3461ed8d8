"""Draw a product picture for every caption: one `img_id \\t base64(PNG)` line per caption on stdout, in input order.

    python generate.py > T2I_test.tsv                             # the test prompts prepare.py found
    python generate.py --ckpt out/muge/ckpt.pt --batch_size 256 --cfg_scale 3 > T2I_test.tsv
    python generate.py --prompts my_titles.tsv --grid preview.png --out_dir pictures/ > my_titles.out.tsv
    python generate.py --prompt "红色连衣裙 夏季新款" --grid preview.png > /dev/null
    python generate.py --resume_from part.tsv > T2I_test.tsv      # after an interrupted `... > part.tsv`

Everything defaults to what the checkpoint recorded: the prompts (the data dir's T2I_test.text.tsv), the VQGAN
and the tokenizer. Only result lines reach stdout; warnings, progress and the summary go to stderr. The GPT
samples the next batch while the VQGAN decodes the previous one and worker processes encode the pictures.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import io
import math
import multiprocessing
import multiprocessing.pool
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import PreTrainedTokenizerBase

from data import read_tsv
from model import GPT, load_model
from prepare import make_pool, sha256_file
from text import has_text, load_tokenizer, tokenize_captions
from utils import Progress, autocast, pick_device, pick_dtype
from vqgan import VQGAN, CheckpointError, load_vqgan, tensor_to_images

DEFAULT_CKPT = "out/ckpt.pt"
OUTPUT_SIZE = 256  # MUGE submissions are 256x256 pictures
DEFAULT_CFG_SCALE = 3.0
DEFAULT_SEED = 1337
DEFAULT_BATCH_SIZE = 32
# The VQGAN decodes a batch in slices of this many images: its full-resolution activations are ~100 MB per
# 256 px image, far more than the GPT's KV cache, so a large sampling batch must not become one decode call.
DECODE_CHUNK = 16
ENCODE_WORKERS = max(1, min(8, (os.cpu_count() or 2) - 1))
GRID_CELL = 256  # px per picture on the contact sheet, whatever size the pictures are written at
WARNINGS_SHOWN = 10  # per kind; the summary counts them all
PNG_SIGNATURE, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"


class GenerateError(Exception):
    """A problem the user can fix; main() prints it as one line."""


@dataclass
class Prompt:
    img_id: str
    caption: str
    where: str  # "file:line", for messages


class Report:
    """Warnings on stderr, the first few of each kind in full, and a count of every kind for the summary."""

    def __init__(self, shown: int = WARNINGS_SHOWN):
        self.shown = shown
        self.counts: Counter[str] = Counter()

    def warn(self, where: str, kind: str, detail: str = "") -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= self.shown:
            print(f"{where}: {kind}{': ' + detail if detail else ''}", file=sys.stderr)
        elif self.counts[kind] == self.shown + 1:
            print(f"(further '{kind}' warnings are counted in the summary, not shown)", file=sys.stderr)


@dataclass
class Timings:
    """Seconds spent in each stage; they overlap, so they add up to more than the wall time."""

    sampling: float = 0.0
    decoding: float = 0.0
    encoding: float = 0.0  # summed over the encoding processes


# ----------------------------------------------------------------------------------------------------------
# prompts


def read_prompts(path: str | os.PathLike, report: Report) -> list[Prompt]:
    """The `img_id \\t caption` rows of a prompts TSV, in file order.

    Nothing that names an image is dropped: an empty caption stays (it is drawn unconditionally) and undecodable
    bytes are replaced by U+FFFD. A line that names no usable img_id (no tab, too many tabs, an empty or
    undecodable id) cannot be answered and is reported and skipped.
    """
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    for row in read_tsv(path):
        where = f"{path}:{row.line_no}"
        if row.error is not None:
            report.warn(where, "skipped line", str(row.error))
            continue
        try:
            caption = row.value.decode("utf-8")
        except UnicodeDecodeError as e:
            caption = row.value.decode("utf-8", errors="replace")
            report.warn(where, "caption is not UTF-8", f"{e.reason} at byte {e.start}; replaced by U+FFFD")
        caption = caption.strip()
        if not has_text(caption):
            report.warn(where, "empty caption", f"{row.img_id} is drawn unconditionally")
        if row.img_id in first_line:
            report.warn(where, "duplicate img_id",
                        f"{row.img_id} (first at line {first_line[row.img_id]}); each line gets its own picture")
        else:
            first_line[row.img_id] = row.line_no
        prompts.append(Prompt(row.img_id, caption, where))
    return prompts


def caption_ids(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], text_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """text.tokenize_captions, except that a caption with no text becomes all padding: the model's null caption.

    (The tokenizer would give it [CLS] [SEP], a caption the model never saw in training.)
    """
    ids, counts = tokenize_captions(tokenizer, captions, text_len)
    for i, caption in enumerate(captions):
        if not has_text(caption):
            ids[i] = 0
    return ids, counts


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], text_len: int, report: Report
               ) -> np.ndarray:
    ids, counts = caption_ids(tokenizer, [p.caption for p in prompts], text_len)
    for prompt, count in zip(prompts, counts, strict=True):
        if count > text_len:
            report.warn(prompt.where, "caption truncated",
                        f"{prompt.img_id}: {count} tokens, the model reads the first {text_len}")
    return ids


# ----------------------------------------------------------------------------------------------------------
# sampling and decoding


def batch_seed(seed: int, batch_index: int) -> int:
    """Each batch draws from its own stream, so that a resumed run samples its batches as an unbroken one did."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def decoded_batches(
    model: GPT,
    vq: VQGAN,
    text_ids: np.ndarray,
    *,
    cfg_scale: float,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    batch_size: int,
    dtype: torch.dtype,
    batches: Sequence[int] | None = None,
    timings: Timings | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(batch index, uint8 pictures [b, H, W, 3]) for the rows of `text_ids` [N, text_len], batch after batch.

    Batch i holds rows i*batch_size .. (i+1)*batch_size - 1 and is sampled from `batch_seed(seed, i)`, so the
    pictures depend on the seed, the flags and the batch size only. `batches` limits the work to those batch
    indices (in increasing order). A background thread samples batch i+1 with the GPT while batch i is decoded
    here and handed back; on a GPU the decoding runs on its own CUDA stream so that the two can overlap there too.
    """
    device = model.head.weight.device
    timings = timings if timings is not None else Timings()
    n_batches = math.ceil(len(text_ids) / batch_size)
    todo = list(range(n_batches)) if batches is None else list(batches)
    if cfg_scale == 0:
        # Pure unconditional sampling: one stream over the null caption gives the same logits for half the work.
        text_ids, cfg_scale = np.zeros_like(text_ids), 1.0
    sampled: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    done = object()

    def hand_over(item: object) -> bool:
        while not stop.is_set():
            try:
                sampled.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def sample() -> None:
        try:
            with autocast(device, dtype):
                for index in todo:
                    if stop.is_set():
                        return
                    started = time.perf_counter()
                    rows = torch.from_numpy(text_ids[index * batch_size : (index + 1) * batch_size].astype(np.int64))
                    generator = torch.Generator(device if device.type == "cuda" else "cpu")
                    generator.manual_seed(batch_seed(seed, index))
                    codes = model.generate(rows.to(device), cfg_scale=cfg_scale, temperature=temperature,
                                           top_k=top_k, top_p=top_p, generator=generator)
                    codes = codes.cpu()  # waits for the GPU, so that the time below is the sampling's
                    timings.sampling += time.perf_counter() - started
                    if not hand_over((index, codes)):
                        return
            hand_over(done)
        except BaseException as e:  # handed to the consumer, which raises it there
            hand_over(e)

    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    finished = False
    sampler.start()
    try:
        while True:
            item = sampled.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            index, codes = item
            started = time.perf_counter()
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                pictures = np.concatenate([tensor_to_images(vq.decode(codes[i : i + DECODE_CHUNK], dtype=dtype))
                                           for i in range(0, len(codes), DECODE_CHUNK)])
            timings.decoding += time.perf_counter() - started
            yield index, pictures
        finished = True
    finally:
        stop.set()
        # An abandoned run leaves the (daemon) sampler to finish its batch alone rather than wait for it here.
        if finished:
            sampler.join()


def generate_images(
    model: GPT,
    vq: VQGAN,
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    *,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = DEFAULT_SEED,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: torch.dtype | None = None,
    image_size: int | None = None,
    timings: Timings | None = None,
) -> Iterator[np.ndarray]:
    """One uint8 picture [H, W, 3] per caption, in order: what `generate.py` writes for the same settings.

    An empty caption is drawn unconditionally, a long one is cut to the model's text_len. `image_size` resizes
    the pictures as the command line does (None: the VQGAN's own size); `dtype` None: bfloat16 on GPUs that
    have it, float32 on the CPU. Sampling of the next batch overlaps decoding of the current one.
    """
    device = model.head.weight.device
    ids, _ = caption_ids(tokenizer, captions, model.config.text_len)
    batches = decoded_batches(model, vq, ids, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, batch_size=batch_size, dtype=dtype or pick_dtype(device),
                              timings=timings)
    with contextlib.closing(batches):
        for _, pictures in batches:
            for picture in pictures:
                yield picture if image_size is None else np.asarray(resized(picture, image_size))


# ----------------------------------------------------------------------------------------------------------
# encoding and writing


def resized(picture: np.ndarray, size: int | None) -> Image.Image:
    image = Image.fromarray(picture)
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def encode_picture(picture: np.ndarray, size: int | None, image_format: str, quality: int) -> bytes:
    """PNG (lossless, no timestamp: the same pixels always give the same bytes) or JPEG at `quality`."""
    buffer = io.BytesIO()
    if image_format == "png":
        resized(picture, size).save(buffer, "PNG")
    else:
        resized(picture, size).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def result_line(img_id: str, data: bytes) -> bytes:
    # The standard alphabet with padding: base64.b64decode reads it, and urlsafe_b64decode reads it identically
    # because it keeps '+' and '/'. URL-safe output ('-', '_') would be silently mangled by b64decode.
    return img_id.encode("utf-8") + b"\t" + base64.b64encode(data) + b"\n"


def encode_job(img_id: str, picture: np.ndarray, size: int | None, image_format: str, quality: int
               ) -> tuple[bytes, bytes, float]:
    started = time.perf_counter()
    data = encode_picture(picture, size, image_format, quality)
    return result_line(img_id, data), data, time.perf_counter() - started


def whole_image(data: bytes) -> str | None:
    """"png" or "jpeg" when `data` is an image from its first byte to its last, else None."""
    if data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END):
        return "png"
    if data.startswith(JPEG_START) and data.endswith(JPEG_END):
        return "jpeg"
    return None


def safe_file_name(img_id: str) -> str:
    name = re.sub(r"[^\w.-]", "_", img_id)
    return "_" + name if name.startswith(".") else name


# ----------------------------------------------------------------------------------------------------------
# resuming


def read_finished(path: str | os.PathLike, prompts: Sequence[Prompt], image_format: str, report: Report
                  ) -> dict[int, tuple[int, int]]:
    """Which prompts a partial output already answers: prompt index -> (byte offset, length) of its line.

    A line counts when it is whole: newline-terminated, `img_id \\t base64` with valid base64 of a complete PNG or
    JPEG. The last line of a killed run usually is not, and is drawn again. The k-th line of an img_id answers
    its k-th prompt, so duplicate ids resume too.
    """
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: no such file (--resume_from)")
    lines: dict[str, list[tuple[int, int]]] = {}
    formats: Counter[str] = Counter()
    offset = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            kind = _finished_line_format(line)
            if kind is None:
                detail = "no newline at the end (an interrupted write)" if not line.endswith(b"\n") else ""
                report.warn(f"{path}:{line_no}", "not a whole result line; drawn again", detail)
            else:
                img_id = line.split(b"\t", 1)[0].decode("utf-8")
                lines.setdefault(img_id, []).append((offset, len(line)))
                formats[kind] += 1
            offset += len(line)
    finished: dict[int, tuple[int, int]] = {}
    taken: Counter[str] = Counter()
    for i, prompt in enumerate(prompts):
        found = lines.get(prompt.img_id, [])
        if taken[prompt.img_id] < len(found):
            finished[i] = found[taken[prompt.img_id]]
            taken[prompt.img_id] += 1
    unused = sum(len(found) - taken[img_id] for img_id, found in lines.items())
    if unused:
        report.warn(str(path), "lines for no prompt are dropped", f"{unused} line(s) whose img_id is not asked for")
    other = sum(n for kind, n in formats.items() if kind != image_format)
    if other:
        report.warn(str(path), "resumed lines in another format",
                    f"{other} line(s) are not {image_format.upper()}; they are copied as they are")
    return finished


def _finished_line_format(line: bytes) -> str | None:
    if not line.endswith(b"\n"):
        return None
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != 2 or not fields[0]:
        return None
    try:
        fields[0].decode("utf-8")
        return whole_image(base64.b64decode(fields[1], validate=True))
    except (UnicodeDecodeError, binascii.Error):
        return None


# ----------------------------------------------------------------------------------------------------------
# the contact sheet


# Fonts with Chinese glyphs that are often installed, tried when fontconfig finds none.
CJK_FONT_PATHS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simhei.ttf",
)


def find_cjk_font() -> str | None:
    """A font file that has Chinese glyphs: fontconfig's pick for Chinese, else a well-known path."""
    if shutil.which("fc-list"):
        try:
            listing = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10)
            files = sorted(line.split(":")[0].strip() for line in listing.stdout.splitlines() if line.strip())
            # Regular weights read best at small sizes.
            files.sort(key=lambda name: "regular" not in name.lower())
            if files:
                return files[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return next((path for path in CJK_FONT_PATHS if os.path.isfile(path)), None)


def draw_grid(entries: Sequence[tuple[str, str, bytes]], path: str | os.PathLike, cell: int, font_path: str | None
              ) -> None:
    """A contact sheet of (img_id, caption, encoded picture): each picture at `cell` px with its img_id and
    caption (up to three lines) underneath; the img_id stays readable even in a font without Chinese."""
    font_size = max(10, cell // 16)
    font = ImageFont.truetype(font_path, font_size) if font_path else ImageFont.load_default(size=font_size)
    line_height, text_lines, margin = font_size + 4, 4, 6
    columns = math.ceil(math.sqrt(len(entries)))
    rows = math.ceil(len(entries) / columns)
    cell_height = cell + text_lines * line_height + margin
    sheet = Image.new("RGB", (columns * (cell + margin) + margin, rows * cell_height + margin), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (img_id, caption, data) in enumerate(entries):
        x, y = margin + (n % columns) * (cell + margin), margin + (n // columns) * cell_height
        with Image.open(io.BytesIO(data)) as picture:
            sheet.paste(picture.convert("RGB").resize((cell, cell), Image.Resampling.LANCZOS), (x, y))
        lines = wrap(img_id, font, cell, 1) + wrap(caption or "(no caption)", font, cell, text_lines - 1)
        for k, text in enumerate(lines):
            draw.text((x, y + cell + 2 + k * line_height), text, fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, most: int) -> list[str]:
    # Chinese has no spaces to break at, so lines break at any character; the last one ends in "…" if cut.
    lines, current = [], ""
    for char in text:
        if font.getlength(current + char) > width:
            lines.append(current)
            current = ""
        current += char
    lines.append(current)
    if len(lines) > most:
        lines = lines[:most]
        lines[-1] = lines[-1][:-1] + "…"
    return lines


# ----------------------------------------------------------------------------------------------------------
# the command


def load_pipeline(ckpt_path: str | os.PathLike, device: torch.device, vqgan_ckpt: str | None = None,
                  data_dir: str | None = None, report: Report | None = None
                  ) -> tuple[GPT, VQGAN, PreTrainedTokenizerBase, dict]:
    """The GPT, VQGAN and tokenizer of a train.py checkpoint, found where prepare.py recorded them.

    `vqgan_ckpt` and `data_dir` (the prepare.py output dir holding the tokenizer's vocab.txt) override the
    recorded paths, for a checkpoint that moved to another machine. Raises GenerateError with what to do.
    """
    report = report or Report()
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise GenerateError(f"no checkpoint at {ckpt_path}: run train.py first (it writes {DEFAULT_CKPT}), "
                            "or pass --ckpt")
    try:
        model, ckpt = load_model(ckpt_path, device)
    except CheckpointError as e:
        raise GenerateError(str(e)) from None
    meta = ckpt.get("meta") or {}
    data_dir = data_dir or ckpt.get("data_dir")
    try:
        tokenizer = load_tokenizer(meta.get("tokenizer", "vocab.txt"), data_dir)
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot load the tokenizer the model was trained with: {e}; pass --data_dir, the "
                            "prepare.py output dir that holds its vocab.txt") from None
    recorded = meta.get("vqgan_ckpt")
    path = vqgan_ckpt or recorded
    if not path:
        raise GenerateError(f"{ckpt_path} records no VQGAN (its meta has no vqgan_ckpt): pass --vqgan_ckpt")
    if not Path(path).is_file():
        if vqgan_ckpt:
            raise GenerateError(f"{path}: no such VQGAN checkpoint (--vqgan_ckpt)")
        raise GenerateError(f"the VQGAN the data was prepared with, {path}, no longer exists: pass --vqgan_ckpt")
    try:
        vq = load_vqgan(path, device)
    except CheckpointError as e:
        raise GenerateError(str(e)) from None
    if vq.codebook_size != model.config.codebook_size:
        raise GenerateError(f"{path} has {vq.codebook_size} codes but the model draws from "
                            f"{model.config.codebook_size}: pass the VQGAN the data was prepared with")
    if meta.get("vqgan_sha256") and sha256_file(Path(path)) != meta["vqgan_sha256"]:
        report.warn(str(path), "not the VQGAN the data was prepared with",
                    f"its sha256 differs from the one recorded in {ckpt_path}; pictures may come out wrong")
    return model, vq, tokenizer, ckpt


def resolve_prompts(args: argparse.Namespace, meta: dict, report: Report) -> list[Prompt]:
    if args.prompt is not None:
        if not has_text(args.prompt):
            report.warn("--prompt", "empty caption", "drawn unconditionally")
        return [Prompt("prompt", args.prompt.strip(), "--prompt")]
    path = args.prompts or meta.get("test_prompts")
    if not path:
        raise GenerateError("the checkpoint's data has no test prompts (prepare.py found no T2I_test.text.tsv): "
                            "pass --prompts FILE.tsv or --prompt TEXT")
    if not Path(path).is_file():
        hint = "" if args.prompts else ", recorded by prepare.py, no longer exists: pass --prompts FILE.tsv"
        raise GenerateError(f"{path}: no such prompts file{hint}")
    prompts = read_prompts(path, report)
    if not prompts:
        raise GenerateError(f"{path}: no `img_id<TAB>caption` lines to generate for")
    return prompts


def check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.prompt is not None and args.prompts:
        problems.append("--prompt and --prompts exclude each other")
    if args.batch_size < 1:
        problems.append("--batch_size must be at least 1")
    if args.temperature < 0:
        problems.append("--temperature must be 0 (greedy) or more")
    if args.top_k is not None and args.top_k < 0:
        problems.append("--top_k must be 0 (off) or more")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append("--top_p must lie in (0, 1]")
    if not 1 <= args.quality <= 100:
        problems.append("--quality must lie in 1..100")
    if args.num_workers < 0:
        problems.append("--num_workers must be 0 (encode in this process) or more")
    if args.image_size < 0 or args.grid_count < 1:
        problems.append("--image_size must be 0 (the VQGAN's size) or more, --grid_count at least 1")
    if args.grid_font and not Path(args.grid_font).is_file():
        problems.append(f"{args.grid_font}: no such font file (--grid_font)")
    if problems:
        raise GenerateError("; ".join(problems))


def run(args: argparse.Namespace, out: BinaryIO) -> dict[str, Any]:
    """Write one result line per prompt to `out` in input order; returns the summary (also shown on stderr)."""
    check_args(args)
    if not Path(args.ckpt).is_file():
        raise GenerateError(f"no checkpoint at {args.ckpt}: run train.py first (it writes {DEFAULT_CKPT}), "
                            "or pass --ckpt")
    if args.prompts and not Path(args.prompts).is_file():
        raise GenerateError(f"{args.prompts}: no such prompts file (--prompts)")
    if args.resume_from:
        _refuse_same_file(args.resume_from, out)
    # Pillow holds the GIL while it compresses, which would stall the sampling loop: encoding runs in worker
    # processes, started (forked) before torch has run anything here.
    pool = make_pool(args.num_workers)
    try:
        return _run(args, out, pool)
    finally:
        if pool is not None:
            pool.terminate()


def _run(args: argparse.Namespace, out: BinaryIO, pool: multiprocessing.pool.Pool | None) -> dict[str, Any]:
    started = time.perf_counter()
    report = Report()
    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda, but torch sees no CUDA GPU here")
    dtype = pick_dtype(device, args.dtype)
    model, vq, tokenizer, ckpt = load_pipeline(args.ckpt, device, args.vqgan_ckpt, args.data_dir, report)
    prompts = resolve_prompts(args, ckpt.get("meta") or {}, report)
    ids = prompt_ids(tokenizer, prompts, model.config.text_len, report)
    finished = read_finished(args.resume_from, prompts, args.format, report) if args.resume_from else {}
    native = model.config.grid_rows * vq.downsample_factor
    size = args.image_size or None
    loaded = time.perf_counter()

    n, batch_size = len(prompts), args.batch_size
    todo = [b for b in range(math.ceil(n / batch_size))
            if any(i not in finished for i in range(b * batch_size, min(n, (b + 1) * batch_size)))]
    resumed = f" ({len(finished)} already in {args.resume_from})" if args.resume_from else ""
    resize = f" resized to {size} px" if size and size != native else ""
    print(f"generate: {n} prompts{resumed}, {model.num_params() / 1e6:.1f}M parameters, "
          f"{model.config.grid_rows}x{model.config.grid_cols} codes -> {native} px{resize}, {args.format}, "
          f"batch {batch_size}, cfg {args.cfg_scale}, device {device}, {str(dtype).removeprefix('torch.')}",
          file=sys.stderr)
    timings = Timings()
    batches = decoded_batches(model, vq, ids, cfg_scale=args.cfg_scale, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=batch_size,
                              dtype=dtype, batches=todo, timings=timings)
    # Enough encodings queued to keep the workers busy while the next batch decodes, and no more.
    most_pending = 2 * batch_size + 2 * max(1, args.num_workers)
    pending: deque[tuple[int, Job]] = deque()
    next_index = 0
    with (ResultWriter(out, prompts, finished, args) as writer, contextlib.closing(batches),
          Progress(n - len(finished), desc="generate", unit="img") as bar):
        writer.progress = bar
        for index, pictures in batches:
            start = index * batch_size
            # Batches skipped because every line of them was resumed come first, from the partial file.
            pending.extend((i, None) for i in range(next_index, start))
            for i, picture in enumerate(pictures, start):
                job_args = (prompts[i].img_id, picture, size, args.format, args.quality)
                if i in finished:
                    job = None
                elif pool is None:
                    job = encode_job(*job_args)
                else:
                    job = pool.apply_async(encode_job, job_args)
                pending.append((i, job))
            next_index = start + len(pictures)
            writer.write_ready(pending, most_pending, timings)
        pending.extend((i, None) for i in range(next_index, n))
        writer.write_ready(pending, 0, timings)
    seconds = time.perf_counter() - loaded
    summary = {
        "prompts": n,
        "generated": n - len(finished),
        "resumed": len(finished),
        "seconds": seconds,
        "load_seconds": loaded - started,
        "images_per_sec": (n - len(finished)) / max(seconds, 1e-9),
        "sampling_seconds": timings.sampling,
        "decoding_seconds": timings.decoding,
        "encoding_seconds": timings.encoding,
        "encode_workers": args.num_workers,
        "warnings": dict(report.counts),
    }
    if args.grid:
        write_grid(args, writer.grid_entries)
    print_summary(summary)
    return summary


# A picture's line to write: None for a line copied from --resume_from, the encoding's result when it ran in this
# process, or the worker's pending result.
Job = tuple[bytes, bytes, float] | multiprocessing.pool.AsyncResult | None


class ResultWriter:
    """Writes the lines in input order, flushed one by one so that an interrupted run keeps every whole line;
    also keeps the first pictures for --grid and saves files for --out_dir."""

    def __init__(self, out: BinaryIO, prompts: Sequence[Prompt], finished: dict[int, tuple[int, int]],
                 args: argparse.Namespace):
        self.out, self.prompts, self.finished = out, prompts, finished
        self.partial = open(args.resume_from, "rb") if finished else None  # noqa: SIM115 - closed on __exit__
        self.grid_count = args.grid_count if args.grid else 0
        self.grid_entries: list[tuple[str, str, bytes]] = []
        self.out_dir = Path(args.out_dir) if args.out_dir else None
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.file_names: set[str] = set()
        self.progress: Progress | None = None

    def write_ready(self, pending: deque[tuple[int, Job]], most_pending: int, timings: Timings) -> None:
        """Write the head of `pending` while it is ready, and wait for it while more than `most_pending` wait."""
        while pending:
            index, job = pending[0]
            waiting = isinstance(job, multiprocessing.pool.AsyncResult) and not job.ready()
            if waiting and len(pending) <= most_pending:
                return
            pending.popleft()
            if job is None:
                offset, length = self.finished[index]
                self.partial.seek(offset)
                line, data = self.partial.read(length), None
            else:
                line, data, seconds = job if isinstance(job, tuple) else job.get()
                timings.encoding += seconds
            self.out.write(line)
            self.out.flush()
            self._keep(index, line, data)
            if job is not None and self.progress is not None:
                self.progress.update()

    def _keep(self, index: int, line: bytes, data: bytes | None) -> None:
        if len(self.grid_entries) >= self.grid_count and self.out_dir is None:
            return
        if data is None:
            data = base64.b64decode(line.rstrip(b"\r\n").split(b"\t", 1)[1])
        prompt = self.prompts[index]
        if len(self.grid_entries) < self.grid_count:
            self.grid_entries.append((prompt.img_id, prompt.caption, data))
        if self.out_dir is not None:
            stem, n = safe_file_name(prompt.img_id), 1
            name = f"{stem}.{'png' if data.startswith(PNG_SIGNATURE) else 'jpg'}"
            while name.lower() in self.file_names:  # duplicate ids, or ids equal after making them safe
                n += 1
                name = f"{stem}-{n}.{name.rsplit('.', 1)[1]}"
            self.file_names.add(name.lower())
            (self.out_dir / name).write_bytes(data)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.partial is not None:
            self.partial.close()


def _refuse_same_file(resume_from: str, out: BinaryIO) -> None:
    try:
        same = os.path.samestat(os.fstat(out.fileno()), os.stat(resume_from))
    except (OSError, ValueError, io.UnsupportedOperation):
        return
    if same:
        raise GenerateError(f"stdout is {resume_from} itself: write the resumed output to a new file, "
                            f"e.g. `python generate.py --resume_from {resume_from} > full.tsv`")


def write_grid(args: argparse.Namespace, entries: list[tuple[str, str, bytes]]) -> None:
    """Draw the contact sheet `--grid` asks for, with a CJK font when the system has one."""
    font = args.grid_font or find_cjk_font()
    if font is None:
        print("generate: no font with Chinese glyphs found (install fonts-noto-cjk or fonts-wqy-microhei, or pass "
              f"--grid_font): the captions in {args.grid} are drawn without one, so Chinese shows as boxes",
              file=sys.stderr)
    draw_grid(entries, args.grid, GRID_CELL, font)
    print(f"generate: contact sheet of the first {len(entries)} pictures in {args.grid}"
          f"{f' (font {font})' if font else ''}", file=sys.stderr)


def print_summary(summary: dict[str, Any]) -> None:
    resumed = f", {summary['resumed']} lines resumed" if summary["resumed"] else ""
    print(f"generate: {summary['generated']} pictures in {summary['seconds']:.1f} s "
          f"({summary['images_per_sec']:.2f} images/s) after {summary['load_seconds']:.1f} s of loading{resumed}; "
          f"time in each stage (they overlap): sampling {summary['sampling_seconds']:.1f} s, VQGAN decoding "
          f"{summary['decoding_seconds']:.1f} s, image encoding {summary['encoding_seconds']:.1f} s in "
          f"{summary['encode_workers'] or 'no'} worker processes", file=sys.stderr)
    if summary["warnings"]:
        counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(summary["warnings"].items()))
        print(f"generate: warnings: {counts}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    what = parser.add_argument_group("what to draw")
    what.add_argument("--ckpt", default=DEFAULT_CKPT, help="train.py checkpoint (default: %(default)s)")
    what.add_argument("--prompts", default=None,
                      help="TSV of `img_id<TAB>caption` lines (default: the T2I_test.text.tsv prepare.py recorded)")
    what.add_argument("--prompt", default=None, help="one caption instead of a file; its line has img_id `prompt`")
    what.add_argument("--vqgan_ckpt", default=None,
                      help="VQGAN to decode with (default: the one prepare.py encoded the data with)")
    what.add_argument("--data_dir", default=None,
                      help="prepare.py output dir holding the tokenizer's vocab.txt (default: the checkpoint's)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--cfg_scale", type=float, default=DEFAULT_CFG_SCALE,
                          help="classifier-free guidance: 1 conditional only (fastest), 0 unconditional, above 1 "
                          "follows the caption more closely at twice the sampling cost (default: %(default)s)")
    sampling.add_argument("--temperature", type=float, default=1.0,
                          help="softmax temperature; 0 always takes the most likely code (default: %(default)s)")
    sampling.add_argument("--top_k", type=int, default=None, help="sample among the k most likely codes (default: all)")
    sampling.add_argument("--top_p", type=float, default=None,
                          help="sample within the smallest set of codes holding this probability (default: off)")
    sampling.add_argument("--seed", type=int, default=DEFAULT_SEED,
                          help="the same seed, flags and --batch_size give byte-identical output on the same "
                          "machine (default: %(default)s)")
    sampling.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                          help="captions sampled together; raise it on a GPU, e.g. 256 (default: %(default)s)")
    sampling.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (default: the best there is)")
    sampling.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                          help="precision of the GPT and the VQGAN decoder (default: bfloat16 on GPUs that have "
                          "it, float32 on the CPU)")
    output = parser.add_argument_group("output")
    output.add_argument("--image_size", type=int, default=OUTPUT_SIZE,
                        help="side of the written pictures; pictures the VQGAN decodes at another size (the 64 px "
                        "demo) are resized with Lanczos; 0 keeps the VQGAN's own size (default: %(default)s)")
    output.add_argument("--format", default="png", choices=["png", "jpeg"], help="image format (default: png)")
    output.add_argument("--quality", type=int, default=95, help="JPEG quality (default: %(default)s)")
    output.add_argument("--resume_from", default=None,
                        help="output of an interrupted run: its whole lines are copied instead of drawn again, "
                        "and stdout gets the complete file in input order; write it to a new file, e.g. "
                        "`--resume_from part.tsv > full.tsv`")
    output.add_argument("--num_workers", type=int, default=ENCODE_WORKERS,
                        help="processes encoding the pictures; 0 encodes in the main process (default: CPU cores - "
                        "1, at most 8: %(default)s here)")
    output.add_argument("--out_dir", default=None, help="also save every picture there as <img_id>.png (or .jpg)")
    output.add_argument("--grid", default=None, help="also save a contact sheet of the first pictures with their "
                        "captions, e.g. preview.png")
    output.add_argument("--grid_count", type=int, default=16, help="pictures on the contact sheet (default: 16)")
    output.add_argument("--grid_font", default=None,
                        help="font file for the captions on the sheet (default: a system font with Chinese glyphs)")
    return parser


@contextlib.contextmanager
def results_stdout() -> Iterator[BinaryIO]:
    """The real stdout for the result lines, while everything else that writes to stdout (print, a library,
    C code writing to file descriptor 1) goes to stderr instead."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    saved, sys.stdout = sys.stdout, sys.stderr
    out = os.fdopen(os.dup(real_stdout), "wb")
    try:
        yield out
    finally:
        with contextlib.suppress(BrokenPipeError):
            out.close()
        sys.stdout = saved
        os.dup2(real_stdout, 1)
        os.close(real_stdout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with results_stdout() as out:
            run(args, out)
        return 0
    except GenerateError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        print("generate.py: error: stdout was closed before all lines were written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ngenerate.py: interrupted; every whole line written so far is kept: continue with "
              "`python generate.py --resume_from <that output> [same flags] > <new file>`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
