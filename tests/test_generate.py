import base64
import binascii
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, TINY_F4_SIZE, good_rows, write_dataset, write_lines
from PIL import Image

import generate
import prepare
import sample
import train
from sample import load_pipeline
from utils import UserError
from vqgan import load_checkpoint_file, save_checkpoint_atomic

TEXT_LEN = 16
# Test prompts as MUGE ships them: hex-like ids, not sorted, so that order is checked for real.
TEST_PROMPTS = [("f3", "红色T恤 XL码 1号"), ("a1", "蓝色连衣裙"), ("c9", "黑色运动鞋 男"), ("07", "白色帽子"),
                ("b2", "粉色口红"), ("e5", "香水 女士")]
# Subprocesses keep to one thread: the machine is small and shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vqgan_ckpt):
    """prepare.py and train.py run as a user would, in a folder laid out like the repo (out/best.pt)."""
    root = tmp_path_factory.mktemp("run")
    source = write_dataset(root / "muge", good_rows(24))
    write_lines(source / prepare.TEST_FILE, [f"{i}\t{caption}" for i, caption in TEST_PROMPTS])
    assert prepare.main(["--data_dir", str(source), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir",
                         str(root / "data"), "--image_size", str(TINY_F4_SIZE), "--text_len", str(TEXT_LEN),
                         "--val_fraction", "0.25", "--batch_size", "8", "--num_workers", "0"]) == 0
    steps = ["--max_iters=4", "--eval_interval=2", "--eval_iters=1"]
    recipe = str(ROOT / "config" / "tiny_cpu.py")
    train.main([recipe, f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}", *steps])
    return SimpleNamespace(root=root, ckpt=root / "out" / "best.pt", data=root / "data", vqgan=vqgan_ckpt,
                           test_prompts=source / prepare.TEST_FILE)


def run_generate(trained, *flags: str) -> tuple[list[bytes], dict]:
    """generate.py in this process: its result lines and summary."""
    args = generate.build_parser().parse_args(["--ckpt", str(trained.ckpt), "--batch_size", "4", *flags])
    out = io.BytesIO()
    summary = generate.run(args, out)
    return out.getvalue().splitlines(keepends=True), summary


def parse(line: bytes) -> tuple[str, bytes]:
    assert line.endswith(b"\n") and line.count(b"\t") == 1
    img_id, payload = line[:-1].split(b"\t")
    return img_id.decode("utf-8"), payload


def picture(payload: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image


def write_prompts(path: Path, rows: list[tuple[str, str]]) -> Path:
    write_lines(path, [f"{i}\t{caption}" for i, caption in rows])
    return path


def error_line(stderr: str, prog: str = "generate.py") -> str:
    """The one error line a failed run ends with; no traceback, no second error."""
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and stderr.rstrip("\n").splitlines()[-1] == errors[0], stderr[-3000:]
    assert errors[0].startswith(f"{prog}: error: ")
    return errors[0]


# --- the output format --------------------------------------------------------------------------------------


def test_every_line_is_a_256_px_rgb_png_in_input_order_and_decodes_both_ways(trained, tmp_path):
    rows = [(f"{n:02x}{'z' if n % 3 else ''}", f"红色T恤 {n}号") for n in (9, 3, 7, 1, 8, 2, 6, 4, 5, 0, 11)]
    lines, summary = run_generate(trained, "--prompts", str(write_prompts(tmp_path / "p.tsv", rows)))
    assert [parse(line)[0] for line in lines] == [i for i, _ in rows]
    assert summary["prompts"] == len(rows) and summary["warnings"] == {}
    standard_only = 0
    for line in lines:
        _, payload = parse(line)
        data = base64.b64decode(payload, validate=True)
        # urlsafe_b64decode maps '-' and '_' and keeps '+' and '/', so standard base64 decodes identically with it.
        assert base64.urlsafe_b64decode(payload) == data
        standard_only += b"+" in payload or b"/" in payload
        image = picture(payload)
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (256, 256))
    # The check above is only worth something if '+' and '/' do occur (they do in any sizeable PNG).
    assert standard_only > 0
    # Why the standard alphabet: b64decode drops the '-' and '_' of URL-safe base64, which corrupts the data
    # or, when the dropped characters break the padding, fails.
    data = base64.b64decode(parse(lines[0])[1])
    urlsafe = base64.urlsafe_b64encode(data)
    assert urlsafe != base64.b64encode(data)
    with contextlib.suppress(binascii.Error):
        assert base64.b64decode(urlsafe) != data


def test_defaults_come_from_the_checkpoint_and_nothing_but_results_reach_stdout(trained):
    # Run as the user does, `python generate.py > T2I_test.tsv` with no flags from the repo-like folder, with
    # a sampler that also prints, writes to file descriptor 1 and warns: none of that may reach stdout.
    script = (
        "import os, runpy, sys, warnings\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import model\n"
        "sample = model.Sampler.sample\n"
        "def noisy(self, *args, **kwargs):\n"
        "    print('LEAK from print')\n"
        "    os.write(1, b'LEAK from fd 1\\n')\n"
        "    warnings.warn('LEAK from warnings')\n"
        "    return sample(self, *args, **kwargs)\n"
        "model.Sampler.sample = noisy\n"
        "sys.argv = ['generate.py']\n"
        f"runpy.run_path({str(ROOT / 'generate.py')!r}, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=trained.root, capture_output=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    stderr = result.stderr.decode()
    assert "LEAK from print" in stderr and "LEAK from fd 1" in stderr and "LEAK from warnings" in stderr
    lines = result.stdout.splitlines(keepends=True)
    assert [parse(line)[0] for line in lines] == [i for i, _ in TEST_PROMPTS]
    assert all(picture(parse(line)[1]).size == (256, 256) for line in lines)
    assert re.search(r"generate: 6 pictures in [\d.]+ s \([\d.]+ images/s\)", stderr)
    assert "sampling" in stderr and "VQGAN decoding" in stderr and "image encoding" in stderr
    # out/best.pt is the default checkpoint, and cfg 3 the default guidance
    assert f"cfg {sample.DEFAULT_CFG_SCALE}" in stderr and sample.DEFAULT_CKPT == "out/best.pt"


def test_the_same_seed_gives_the_same_bytes_and_the_pictures_of_draw_captions(trained, tmp_path):
    prompts = write_prompts(tmp_path / "p.tsv", TEST_PROMPTS)
    first, _ = run_generate(trained, "--prompts", str(prompts), "--seed", "5", "--image_size", "0")
    again, _ = run_generate(trained, "--prompts", str(prompts), "--seed", "5", "--image_size", "0")
    other, _ = run_generate(trained, "--prompts", str(prompts), "--seed", "6", "--image_size", "0")
    assert first == again and first != other
    # the same bytes whether the pictures are encoded in worker processes or in this one, and whatever the batch
    assert run_generate(trained, "--prompts", str(prompts), "--seed", "5", "--image_size", "0",
                        "--num_workers", "0", "--batch_size", "5")[0] == first
    # The library call that evaluation and the app use draws exactly what the command line writes.
    pipe = load_pipeline(trained.ckpt, generate.pick_device("cpu"))
    pictures = list(pipe.draw_captions([c for _, c in TEST_PROMPTS], seed=5, batch_size=4))
    assert len(pictures) == len(TEST_PROMPTS)
    for line, expected in zip(first, pictures, strict=True):
        assert np.array_equal(np.asarray(picture(parse(line)[1])), expected)


def test_guidance_scale_zero_ignores_captions_and_one_differs_from_three(trained, tmp_path):
    prompts = write_prompts(tmp_path / "p.tsv", TEST_PROMPTS)
    other_captions = write_prompts(tmp_path / "q.tsv", [(i, "完全不同的标题") for i, _ in TEST_PROMPTS])
    empty_captions = write_prompts(tmp_path / "e.tsv", [(i, "") for i, _ in TEST_PROMPTS])
    unconditional, _ = run_generate(trained, "--prompts", str(prompts), "--cfg_scale", "0")
    assert run_generate(trained, "--prompts", str(other_captions), "--cfg_scale", "0")[0] == unconditional
    # cfg 0 samples the null caption alone, exactly as empty captions do without guidance
    assert run_generate(trained, "--prompts", str(empty_captions), "--cfg_scale", "1")[0] == unconditional
    conditional, _ = run_generate(trained, "--prompts", str(prompts), "--cfg_scale", "1")
    guided, _ = run_generate(trained, "--prompts", str(prompts), "--cfg_scale", "3")
    assert len({tuple(unconditional), tuple(conditional), tuple(guided)}) == 3


def test_native_size_and_jpeg(trained, tmp_path):
    prompts = str(write_prompts(tmp_path / "p.tsv", TEST_PROMPTS[:2]))
    native, _ = run_generate(trained, "--prompts", prompts, "--image_size", "0")
    assert picture(parse(native[0])[1]).size == (TINY_F4_SIZE, TINY_F4_SIZE)
    jpeg, _ = run_generate(trained, "--prompts", prompts, "--format", "jpeg", "--quality", "95")
    image = picture(parse(jpeg[0])[1])
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (256, 256))


def test_compiled_sampling_draws_the_same_bytes_as_eager(trained, tmp_path):
    # inductor's C++ on the CPU: the first compilation of this model takes tens of seconds on two cores, later
    # ones read torch's cache. On this CPU the compiled step's float rounding picks the same codes as eager.
    try:
        generate.check_compiler(generate.pick_device("cpu"))
    except UserError as e:
        pytest.skip(str(e))
    prompts = str(write_prompts(tmp_path / "p.tsv", TEST_PROMPTS[:5]))  # batches of 4 and a short 1
    compiled, _ = run_generate(trained, "--prompts", prompts, "--compile", "true", "--num_workers", "0")
    assert run_generate(trained, "--prompts", prompts, "--compile", "true", "--num_workers", "0")[0] == compiled
    assert run_generate(trained, "--prompts", prompts, "--compile", "false", "--num_workers", "0")[0] == compiled


def test_best_of_n_keeps_each_captions_likeliest_candidate_in_input_order(trained, tmp_path, capsys):
    prompts = str(write_prompts(tmp_path / "p.tsv", TEST_PROMPTS[:5]))
    likeliest, _ = run_generate(trained, "--prompts", prompts, "--candidates", "3", "--num_workers", "0")
    assert [parse(line)[0] for line in likeliest] == [i for i, _ in TEST_PROMPTS[:5]]
    assert "best of 3 by likelihood" in capsys.readouterr().err
    plain, _ = run_generate(trained, "--prompts", prompts, "--num_workers", "0")
    assert likeliest != plain


# --- bad prompts ------------------------------------------------------------------------------------------------


def test_bad_prompts_are_reported_with_their_line_and_never_lose_a_caption(trained, tmp_path, capsys):
    path = tmp_path / "bad.tsv"
    long_caption = "超长标题" * 20  # 80 characters, over text_len 16
    lines = [b"ok1\t\xe7\xba\xa2\xe8\x89\xb2T\xe6\x81\xa4",  # 1: 红色T恤
             b"",                                           # 2: blank, ignored
             b"empty\t",                                    # 3: empty caption
             b"spaces\t   ",                               # 4: only spaces
             b"long\t" + long_caption.encode(),             # 5: truncated
             b"ok1\t\xe8\x93\x9d\xe8\x89\xb2",              # 6: duplicate id (蓝色)
             b"bytes\t\xe7\xba\xff\xfe T\xe6\x81\xa4",      # 7: invalid UTF-8
             b"no tab at all",                              # 8: skipped
             b"three\tfields\there"]                        # 9: a tab in the caption: kept as a space
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    out, summary = run_generate(trained, "--prompts", str(path))
    err = capsys.readouterr().err
    assert [parse(line)[0] for line in out] == ["ok1", "empty", "spaces", "long", "ok1", "bytes", "three"]
    assert f"{path}:3: empty caption" in err and f"{path}:4: empty caption" in err
    assert f"{path}:5: caption truncated: long" in err
    assert f"{path}:6: duplicate img_id: ok1 (first at line 1)" in err
    assert f"{path}:7: caption is not UTF-8: bytes is drawn unconditionally" in err
    assert f"{path}:8: skipped line: malformed line" in err
    assert summary["warnings"] == {"empty caption": 2, "caption truncated": 1, "duplicate img_id": 1,
                                   "caption is not UTF-8": 1, "skipped line": 1}
    assert "skipped line: 1" in err  # the summary's counts
    # The undecodable caption is drawn as an empty one, and the tab is a space: the same file written that
    # way gives the same lines (each picture's random numbers follow its place among the prompts).
    fixed = [b"ok1\t\xe7\xba\xa2\xe8\x89\xb2T\xe6\x81\xa4", b"empty\t", b"spaces\t", b"long\t" + long_caption.encode(),
             b"ok1\t\xe8\x93\x9d\xe8\x89\xb2", b"bytes\t", b"three\tfields here"]
    path.write_bytes(b"\n".join(fixed) + b"\n")
    assert run_generate(trained, "--prompts", str(path))[0] == out


def test_a_file_in_another_encoding_is_an_error(trained, tmp_path, capsys):
    path = tmp_path / "gbk.tsv"
    path.write_bytes("".join(f"g{i}\t{c}\n" for i, (_, c) in enumerate(TEST_PROMPTS)).encode("gb18030"))
    assert generate.main(["--ckpt", str(trained.ckpt), "--prompts", str(path)]) == 1
    line = error_line(capsys.readouterr().err)
    assert "captions are not UTF-8" in line and "GB18030" in line


def test_empty_captions_become_the_null_caption(trained):
    pipe = load_pipeline(trained.ckpt, generate.pick_device("cpu"))
    ids, counts = pipe.caption_ids(["红色", "", "  ", "\u200b"])
    assert ids.shape == (4, TEXT_LEN) and ids[0].any() and not ids[1:].any() and counts[0] > 0


def test_a_single_prompt(trained):
    lines, _ = run_generate(trained, "--prompt", "黄色手提包")
    assert len(lines) == 1 and parse(lines[0])[0] == "prompt"


# --- interrupted runs -------------------------------------------------------------------------------------------


def start_generate(trained, tmp_path: Path, **popen) -> subprocess.Popen:
    # 40 pictures of ~150 KB each: far more than a pipe holds, so the run is still going when it is stopped
    rows = [(f"k{n}", f"蓝色连衣裙 {n}号") for n in range(40)]
    flags = ["--prompts", str(write_prompts(tmp_path / "p.tsv", rows)), "--batch_size", "2", "--num_workers", "2"]
    return subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(trained.ckpt), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, **popen)


