"""Draw a product picture for every caption: one `img_id \\t base64(PNG)` line per caption on stdout, in input order.

    python generate.py > T2I_test.tsv                             # the test prompts prepare.py found
    python generate.py --ckpt out/muge/best.pt --batch_size 256 > T2I_test.tsv
    python generate.py --prompts my_titles.tsv --grid preview.png --out_dir pictures/ > my_titles.out.tsv
    python generate.py --prompt "红色连衣裙 夏季新款" --grid preview.png > /dev/null

Everything defaults to what the checkpoint recorded: the prompts (the data dir's T2I_test.text.tsv), the VQGAN
and the tokenizer. Only result lines reach stdout; warnings, progress and the summary go to stderr. Worker
processes encode the pictures while the GPT samples the next batch.
"""

import argparse
import base64
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from data import LINE_ERRORS, read_text_tsv
from model import row_keys
from sample import (
    DEFAULT_CKPT,
    OUTPUT_SIZE,
    add_sampling_flags,
    encode_picture,
    load_pipeline,
    sampling_flag_problems,
    write_grid,
)
from text import has_text
from utils import (
    Report,
    UserError,
    check_compiler,
    map_in_order,
    pick_device,
    pick_dtype,
    process_pool,
    progress,
    results_stdout,
    run_main,
)


class Prompt(NamedTuple):
    img_id: str
    caption: str
    where: str  # "file:line", for messages


def read_prompts(args: argparse.Namespace, meta: dict, report: Report) -> list[Prompt]:
    """--prompt, or the rows of --prompts (default: the checkpoint's test prompts) in file order: an empty or bad
    caption is drawn unconditionally, a repeated img_id gets a line each time, a line with no img_id is skipped."""
    if args.prompt is not None:
        if not has_text(args.prompt):
            report.warn("--prompt", "empty caption", "drawn unconditionally")
        return [Prompt("prompt", args.prompt.strip(), "--prompt")]
    path = args.prompts or meta.get("test_prompts")
    if not path:
        raise UserError("the checkpoint's data has no test prompts (prepare.py found no T2I_test.text.tsv): "
                        "pass --prompts FILE.tsv or --prompt TEXT")
    if not Path(path).is_file():
        hint = " (--prompts)" if args.prompts else ", recorded by prepare.py, no longer exists: pass --prompts FILE.tsv"
        raise UserError(f"{path}: no such prompts file{hint}")
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    for row in read_text_tsv(path):
        where = f"{path}:{row.line_no}"
        if row.error is not None and row.error.reason in LINE_ERRORS:
            report.warn(where, "skipped line", str(row.error))
            continue
        if row.error is not None or not has_text(row.caption):
            reason = "empty caption" if row.error is None else row.error.reason
            report.warn(where, reason, f"{row.img_id} is drawn unconditionally")
        if row.img_id in first_line:
            report.warn(where, "duplicate img_id",
                        f"{row.img_id} (first at line {first_line[row.img_id]}); each line gets its own picture")
        first_line.setdefault(row.img_id, row.line_no)
        prompts.append(Prompt(row.img_id, row.caption, where))
    if not prompts:
        raise UserError(f"{path}: no `img_id<TAB>caption` lines to generate for")
    return prompts


def result_line(img_id: str, picture: np.ndarray, size: int | None, image_format: str, quality: int,
                save_to: str | None) -> tuple[bytes, float]:
    """Runs in a worker: one picture's submission line (and its file under --out_dir), and the seconds. Standard
    base64 with padding: b64decode and urlsafe_b64decode both read it, where b64decode would mangle URL-safe '-' '_'."""
    started = time.perf_counter()
    data = encode_picture(picture, size, image_format, quality)
    if save_to:
        Path(save_to).write_bytes(data)
    return img_id.encode("utf-8") + b"\t" + base64.b64encode(data) + b"\n", time.perf_counter() - started


