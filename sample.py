"""From a train.py checkpoint to pictures: the GPT, VQGAN and tokenizer it was trained with, captions drawn
batch after batch by the static-cache sampler and decoded to pixels, PNG bytes and contact sheets.
generate.py, evaluate.py and app.py all draw through here."""

import argparse
import copy
import io
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import PreTrainedTokenizerBase

from model import GPT, Sampler, load_model, row_keys
from text import has_text, load_tokenizer, tokenize_captions
from utils import Report, UserError, pick_dtype, sha256_file
from vqgan import VQGAN, load_vqgan, tensor_to_images

DEFAULT_CKPT = "out/best.pt"
# Chosen with `evaluate.py --demo --sweep` (BENCHMARKS.md, "Sampling settings of the 4 × 128 GPT"). make demo draws
# the best of 4 ("Best-of-N on the 4 × 128 GPT"), but its effect on MUGE's FID is not measured: 1 stays the default.
DEFAULT_CFG_SCALE = 2.0
DEFAULT_TEMPERATURE = 0.7
DEFAULT_CANDIDATES = 1
DEFAULT_SEED = 1337
OUTPUT_SIZE = 256  # MUGE submissions are 256x256 pictures
# zlib level of the PNGs: on the demo's pictures at 256 px, level 3 writes files 15% larger than the default 6
# in 40% of its time (BENCHMARKS.md, "PNG").
PNG_LEVEL = 3


