"""app.py: requests cleaned and batched through the sampler, and the page itself in a headless Chromium."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_F4_SIZE, good_rows, write_dataset, write_lines
from PIL import Image

import app
import prepare
import train
from app import MAX_PICTURES, MAX_TITLE_CHARS, SEED_MAX, Batcher, Request, clean_request
from model import row_keys
from sample import DEFAULT_SEED, OUTPUT_SIZE, load_pipeline
from utils import UserError

TEXT_LEN = 16
TEST_TITLES = ["红色T恤 XL码 1号", "蓝色连衣裙", "黑色运动鞋 男"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vqgan_ckpt):
    """A tiny checkpoint made by prepare.py and train.py, with test prompts recorded in its data."""
    root = tmp_path_factory.mktemp("app")
    source = write_dataset(root / "muge", good_rows(24))
    write_lines(source / prepare.TEST_FILE, [f"t{i}\t{title}" for i, title in enumerate(TEST_TITLES)])
    assert prepare.main(["--data_dir", str(source), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir",
                         str(root / "data"), "--image_size", str(TINY_F4_SIZE), "--text_len", str(TEXT_LEN),
                         "--val_fraction", "0.25", "--batch_size", "8", "--num_workers", "0"]) == 0
    train.main([str(ROOT / "config" / "tiny_cpu.py"), f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}",
                "--max_iters=4", "--eval_interval=2", "--eval_iters=1"])
    return SimpleNamespace(root=root, ckpt=root / "out" / "best.pt")


@pytest.fixture(scope="module")
def pipe(trained):
    return load_pipeline(trained.ckpt, torch.device("cpu"))


def drawn(batcher: Batcher, *requests: Request) -> list[list[np.ndarray]]:
    """The pictures of requests submitted together, so that the batcher sees them all waiting."""
    futures = [batcher.submit(request) for request in requests]
    return [future.result(timeout=120) for future in futures]


# --- cleaning what the page or an API client sends ---------------------------------------------------------


def test_clean_request_keeps_good_input():
    request = clean_request("红色条纹T恤", 3.0, 4, 42, 0, 1.0)
    assert (request.title, request.pictures, request.seed, request.settings) == ("红色条纹T恤", 4, 42, (3.0, 1.0, None))
    assert request.notices == []
    assert clean_request("红色", 1, 2, 3, 50, 0.5).settings == (1.0, 0.5, 50)


@pytest.mark.parametrize("title, expect, notice", [
    ("", "", "No title"),
    ("  \n\t ", "", "No title"),
    (None, "", "No title"),
    ("红色\n条纹\tT恤\x00", "红色 条纹 T恤", None),
    ("长" * 5000, "长" * MAX_TITLE_CHARS, f"first {MAX_TITLE_CHARS} of 5000 characters"),
    ("<b>粗体</b> 😀 & <img src=x onerror=alert(1)>", "<b>粗体</b> 😀 & <img src=x onerror=alert(1)>", None),
])
def test_clean_request_titles(title, expect, notice):
    request = clean_request(title)
    assert request.title == expect
    if notice is None:
        assert request.notices == []
    else:
        assert len(request.notices) == 1 and notice in request.notices[0]


@pytest.mark.parametrize("seed, used", [(-5, 0), (2**40, SEED_MAX), (1.5, 1), ("7", 7), (None, DEFAULT_SEED),
                                        (SEED_MAX, SEED_MAX), (0, 0)])
def test_clean_request_brings_the_seed_into_range(seed, used):
    request = clean_request("红色", seed=seed)
    assert request.seed == used
    assert bool(request.notices) == (seed not in (used, str(used))), request.notices


@pytest.mark.parametrize("pictures, used", [(0, 1), (-3, 1), (99, MAX_PICTURES), (2.4, 2), (16, 16)])
def test_clean_request_brings_the_number_of_pictures_into_range(pictures, used):
    request = clean_request("红色", pictures=pictures)
    assert request.pictures == used and bool(request.notices) == (pictures != used)


@pytest.mark.parametrize("settings, message", [
    ({"cfg_scale": math.nan}, "guidance must be a finite number"),
    ({"cfg_scale": math.inf}, "guidance must be a finite number"),
    ({"cfg_scale": "nan"}, "guidance must be a finite number"),
    ({"cfg_scale": -1}, "guidance must lie in 0..10"),
    ({"cfg_scale": None}, "guidance must be a number"),
    ({"temperature": -0.5}, "temperature must lie in"),
    ({"top_k": -1}, "top-k must be 0"),
    ({"seed": "abc"}, "the seed must be a number"),
    ({"pictures": math.inf}, "the number of pictures must be a finite number"),
])
def test_clean_request_refuses_settings_that_make_no_sense(settings, message):
    with pytest.raises(UserError, match=message):
        clean_request("红色", **settings)


def test_markup_in_titles_is_shown_as_text():
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py comes with gradio (requirements-app.txt)")
    title = "<b>粗体</b> **强调** [链接](http://x.cn) `代码` # 标题 😀 & <img src=x onerror=alert(1)>"
    request = clean_request(title)
    request.batch = (1, 4)
    rendered = markdown_it.MarkdownIt().render(app.describe(request, 1.0))
    for tag in ("<b>", "<img", "<a ", "<code>", "<h1>", "<em>"):
        assert tag not in rendered
    assert rendered.count("<strong>") == 2  # the notes' own emphasis only
    assert "&lt;b&gt;粗体&lt;/b&gt; **强调** [链接](http://x.cn) `代码` # 标题 😀 &amp; &lt;img" in rendered


# --- the batcher: requests -> sampler batches -------------------------------------------------------------


def test_requests_waiting_together_share_one_draw(pipe):
    batcher = Batcher(pipe, max_batch=8, wait=0.5)
    first, second, third = drawn(batcher, clean_request("红色T恤", pictures=2, seed=1),
                                 clean_request("蓝色连衣裙", pictures=3, seed=2), clean_request("", pictures=1))
    assert batcher.draws == 1
    assert [len(first), len(second), len(third)] == [2, 3, 1]
    native = pipe.model.config.grid_rows * pipe.vq.downsample_factor
    assert all(p.shape == (native, native, 3) and p.dtype == np.uint8 for p in first + second + third)


def test_batches_hold_one_setting_and_at_most_max_batch_pictures(pipe):
    batcher = Batcher(pipe, max_batch=4, wait=0.5)
    requests = [clean_request("红色", pictures=3), clean_request("红色", pictures=2),
                clean_request("红色", pictures=1, cfg_scale=1.0), clean_request("红色", pictures=6)]
    results = drawn(batcher, *requests)
    assert [len(r) for r in results] == [3, 2, 1, 6]
    # 3 | 2 (3 + 2 > 4) | the other guidance | 6 alone, in two sampler batches of one draw
    assert batcher.draws == 4
    assert [r.batch for r in requests] == [(1, 3), (1, 2), (1, 1), (1, 6)]


def test_a_request_draws_the_same_pictures_alone_or_batched(pipe):
    alone = drawn(Batcher(pipe, wait=0), clean_request("红色T恤", pictures=3, seed=5))[0]
    batcher = Batcher(pipe, max_batch=16, wait=0.5)
    merged = drawn(batcher, clean_request("黑色运动鞋", pictures=4, seed=6),
                   clean_request("红色T恤", pictures=3, seed=5))
    assert batcher.draws == 1
    assert all(np.array_equal(a, b) for a, b in zip(alone, merged[1], strict=True))
    assert not np.array_equal(merged[0][0], merged[1][0])
    # Picture j is what generate.py draws for line j of prompts that all carry the title.
    generated = list(pipe.draw_captions(["红色T恤"] * 3, seed=5))
    assert all(np.array_equal(a, b) for a, b in zip(alone, generated, strict=True))
    # and its pictures differ from one another
    assert not np.array_equal(alone[0], alone[1])


def test_an_error_in_one_request_does_not_fail_the_others(pipe, monkeypatch, capsys):
    bad_key = row_keys(666, range(1))[0, 0]
    real_draw = pipe.draw

    def draw(text_ids, keys, sampler):
        if (keys == bad_key).any():
            raise RuntimeError("this request breaks the sampler")
        return real_draw(text_ids, keys, sampler)

    monkeypatch.setattr(pipe, "draw", draw)
    batcher = Batcher(pipe, max_batch=16, wait=0.5)
    futures = [batcher.submit(clean_request("红色", pictures=2, seed=seed)) for seed in (1, 666, 2)]
    assert len(futures[0].result(timeout=120)) == 2 and len(futures[2].result(timeout=120)) == 2
    with pytest.raises(RuntimeError, match="breaks the sampler"):
        futures[1].result(timeout=120)
    assert batcher.draws == 4  # the three together, then each alone
    assert "breaks the sampler" in capsys.readouterr().err
    assert len(drawn(batcher, clean_request("蓝色", pictures=1))[0]) == 1  # and the next request works


def test_notices_of_the_draw(pipe):
    batcher = Batcher(pipe, wait=0)
    long_title, empty = clean_request("红色条纹T恤 夏季新款 " * 8, pictures=1), clean_request("", pictures=2)
    drawn(batcher, long_title)
    drawn(batcher, empty)
    assert any(f"first {TEXT_LEN} of the title's" in n for n in long_title.notices)
    assert len(empty.notices) == 1 and "No title" in empty.notices[0]
    notes = app.describe(empty, 0.5)
    assert "2 pictures** of no title" in notes and "drawn unconditionally" in notes


def test_a_full_queue_is_refused(pipe, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_draw = pipe.draw

    def draw(*args):  # holds the batcher thread in its first draw while requests queue up
        started.set()
        release.wait(60)
        return real_draw(*args)

    monkeypatch.setattr(pipe, "draw", draw)
    batcher = Batcher(pipe, wait=0, max_waiting=1)
    first = batcher.submit(clean_request("红色", pictures=1))
    assert started.wait(60)
    second = batcher.submit(clean_request("蓝色", pictures=1))
    with pytest.raises(UserError, match="too many pictures are waiting"):
        batcher.submit(clean_request("黑色", pictures=1))
    release.set()
    assert len(first.result(timeout=120)) == 1 and len(second.result(timeout=120)) == 1


def test_examples_come_from_the_checkpoints_test_prompts(pipe):
    assert app.example_titles(pipe.ckpt) == TEST_TITLES
    assert app.example_titles(pipe.ckpt, most=2) == TEST_TITLES[:2]
    assert app.example_titles({"meta": {}}) == [] and app.example_titles({}) == []
    assert app.example_titles({"meta": {"test_prompts": "/nonexistent/T2I_test.text.tsv"}}) == []


def test_the_page_builds_without_examples(pipe):
    gr = pytest.importorskip("gradio", reason="the page needs gradio: pip install -r requirements-app.txt")
    assert isinstance(app.build_page(Batcher(pipe), []), gr.Blocks)


# --- the command line ---------------------------------------------------------------------------------------


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--ckpt", "--device", "--max_batch", "--port", "--host"):
        assert flag in out


def test_no_checkpoint_says_what_to_do(tmp_path, capsys):
    assert app.main(["--ckpt", str(tmp_path / "best.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("app.py: error: no checkpoint at") and "make demo" in err and "Traceback" not in err


def test_the_scripts_never_import_gradio():
    code = "import sys, prepare, train, generate, evaluate, sample; sys.exit('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# --- the page, served by `python app.py` --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """`python app.py` on a free port with the tiny checkpoint; its stderr is kept in a log file."""
    pytest.importorskip("gradio", reason="the page needs gradio: pip install -r requirements-app.txt")
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
    log = open(folder / "server.log", "w")  # noqa: SIM115 - open while the server runs
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--ckpt", str(trained.ckpt), "--device", "cpu",
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"app.py did not start: {(folder / 'server.log').read_text()}")
            time.sleep(0.3)
    yield SimpleNamespace(url=url, log=folder / "server.log")
    process.terminate()
    process.wait(timeout=30)
    log.close()


def call(url: str, *data: object) -> tuple[str, object]:
    """The `draw` API over plain HTTP, as a script would use it: ("complete", [gallery, notes]) or ("error", ...)."""
    body = json.dumps({"data": list(data)}).encode()
    posted = urllib.request.Request(f"{url}/gradio_api/call/draw", body, {"Content-Type": "application/json"})
    event_id = json.load(urllib.request.urlopen(posted, timeout=30))["event_id"]
    stream = urllib.request.urlopen(f"{url}/gradio_api/call/draw/{event_id}", timeout=120).read().decode()
    lines = stream.splitlines()
    event = [line for line in lines if line.startswith("event:")][-1].split(":", 1)[1].strip()
    payload = [line for line in lines if line.startswith("data:")][-1].split(":", 1)[1].strip()
    return event, json.loads(payload)


def test_the_api_answers_bad_input_and_keeps_working(server):
    event, (gallery, notes) = call(server.url, "", 3, 2, 1, 0, 1)
    assert event == "complete" and len(gallery) == 2 and "drawn unconditionally" in notes
    event, (gallery, notes) = call(server.url, "<b>粗</b> **x** 😀", 3, 1, 2**40, 0, 1)
    assert event == "complete" and "&lt;b&gt;粗&lt;/b&gt; \\*\\*x\\*\\* 😀" in notes and f"used {SEED_MAX}" in notes
    event, payload = call(server.url, "红色", "inf", 1, 1, 0, 1)
    assert event == "error" and "guidance must be a finite number" in json.dumps(payload)
    event, (gallery, notes) = call(server.url, "长" * 3000, 3, 1, 1, 0, 1)
    assert event == "complete" and f"first {MAX_TITLE_CHARS} of 3000 characters" in notes
    png = urllib.request.urlopen(gallery[0]["image"]["url"], timeout=30).read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(call(server.url, f"红色{i}", 3, 2, i, 0, 1)))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(event for event, _ in results) == ["complete"] * 4
    assert all(len(gallery) == 2 for _, (gallery, _) in results)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--lang=zh-CN"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium fonts-wqy-microhei)")
def test_the_page_in_a_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-app.txt")
    with sync_api.sync_playwright() as playwright:
        # A fresh profile; playwright's own browser downloads are never used, the system's Chromium is.
        browser = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(dir=tmp_path), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1000, "height": 900})
        try:
            page = browser.new_page()
            elsewhere = []  # the page must work offline: nothing is fetched from other hosts
            page.on("request", lambda r: r.url.startswith((server.url, "data:", "blob:")) or elsewhere.append(r.url))
            page.goto(server.url)
            page.get_by_label("Product title (Chinese)").fill("红色条纹T恤")
            page.get_by_role("button", name="Draw", exact=True).click()
            sync_api.expect(page.locator("#notes")).to_contain_text("4 pictures of “红色条纹T恤”", timeout=120_000)
            pictures = page.locator("#pictures img")
            sync_api.expect(pictures).to_have_count(4)
            page.wait_for_function("[...document.querySelectorAll('#pictures img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            sizes = pictures.evaluate_all("list => list.map(i => [i.naturalWidth, i.naturalHeight])")
            assert sizes == [[OUTPUT_SIZE, OUTPUT_SIZE]] * 4
            page.screenshot(path=tmp_path / "page.png", full_page=True)
            assert (tmp_path / "page.png").stat().st_size > 0
            pictures.first.click()  # the preview has the download button
            with page.expect_download() as download:
                page.get_by_role("button", name="Download").first.click()
            with Image.open(download.value.path()) as picture:
                assert (picture.format, picture.size) == ("PNG", (OUTPUT_SIZE, OUTPUT_SIZE))
            # An example title fills the box.
            page.get_by_text(TEST_TITLES[1], exact=True).first.click()
            sync_api.expect(page.get_by_label("Product title (Chinese)")).to_have_value(TEST_TITLES[1])
            assert elsewhere == []
        finally:
            browser.close()
