"""A web page that draws product pictures from a Chinese product title with a train.py checkpoint.

    python app.py                                     # out/best.pt (after `make demo`) on http://127.0.0.1:7860
    python app.py --ckpt out/muge/best.pt --device cuda --max_batch 64
    python app.py --host 0.0.0.0 --port 8080          # reachable from other machines

The page draws through the sampler generate.py uses. One model is loaded; requests from all browsers wait in
one queue, and a background thread merges those with the same sampling settings into batches of up to
--max_batch pictures. Picture j of a request with seed s is the same whichever requests share its batch, and
the same as line j of `generate.py --seed s` on prompts that all carry the title. The page also answers
scripts over HTTP (see "Use via API" at its foot). Needs the packages of requirements-app.txt.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import queue
import re
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from data import read_text_tsv
from model import row_keys
from sample import (
    DEFAULT_CFG_SCALE,
    DEFAULT_CKPT,
    DEFAULT_SEED,
    DEFAULT_TEMPERATURE,
    OUTPUT_SIZE,
    Pipeline,
    load_pipeline,
    resized,
)
from text import has_text
from utils import UserError, pick_device, run_main

if TYPE_CHECKING:
    import gradio as gr

# Before gradio is imported (in build_page and main): no usage statistics or version checks sent anywhere.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MAX_PICTURES = 16  # per request
MAX_TITLE_CHARS = 200  # real titles are under 60; the tokenizer cuts far earlier anyway
MAX_CFG_SCALE = 10.0
MAX_TEMPERATURE = 2.0
SEED_MAX = 2**32 - 1
WAIT_SECONDS = 0.05  # how long the batcher waits for more requests before it draws
QUEUE_SIZE = 128  # requests waiting in the page's queue; more get a "queue full" error, not a longer wait
ERROR_SECONDS = 15  # how long an error stays on the page


@dataclass
class Request:
    """What one click asks for, cleaned; `notices` tell the user what was changed."""

    title: str
    pictures: int
    seed: int
    cfg_scale: float
    temperature: float
    top_k: int | None
    notices: list[str] = field(default_factory=list)
    batch: tuple[int, int] = (1, 0)  # requests and pictures of the draw it was part of, set by the Batcher

    @property
    def settings(self) -> tuple[float, float, int | None]:
        # A Sampler holds these as scalars for all its rows: only requests that agree share a draw.
        return self.cfg_scale, self.temperature, self.top_k


def _number(value: object, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what} must be a number, not {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{what} must be a finite number, not {number}")
    if not low <= number <= high:
        raise UserError(f"{what} must lie in {low:g}..{high:g}, not {number:g}")
    return number


def clean_request(title: object, cfg_scale: object = DEFAULT_CFG_SCALE, pictures: object = 4,
                  seed: object = DEFAULT_SEED, top_k: object = 0, temperature: object = DEFAULT_TEMPERATURE) -> Request:
    """A Request from whatever a browser or an API client sent. What can be mended is (a long title cut, the
    seed and the number of pictures brought into range), with a notice; a setting that makes no sense (a NaN
    guidance, a negative temperature) raises UserError with a message for the page."""
    notices = []
    text = "" if title is None else str(title)
    # Line breaks, tabs and invisible characters become single spaces: the tokenizer would drop them anyway,
    # and the title shown back is then what the model read.
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(text) > MAX_TITLE_CHARS:
        notices.append(f"The title was cut to its first {MAX_TITLE_CHARS} of {len(text)} characters.")
        text = text[:MAX_TITLE_CHARS]
    if not has_text(text):
        notices.append("No title: the pictures are drawn unconditionally, products of any kind.")
    cfg_scale = _number(cfg_scale, "guidance", 0.0, MAX_CFG_SCALE)
    temperature = _number(temperature, "temperature", 0.0, MAX_TEMPERATURE)
    top_k = round(_number(top_k, "top-k"))
    if top_k < 0:
        raise UserError(f"top-k must be 0 (off) or more, not {top_k}")
    wanted = _number(pictures, "the number of pictures")
    count = min(max(round(wanted), 1), MAX_PICTURES)
    if count != wanted:
        notices.append(f"{wanted:g} pictures asked for: drew {count} (1 to {MAX_PICTURES}).")
    if seed is None or seed == "":
        number, used = None, DEFAULT_SEED
    else:
        number = seed if isinstance(seed, int) else _number(seed, "the seed")  # a JSON int is exact, a float not
        used = min(max(int(number), 0), SEED_MAX)
    if number != used:
        notices.append(f"The seed must be a whole number from 0 to {SEED_MAX}: used {used}.")
    return Request(text, count, used, cfg_scale, temperature, top_k or None, notices)


class Batcher:
    """The one thread that draws. `submit` queues a request and returns a Future of its pictures; the thread
    takes the waiting requests, waits `wait` seconds for more, and draws those with the settings of the
    oldest, whole, in one `pipe.draw` of up to `max_batch` pictures (a request of more is drawn alone)."""

    def __init__(self, pipe: Pipeline, max_batch: int = 16, wait: float = WAIT_SECONDS, max_waiting: int = 256):
        self.pipe, self.max_batch, self.wait = pipe, max_batch, wait
        self.queue: queue.Queue[tuple[Request, Future]] = queue.Queue(max_waiting)
        self.draws = 0  # pipe.draw calls so far
        threading.Thread(target=self._run, name="batcher", daemon=True).start()

    def submit(self, request: Request) -> Future[list[np.ndarray]]:
        future: Future[list[np.ndarray]] = Future()
        try:
            self.queue.put_nowait((request, future))
        except queue.Full:
            raise UserError("too many pictures are waiting to be drawn: try again in a minute") from None
        return future

    def _run(self) -> None:
        pending: list[tuple[Request, Future]] = []
        while True:
            if not pending:
                pending.append(self.queue.get())
            deadline = time.monotonic() + self.wait
            while sum(r.pictures for r, _ in pending) < self.max_batch and time.monotonic() < deadline:
                try:
                    pending.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            settings, batch, size = pending[0][0].settings, [], 0
            for item in list(pending):  # oldest first, so that no request waits behind later ones for long
                if item[0].settings == settings and (not batch or size + item[0].pictures <= self.max_batch):
                    batch.append(item)
                    size += item[0].pictures
                    pending.remove(item)
            self._serve(batch)

    def _serve(self, batch: list[tuple[Request, Future]]) -> None:
        try:
            pictures = self._draw([request for request, _ in batch])
        except Exception as error:
            if len(batch) > 1:
                # One bad request must not fail the others: each is drawn again alone. Its pictures come out
                # the same, as they depend on the request's own keys only.
                for item in batch:
                    self._serve([item])
                return
            traceback.print_exc()
            batch[0][1].set_exception(error)
            return
        start = 0
        for request, future in batch:
            future.set_result(list(pictures[start : start + request.pictures]))
            start += request.pictures

    def _draw(self, requests: list[Request]) -> np.ndarray:
        started = time.perf_counter()
        text_len = self.pipe.model.config.text_len
        ids, keys = [], []
        for request in requests:
            request_ids, counts = self.pipe.caption_ids([request.title] * request.pictures)
            cut = f"The model reads the first {text_len} of the title's {counts[0]} tokens."
            if counts[0] > text_len and has_text(request.title) and cut not in request.notices:  # drawn again?
                request.notices.append(cut)
            ids.append(request_ids)
            keys.append(row_keys(request.seed, range(request.pictures)))  # [pictures, 1]: the request's own
        size = sum(r.pictures for r in requests)
        # A Sampler per draw: allocating its caches costs little beside drawing, as app.py never compiles the step.
        cfg_scale, temperature, top_k = requests[0].settings
        sampler = self.pipe.sampler(min(size, self.max_batch), cfg_scale, temperature, top_k)
        self.draws += 1
        pictures = np.concatenate(list(self.pipe.draw(np.concatenate(ids), torch.cat(keys), sampler)))
        for request in requests:
            request.batch = (len(requests), size)
        print(f"app: drew {size} pictures for {len(requests)} requests in {time.perf_counter() - started:.2f} s",
              file=sys.stderr, flush=True)
        return pictures


def markdown_text(text: str) -> str:
    """`text` shown as typed inside Markdown: no tag, link or emphasis of it takes effect."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~$])", r"\\\1", html.escape(text, quote=False))