def file_names(prompts: list[Prompt], suffix: str) -> list[str]:
    """A file name per prompt: its img_id made safe, numbered when ids repeat or become equal."""
    names, taken = [], set()
    for prompt in prompts:
        stem = re.sub(r"[^\w.-]", "_", prompt.img_id).lstrip(".") or "_"
        name, n = f"{stem}.{suffix}", 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}-{n}.{suffix}"
        taken.add(name.lower())
        names.append(name)
    return names


def run(args: argparse.Namespace, out: BinaryIO) -> dict[str, Any]:
    """Write one result line per prompt to `out` in input order; returns the summary (also shown on stderr)."""
    check_args(args)
    pool = process_pool(args.num_workers)  # before torch runs anything, see process_pool
    try:
        return _run(args, out, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _run(args: argparse.Namespace, out: BinaryIO, pool: ProcessPoolExecutor | None) -> dict[str, Any]:
    started = time.perf_counter()
    report = Report()
    device = pick_device(args.device)
    compile = device.type == "cuda" if args.compile is None else args.compile == "true"
    if compile:
        check_compiler(device)
    pipe = load_pipeline(args.ckpt, device, pick_dtype(device, args.dtype), args.vqgan_ckpt, args.data_dir, report)
    prompts = read_prompts(args, pipe.ckpt.get("meta") or {}, report)
    ids, counts = pipe.caption_ids([p.caption for p in prompts])
    text_len = pipe.model.config.text_len
    for prompt, count in zip(prompts, counts, strict=True):
        if count > text_len:
            report.warn(prompt.where, "caption truncated",
                        f"{prompt.img_id}: {count} tokens, the model reads the first {text_len}")
    n, batch_size = len(prompts), min(args.batch_size, len(prompts))
    sampler = pipe.sampler(batch_size * args.candidates, args.cfg_scale, args.temperature, args.top_k, args.top_p,
                           compile)
    native = pipe.model.config.grid_rows * pipe.vq.downsample_factor
    size = args.image_size or None
    best_of = f", best of {args.candidates} by likelihood" if args.candidates > 1 else ""
    resize = f" resized to {size} px" if size and size != native else ""
    print(f"generate: {n} prompts, {pipe.model.num_params() / 1e6:.1f}M parameters, {native} px pictures{resize}, "
          f"{args.format}, batch {batch_size}, cfg {args.cfg_scale}{best_of}, {device}, "
          f"{str(pipe.model.head.weight.dtype).removeprefix('torch.')}{', compiled' if compile else ''}",
          file=sys.stderr)
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    names = file_names(prompts, "png" if args.format == "png" else "jpg") if args.out_dir else [None] * n
    grid: list[tuple[str, str, np.ndarray]] = []
    loaded = time.perf_counter()

    def jobs():
        batches = pipe.draw(ids, row_keys(args.seed, range(n), args.candidates), sampler)
        pictures = (picture for batch in batches for picture in batch)
        for prompt, picture, name in zip(prompts, pictures, names, strict=True):
            if args.grid and len(grid) < args.grid_count:
                grid.append((prompt.img_id, prompt.caption, picture))
            save_to = str(Path(args.out_dir) / name) if name else None
            yield prompt.img_id, picture, size, args.format, args.quality, save_to

    encoding = 0.0
    window = 2 * batch_size + 2 * args.num_workers  # keeps the workers busy while the next batch is drawn
    with progress(n, "generate", "img") as bar:
        for line, seconds in map_in_order(pool, result_line, jobs(), window, "PNG encoding"):
            out.write(line)
            out.flush()  # an interrupted run keeps every whole line
            encoding += seconds
            bar.update()
    seconds = time.perf_counter() - loaded
    if args.grid:
        write_grid(grid, args.grid, args.grid_font)
    summary = {"prompts": n, "seconds": seconds, "load_seconds": loaded - started, "images_per_sec": n / seconds,
               "sampling_seconds": pipe.timings["sampling"], "decoding_seconds": pipe.timings["decoding"],
               "encoding_seconds": encoding, "encode_workers": args.num_workers, "warnings": dict(report.counts)}
    print(f"generate: {n} pictures in {seconds:.1f} s ({n / seconds:.2f} images/s) after {loaded - started:.1f} s "
          f"of loading; sampling {summary['sampling_seconds']:.1f} s, VQGAN decoding {summary['decoding_seconds']:.1f} "
          f"s, image encoding {encoding:.1f} s in {args.num_workers or 'no'} worker processes (alongside)",
          file=sys.stderr)
    if report.counts:
        print("generate: warnings: " + ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items())),
              file=sys.stderr)
    return summary