@dataclass
class Pipeline:
    """A trained model with the VQGAN and tokenizer of its data."""

    model: GPT
    vq: VQGAN  # float32, for exact encoding and the round trip
    decoder: VQGAN  # what decodes sampled codes: `vq`, or on a GPU a bfloat16 channels-last copy of it
    tokenizer: PreTrainedTokenizerBase
    ckpt: dict
    timings: dict[str, float] = field(default_factory=lambda: {"sampling": 0.0, "decoding": 0.0})

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def caption_ids(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [N, text_len] and the untruncated token counts [N]. A caption with no text becomes all
        padding, the model's null caption (the tokenizer would give [CLS] [SEP], which it never saw)."""
        ids, counts = tokenize_captions(self.tokenizer, captions, self.model.config.text_len)
        ids[[not has_text(c) for c in captions]] = 0
        return ids, counts

    def sampler(self, batch_size: int, cfg_scale: float = DEFAULT_CFG_SCALE, temperature: float = DEFAULT_TEMPERATURE,
                top_k: int | None = None, top_p: float | None = None, compile: bool = False) -> Sampler:
        return Sampler(self.model, batch_size, cfg_scale, temperature, top_k, top_p, compile)

    def draw(self, text_ids: np.ndarray, keys: torch.Tensor, sampler: Sampler) -> Iterator[np.ndarray]:
        """uint8 pictures [b, H, W, 3], batch after batch, for captions `text_ids` [N, L] drawn with `keys`
        [N, candidates] (model.row_keys); of several candidates, drawn in one batch, the one the GPT finds likeliest
        for its caption is kept. Adds the seconds spent to `timings`."""
        candidates = keys.shape[1]
        step = sampler.batch_size // candidates
        for start in range(0, len(text_ids), step):
            started = time.perf_counter()
            rows = torch.from_numpy(text_ids[start : start + step].astype(np.int64)).repeat_interleave(candidates, 0)
            codes = sampler.sample(rows, keys[start : start + step].flatten())
            if candidates > 1:
                best = self.model.score(codes, rows.to(self.device)).view(-1, candidates).argmax(1)
                codes = codes.view(-1, candidates, *codes.shape[1:])[torch.arange(len(best)), best.to(codes.device)]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            decoding = time.perf_counter()
            self.timings["sampling"] += decoding - started
            pictures = self.decode(codes)
            self.timings["decoding"] += time.perf_counter() - decoding
            yield pictures

    def draw_captions(self, captions: Sequence[str], seed: int = DEFAULT_SEED, batch_size: int = 32,
                      candidates: int = 1, **sampling: object) -> Iterator[np.ndarray]:
        """One uint8 picture per caption, in order: what generate.py writes for the same settings."""
        ids, _ = self.caption_ids(captions)
        sampler = self.sampler(min(batch_size, max(1, len(captions))) * candidates, **sampling)
        for pictures in self.draw(ids, row_keys(seed, range(len(captions)), candidates), sampler):
            yield from pictures

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """Codes [B, h, w] -> uint8 pictures [B, H, W, 3], in slices as large as free memory allows."""
        chunk = 16
        if self.device.type == "cuda":
            # ~6 feature maps of the widest level at full size are alive at once (an estimate, with margin)
            side = codes.shape[-1] * self.decoder.downsample_factor
            per_image = 6 * self.decoder.config.ch * side * side * self.decoder.quant_conv.weight.element_size()
            chunk = max(1, int(torch.cuda.mem_get_info(self.device)[0] // 2 // per_image))
        return np.concatenate([tensor_to_images(self.decoder.decode(codes[i : i + chunk]))
                               for i in range(0, len(codes), chunk)])


def load_pipeline(ckpt_path: str | os.PathLike, device: torch.device, dtype: torch.dtype | None = None,
                  vqgan_ckpt: str | None = None, data_dir: str | None = None, report: Report | None = None
                  ) -> Pipeline:
    """The GPT (in `dtype`: default bfloat16 on GPUs that have it), VQGAN and tokenizer of a checkpoint, found where
    prepare.py recorded them, or at `vqgan_ckpt` and in `data_dir` (prepare.py's output, with vocab.txt) if given."""
    report = report or Report()
    if not Path(ckpt_path).is_file():
        raise UserError(f"no checkpoint at {ckpt_path}: run train.py first (it writes {DEFAULT_CKPT}), or pass --ckpt")
    model, ckpt = load_model(ckpt_path, device)
    dtype = dtype or pick_dtype(device)
    model.to(dtype)  # weights cast once, not at every step as autocast would
    meta = ckpt.get("meta") or {}
    tokenizer = load_tokenizer(meta.get("tokenizer", "vocab.txt"), data_dir or ckpt.get("data_dir"))
    path = vqgan_ckpt or meta.get("vqgan_ckpt")
    if not path:
        raise UserError(f"{ckpt_path} records no VQGAN (its meta has no vqgan_ckpt): pass --vqgan_ckpt")
    if not Path(path).is_file():
        if vqgan_ckpt:
            raise UserError(f"{path}: no such VQGAN checkpoint (--vqgan_ckpt)")
        raise UserError(f"the VQGAN the data was prepared with, {path}, no longer exists: pass --vqgan_ckpt")
    vq = load_vqgan(path, device)
    if vq.codebook_size != model.config.codebook_size:
        raise UserError(f"{path} has {vq.codebook_size} codes but the model draws from {model.config.codebook_size}: "
                        "pass the VQGAN the data was prepared with")
    if meta.get("vqgan_sha256") and sha256_file(path) != meta["vqgan_sha256"]:
        report.warn(str(path), "not the VQGAN the data was prepared with",
                    f"its sha256 differs from the one recorded in {ckpt_path}; pictures may come out wrong")
    decoder = copy.deepcopy(vq).to(dtype=dtype, memory_format=torch.channels_last) if device.type == "cuda" else vq
    return Pipeline(model, vq, decoder, tokenizer, ckpt)


def add_sampling_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The sampling flags generate.py and evaluate.py share, in a "sampling" group the script adds its own to."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--cfg_scale", type=float, default=DEFAULT_CFG_SCALE, help="classifier-free guidance: 0 "
                       "ignores the caption, 1 is conditional only (fastest), above 1 follows the caption more "
                       "closely at twice the sampling cost (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                       help="softmax temperature; 0 always takes the most likely code (default: %(default)s)")
    group.add_argument("--top_k", type=int, help="sample among the k most likely codes (default: all)")
    group.add_argument("--top_p", type=float, help="sample among the top codes holding this probability (default: off)")
    group.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="best-of-N: draw N pictures per "
                       "caption in one batch, keep the one the GPT finds likeliest (default: %(default)s)")
    group.add_argument("--seed", type=int, default=DEFAULT_SEED, help="a picture's random numbers follow from (seed, "
                       "its caption's place): the same seed and flags give the same bytes on the same machine "
                       "(default: %(default)s)")
    group.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: the best there is)")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="precision of the GPT and the "
                       "VQGAN decoder (default: bfloat16 on GPUs that have it, else float32)")
    return group


