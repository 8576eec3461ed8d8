"""Turn MUGE TSVs into the uint16 memmaps that train.py reads: VQGAN codes per image, token ids per caption.

    python prepare.py --data_dir dataset/ECommerce-T2I --vqgan_ckpt vqgan_imagenet_f16_1024/last.ckpt \\
        --out_dir data/muge
    python prepare.py    # the embedded demo: demo.py's products -> data/demo_src -> data/demo

The image TSV is streamed (memory does not grow with its size) and joined to the captions by img_id; bad rows
are skipped and listed in rejects.tsv. Everything is written into <out_dir>.partial, renamed to <out_dir> once
complete: a stopped run leaves nothing that looks finished, and the same command runs it again.
"""

import argparse
import hashlib
import itertools
import json
import os
import shlex
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import PIL
import tokenizers
import torch
import transformers

import demo
from data import (
    FLIP_SUFFIX,
    MAX_DECODE_MB,
    RESIZE_MODES,
    BadRowError,
    TextRow,
    image_from_base64,
    read_captions,
    read_tsv,
)
from text import VOCAB_FILE, build_char_vocab, load_tokenizer, tokenize_captions, write_vocab
from utils import (
    UserError,
    batched,
    map_in_order,
    memory_gib,
    pick_device,
    process_pool,
    progress,
    run_main,
    sha256_file,
)
from vqgan import VQGAN, images_to_tensor, load_vqgan

TRAIN_FILES = ("T2I_train.img.tsv", "T2I_train.text.tsv")
VAL_FILES = ("T2I_val.img.tsv", "T2I_val.text.tsv")
TEST_FILE = "T2I_test.text.tsv"
SPLITS = ("train", "val")
REJECTS_FILE = "rejects.tsv"
DEFAULT_VAL_FRACTION = 0.05

# `python prepare.py` alone prepares the demo with the small VQGAN in assets/ (trained at 64 px; titles <= 28 tokens).
# Products are drawn mirrored at random, so --flip adds more of the same: -0.19 bits/code of val loss (BENCHMARKS.md).
DEMO_SOURCE = Path("data/demo_src")
DEMO_IMAGE_SIZE = 64
DEMO_ARGS = ["--data_dir", str(DEMO_SOURCE), "--vqgan_ckpt", "assets/vqgan_demo.pt", "--out_dir", "data/demo",
             "--image_size", str(DEMO_IMAGE_SIZE), "--text_len", "32", "--flip"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prepare.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data_dir", required=True, help=f"folder with {' and '.join(TRAIN_FILES)}; optionally "
        f"{' and '.join(VAL_FILES)} (the val split) and {TEST_FILE} (recorded in meta.json for generate.py)")
    add("--vqgan_ckpt", required=True, help="VQGAN checkpoint: a taming last.ckpt or one of vqgan/train.py's")
    add("--out_dir", required=True, help="where the memmaps, meta.json and rejects.tsv go")
    add("--text_tokenizer", default=None, help="Hugging Face tokenizer name or local folder (BERT-style, padding id "
        f"0); by default a character vocabulary is built from the training captions and saved as {VOCAB_FILE}")
    add("--image_size", type=int, default=256, help="side of the square images the VQGAN sees (default: %(default)s)")
    add("--text_len", type=int, default=64, help="tokens per caption, [CLS] and [SEP] included (default: %(default)s)")
    add("--resize", choices=RESIZE_MODES, default="pad", help="non-square images: pad (the default) keeps the whole "
        "product on its background colour, crop cuts the centre square")
    add("--flip", action="store_true", help="also train on every training image mirrored left to right (doubles "
        "the train split; leave it off where products carry text, which would read backwards)")
    add("--val_fraction", type=float, default=None, help="without val files: the share of training rows held out, "
        f"chosen by a hash of img_id (default: {DEFAULT_VAL_FRACTION}); ignored when val files exist")
    add("--batch_size", type=int, default=32, help="images per VQGAN forward pass (default: %(default)s)")
    add("--device", default=None, help="cuda, cpu, mps, cuda:1, ... (default: cuda if available)")
    add("--num_workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)), help="processes decoding "
        "and resizing images; 0 does it in the main process (default: CPU cores - 1, at most 8: %(default)s here)")
    add("--max_decode_mb", type=float, default=MAX_DECODE_MB, help="images that would take more memory than this "
        "to decode (about twice their pixels plus an RGB copy) are rejected as bombs (default: %(default)s)")
    return parser