def check_args(args: argparse.Namespace) -> None:
    # A missing --ckpt or --prompts file is reported by load_pipeline and read_prompts.
    checks = [(args.prompt is not None and args.prompts, "--prompt and --prompts exclude each other"),
              (args.batch_size < 1, "--batch_size must be at least 1"),
              (not 1 <= args.quality <= 100, "--quality must lie in 1..100"),
              (args.num_workers < 0, "--num_workers must be 0 (encode in this process) or more"),
              (args.image_size < 0, "--image_size must be 0 (the VQGAN's size) or more"),
              (args.grid_count < 1, "--grid_count must be at least 1"),
              (args.grid_font and not Path(args.grid_font).is_file(),
               f"{args.grid_font}: no such font file (--grid_font)")]
    problems = sampling_flag_problems(args) + [message for failed, message in checks if failed]
    if problems:
        raise UserError("; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to draw")
    what.add_argument("--ckpt", default=DEFAULT_CKPT, help="train.py checkpoint: best.pt holds the weights with the "
                      "lowest val loss, ckpt.pt the last state (default: %(default)s)")
    what.add_argument("--prompts", help="TSV of `img_id<TAB>caption` lines (default: prepare.py's test prompts)")
    what.add_argument("--prompt", help="one caption instead of a file; its line has img_id `prompt`")
    what.add_argument("--vqgan_ckpt", help="VQGAN to decode with (default: the one prepare.py encoded the data with)")
    what.add_argument("--data_dir", help="prepare.py's output dir, with the tokenizer (default: the checkpoint's)")
    sampling = add_sampling_flags(parser)
    sampling.add_argument("--batch_size", type=int, default=32,
                          help="captions sampled together; raise it on a GPU, e.g. 256 (default: %(default)s)")
    sampling.add_argument("--compile", choices=["true", "false"], help="compile the decode step (replayed as a CUDA "
                          "graph on CUDA); the first batch waits for it (default: true on CUDA, false elsewhere)")
    output = parser.add_argument_group("output")
    output.add_argument("--image_size", type=int, default=OUTPUT_SIZE, help="side of the written pictures, resized "
                        "with Lanczos from the VQGAN's (64 px in the demo); 0 keeps the VQGAN's (default: %(default)s)")
    output.add_argument("--format", default="png", choices=["png", "jpeg"], help="image format (default: png)")
    output.add_argument("--quality", type=int, default=95, help="JPEG quality (default: %(default)s)")
    output.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="processes encoding the "
                        "pictures; 0 encodes in the main process (default: the CPU cores, %(default)s here)")
    output.add_argument("--out_dir", help="also save every picture there as <img_id>.png (or .jpg)")
    output.add_argument("--grid", help="also save a contact sheet of the first pictures and captions, e.g. preview.png")
    output.add_argument("--grid_count", type=int, default=16, help="pictures on the contact sheet (default: 16)")
    output.add_argument("--grid_font", help="font file for the sheet (default: a system font with Chinese glyphs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def generate() -> None:
        with results_stdout() as out:
            run(args, out)

    return run_main("generate.py", generate)


if __name__ == "__main__":
    sys.exit(main())