def test_ctrl_c_ends_the_run_with_one_line_and_status_130(trained, tmp_path):
    # Ctrl-C signals the whole process group: the main process and its encoding workers. A shell that runs the
    # tests in the background hands them SIGINT ignored, and so would its children; a terminal's user would not.
    child = start_generate(trained, tmp_path, start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = child.stdout.readline()
    os.killpg(child.pid, signal.SIGINT)
    rest, stderr = child.communicate(timeout=120)
    stderr = stderr.decode()
    assert child.returncode == 130, (child.returncode, stderr[-3000:])  # not -6 / 134: no abort
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr[-3000:]
    assert stderr.rstrip("\n").splitlines()[-1] == "generate.py: interrupted"
    # every line written is whole
    lines = (first + rest).splitlines(keepends=True)
    assert 1 <= len(lines) < 40 and all(parse(line)[0] == f"k{n}" for n, line in enumerate(lines))


def test_a_closed_output_pipe_ends_the_run_with_one_line(trained, tmp_path):
    # `python generate.py ... | head -c 100`: the reader leaves after 100 bytes
    child = start_generate(trained, tmp_path)
    assert len(child.stdout.read(100)) == 100
    child.stdout.close()
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == 1, stderr[-3000:]
    assert "output was closed" in error_line(stderr)


def test_a_full_disk_ends_the_run_with_one_line(trained, tmp_path):
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(trained.ckpt), "--prompt",
                                 "红色", "--num_workers", "0"], stdout=full, stderr=subprocess.PIPE, env=ENV,
                                timeout=300)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr[-3000:]
    assert "No space left on device" in error_line(stderr)


