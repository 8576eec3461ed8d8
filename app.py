"""A web page that draws product pictures from a Chinese product title with a train.py checkpoint.

    python app.py                                     # out/best.pt (after `make demo`) on http://127.0.0.1:7860
    python app.py --ckpt out/muge/best.pt --device cuda --max_batch 64 --host 0.0.0.0    # open to other machines

One model draws through generate.py's sampler for all browsers and scripts (over HTTP: "Use via API" at the
page's foot), merging requests with the same settings into batches of up to --max_batch pictures: picture j of
seed s is line j of `generate.py --seed s` on prompts all carrying the title, whoever shares its batch."""

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
from typing import TYPE_CHECKING

import numpy as np
import torch

from data import read_text_tsv
from model import row_keys
from sample import DEFAULT_CFG_SCALE, DEFAULT_SEED, DEFAULT_TEMPERATURE, OUTPUT_SIZE, Pipeline, load_pipeline, resized
from text import has_text
from utils import UserError, pick_device, run_main

if TYPE_CHECKING:
    import gradio as gr

# Before gradio is imported (in build_page): no usage statistics or version checks sent anywhere.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MAX_PICTURES = 16  # per request
MAX_TITLE_CHARS = 200  # real titles are under 60; the tokenizer cuts far earlier anyway
MAX_CFG_SCALE = 10.0
MAX_TEMPERATURE = 2.0
SEED_MAX = 2**32 - 1


@dataclass
class Request:
    """What one click asks for, cleaned; `notices` tell the user what was changed."""

    title: str
    pictures: int
    seed: int
    # cfg_scale, temperature, top_k: a Sampler holds them for all its rows, so only requests that agree share a draw
    settings: tuple[float, float, int | None]
    notices: list[str] = field(default_factory=list)
    batch: tuple[int, int] = (1, 0)  # requests and pictures of the draw it was part of, set by the Batcher