def sampling_flag_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the values of add_sampling_flags' flags, a message each."""
    checks = [(args.candidates < 1, "--candidates must be at least 1"),
              (not 0 <= args.cfg_scale < math.inf, "--cfg_scale must be a number, 0 or more"),
              (not 0 <= args.temperature < math.inf, "--temperature must be 0 (greedy) or more"),
              (args.top_k is not None and args.top_k < 0, "--top_k must be 0 (off) or more"),
              (args.top_p is not None and not 0 < args.top_p <= 1, "--top_p must lie in (0, 1]")]
    return [message for failed, message in checks if failed]


def resized(picture: np.ndarray, size: int | None) -> Image.Image:
    image = Image.fromarray(picture)
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def encode_picture(picture: np.ndarray, size: int | None = None, image_format: str = "png", quality: int = 95
                   ) -> bytes:
    """PNG (lossless, no timestamp: the same pixels always give the same bytes) or JPEG at `quality`."""
    buffer = io.BytesIO()
    options = {"compress_level": PNG_LEVEL} if image_format == "png" else {"quality": quality}
    resized(picture, size).save(buffer, image_format.upper(), **options)
    return buffer.getvalue()


CJK_FONT_PATHS = (  # often installed fonts with Chinese glyphs, tried when fontconfig finds none
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)


def find_cjk_font() -> str | None:
    """A font file that has Chinese glyphs: fontconfig's pick for Chinese, else a well-known path."""
    try:
        listing = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):  # no fontconfig
        listing = ""
    # Regular weights read best at small sizes.
    found = sorted((line.split(":")[0].strip() for line in listing.splitlines() if line.strip()),
                   key=lambda name: ("regular" not in name.lower(), name))
    return next(iter(found + [path for path in CJK_FONT_PATHS if os.path.isfile(path)]), None)


def write_grid(entries: Sequence[tuple[str, str, np.ndarray]], path: str | os.PathLike, font_path: str | None = None,
               cell: int = 256) -> None:
    """A contact sheet of (label, caption, picture): each picture at `cell` px with its label and caption (up to
    three lines) underneath, in a font with Chinese glyphs when the system has one (and says so when not)."""
    font_path = font_path or find_cjk_font()
    if font_path is None:
        print(f"no font with Chinese glyphs found (install fonts-noto-cjk or fonts-wqy-microhei): the captions in "
              f"{path} show Chinese as boxes", file=sys.stderr)
    font_size = max(10, cell // 16)
    font = ImageFont.truetype(font_path, font_size) if font_path else ImageFont.load_default(size=font_size)
    line_height, text_lines, margin = font_size + 4, 4, 6
    columns = math.ceil(math.sqrt(len(entries)))
    rows = math.ceil(len(entries) / columns)
    cell_height = cell + text_lines * line_height + margin
    sheet = Image.new("RGB", (columns * (cell + margin) + margin, rows * cell_height + margin), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (label, caption, picture) in enumerate(entries):
        x, y = margin + (n % columns) * (cell + margin), margin + (n // columns) * cell_height
        sheet.paste(resized(picture, cell), (x, y))
        lines = _wrap(label, font, cell, 1) + _wrap(caption or "(no caption)", font, cell, text_lines - 1)
        for k, text in enumerate(lines):
            draw.text((x, y + cell + 2 + k * line_height), text, fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, most: int) -> list[str]:
    # Chinese has no spaces to break at, so lines break at any character; the last one ends in "…" if cut.
    lines, current = [], ""
    for char in text:
        if font.getlength(current + char) > width:
            lines.append(current)
            current = ""
        current += char
    lines.append(current)
    if len(lines) > most:
        lines[most - 1] = lines[most - 1][:-1] + "…"
    return lines[:most]
