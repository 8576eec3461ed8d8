"""From a train.py checkpoint to pictures: the GPT, VQGAN and tokenizer it was trained with, captions drawn
batch after batch by the static-cache sampler and decoded to pixels, PNG bytes and contact sheets.
generate.py, evaluate.py and app.py all draw through here."""

from __future__ import annotations

import argparse
import copy
import io
import math
import os
import shutil
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
from scorer import Scorer, load_scorer
from text import has_text, load_tokenizer, tokenize_captions
from utils import Report, UserError, pick_dtype, sha256_file
from vqgan import VQGAN, load_vqgan, tensor_to_images

DEFAULT_CKPT = "out/best.pt"
# Chosen with `evaluate.py --demo --sweep` (BENCHMARKS.md, "Sampling settings of the 4 × 128 GPT"): guidance 2
# and temperature 0.7 drew the demo's colours and categories best. Best of 4 by the GPT's own likelihood adds two or
# three points of category at about three times the sampling time ("Best-of-N on the 4 × 128 GPT"): make demo
# uses it; one candidate stays the default, as what ranking does to MUGE's FID is not measured.
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

    def draw(self, text_ids: np.ndarray, keys: torch.Tensor, sampler: Sampler, scorer: Scorer | GPT | None = None
             ) -> Iterator[np.ndarray]:
        """uint8 pictures [b, H, W, 3], batch after batch, for captions `text_ids` [N, L] drawn with `keys`
        [N, candidates] (model.row_keys); of several candidates, drawn in one batch, the one `scorer` ranks highest
        (without one, the GPT's own likelihood of it) is kept. Adds the seconds spent to `timings`."""
        candidates = keys.shape[1]
        scorer = self.model if scorer is None else scorer
        step = sampler.batch_size // candidates
        for start in range(0, len(text_ids), step):
            started = time.perf_counter()
            rows = torch.from_numpy(text_ids[start : start + step].astype(np.int64)).repeat_interleave(candidates, 0)
            codes = sampler.sample(rows, keys[start : start + step].flatten())
            if candidates > 1:
                best = scorer.score(codes, rows.to(self.device)).view(-1, candidates).argmax(1)
                codes = codes.view(-1, candidates, *codes.shape[1:])[torch.arange(len(best)), best.to(codes.device)]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            decoding = time.perf_counter()
            self.timings["sampling"] += decoding - started
            pictures = self.decode(codes)
            self.timings["decoding"] += time.perf_counter() - decoding
            yield pictures

    def draw_captions(self, captions: Sequence[str], seed: int = DEFAULT_SEED, batch_size: int = 32,
                      candidates: int = 1, scorer: Scorer | GPT | None = None, **sampling: object
                      ) -> Iterator[np.ndarray]:
        """One uint8 picture per caption, in order: what generate.py writes for the same settings."""
        ids, _ = self.caption_ids(captions)
        sampler = self.sampler(min(batch_size, max(1, len(captions))) * candidates, **sampling)
        for pictures in self.draw(ids, row_keys(seed, range(len(captions)), candidates), sampler, scorer):
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
    """The GPT (in `dtype`: default bfloat16 on GPUs that have it), VQGAN and tokenizer of a checkpoint, found
    where prepare.py recorded them; `vqgan_ckpt` and `data_dir` (the prepare.py output dir holding vocab.txt)
    override that for a checkpoint that moved to another machine."""
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
    decoder = vq
    if device.type == "cuda":
        decoder = copy.deepcopy(vq).to(dtype=dtype, memory_format=torch.channels_last)
    return Pipeline(model, vq, decoder, tokenizer, ckpt)


