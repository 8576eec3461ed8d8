import base64
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
import train
from generate import GenerateError
from model import load_model
from text import load_tokenizer
from vqgan import load_checkpoint_file, load_vqgan, save_checkpoint_atomic

TEXT_LEN = 16
# Test prompts as MUGE ships them: hex-like ids, not sorted, so that order is checked for real.
TEST_PROMPTS = [("f3", "红色T恤 XL码 1号"), ("a1", "蓝色连衣裙"), ("c9", "黑色运动鞋 男"), ("07", "白色帽子"),
                ("b2", "粉色口红"), ("e5", "香水 女士")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vqgan_ckpt):
    """prepare.py and train.py run as a user would, in a folder laid out like the repo (out/ckpt.pt)."""
    root = tmp_path_factory.mktemp("run")
    source = write_dataset(root / "muge", good_rows(24))
    write_lines(source / prepare.TEST_FILE, [f"{i}\t{caption}" for i, caption in TEST_PROMPTS])
    assert prepare.main(["--data_dir", str(source), "--vqgan_ckpt", str(vqgan_ckpt), "--out_dir",
                         str(root / "data"), "--image_size", str(TINY_F4_SIZE), "--text_len", str(TEXT_LEN),
                         "--val_fraction", "0.25", "--batch_size", "8", "--num_workers", "0"]) == 0
    train.main([str(ROOT / "config" / "tiny_cpu.py"), "--data_dir", str(root / "data"), "--out_dir",
                str(root / "out"), "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1"])
    return SimpleNamespace(root=root, ckpt=root / "out" / "ckpt.pt", data=root / "data", vqgan=vqgan_ckpt,
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


# --- the output format --------------------------------------------------------------------------------------


def test_every_line_is_a_256_px_rgb_png_in_input_order_and_decodes_both_ways(trained, tmp_path):
    rows = [(f"{n:02x}{'z' if n % 3 else ''}", f"红色T恤 {n}号") for n in (9, 3, 7, 1, 8, 2, 6, 4, 5, 0, 11)]
    lines, summary = run_generate(trained, "--prompts", str(write_prompts(tmp_path / "p.tsv", rows)))
    assert [parse(line)[0] for line in lines] == [i for i, _ in rows]
    assert summary["generated"] == len(rows)
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
    # Why the standard alphabet: URL-safe base64 is silently corrupted by b64decode (it drops '-' and '_').
    data = base64.b64decode(parse(lines[0])[1])
    urlsafe = base64.urlsafe_b64encode(data)
    assert urlsafe != base64.b64encode(data) and base64.b64decode(urlsafe) != data


def test_defaults_come_from_the_checkpoint_and_nothing_but_results_reach_stdout(trained):
    # Run as the user does, `python generate.py > T2I_test.tsv` with no flags from the repo-like folder, with
    # a GPT that also prints, writes to file descriptor 1 and warns: none of that may reach stdout.
    script = (
        "import os, runpy, sys, warnings\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import model\n"
        "sample = model.GPT.generate\n"
        "def noisy(self, *args, **kwargs):\n"
        "    print('LEAK from print')\n"
        "    os.write(1, b'LEAK from fd 1\\n')\n"
        "    warnings.warn('LEAK from warnings')\n"
        "    return sample(self, *args, **kwargs)\n"
        "model.GPT.generate = noisy\n"
        "sys.argv = ['generate.py']\n"
        f"runpy.run_path({str(ROOT / 'generate.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=trained.root, capture_output=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    stderr = result.stderr.decode()
    assert "LEAK from print" in stderr and "LEAK from fd 1" in stderr and "LEAK from warnings" in stderr
    lines = result.stdout.splitlines(keepends=True)
    assert [parse(line)[0] for line in lines] == [i for i, _ in TEST_PROMPTS]
    assert all(picture(parse(line)[1]).size == (256, 256) for line in lines)
    assert re.search(r"generate: 6 pictures in [\d.]+ s \([\d.]+ images/s\)", stderr)
    assert "sampling" in stderr and "VQGAN decoding" in stderr and "image encoding" in stderr


def test_the_same_seed_gives_the_same_bytes_and_the_pictures_of_generate_images(trained, tmp_path):
    prompts = write_prompts(tmp_path / "p.tsv", TEST_PROMPTS)
    first, _ = run_generate(trained, "--prompts", str(prompts), "--seed", "5")
    again, _ = run_generate(trained, "--prompts", str(prompts), "--seed", "5")
    other, _ = run_generate(trained, "--prompts", str(prompts), "--seed", "6")
    assert first == again and first != other
    # the same bytes whether the pictures are encoded in worker processes or in this one
    assert run_generate(trained, "--prompts", str(prompts), "--seed", "5", "--num_workers", "0")[0] == first
    # The library function that evaluation uses draws exactly what the command line writes.
    model, _ = load_model(trained.ckpt)
    tokenizer = load_tokenizer("vocab.txt", trained.data)
    pictures = list(generate.generate_images(model, load_vqgan(trained.vqgan), tokenizer,
                                             [c for _, c in TEST_PROMPTS], seed=5, batch_size=4, image_size=256))
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
             b"three\tfields\there"]                        # 9: skipped
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    out, summary = run_generate(trained, "--prompts", str(path))
    err = capsys.readouterr().err
    assert [parse(line)[0] for line in out] == ["ok1", "empty", "spaces", "long", "ok1", "bytes"]
    assert f"{path}:3: empty caption" in err and f"{path}:4: empty caption" in err
    assert f"{path}:5: caption truncated: long" in err
    assert f"{path}:6: duplicate img_id: ok1 (first at line 1)" in err
    assert f"{path}:7: caption is not UTF-8" in err
    assert f"{path}:8: skipped line: malformed line" in err and f"{path}:9: skipped line" in err
    assert summary["warnings"] == {"empty caption": 2, "caption truncated": 1, "duplicate img_id": 1,
                                   "caption is not UTF-8": 1, "skipped line": 2}
    assert "skipped line: 2" in err  # the summary's counts


def test_empty_captions_become_the_null_caption(trained):
    tokenizer = load_tokenizer("vocab.txt", trained.data)
    ids, _ = generate.caption_ids(tokenizer, ["红色", "", "  ", "\u200b"], TEXT_LEN)
    assert ids[0].any() and not ids[1:].any()


def test_a_single_prompt(trained):
    lines, _ = run_generate(trained, "--prompt", "黄色手提包")
    assert len(lines) == 1 and parse(lines[0])[0] == "prompt"


# --- resuming ---------------------------------------------------------------------------------------------------


def test_resume_from_a_killed_run_gives_the_unbroken_output(trained, tmp_path, capsys):
    rows = [(f"id{n}", f"红色T恤 {n}号") for n in range(9)] + [("id2", "重复的编号")]
    prompts = str(write_prompts(tmp_path / "p.tsv", rows))
    full, _ = run_generate(trained, "--prompts", prompts)
    # A run killed while writing line 6 (of batches of 4): five whole lines, then part of one.
    partial = tmp_path / "part.tsv"
    partial.write_bytes(b"".join(full[:5]) + full[5][: len(full[5]) // 2])
    resumed, summary = run_generate(trained, "--prompts", prompts, "--resume_from", str(partial))
    assert resumed == full  # byte for byte: every batch draws from its own seed
    assert (summary["resumed"], summary["generated"]) == (5, 5)
    assert f"{partial}:6: not a whole result line; drawn again: no newline at the end" in capsys.readouterr().err
    # a finished output resumes to itself without drawing anything
    partial.write_bytes(b"".join(full))
    resumed, summary = run_generate(trained, "--prompts", prompts, "--resume_from", str(partial))
    assert resumed == full and (summary["resumed"], summary["generated"]) == (10, 0)
    # Lines in any order, a corrupt one, the duplicate id's second line and a line for no prompt: each whole
    # line is copied to its place, the rest is drawn again.
    shuffled = [full[3], full[2], b"id1\tbm90IGFuIGltYWdl\n", full[0], full[9], full[1].replace(b"id1", b"stranger")]
    partial.write_bytes(b"".join(shuffled))
    resumed, summary = run_generate(trained, "--prompts", prompts, "--resume_from", str(partial))
    assert resumed == full and (summary["resumed"], summary["generated"]) == (4, 6)
    err = capsys.readouterr().err
    assert f"{partial}:3: not a whole result line" in err and "1 line(s) whose img_id is not asked for" in err


def test_a_killed_run_keeps_whole_lines_and_resumes_to_the_same_bytes(trained, tmp_path):
    rows = [(f"k{n}", f"蓝色连衣裙 {n}号") for n in range(12)]
    flags = ["--prompts", str(write_prompts(tmp_path / "p.tsv", rows)), "--batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--ckpt", str(trained.ckpt), *flags],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    # 12 lines of ~150 KB cannot all fit in the pipe: the run is still going when it is killed.
    first = child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait()
    partial = tmp_path / "part.tsv"
    partial.write_bytes(first + child.stdout.read())
    assert 1 <= partial.read_bytes().count(b"\n") < len(rows)
    resumed, summary = run_generate(trained, *flags, "--resume_from", str(partial))
    assert summary["resumed"] >= 1 and resumed == run_generate(trained, *flags)[0]


def test_resume_refuses_to_write_over_its_own_input(trained, tmp_path):
    partial = tmp_path / "part.tsv"
    partial.write_bytes(b"")
    args = generate.build_parser().parse_args(["--ckpt", str(trained.ckpt), "--resume_from", str(partial)])
    with open(partial, "ab") as same_file, pytest.raises(GenerateError, match="write the resumed output to a new"):
        generate.run(args, same_file)


# --- extras -----------------------------------------------------------------------------------------------------


def test_grid_and_out_dir(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate, "find_cjk_font", lambda: None)
    rows = [("a/1", "红色T恤"), ("b", "蓝色连衣裙"), ("a/1", "黑色"), ("c", "")]
    prompts = str(write_prompts(tmp_path / "p.tsv", rows))
    grid, pictures = tmp_path / "preview.png", tmp_path / "pictures"
    lines, _ = run_generate(trained, "--prompts", prompts, "--grid", str(grid), "--grid_count", "3",
                            "--out_dir", str(pictures))
    assert "no font with Chinese glyphs found" in capsys.readouterr().err
    with Image.open(grid) as sheet:
        assert sheet.width > 2 * 256 and sheet.height > 2 * 256  # 2 x 2 cells of 256 px with captions
    assert sorted(p.name for p in pictures.iterdir()) == ["a_1-2.png", "a_1.png", "b.png", "c.png"]
    assert (pictures / "a_1-2.png").read_bytes() == base64.b64decode(parse(lines[2])[1])


def test_help_explains_every_flag():
    parser = generate.build_parser()
    flags = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert len(flags) >= 20 and all(action.help for action in flags)
    text = parser.format_help()
    assert all(action.option_strings[0] in text for action in flags)


def test_clear_errors(trained, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "ckpt.pt"
    assert generate.main(["--ckpt", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: no checkpoint at") and "run train.py" in err and err.count("\n") == 1
    # a checkpoint whose VQGAN was moved away since prepare.py ran
    ckpt = load_checkpoint_file(trained.ckpt)
    ckpt["meta"]["vqgan_ckpt"] = str(tmp_path / "moved.pt")
    moved = tmp_path / "ckpt.pt"
    save_checkpoint_atomic(ckpt, moved)
    args = generate.build_parser().parse_args(["--ckpt", str(moved)])
    with pytest.raises(GenerateError, match="moved.pt, no longer exists: pass --vqgan_ckpt"):
        generate.run(args, io.BytesIO())
    args = generate.build_parser().parse_args(["--ckpt", str(moved), "--vqgan_ckpt", str(trained.vqgan),
                                               "--prompt", "红色"])
    out = io.BytesIO()
    generate.run(args, out)  # works again with --vqgan_ckpt
    assert out.getvalue().count(b"\n") == 1
    for flags, message in [(["--prompts", str(tmp_path / "none.tsv")], "no such prompts file"),
                           (["--prompt", "x", "--prompts", str(trained.test_prompts)], "exclude each other"),
                           (["--top_p", "0"], "--top_p must lie in"),
                           (["--resume_from", str(tmp_path / "none.tsv")], "no such file")]:
        args = generate.build_parser().parse_args(["--ckpt", str(trained.ckpt), *flags])
        with pytest.raises(GenerateError, match=message):
            generate.run(args, io.BytesIO())


def test_meta_records_what_generate_reads(trained):
    meta = json.loads((trained.data / "meta.json").read_text())
    assert meta["test_prompts"] == str(trained.test_prompts.resolve())
    assert meta["vqgan_ckpt"] == str(Path(trained.vqgan).resolve()) and meta["tokenizer"] == "vocab.txt"
