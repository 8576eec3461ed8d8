"""Turn MUGE TSVs into the uint16 memmaps that train.py reads: VQGAN codes per image, token ids per caption.

    python prepare.py --data_dir dataset/ECommerce-T2I --vqgan_ckpt vqgan_imagenet_f16_1024/last.ckpt \\
        --out_dir data/muge
    python prepare.py    # the embedded demo: demo.py's products -> data/demo_src -> data/demo

The image TSV is streamed (memory does not grow with its size) and joined to the captions by img_id. Bad rows
are skipped and listed in rejects.tsv; a run that is stopped (Ctrl-C, kill -9, power loss) continues where its
last commit left off when the same command is run again, and gives the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shlex
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL
import tokenizers
import torch
import transformers

import demo
from data import (
    LINE_ERRORS,
    MAX_IMAGE_PIXELS,
    RESIZE_MODES,
    BadRowError,
    TsvRow,
    image_from_base64,
    read_text_tsv,
    read_tsv,
)
from text import VOCAB_FILE, build_char_vocab, has_text, load_tokenizer, read_vocab, tokenize_captions, write_vocab
from utils import Progress, batched, fsync_dir, pick_device, write_atomic
from vqgan import images_to_tensor, load_vqgan

TRAIN_FILES = ("T2I_train.img.tsv", "T2I_train.text.tsv")
VAL_FILES = ("T2I_val.img.tsv", "T2I_val.text.tsv")
TEST_FILE = "T2I_test.text.tsv"
SPLITS = ("train", "val")
STATE_FILE = "prepare_state.json"
META_FILE = "meta.json"
REJECTS_FILE = "rejects.tsv"
DEFAULT_VAL_FRACTION = 0.05
# Committing costs an fsync of every output; once a second loses at most a second of work to a crash.
COMMIT_EVERY_SECONDS = 1.0
# For the resume tests: write this many batches, then stop before committing the last one and wait to be killed.
STALL_ENV = "NANOT2I_PREPARE_STALL_AFTER"


# `python prepare.py` alone prepares the demo: synthetic products and the small VQGAN in assets/, which was
# trained at 64 px. Demo titles are at most 28 tokens long.
DEMO_SOURCE = Path("data/demo_src")
DEMO_IMAGE_SIZE = 64
DEMO_ARGS = ["--data_dir", str(DEMO_SOURCE), "--vqgan_ckpt", "assets/vqgan_demo.pt", "--out_dir", "data/demo",
             "--image_size", str(DEMO_IMAGE_SIZE), "--text_len", "32"]


class PrepareError(Exception):
    """A problem with the inputs or the output folder that stops the run; the message says what to do."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare.py",
        description="Encode MUGE ECommerce-T2I TSVs into VQGAN code and caption token memmaps.",
    )
    parser.add_argument(
        "--data_dir",
        required=True,
        help=f"folder with {' and '.join(TRAIN_FILES)}; optionally {' and '.join(VAL_FILES)} (used as the "
        f"val split) and {TEST_FILE} (recorded in meta.json for generate.py)",
    )
    parser.add_argument("--vqgan_ckpt", required=True, help="VQGAN checkpoint: a taming last.ckpt or our own")
    parser.add_argument("--out_dir", required=True, help="where the memmaps, meta.json and rejects.tsv go")
    parser.add_argument(
        "--text_tokenizer",
        default=None,
        help="Hugging Face tokenizer name or local folder (BERT-style, padding id 0); by default a character "
        f"vocabulary is built from the training captions and saved as {VOCAB_FILE}",
    )
    parser.add_argument(
        "--image_size", type=int, default=256, help="side of the square images the VQGAN sees (default: %(default)s)"
    )
    parser.add_argument(
        "--text_len", type=int, default=64, help="tokens per caption, [CLS] and [SEP] included (default: %(default)s)"
    )
    parser.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="pad",
        help="non-square images: pad (the default) keeps the whole product on its background colour, crop cuts the "
        "centre square",
    )
    parser.add_argument(
        "--val_fraction",
        type=float,
        default=None,
        help=f"without val files: the share of training rows held out, chosen by a hash of img_id "
        f"(default: {DEFAULT_VAL_FRACTION}); ignored when val files exist",
    )
    parser.add_argument(
        "--batch_size", type=int, default=32, help="images per VQGAN forward pass (default: %(default)s)"
    )
    parser.add_argument("--device", default=None, help="cuda, cpu, mps, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) - 1)),
        help="processes decoding and resizing images; 0 decodes in the main process (default: CPU cores - 1, "
        "at most 8: %(default)s here)",
    )
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help="images with more pixels are rejected as decompression bombs (default: %(default)s)",
    )
    return parser