# --- extras -----------------------------------------------------------------------------------------------------


def test_grid_and_out_dir(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "find_cjk_font", lambda: None)
    rows = [("a/1", "红色T恤"), ("b", "蓝色连衣裙"), ("a/1", "黑色"), ("c", "")]
    prompts = str(write_prompts(tmp_path / "p.tsv", rows))
    grid, pictures = tmp_path / "preview.png", tmp_path / "pictures"
    lines, _ = run_generate(trained, "--prompts", prompts, "--grid", str(grid), "--grid_count", "3",
                            "--out_dir", str(pictures))
    assert "no font with Chinese glyphs found" in capsys.readouterr().err
    with Image.open(grid) as sheet:
        assert sheet.width > 2 * 256 and sheet.height > 2 * 256  # 2 x 2 cells of 256 px with captions
    assert sorted(p.name for p in pictures.iterdir()) == ["a_1-2.png", "a_1.png", "b.png", "c.png"]
    # the files the workers wrote are the pictures of the lines
    for name, line in zip(["a_1.png", "b.png", "a_1-2.png", "c.png"], lines, strict=True):
        assert (pictures / name).read_bytes() == base64.b64decode(parse(line)[1])


def test_help_explains_every_flag():
    parser = generate.build_parser()
    flags = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert len(flags) >= 20 and all(action.help for action in flags)
    text = parser.format_help()
    assert all(action.option_strings[0] in text for action in flags)
    assert "--resume_from" not in text and "--candidates" in text and "--compile" in text