def load_ranker(path: str, pipe: Pipeline, ckpt_path: str | os.PathLike) -> Scorer:
    """A text-image scorer to rank best-of-N candidates instead of the GPT's own likelihood, checked against the
    GPT's data."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such scorer (--scorer; train one with `python train.py config/scorer_demo.py`, "
                        "or leave --scorer out to rank by the GPT's own likelihood)")
    scorer, _ = load_scorer(path, pipe.device)
    for name in ("codebook_size", "grid_rows", "grid_cols", "text_len", "text_vocab_size", "text_encoder"):
        if getattr(scorer.config, name) != getattr(pipe.model.config, name):
            raise UserError(f"the scorer {path} was trained on other data than {ckpt_path} ({name}): pass the right "
                            "--scorer")
    return scorer.to(pipe.model.head.weight.dtype)


def add_sampling_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The sampling flags generate.py and evaluate.py share, in a "sampling" group the script adds its own to."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--cfg_scale", type=float, default=DEFAULT_CFG_SCALE,
                       help="classifier-free guidance: 1 conditional only (fastest), 0 unconditional, above 1 "
                       "follows the caption more closely at twice the sampling cost (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                       help="softmax temperature; 0 always takes the most likely code (default: %(default)s)")
    group.add_argument("--top_k", type=int, default=None, help="sample among the k most likely codes (default: all)")
    group.add_argument("--top_p", type=float, default=None,
                       help="sample within the smallest set of codes holding this probability (default: off)")
    group.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                       help="best-of-N: draw N pictures per caption (in the same batch) and keep the one ranked "
                       "highest (default: %(default)s)")
    group.add_argument("--scorer", default=None, help="a text-image scorer (train.py --model=scorer) that ranks "
                       "best-of-N candidates (default: the GPT's own likelihood of each candidate's codes given "
                       "its caption)")
    group.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help="each picture draws from the random numbers of (seed, its caption's place among the "
                       "prompts or val rows): the same seed and flags give byte-identical pictures on the same "
                       "machine (default: %(default)s)")
    group.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (default: the best there is)")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="precision of the GPT and the VQGAN decoder (default: bfloat16 on GPUs that have it, "
                       "float32 on the CPU)")
    return group


def sampling_flag_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the values of add_sampling_flags' flags, a message each."""
    checks = [(args.candidates < 1, "--candidates must be at least 1"),
              (not 0 <= args.cfg_scale < math.inf, "--cfg_scale must be a number, 0 or more"),
              (not 0 <= args.temperature < math.inf, "--temperature must be 0 (greedy) or more"),
              (args.top_k is not None and args.top_k < 0, "--top_k must be 0 (off) or more"),
              (args.top_p is not None and not 0 < args.top_p <= 1, "--top_p must lie in (0, 1]")]
    return [message for failed, message in checks if failed]


# ----------------------------------------------------------------------------------------------------------
# pictures


def resized(picture: np.ndarray, size: int | None) -> Image.Image:
    image = Image.fromarray(picture)
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def encode_picture(picture: np.ndarray, size: int | None = None, image_format: str = "png", quality: int = 95
                   ) -> bytes:
    """PNG (lossless, no timestamp: the same pixels always give the same bytes) or JPEG at `quality`."""
    buffer = io.BytesIO()
    if image_format == "png":
        resized(picture, size).save(buffer, "PNG", compress_level=PNG_LEVEL)
    else:
        resized(picture, size).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# Fonts with Chinese glyphs that are often installed, tried when fontconfig finds none.
CJK_FONT_PATHS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)


def find_cjk_font() -> str | None:
    """A font file that has Chinese glyphs: fontconfig's pick for Chinese, else a well-known path."""
    if shutil.which("fc-list"):
        try:
            listing = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10)
            # Regular weights read best at small sizes.
            files = sorted((line.split(":")[0].strip() for line in listing.stdout.splitlines() if line.strip()),
                           key=lambda name: ("regular" not in name.lower(), name))
            if files:
                return files[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return next((path for path in CJK_FONT_PATHS if os.path.isfile(path)), None)


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
        lines = lines[:most]
        lines[-1] = lines[-1][:-1] + "…"
    return lines