# --- inputs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A pair of image and caption files; `split` is None when rows are split by hash into train and val."""

    img_path: Path
    text_path: Path
    split: str | None


class Caption(NamedTuple):
    line_no: int
    caption: str
    error: BadRowError | None


def find_inputs(data_dir: Path) -> tuple[list[Source], Path | None]:
    if not data_dir.is_dir():
        raise PrepareError(f"{data_dir}: no such folder (--data_dir)")
    train = [data_dir / name for name in TRAIN_FILES]
    val = [data_dir / name for name in VAL_FILES]
    missing = [str(p) for p in train if not p.is_file()]
    if missing:
        raise PrepareError(f"missing training file(s): {', '.join(missing)}")
    sources = [Source(*train, split=None)]
    val_present = [p.is_file() for p in val]
    if any(val_present) and not all(val_present):
        have, lack = (val[0], val[1]) if val_present[0] else (val[1], val[0])
        raise PrepareError(f"{have} exists but {lack} does not: the val split needs both")
    if all(val_present):
        sources = [Source(*train, split="train"), Source(*val, split="val")]
    test = data_dir / TEST_FILE
    return sources, test.resolve() if test.is_file() else None


def held_out(img_id: str, fraction: float) -> bool:
    """Whether a training row goes to val: a hash of its id, so the same ids are held out on every run."""
    digest = hashlib.blake2b(img_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


def read_captions(text_path: Path) -> tuple[dict[str, Caption], list[tuple[int, str, BadRowError]]]:
    """All caption rows by img_id (first occurrence wins), and the rejected text rows in file order.

    Captions are a few MB even for MUGE's 90k rows, so they are held in memory while the image file streams.
    """
    captions: dict[str, Caption] = {}
    rejects: list[tuple[int, str, BadRowError]] = []
    for row in read_text_tsv(text_path):
        if row.error is not None and row.error.reason in LINE_ERRORS:
            rejects.append((row.line_no, row.img_id, row.error))
            continue
        if row.img_id in captions:
            first = captions[row.img_id].line_no
            rejects.append((row.line_no, row.img_id, BadRowError("duplicate img_id", f"first at line {first}")))
            continue
        error = row.error
        if error is None and not has_text(row.caption):
            error = BadRowError("empty caption", "nothing but spaces and control characters")
        if error is not None:
            rejects.append((row.line_no, row.img_id, error))
        # A rejected caption is kept too, so that its image row can say why it has no caption.
        captions[row.img_id] = Caption(row.line_no, row.caption, error)
    return captions, rejects


def training_captions(captions: dict[str, Caption], source: Source, val_fraction: float) -> Iterator[str]:
    for img_id, entry in captions.items():
        if entry.error is None and (source.split == "train" or not held_out(img_id, val_fraction)):
            yield entry.caption


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# --- decoding in worker processes ------------------------------------------------------------------------------


class Item(NamedTuple):
    """One image-file row on its way through the decoders, in file order."""

    line_no: int
    end_offset: int
    img_id: str
    image_field: bytes | None  # base64; None when the row is already rejected
    split: str
    caption: str
    text_line: int  # 0 when no caption row belongs to this row
    error: BadRowError | None


def plan_rows(
    source: Source,
    captions: dict[str, Caption],
    seen: dict[str, int],
    val_fraction: float,
    start_offset: int,
    start_line: int,
    kept_earlier: frozenset[str],
) -> Iterator[Item]:
    """Read image rows and decide from the ids alone what can be rejected before decoding.

    `kept_earlier` holds the img_ids that earlier sources put in the outputs: a val file that repeats one of them
    would score pictures the model trained on.
    """
    text_name = source.text_path.name
    for row in read_tsv(source.img_path, start_offset, start_line):
        if row.error is not None:
            yield _rejected(row, row.error)
            continue
        first = seen.setdefault(row.img_id, row.line_no)
        if first != row.line_no:
            yield _rejected(row, BadRowError("duplicate img_id", f"first at line {first}"))
            continue
        entry = captions.pop(row.img_id, None)
        if row.img_id in kept_earlier:
            error = BadRowError("duplicate img_id", "already kept from the training files")
            text_line = entry.line_no if entry is not None and entry.error is None else 0  # else already rejected
            yield Item(row.line_no, row.end_offset, row.img_id, None, "", "", text_line, error)
        elif entry is None:
            yield _rejected(row, BadRowError("no caption row", f"img_id not in {text_name}"))
        elif entry.error is not None:
            reason = f"{text_name} line {entry.line_no}: {entry.error.reason}"
            yield _rejected(row, BadRowError("caption rejected", reason))
        else:
            split = source.split or ("val" if held_out(row.img_id, val_fraction) else "train")
            yield Item(row.line_no, row.end_offset, row.img_id, row.value, split, entry.caption, entry.line_no, None)


def _rejected(row: TsvRow, error: BadRowError) -> Item:
    return Item(row.line_no, row.end_offset, row.img_id, None, "", "", 0, error)


def replay_seen(source: Source, captions: dict[str, Caption], seen: dict[str, int], offset: int) -> None:
    """On resume: redo plan_rows' bookkeeping for the rows before `offset` without decoding them."""
    for row in read_tsv(source.img_path):
        if row.end_offset > offset:
            return
        if row.error is None and row.img_id not in seen:
            seen[row.img_id] = row.line_no
            captions.pop(row.img_id, None)


def decode_fields(
    fields: list[bytes | None], size: int, resize: str, max_pixels: int
) -> list[tuple[np.ndarray | None, BadRowError | None]]:
    """Runs in a worker: base64 fields -> square uint8 images, or the reason each one is unusable."""
    results: list[tuple[np.ndarray | None, BadRowError | None]] = []
    for data in fields:
        if data is None:
            results.append((None, None))
            continue
        try:
            results.append((image_from_base64(data, size, resize, max_pixels), None))
        except BadRowError as e:
            results.append((None, e))
    return results


def _ignore_sigint() -> None:
    # Ctrl-C is handled once, by the main process, which then stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_pool(num_workers: int) -> multiprocessing.pool.Pool | None:
    if num_workers <= 0:
        return None
    # fork starts workers instantly and shares the loaded modules; it is safe here because the pool starts before
    # torch has run anything and the workers only use Pillow and numpy. spawn where fork is missing or unsafe.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"
    return multiprocessing.get_context(method).Pool(num_workers, initializer=_ignore_sigint)


def decode_in_order(
    items: Iterator[Item], pool: multiprocessing.pool.Pool | None, args: argparse.Namespace
) -> Iterator[tuple[Item, np.ndarray | None, BadRowError | None]]:
    """Decode rows in the workers, yielding results in file order with a bounded number of rows in flight."""
    decode_args = (args.image_size, args.resize, args.max_pixels)
    workers = max(1, args.num_workers)
    chunk_rows = max(1, min(16, args.batch_size // workers))
    # Enough rows in flight to fill the next batch while the VQGAN encodes this one, and no more.
    max_chunks = -(-args.batch_size // chunk_rows) + 2 * workers

    def submit(chunk: list[Item]):
        fields = [item.image_field for item in chunk]
        if pool is None:
            return decode_fields(fields, *decode_args)
        return pool.apply_async(decode_fields, (fields, *decode_args))

    def finish(chunk: list[Item], result) -> Iterator[tuple[Item, np.ndarray | None, BadRowError | None]]:
        decoded = result if pool is None else result.get()
        for item, (pixels, error) in zip(chunk, decoded, strict=True):
            yield item, pixels, item.error or error

    pending: deque = deque()
    for chunk in batched(items, chunk_rows):
        pending.append((chunk, submit(chunk)))
        while len(pending) >= max_chunks:
            yield from finish(*pending.popleft())
    while pending:
        yield from finish(*pending.popleft())


# --- outputs and the resumable state ---------------------------------------------------------------------------


def output_names() -> list[str]:
    return [f"{split}.{kind}" for split in SPLITS for kind in ("img.bin", "txt.bin", "ids.txt")] + [REJECTS_FILE]


@dataclass
class State:
    """What has been committed: everything in the outputs up to `sizes` is final; the rest is redone."""

    settings: dict
    source: int = 0  # index of the source being read
    started: bool = False  # its caption rejects are written and it is being read from `offset`
    offset: int = 0  # byte offset in its image file after the last committed row
    line: int = 0  # line number of that row
    sizes: dict = field(default_factory=lambda: dict.fromkeys(output_names(), 0))
    rows: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    rejects: dict = field(default_factory=dict)
    token_counts: dict = field(default_factory=dict)  # caption length in tokens -> rows, before truncation
    done: bool = False

    @classmethod
    def load(cls, out_dir: Path) -> State | None:
        path = out_dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:
            raise PrepareError(f"{path}: unreadable progress file ({e}); delete {out_dir} to start over") from None

    def save(self, out_dir: Path) -> None:
        write_atomic(out_dir / STATE_FILE, json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n")


class Outputs:
    """The append-only output files, cut back to the committed sizes when a run resumes."""

    def __init__(self, out_dir: Path, sizes: dict[str, int]):
        self.out_dir = out_dir
        self.files = {}
        for name, size in sizes.items():
            path = out_dir / name
            actual = path.stat().st_size if path.exists() else 0
            if actual < size:
                raise PrepareError(
                    f"{path} has {actual} bytes but {size} were committed: the output folder was changed; "
                    f"delete {out_dir} and run again"
                )
            with open(path, "ab") as f:
                f.truncate(size)
            self.files[name] = open(path, "ab")  # noqa: SIM115 (closed in close())

    def append_rows(self, split: str, codes: np.ndarray, tokens: np.ndarray, img_ids: list[str]) -> None:
        self.files[f"{split}.img.bin"].write(codes.astype(np.uint16).tobytes())
        self.files[f"{split}.txt.bin"].write(tokens.astype(np.uint16).tobytes())
        self.files[f"{split}.ids.txt"].write("".join(i + "\n" for i in img_ids).encode("utf-8"))

    def reject(self, source_file: str, line_no: int, img_id: str, error: BadRowError) -> None:
        cells = [source_file, str(line_no), img_id, str(error)]
        self.files[REJECTS_FILE].write(("\t".join(_one_line(c) for c in cells) + "\n").encode("utf-8"))

    def flush(self) -> None:
        for f in self.files.values():
            f.flush()

    def sync(self) -> dict[str, int]:
        """Make everything written durable; returns the file sizes to commit."""
        self.flush()
        for f in self.files.values():
            os.fsync(f.fileno())
        return {name: f.tell() for name, f in self.files.items()}

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _one_line(cell: str) -> str:
    return cell.replace("\t", " ").replace("\r", " ").replace("\n", " ")


# --- the run ---------------------------------------------------------------------------------------------------


class Run:
    """One prepare run: reads the sources in order, encodes full batches and commits progress."""

    def __init__(self, args: argparse.Namespace, out_dir: Path, state: State):
        self.args, self.out_dir, self.state = args, out_dir, state
        self.outputs = Outputs(out_dir, state.sizes)
        self.rejects = Counter(state.rejects)
        self.token_counts = Counter({int(k): v for k, v in state.token_counts.items()})
        self.last_commit = time.perf_counter()
        self.batches = 0
        self.stall_after = int(os.environ.get(STALL_ENV, "0"))
        self.commit_every = 0.0 if self.stall_after else COMMIT_EVERY_SECONDS
        self.bar = Progress(desc="prepare", unit="rows")
        self.kept = sum(state.rows.values())

    def reject(self, source_file: str, line_no: int, img_id: str, error: BadRowError) -> None:
        self.outputs.reject(source_file, line_no, img_id, error)
        self.rejects[error.reason] += 1

    def commit(self, **position) -> None:
        for key, value in position.items():
            setattr(self.state, key, value)
        # Data first, then the state that points at it: a crash in between leaves uncommitted data that the next
        # run cuts off, never a state that points past the data.
        self.state.sizes = self.outputs.sync()
        self.state.rejects = dict(sorted(self.rejects.items()))
        self.state.token_counts = {str(k): v for k, v in sorted(self.token_counts.items())}
        self.state.save(self.out_dir)
        self.last_commit = time.perf_counter()

    def encode_source(self, index: int, source: Source, captions, text_rejects, pool, vq, tokenizer) -> None:
        state, img_name, text_name = self.state, source.img_path.name, source.text_path.name
        seen: dict[str, int] = {}
        if state.started:
            replay_seen(source, captions, seen, state.offset)
        else:
            for line_no, img_id, error in text_rejects:
                self.reject(text_name, line_no, img_id, error)
            self.commit(started=True, offset=0, line=0)
        size = max(1, source.img_path.stat().st_size)
        # Earlier sources are committed in full before a later one starts, so their id files are complete here.
        train_ids = (self.out_dir / "train.ids.txt").read_text(encoding="utf-8").splitlines() if index > 0 else []
        kept_earlier = frozenset(train_ids)
        items = plan_rows(source, captions, seen, self.args.val_fraction, state.offset, state.line, kept_earlier)
        batch: list[tuple[Item, np.ndarray]] = []
        for item, pixels, error in decode_in_order(items, pool, self.args):
            if error is not None:
                self.reject(img_name, item.line_no, item.img_id, error)
                if item.text_line:
                    partner = BadRowError("image rejected", f"{img_name} line {item.line_no}: {error.reason}")
                    self.reject(text_name, item.text_line, item.img_id, partner)
            else:
                batch.append((item, pixels))
            self.bar.update(1, postfix=f"{img_name} {100 * item.end_offset / size:.0f}% kept {self.kept + len(batch)}")
            if len(batch) == self.args.batch_size:
                self.write_batch(batch, vq, tokenizer)
                batch = []
                if time.perf_counter() - self.last_commit >= self.commit_every:
                    self.commit(offset=item.end_offset, line=item.line_no)
        if batch:
            self.write_batch(batch, vq, tokenizer)
        # Rows of the caption file that no image row claimed, in caption-file order.
        for img_id, entry in captions.items():
            if entry.error is None:
                self.reject(text_name, entry.line_no, img_id, BadRowError("no image row", f"img_id not in {img_name}"))
        self.commit(source=index + 1, started=False, offset=0, line=0)

    def write_batch(self, batch: list[tuple[Item, np.ndarray]], vq, tokenizer) -> None:
        pixels = np.stack([p for _, p in batch])
        codes = vq.encode(images_to_tensor(pixels)).reshape(len(batch), -1).cpu().numpy()
        tokens, counts = tokenize_captions(tokenizer, [item.caption for item, _ in batch], self.args.text_len)
        self.token_counts.update(counts.tolist())
        for split in SPLITS:
            rows = [i for i, (item, _) in enumerate(batch) if item.split == split]
            if rows:
                ids = [batch[i][0].img_id for i in rows]
                self.outputs.append_rows(split, codes[rows], tokens[rows], ids)
                self.state.rows[split] += len(rows)
        self.kept += len(batch)
        self.batches += 1
        if self.batches == self.stall_after:
            self.outputs.flush()
            print(f"prepare: stalling after {self.batches} batches ({STALL_ENV})", file=sys.stderr, flush=True)
            time.sleep(3600)


def settings_of(args: argparse.Namespace, sources: list[Source], tokenizer_spec: str, vqgan_sha256: str) -> dict:
    """Everything that decides the output bytes; a resumed run must match them."""
    inputs = {}
    for source in sources:
        for path in (source.img_path, source.text_path):
            stat = path.stat()
            inputs[path.name] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    has_val_files = any(s.split == "val" for s in sources)
    return {
        "data_dir": str(Path(args.data_dir).resolve()),
        "inputs": inputs,
        "vqgan_ckpt": str(Path(args.vqgan_ckpt).resolve()),
        "vqgan_sha256": vqgan_sha256,
        "tokenizer": tokenizer_spec,
        "image_size": args.image_size,
        "text_len": args.text_len,
        "resize": args.resize,
        "val_fraction": None if has_val_files else args.val_fraction,
        "max_pixels": args.max_pixels,
    }


def check_args(args: argparse.Namespace) -> None:
    if args.val_fraction is not None and not 0.0 <= args.val_fraction <= 1.0:
        raise PrepareError(f"--val_fraction must be within [0, 1], got {args.val_fraction}")
    for name in ("image_size", "text_len", "batch_size", "max_pixels"):
        if getattr(args, name) <= 0:
            raise PrepareError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.text_len < 3:
        raise PrepareError("--text_len must leave room for [CLS], a token and [SEP] (at least 3)")
    if not Path(args.vqgan_ckpt).is_file():
        raise PrepareError(f"{args.vqgan_ckpt}: no such VQGAN checkpoint (--vqgan_ckpt)")


def prepare(args: argparse.Namespace, command: str) -> dict:
    """Run (or resume) a prepare; returns the summary it prints. Raises PrepareError for unusable inputs."""
    check_args(args)
    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    sources, test_prompts = find_inputs(data_dir)
    has_val_files = len(sources) == 2
    if has_val_files and args.val_fraction is not None:
        print(f"prepare: --val_fraction ignored: {VAL_FILES[0]} is the val split", file=sys.stderr)
    val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    args.val_fraction = val_fraction
    tokenizer_spec = VOCAB_FILE
    if args.text_tokenizer:
        local = Path(args.text_tokenizer)
        tokenizer_spec = str(local.resolve()) if local.exists() else args.text_tokenizer
    settings = settings_of(args, sources, tokenizer_spec, sha256_file(Path(args.vqgan_ckpt)))

    out_dir.mkdir(parents=True, exist_ok=True)
    state = State.load(out_dir)
    if state is not None and state.settings != settings:
        changed = sorted(k for k in settings.keys() | state.settings.keys() if settings.get(k) != state.settings.get(k))
        raise PrepareError(
            f"{out_dir} holds a run with other settings or inputs (changed: {', '.join(changed)}); "
            "use another --out_dir, or delete it to start over"
        )
    if state is not None and state.done:
        check_finished_outputs(out_dir, state)
        print(f"prepare: {out_dir} is already prepared; nothing to do", file=sys.stderr)
        return {"rows_read": 0, "kept": dict(state.rows), "rejected": sum(state.rejects.values())}
    if state is None:
        state = State(settings=settings)
        for name in (META_FILE, VOCAB_FILE):
            (out_dir / name).unlink(missing_ok=True)

    started = time.perf_counter()
    pool = make_pool(args.num_workers)  # before torch runs anything: see make_pool
    try:
        return run(args, out_dir, state, sources, test_prompts, pool, command, started)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def run(args, out_dir: Path, state: State, sources, test_prompts, pool, command: str, started: float) -> dict:
    device = pick_device(args.device)
    vq = load_vqgan(args.vqgan_ckpt, device)
    factor = vq.downsample_factor
    if args.image_size % factor:
        raise PrepareError(f"--image_size {args.image_size} is not a multiple of the VQGAN's factor {factor}")
    if vq.codebook_size > 65536:
        raise PrepareError(f"{args.vqgan_ckpt}: {vq.codebook_size} codes do not fit in uint16")

    first_captions, first_rejects = read_captions(sources[0].text_path)
    tokenizer_spec = state.settings["tokenizer"]
    if tokenizer_spec == VOCAB_FILE:
        write_or_check_vocab(
            out_dir, build_char_vocab(training_captions(first_captions, sources[0], args.val_fraction))
        )
    tokenizer = load_tokenizer(tokenizer_spec, out_dir)

    job = Run(args, out_dir, state)
    try:
        for index, source in enumerate(sources):
            if index < state.source:
                continue
            captions, text_rejects = (first_captions, first_rejects) if index == 0 else read_captions(source.text_path)
            job.encode_source(index, source, captions, text_rejects, pool, vq, tokenizer)
    finally:
        job.bar.close()
        job.outputs.close()
    if pool is not None:  # finished workers report their peak memory to the summary
        pool.close()
        pool.join()

    summary = summarize(job, time.perf_counter() - started)
    if state.rows["train"] == 0:
        print_summary(summary, out_dir)
        raise PrepareError(f"no usable training rows: every row was rejected (see {out_dir / REJECTS_FILE})")
    if state.rows["val"] == 0:
        print("prepare: warning: the val split is empty; train.py will have no val loss", file=sys.stderr)
    meta = build_meta(args, state, vq, tokenizer, tokenizer_spec, test_prompts, job, command)
    write_atomic(out_dir / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    state.done = True
    state.save(out_dir)
    fsync_dir(out_dir)
    print_summary(summary, out_dir)
    return summary


def write_or_check_vocab(out_dir: Path, vocab: list[str]) -> None:
    """The vocabulary is written before any ids; a resumed run must rebuild the very same one."""
    path = out_dir / VOCAB_FILE
    if path.is_file():
        if read_vocab(path) != vocab:
            raise PrepareError(f"{path} differs from the vocabulary the captions give now; delete {out_dir}")
        return
    write_vocab(vocab, path)


def check_finished_outputs(out_dir: Path, state: State) -> None:
    for name, size in state.sizes.items():
        path = out_dir / name
        if not path.is_file() or path.stat().st_size != size:
            raise PrepareError(f"{path} was changed after prepare finished; delete {out_dir} to prepare again")
    if not (out_dir / META_FILE).is_file():
        raise PrepareError(f"{out_dir / META_FILE} is missing; delete {out_dir} to prepare again")


def token_stats(counts: Counter, text_len: int) -> dict:
    total = sum(counts.values())
    if not total:
        return {}
    lengths = np.repeat(np.array(sorted(counts)), [counts[k] for k in sorted(counts)])
    p50, p95, p99 = (int(np.percentile(lengths, q)) for q in (50, 95, 99))
    return {
        "mean": round(float(lengths.mean()), 2),
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "max": int(lengths.max()),
        "over_text_len": int((lengths > text_len).sum()),
    }


def build_meta(args, state: State, vq, tokenizer, tokenizer_spec: str, test_prompts, job: Run, command: str) -> dict:
    grid = args.image_size // vq.downsample_factor
    token_counts = job.token_counts
    return {
        "image_size": args.image_size,
        "code_grid": [grid, grid],
        "codebook_size": vq.codebook_size,
        "text_len": args.text_len,
        "tokenizer": tokenizer_spec,
        "text_vocab_size": len(tokenizer),
        "pad_id": 0,
        "vqgan_ckpt": state.settings["vqgan_ckpt"],
        "vqgan_sha256": state.settings["vqgan_sha256"],
        "vqgan_config": asdict(vq.config),
        "resize": args.resize,
        "splits": {split: {"rows": state.rows[split]} for split in SPLITS},
        "val_split": "val files" if state.settings["val_fraction"] is None else "held out by img_id hash",
        "val_fraction": state.settings["val_fraction"],
        "test_prompts": str(test_prompts) if test_prompts else None,
        "rejects": dict(sorted(job.rejects.items())),
        "captions_truncated": sum(v for k, v in token_counts.items() if k > args.text_len),
        "caption_tokens": token_stats(token_counts, args.text_len),
        "dtype": "uint16",
        "max_pixels": args.max_pixels,
        "data_dir": state.settings["data_dir"],
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        },
        "command": command,
    }


def summarize(job: Run, seconds: float) -> dict:
    """This run's figures: rows read now (after a resume, only the rest), the image-pass rate, memory."""
    image_seconds = time.perf_counter() - job.bar.start
    main_mb, worker_mb = peak_memory_mb()
    return {
        "rows_read": job.bar.done,
        "seconds": round(seconds, 2),
        "rows_per_sec": round(job.bar.done / max(image_seconds, 1e-9), 2),
        "kept": dict(job.state.rows),
        "rejected": sum(job.rejects.values()),
        "rejects": dict(sorted(job.rejects.items(), key=lambda kv: -kv[1])),
        "caption_tokens": token_stats(job.token_counts, job.args.text_len),
        "text_len": job.args.text_len,
        "peak_rss_mb": {"main": round(main_mb), "largest_worker": round(worker_mb)},
    }


def print_summary(summary: dict, out_dir: Path) -> None:
    kept = summary["kept"]
    lines = [
        f"prepare: {summary['rows_read']} rows in {summary['seconds']:.1f}s, {summary['rows_per_sec']:.1f} rows/s "
        f"after start-up; kept train {kept['train']}, val {kept['val']}; {summary['rejected']} rejected rows"
    ]
    lines += [f"  {count:8d}  {reason}" for reason, count in summary["rejects"].items()]
    tokens = summary["caption_tokens"]
    if tokens:
        lines.append(
            f"  caption tokens: p50 {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}; "
            f"{tokens['over_text_len']} truncated to {summary['text_len']}"
        )
    memory = summary["peak_rss_mb"]
    if memory["main"]:
        lines.append(
            f"  peak memory: main process {memory['main']} MB, largest decode worker {memory['largest_worker']} MB"
        )
    lines.append(f"  outputs in {out_dir} (rejected rows listed in {REJECTS_FILE})")
    print("\n".join(lines), file=sys.stderr)


def peak_memory_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest finished child; zeros where the OS has no count."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0, 0.0
    scale = 1 / 1024**2 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return own, children


def write_demo_source() -> None:
    """Write the demo's MUGE-format TSVs once; they are deterministic, so existing ones are kept."""
    if not all((DEMO_SOURCE / name).is_file() for name in (*TRAIN_FILES, *VAL_FILES, TEST_FILE)):
        print(f"prepare.py: writing the demo products to {DEMO_SOURCE}", file=sys.stderr)
        demo.write_dataset(DEMO_SOURCE, image_size=DEMO_IMAGE_SIZE)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        write_demo_source()
        argv = DEMO_ARGS
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "prepare.py", *argv])
    try:
        prepare(args, command)
        return 0
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nprepare.py: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