def test_clear_errors(trained, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "best.pt"
    assert generate.main(["--ckpt", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: no checkpoint at") and "run train.py" in err and err.count("\n") == 1
    # a checkpoint whose VQGAN was moved away since prepare.py ran
    ckpt = load_checkpoint_file(trained.ckpt)
    ckpt["meta"]["vqgan_ckpt"] = str(tmp_path / "moved.pt")
    moved = tmp_path / "best.pt"
    save_checkpoint_atomic(ckpt, moved)
    args = generate.build_parser().parse_args(["--ckpt", str(moved)])
    with pytest.raises(UserError, match="moved.pt, no longer exists: pass --vqgan_ckpt"):
        generate.run(args, io.BytesIO())
    args = generate.build_parser().parse_args(["--ckpt", str(moved), "--vqgan_ckpt", str(trained.vqgan),
                                               "--prompt", "红色"])
    out = io.BytesIO()
    generate.run(args, out)  # works again with --vqgan_ckpt
    assert out.getvalue().count(b"\n") == 1
    for flags, message in [(["--prompts", str(tmp_path / "none.tsv")], "no such prompts file"),
                           (["--prompt", "x", "--prompts", str(trained.test_prompts)], "exclude each other"),
                           (["--top_p", "0"], "--top_p must lie in"),
                           (["--candidates", "0"], "--candidates must be at least 1"),
                           (["--temperature", "-1"], "--temperature must be 0")]:
        assert generate.main(["--ckpt", str(trained.ckpt), *flags]) == 1, flags
        assert message in error_line(capsys.readouterr().err), flags


@pytest.mark.parametrize("case", ["nan guidance", "out_dir is a file"])
def test_bad_values_and_paths_end_with_one_line(trained, tmp_path, capsys, case):
    flags = {"nan guidance": ["--cfg_scale", "nan"],
             "out_dir is a file": ["--out_dir", str(trained.test_prompts)]}[case]
    assert generate.main(["--ckpt", str(trained.ckpt), "--prompt", "红色", "--num_workers", "0", *flags]) == 1
    line = error_line(capsys.readouterr().err)
    assert {"nan guidance": "--cfg_scale must be a number", "out_dir is a file": "File exists"}[case] in line
    assert case != "out_dir is a file" or str(trained.test_prompts) in line


def test_meta_records_what_generate_reads(trained):
    meta = json.loads((trained.data / "meta.json").read_text())
    assert meta["test_prompts"] == str(trained.test_prompts.resolve())
    assert meta["vqgan_ckpt"] == str(Path(trained.vqgan).resolve()) and meta["tokenizer"] == "vocab.txt"