def describe(request: Request, seconds: float) -> str:
    """The notes under the pictures: what was drawn, how long it took and what was changed."""
    title = f"“{markdown_text(request.title)}”" if has_text(request.title) else "no title"
    shared = ""
    if request.batch[0] > 1:
        shared = f" (drawn with {request.batch[0] - 1} other requests, {request.batch[1]} pictures in all)"
    lines = [f"**{request.pictures} pictures** of {title} in **{seconds:.1f} s**{shared}, seed {request.seed}"]
    return "\n".join(lines + [f"- {markdown_text(notice)}" for notice in request.notices])


def example_titles(ckpt: dict, most: int = 6) -> list[str]:
    """The first titles of the test prompts recorded with the checkpoint's data, to click; none if it has none."""
    path = (ckpt.get("meta") or {}).get("test_prompts")
    titles: list[str] = []
    if not path or not Path(path).is_file():
        return titles
    try:
        for row in read_text_tsv(path):
            if row.error is None and row.caption not in titles:
                titles.append(row.caption[:MAX_TITLE_CHARS])
            if len(titles) == most:
                break
    except (UserError, OSError):
        pass  # examples are a convenience: a page without them still works
    return titles


def build_page(batcher: Batcher, examples: list[str], heading: str = "") -> gr.Blocks:
    """The page: title, settings, a button, the pictures and notes; `heading` is Markdown above them."""
    import gradio as gr

    def draw(title: object, cfg_scale: object, pictures: object, seed: object, top_k: object, temperature: object
             ) -> tuple[list, str]:
        started = time.perf_counter()
        try:
            request = clean_request(title, cfg_scale, pictures, seed, top_k, temperature)
            images = batcher.submit(request).result()
        except UserError as e:
            raise gr.Error(html.escape(str(e)), duration=ERROR_SECONDS) from None
        except Exception as e:
            raise gr.Error(html.escape(f"drawing failed ({type(e).__name__}: {e}); please try again"),
                           duration=ERROR_SECONDS) from None
        gallery = [(resized(image, OUTPUT_SIZE), f"{j + 1} of {len(images)}") for j, image in enumerate(images)]
        return gallery, describe(request, time.perf_counter() - started)

    codebook_size = batcher.pipe.model.config.codebook_size
    with gr.Blocks(title="nanoT2I", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## nanoT2I: product pictures from a title\n{heading}")
        with gr.Row():
            title = gr.Textbox(label="Product title (Chinese)", placeholder="红色条纹T恤 2021夏季新款",
                               lines=1, max_lines=2, scale=4, elem_id="title")
            button = gr.Button("Draw", variant="primary", scale=1)
        with gr.Row():
            cfg_scale = gr.Slider(0, MAX_CFG_SCALE, value=DEFAULT_CFG_SCALE, step=0.5, label="Guidance",
                                  info="higher sticks closer to the title; 0 ignores it")
            pictures = gr.Slider(1, MAX_PICTURES, value=4, step=1, label="Pictures")
            seed = gr.Number(value=DEFAULT_SEED, precision=0, label="Seed",
                             info="same seed and settings, same pictures")
        with gr.Accordion("More", open=False):
            top_k = gr.Slider(0, codebook_size, value=0, step=1, label="Top-k",
                              info="sample among the k most likely codes; 0 among all")
            temperature = gr.Slider(0, MAX_TEMPERATURE, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                                    info="0 always takes the most likely code")
        gallery = gr.Gallery(label="Pictures", columns=4, format="png", interactive=False,
                             buttons=["download", "fullscreen"], elem_id="pictures")
        notes = gr.Markdown(elem_id="notes")
        if examples:
            gr.Examples([[t] for t in examples], inputs=[title], label="Titles from the test prompts")
        # One event for both triggers, so one queue; every request may wait in the Batcher at once. The values
        # reach `draw` as sent (preprocess=False): clean_request, not gradio, says what is wrong with them.
        gr.on([button.click, title.submit], draw, inputs=[title, cfg_scale, pictures, seed, top_k, temperature],
              outputs=[gallery, notes], api_name="draw", concurrency_limit=None, preprocess=False)
    return page


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=DEFAULT_CKPT,
                        help="train.py checkpoint to draw with (default: %(default)s, what `make demo` trains)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (default: the best there is)")
    parser.add_argument("--max_batch", type=int, default=16,
                        help="most pictures drawn together; requests waiting at the same time share a batch up "
                        "to this size; raise it on a GPU (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 lets other machines open the page, which has no "
                        "login (default: %(default)s, this machine only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def serve() -> None:
        if args.max_batch < 1 or not 0 < args.port < 65536:
            raise UserError("--max_batch must be at least 1 and --port lie in 1..65535")
        if not Path(args.ckpt).is_file():
            raise UserError(f"no checkpoint at {args.ckpt}: run `make demo` first, or pass --ckpt")
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UserError("the page needs gradio: pip install -r requirements-app.txt") from None
        pipe = load_pipeline(args.ckpt, pick_device(args.device))
        config = pipe.model.config
        heading = (f"Checkpoint {markdown_text(str(args.ckpt))}: {pipe.model.num_params() / 1e6:.1f}M parameters, "
                   f"titles read up to {config.text_len} tokens, pictures shown at {OUTPUT_SIZE} px.")
        page = build_page(Batcher(pipe, args.max_batch), example_titles(pipe.ckpt), heading)
        page.queue(max_size=QUEUE_SIZE)
        try:
            page.launch(server_name=args.host, server_port=args.port, footer_links=["api"])
        except OSError:  # gradio's message names its own launch() arguments, not our flags
            raise UserError(f"cannot listen on {args.host}:{args.port} (the port is taken, or the address is not "
                            "this machine's): pass another --port or --host") from None

    return run_main("app.py", serve)


if __name__ == "__main__":
    sys.exit(main())