def _number(value: object, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what} must be a number, not {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{what} must be a finite number, not {number}")
    if not low <= number <= high:
        limits = f"lie in {low:g}..{high:g}" if high < math.inf else f"be {low:g} or more"
        raise UserError(f"{what} must {limits}, not {number:g}")
    return number


def clean_request(title: object, cfg_scale: object = DEFAULT_CFG_SCALE, pictures: object = 4,
                  seed: object = DEFAULT_SEED, top_k: object = 0, temperature: object = DEFAULT_TEMPERATURE) -> Request:
    """A Request from whatever a browser or an API client sent: a long title, the seed and the number of pictures
    mended with a notice; a setting that makes no sense (a NaN guidance, a negative temperature) a UserError."""
    # Line breaks, tabs and invisible characters become single spaces: the title shown back is what the model read.
    text = " ".join("".join(c if c.isprintable() else " " for c in str(title or "")).split())
    notices = []
    if len(text) > MAX_TITLE_CHARS:
        notices.append(f"The title was cut to its first {MAX_TITLE_CHARS} of {len(text)} characters.")
        text = text[:MAX_TITLE_CHARS]
    if not has_text(text):
        notices.append("No title: the pictures are drawn unconditionally, products of any kind.")
    cfg_scale = _number(cfg_scale, "guidance", 0.0, MAX_CFG_SCALE)
    temperature = _number(temperature, "temperature", 0.0, MAX_TEMPERATURE)
    top_k = round(_number(top_k, "top-k", 0))
    wanted = _number(pictures, "the number of pictures")
    count = min(max(round(wanted), 1), MAX_PICTURES)
    if count != wanted:
        notices.append(f"{wanted:g} pictures asked for: drew {count} (1 to {MAX_PICTURES}).")
    # a JSON int is exact, a float not
    asked = None if seed in (None, "") else seed if isinstance(seed, int) else _number(seed, "the seed")
    used = DEFAULT_SEED if asked is None else min(max(int(asked), 0), SEED_MAX)
    if asked != used:
        notices.append(f"The seed must be a whole number from 0 to {SEED_MAX}: used {used}.")
    return Request(text, count, used, (cfg_scale, temperature, top_k or None), notices)


class Batcher:
    """The one thread that draws. `submit` queues a request and returns a Future of its pictures; the thread waits
    `wait` seconds for more, then draws whole requests with the oldest one's settings, in batches of `max_batch`."""

    def __init__(self, pipe: Pipeline, max_batch: int = 16, wait: float = 0.05, max_waiting: int = 256):
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
                time.sleep(self.wait)  # for the requests sent at about the same time
            while not self.queue.empty() and sum(r.pictures for r, _ in pending) < self.max_batch:
                pending.append(self.queue.get_nowait())
            settings, batch, size = pending[0][0].settings, [], 0
            for item in list(pending):  # oldest first, so that no request waits behind later ones for long
                if item[0].settings == settings and (not batch or size + item[0].pictures <= self.max_batch):
                    batch.append(item)
                    size += item[0].pictures
                    pending.remove(item)
            self._draw(batch)

    def _draw(self, batch: list[tuple[Request, Future]]) -> None:
        started = time.perf_counter()
        try:
            ids, counts = self.pipe.caption_ids([request.title for request, _ in batch])
            text_len = self.pipe.model.config.text_len
            for (request, _), count in zip(batch, counts, strict=True):
                cut = f"The model reads the first {text_len} of the title's {count} tokens."
                if count > text_len and cut not in request.notices:  # not again when drawn again alone
                    request.notices.append(cut)
            # Each request's own keys: its pictures do not depend on what else is in the batch.
            keys = torch.cat([row_keys(request.seed, range(request.pictures)) for request, _ in batch])
            ids = np.repeat(ids, [request.pictures for request, _ in batch], axis=0)
            # A Sampler per draw: allocating its caches costs little beside drawing, as app.py never compiles the step.
            sampler = self.pipe.sampler(min(len(keys), self.max_batch), *batch[0][0].settings)
            self.draws += 1
            pictures = np.concatenate(list(self.pipe.draw(ids, keys, sampler)))
        except Exception as error:
            if len(batch) == 1:
                traceback.print_exc()
                batch[0][1].set_exception(error)
            else:  # one bad request must not fail the others: each is drawn again alone, to the same pictures
                for item in batch:
                    self._draw([item])
            return
        print(f"app: drew {len(keys)} pictures for {len(batch)} requests in {time.perf_counter() - started:.2f} s",
              file=sys.stderr, flush=True)
        start = 0
        for request, future in batch:
            request.batch = (len(batch), len(keys))
            future.set_result(list(pictures[start : start + request.pictures]))
            start += request.pictures


def markdown_text(text: str) -> str:
    """`text` shown as typed inside Markdown: no tag, link or emphasis of it takes effect."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~$])", r"\\\1", html.escape(text, quote=False))


def describe(request: Request, seconds: float) -> str:
    """The notes under the pictures: what was drawn, how long it took and what was changed."""
    title = f"“{markdown_text(request.title)}”" if has_text(request.title) else "no title"
    requests, pictures = request.batch
    shared = f" (drawn with {requests - 1} other requests, {pictures} pictures in all)" if requests > 1 else ""
    lines = [f"**{request.pictures} pictures** of {title} in **{seconds:.1f} s**{shared}, seed {request.seed}"]
    return "\n".join(lines + [f"- {markdown_text(notice)}" for notice in request.notices])


def example_titles(ckpt: dict, most: int = 6) -> list[str]:
    """The first titles of the test prompts recorded with the checkpoint's data, to click; none if it has none."""
    try:  # examples are a convenience: without them (none recorded, or the file gone) the page still works
        rows = read_text_tsv((ckpt.get("meta") or {}).get("test_prompts") or "")
        return list(dict.fromkeys(row.caption[:MAX_TITLE_CHARS] for row in rows if row.error is None))[:most]
    except (UserError, OSError):
        return []


def build_page(batcher: Batcher, examples: list[str], heading: str = "") -> "gr.Blocks":
    """The page: title, settings, a button, the pictures and notes; `heading` is Markdown above them."""
    import gradio as gr

    def draw(title, cfg_scale, pictures, seed, top_k, temperature) -> tuple[list, str]:
        started = time.perf_counter()
        try:
            request = clean_request(title, cfg_scale, pictures, seed, top_k, temperature)
            images = batcher.submit(request).result()
        except Exception as e:
            message = str(e) if isinstance(e, UserError) else f"drawing failed ({type(e).__name__}: {e}); try again"
            raise gr.Error(html.escape(message), duration=15) from None
        gallery = [(resized(image, OUTPUT_SIZE), f"{j + 1} of {len(images)}") for j, image in enumerate(images)]
        return gallery, describe(request, time.perf_counter() - started)

    with gr.Blocks(title="nanoT2I", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## nanoT2I: product pictures from a title\n{heading}")
        with gr.Row():
            title = gr.Textbox(label="Product title (Chinese)", placeholder="红色条纹T恤", max_lines=2, scale=4)
            button = gr.Button("Draw", variant="primary", scale=1)
        with gr.Row():
            cfg_scale = gr.Slider(0, MAX_CFG_SCALE, value=DEFAULT_CFG_SCALE, step=0.5, label="Guidance",
                                  info="higher sticks closer to the title; 0 ignores it")
            pictures = gr.Slider(1, MAX_PICTURES, value=4, step=1, label="Pictures")
            seed = gr.Number(DEFAULT_SEED, precision=0, label="Seed", info="same seed and settings, same pictures")
        with gr.Accordion("More", open=False):
            top_k = gr.Slider(0, batcher.pipe.model.config.codebook_size, value=0, step=1, label="Top-k",
                              info="sample among the k most likely codes; 0 among all")
            temperature = gr.Slider(0, MAX_TEMPERATURE, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature",
                                    info="0 always takes the most likely code")
        gallery = gr.Gallery(label="Pictures", columns=4, format="png", buttons=["download", "fullscreen"],
                             elem_id="pictures")
        notes = gr.Markdown(elem_id="notes")
        gr.Examples([[t] for t in examples], [title], label="Titles from the test prompts", visible=bool(examples))
        # One event for both triggers, so one queue; every request may wait in the Batcher at once. The values
        # reach `draw` as sent (preprocess=False): clean_request, not gradio, says what is wrong with them.
        gr.on([button.click, title.submit], draw, inputs=[title, cfg_scale, pictures, seed, top_k, temperature],
              outputs=[gallery, notes], api_name="draw", concurrency_limit=None, preprocess=False)
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/best.pt", help="train.py checkpoint (default: %(default)s, make demo's)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, mps (default: the best there is)")
    parser.add_argument("--max_batch", type=int, default=16, help="most pictures drawn at once, from requests "
                        "waiting together; raise it on a GPU (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens the page, which "
                        "has no login, to other machines (default: %(default)s, this machine only)")
    args = parser.parse_args(argv)

    def serve() -> None:
        if args.max_batch < 1 or not 0 < args.port < 65536:
            raise UserError("--max_batch must be at least 1 and --port lie in 1..65535")
        if not os.path.isfile(args.ckpt):
            raise UserError(f"no checkpoint at {args.ckpt}: run `make demo` first, or pass --ckpt")
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UserError("the page needs gradio: pip install -r requirements-app.txt") from None
        pipe = load_pipeline(args.ckpt, pick_device(args.device))
        heading = (f"Checkpoint {markdown_text(args.ckpt)}: {pipe.model.num_params() / 1e6:.1f}M parameters, "
                   f"titles read up to {pipe.model.config.text_len} tokens, pictures shown at {OUTPUT_SIZE} px.")
        page = build_page(Batcher(pipe, args.max_batch), example_titles(pipe.ckpt), heading)
        try:  # past 128 waiting requests the page says that its queue is full, instead of making them wait longer
            page.queue(max_size=128).launch(server_name=args.host, server_port=args.port, footer_links=["api"])
        except OSError:  # gradio's message names its own launch() arguments, not our flags
            raise UserError(f"cannot listen on {args.host}:{args.port}: pass another --port or --host") from None

    return run_main("app.py", serve)


if __name__ == "__main__":
    sys.exit(main())