class Source(NamedTuple):
    """An image file and its captions; `split` is None when rows are split into train and val by hash."""
    img_path: Path
    text_path: Path
    split: str | None


def find_inputs(data_dir: Path) -> list[Source]:
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such folder (--data_dir)")
    train, val = ([data_dir / name for name in names] for names in (TRAIN_FILES, VAL_FILES))
    missing = [str(p) for p in train if not p.is_file()]
    if missing:
        raise UserError(f"missing training file(s): {', '.join(missing)}")
    has_val = [p.is_file() for p in val]
    if has_val[0] != has_val[1]:
        have, lack = val if has_val[0] else val[::-1]
        raise UserError(f"{have} exists but {lack} does not: the val split needs both")
    return [Source(*train, "train"), Source(*val, "val")] if has_val[0] else [Source(*train, None)]


def held_out(img_id: str, fraction: float) -> bool:
    """Whether a training row goes to val: a hash of its id, so the same ids are held out on every run."""
    digest = hashlib.blake2b(img_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


class Row(NamedTuple):
    """An image-file row on its way through the decoders, in file order."""
    line_no: int
    img_id: str
    field: bytes | None  # base64; None when the row is already rejected
    split: str
    caption: str
    text_line: int  # the caption's line, 0 when it has no usable caption row
    error: BadRowError | None


def plan_rows(source: Source, captions: dict[str, TextRow], val_fraction: float | None, kept_before: set[str]
              ) -> Iterator[Row]:
    """Image rows, rejected from their ids alone where they can be before decoding. Captions are taken out of
    `captions` as their images claim them; `kept_before` holds the img_ids earlier sources kept (a val file
    repeating one of them would score pictures the model trained on)."""
    text_name, seen = source.text_path.name, {}
    for row in read_tsv(source.img_path):
        error, caption = row.error, None
        if error is None and seen.setdefault(row.img_id, row.line_no) != row.line_no:
            error = BadRowError("duplicate img_id", f"first at line {seen[row.img_id]}")
        elif error is None:
            caption = captions.pop(row.img_id, None)
            if row.img_id in kept_before:
                error = BadRowError("duplicate img_id", "already kept from the training files")
            elif caption is None:
                error = BadRowError("no caption row", f"img_id not in {text_name}")
            elif caption.error is not None:
                error = BadRowError("caption rejected", f"{text_name} line {caption.line_no}: {caption.error.reason}")
        if error is not None:
            # A kept caption whose image is rejected is rejected too ("image rejected").
            text_line = caption.line_no if caption is not None and caption.error is None else 0
            yield Row(row.line_no, row.img_id, None, "", "", text_line, error)
        else:
            split = source.split or ("val" if held_out(row.img_id, val_fraction) else "train")
            yield Row(row.line_no, row.img_id, row.value, split, caption.caption, caption.line_no, None)


def decode_rows(rows: list[Row], size: int, resize: str, max_decode_mb: float) -> list[tuple[Row, np.ndarray | None]]:
    """Runs in a worker: each row with its square uint8 image, or with the reason it has none in `error`."""
    results = []
    for row in rows:
        try:
            image = None if row.error else image_from_base64(row.field, size, resize, max_decode_mb)
        except BadRowError as e:
            image, row = None, row._replace(error=e)
        results.append((row._replace(field=None), image))  # the base64 need not travel back
    return results


class Outputs:
    """The append-only output files of a run and its counts."""

    def __init__(self, folder: Path):
        names = [f"{split}.{kind}" for split in SPLITS for kind in ("img.bin", "txt.bin", "ids.txt")]
        self.files: dict[str, BinaryIO] = {name: open(folder / name, "wb")  # noqa: SIM115 - closed in close()
                                           for name in [*names, REJECTS_FILE]}
        self.rows, self.rejects, self.token_counts = Counter(), Counter(), Counter()
        self.kept_ids: set[str] = set()

    def append(self, split: str, codes: np.ndarray, tokens: np.ndarray, img_ids: list[str]) -> None:
        self.files[f"{split}.img.bin"].write(codes.astype(np.uint16).tobytes())
        self.files[f"{split}.txt.bin"].write(tokens.astype(np.uint16).tobytes())
        self.files[f"{split}.ids.txt"].write("".join(i + "\n" for i in img_ids).encode("utf-8"))
        self.rows[split] += len(img_ids)
        self.kept_ids.update(img_ids)

    def reject(self, source_file: str, line_no: int, img_id: str, error: BadRowError) -> None:
        cells = [source_file, str(line_no), img_id, str(error)]
        self.files[REJECTS_FILE].write(("\t".join(" ".join(c.split()) for c in cells) + "\n").encode("utf-8"))
        self.rejects[error.reason] += 1

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def encode_batch(batch: list[tuple[Row, np.ndarray]], vq: VQGAN, tokenizer, args: argparse.Namespace,
                 out: Outputs) -> None:
    rows = [row for row, _ in batch]
    pixels = np.stack([image for _, image in batch])
    tokens, counts = tokenize_captions(tokenizer, [row.caption for row in rows], args.text_len)
    out.token_counts.update(counts.tolist())
    codes = vq.encode(images_to_tensor(pixels)).reshape(len(rows), -1).cpu().numpy()
    for split in SPLITS:
        keep = [i for i, row in enumerate(rows) if row.split == split]
        out.append(split, codes[keep], tokens[keep], [rows[i].img_id for i in keep])
    train = [i for i, row in enumerate(rows) if row.split == "train"]
    if args.flip and train:
        codes = vq.encode(images_to_tensor(np.ascontiguousarray(pixels[train, :, ::-1])))
        out.append("train", codes.reshape(len(train), -1).cpu().numpy(), tokens[train],
                   [rows[i].img_id + FLIP_SUFFIX for i in train])


def prepare_source(source: Source, captions: dict[str, TextRow], text_rejects: list, val_fraction: float | None,
                   vq: VQGAN, tokenizer, pool: ProcessPoolExecutor | None, args: argparse.Namespace, out: Outputs,
                   bar) -> None:
    img_name, text_name = source.img_path.name, source.text_path.name
    for line_no, img_id, error in text_rejects:
        out.reject(text_name, line_no, img_id, error)
    workers = max(1, args.num_workers)
    chunk = max(1, min(16, args.batch_size // workers))
    rows = plan_rows(source, captions, val_fraction, set(out.kept_ids))
    jobs = ((rows, args.image_size, args.resize, args.max_decode_mb) for rows in batched(rows, chunk))
    # Enough rows in flight to fill the next batch while the VQGAN encodes this one.
    window = -(-args.batch_size // chunk) + 2 * workers
    batch: list[tuple[Row, np.ndarray]] = []
    for row, image in itertools.chain.from_iterable(map_in_order(pool, decode_rows, jobs, window, "image decoding")):
        if row.error is not None:
            out.reject(img_name, row.line_no, row.img_id, row.error)
            if row.text_line:
                partner = BadRowError("image rejected", f"{img_name} line {row.line_no}: {row.error.reason}")
                out.reject(text_name, row.text_line, row.img_id, partner)
        else:
            batch.append((row, image))
        if len(batch) == args.batch_size:
            encode_batch(batch, vq, tokenizer, args, out)
            batch = []
        bar.update(1)
    if batch:
        encode_batch(batch, vq, tokenizer, args, out)
    for img_id, caption in captions.items():  # caption rows no image row claimed, in caption-file order
        if caption.error is None:
            out.reject(text_name, caption.line_no, img_id, BadRowError("no image row", f"img_id not in {img_name}"))


def prepare(args: argparse.Namespace, command: str) -> dict:
    """Prepare `args.out_dir` unless it already holds the same preparation; returns meta.json's contents."""
    if args.val_fraction is not None and not 0.0 <= args.val_fraction <= 1.0:
        raise UserError(f"--val_fraction must be within [0, 1], got {args.val_fraction}")
    for name in ("image_size", "text_len", "batch_size", "max_decode_mb"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.text_len < 3:
        raise UserError("--text_len must leave room for [CLS], a token and [SEP] (at least 3)")
    if not Path(args.vqgan_ckpt).is_file():
        raise UserError(f"{args.vqgan_ckpt}: no such VQGAN checkpoint (--vqgan_ckpt)")
    out_dir = Path(args.out_dir)
    sources = find_inputs(Path(args.data_dir))
    val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    if len(sources) == 2:  # the val files are the val split
        if args.val_fraction is not None:
            print(f"prepare: --val_fraction ignored: {VAL_FILES[0]} is the val split", file=sys.stderr)
        val_fraction = None
    tokenizer = args.text_tokenizer or VOCAB_FILE
    if args.text_tokenizer and Path(tokenizer).exists():  # a local folder: by its full path
        tokenizer = str(Path(tokenizer).resolve())
    # Everything that decides the output bytes; an out_dir prepared with other settings is not reused.
    settings = {
        "data_dir": str(Path(args.data_dir).resolve()),
        "inputs": {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                   for source in sources for p in (source.img_path, source.text_path)},
        "vqgan_ckpt": str(Path(args.vqgan_ckpt).resolve()),
        "tokenizer": tokenizer,
        "image_size": args.image_size,
        "text_len": args.text_len,
        "resize": args.resize,
        "flip": args.flip,
        "val_fraction": val_fraction,
        "max_decode_mb": args.max_decode_mb,
    }
    if (out_dir / "meta.json").is_file():
        try:
            done = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        except ValueError as e:  # not JSON, or not UTF-8
            raise UserError(f"{out_dir / 'meta.json'} is not valid JSON ({e}): delete {out_dir}, or pick another "
                            "--out_dir") from None
        before = done.get("settings", {})
        changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if changed:
            raise UserError(f"{out_dir} was prepared with other settings or inputs (changed: {', '.join(changed)}); "
                            "delete it, or pick another --out_dir")
        print(f"prepare: {out_dir} is already prepared; nothing to do", file=sys.stderr)
        return done
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not a prepare.py output: delete it, or pick another --out_dir")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pool = process_pool(args.num_workers)  # before torch runs anything, see process_pool
    try:
        meta = _prepare(args, sources, settings, partial, pool, command)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a full disk is the likeliest reason: give the space back
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    meta["peak_memory_gib"]["workers"] = memory_gib(torch.device("cpu"), children=True).get("resident")
    (partial / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if out_dir.is_dir():
        out_dir.rmdir()  # empty (checked above); the rename needs the name free
    partial.rename(out_dir)
    print_summary(meta, out_dir)
    return meta


def _prepare(args: argparse.Namespace, sources: list[Source], settings: dict, folder: Path,
             pool: ProcessPoolExecutor | None, command: str) -> dict:
    started = time.perf_counter()
    vq = load_vqgan(args.vqgan_ckpt, pick_device(args.device))
    if args.image_size % vq.downsample_factor:
        raise UserError(f"--image_size {args.image_size} is not a multiple of the VQGAN's {vq.downsample_factor}")
    if vq.codebook_size > 65536:
        raise UserError(f"{args.vqgan_ckpt}: {vq.codebook_size} codes do not fit in uint16")
    captions = [read_captions(source.text_path) for source in sources]
    val_fraction = settings["val_fraction"]
    if settings["tokenizer"] == VOCAB_FILE:  # the characters of the training captions, held-out rows left out
        training = [c.caption for img_id, c in captions[0][0].items()
                    if c.error is None and not (val_fraction and held_out(img_id, val_fraction))]
        write_vocab(build_char_vocab(training), folder / VOCAB_FILE)
    tokenizer = load_tokenizer(settings["tokenizer"], folder)
    with closing(Outputs(folder)) as out, progress(None, "prepare", "rows") as bar:
        for source, (source_captions, text_rejects) in zip(sources, captions, strict=True):
            prepare_source(source, source_captions, text_rejects, val_fraction, vq, tokenizer, pool, args, out, bar)
        rows_read = bar.n
    if out.rows["train"] == 0:
        raise UserError(f"no usable training rows: every row was rejected ({dict(out.rejects)}; the rows are listed in "
                        f"{folder / REJECTS_FILE}, removed with the rest)")
    if out.rows["val"] == 0:
        print("prepare: warning: the val split is empty; train.py will have no val loss", file=sys.stderr)
    seconds = time.perf_counter() - started
    test_prompts = Path(args.data_dir) / TEST_FILE
    lengths = np.fromiter(out.token_counts.elements(), dtype=np.int64)  # of every kept caption, in tokens
    return {
        "image_size": args.image_size,
        "code_grid": [args.image_size // vq.downsample_factor] * 2,
        "codebook_size": vq.codebook_size,
        "text_len": args.text_len,
        "tokenizer": settings["tokenizer"],
        "text_vocab_size": len(tokenizer),
        "pad_id": 0,
        "vqgan_ckpt": settings["vqgan_ckpt"],
        "vqgan_sha256": sha256_file(args.vqgan_ckpt),
        "vqgan_config": asdict(vq.config),
        "resize": args.resize,
        "splits": {split: {"rows": out.rows[split]} for split in SPLITS},
        "val_split": "held out by img_id hash" if val_fraction is not None else "val files",
        "test_prompts": str(test_prompts.resolve()) if test_prompts.is_file() else None,
        "rejects": dict(sorted(out.rejects.items())),
        "captions_truncated": int((lengths > args.text_len).sum()),
        "caption_tokens": {"mean": round(float(lengths.mean()), 2), "p50": int(np.percentile(lengths, 50)),
                           "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max())},
        "data_dir": settings["data_dir"],
        "settings": settings,
        "rows_read": rows_read,
        "seconds": round(seconds, 1),
        "peak_memory_gib": {"main": memory_gib(torch.device("cpu")).get("resident")},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "pillow": PIL.__version__},
        "command": command,
    }


def print_summary(meta: dict, out_dir: Path) -> None:
    splits, rejects, tokens, memory = meta["splits"], meta["rejects"], meta["caption_tokens"], meta["peak_memory_gib"]
    lines = [f"prepare: {meta['rows_read']} image rows in {meta['seconds']:.1f} s; kept train "
             f"{splits['train']['rows']}, val {splits['val']['rows']}; {sum(rejects.values())} rejected lines "
             f"(listed in {REJECTS_FILE})"]
    lines += [f"  {count:8d}  {reason}" for reason, count in sorted(rejects.items(), key=lambda kv: -kv[1])]
    lines.append(f"  caption tokens: p50 {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}; "
                 f"{meta['captions_truncated']} cut to {meta['text_len']}")
    if memory.get("main"):  # not measured on Windows
        lines.append(f"  peak memory: main process {memory['main']:.2f} GiB, largest worker "
                     f"{memory['workers'] or 0:.2f} GiB")
    lines.append(f"  outputs in {out_dir}")
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        if not all((DEMO_SOURCE / name).is_file() for name in (*TRAIN_FILES, *VAL_FILES, TEST_FILE)):
            print(f"prepare.py: writing the demo products to {DEMO_SOURCE}", file=sys.stderr)
            demo.write_dataset(DEMO_SOURCE, image_size=DEMO_IMAGE_SIZE)
        argv = DEMO_ARGS
    args = build_parser().parse_args(argv)
    return run_main("prepare.py", lambda: prepare(args, shlex.join(["python", "prepare.py", *argv])))


if __name__ == "__main__":
    sys.exit(main())
