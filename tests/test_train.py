import dataclasses
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import ROOT

import train
from model import GPTConfig, load_model

TINY = str(ROOT / "config" / "tiny_cpu.py")
CODEBOOK, GRID, TEXT_LEN, VOCAB = 32, 4, 8, 20


def write_data(data_dir: Path, codebook_size: int = CODEBOOK, train_rows: int = 64) -> Path:
    """prepare.py's layout with a learnable rule: the caption's first token picks the image's code pattern."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, rows in (("train", train_rows), ("val", 16)):
        text = np.zeros((rows, TEXT_LEN), np.uint16)
        codes = np.zeros((rows, GRID * GRID), np.uint16)
        for i in range(rows):
            k = int(rng.integers(1, 6))
            text[i, :3] = [k, k + 5, k + 10]
            codes[i] = (np.arange(GRID * GRID) * k) % codebook_size
        codes.tofile(data_dir / f"{split}.img.bin")
        text.tofile(data_dir / f"{split}.txt.bin")
    meta = {"image_size": 64, "code_grid": [GRID, GRID], "codebook_size": codebook_size, "text_len": TEXT_LEN,
            "tokenizer": "vocab.txt", "text_vocab_size": VOCAB, "pad_id": 0,
            "splits": {"train": {"rows": train_rows}, "val": {"rows": 16}}}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return data_dir


@pytest.fixture
def data_dir(tmp_path):
    return write_data(tmp_path / "data")


def error_of(argv: list[str]) -> str:
    """The one-line message train.py exits with."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("train.py: error: ") and "\n" not in message
    return message


def run_train(*flags: str) -> subprocess.Popen:
    # One thread each: two runs side by side on two cores would otherwise fight over them.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), TINY, *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# --- settings -----------------------------------------------------------------------------------------------


def test_flags_in_both_forms_and_over_config_files(tmp_path):
    assert train.parse_args(["--batch_size", "8"])[0].batch_size == 8
    assert train.parse_args(["--batch_size=8"])[0].batch_size == 8
    recipe = tmp_path / "recipe.py"
    recipe.write_text("batch_size = 3\nn_layer = 5\nlearning_rate = 1  # ints are fine for floats\ncompile = False\n")
    tc, model_settings = train.parse_args([str(recipe), "--batch_size", "4", "--compile", "--bias=false"])
    assert (tc.batch_size, tc.learning_rate, tc.compile) == (4, 1, True)
    assert model_settings == {"n_layer": 5, "bias": False}
    assert train.parse_args([])[0] == train.TrainConfig()  # no arguments: the demo defaults
    # every form of assignment sets a setting, and a typo in any of them is caught
    recipe.write_text("import math\nbatch_size: int = 8\nlearning_rate, min_lr = 5e-4, 5e-5\n"
                      "if math.pi > 3:\n    max_iters = 7\n")
    tc = train.parse_args([str(recipe)])[0]
    assert (tc.batch_size, tc.learning_rate, tc.min_lr, tc.max_iters) == (8, 5e-4, 5e-5, 7)
    recipe.write_text("if True:\n    max_iter = 7\n")
    assert f"{recipe}:2: unknown setting 'max_iter'" in error_of([str(recipe)])


def test_help_documents_every_setting():
    text = train.build_parser().format_help()
    names = [f.name for f in dataclasses.fields(train.TrainConfig)]
    names += [f.name for f in dataclasses.fields(GPTConfig) if f.name != "text_config"]
    assert all(f"--{name}" in text for name in names)


@pytest.mark.parametrize("recipe", sorted((ROOT / "config").glob("*.py")), ids=lambda path: path.name)
def test_recipes_give_a_working_model_config(recipe):
    tc, model_settings = train.parse_args([str(recipe)])
    assert not set(model_settings) & set(train.FROM_META)  # those come from meta.json
    GPTConfig(**model_settings, text_vocab_size=VOCAB)
    assert tc.batch_size * tc.gradient_accumulation_steps >= 1


def test_bad_config_files(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("n_layer = 2\nn_layers = 3\n")
    assert f"{recipe}:2: unknown setting 'n_layers'" in error_of([str(recipe)])
    recipe.write_text("batch_size = 'eight'\n")
    assert f"{recipe}:1: batch_size = 'eight' is not a int" in error_of([str(recipe)])
    recipe.write_text("batch_size = (\n")
    assert f"{recipe}:1:" in error_of([str(recipe)])
    recipe.write_text("n_layer = 2\nn_embd = width * 2\n")
    assert f"{recipe}:2: NameError" in error_of([str(recipe)])


# --- training -------------------------------------------------------------------------------------------------


def test_loss_drops_and_the_checkpoint_is_complete(data_dir, tmp_path):
    out = tmp_path / "out"
    summary = train.main([TINY, "--data_dir", str(data_dir), "--out_dir", str(out), "--max_iters", "40"])
    assert summary["iter_num"] == 40
    assert summary["val_loss"] < 2.5  # from ~3.47 (uniform over 32 codes)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "model_config", "optimizer", "scaler", "iter_num", "best_val_loss",
                         "train_config", "meta", "data_dir", "rng"}
    assert ckpt["iter_num"] == 40 and ckpt["data_dir"] == str(data_dir.resolve())
    assert ckpt["model_config"]["codebook_size"] == CODEBOOK and ckpt["meta"]["text_len"] == TEXT_LEN
    model, _ = load_model(out / "ckpt.pt")
    codes = model.generate(torch.tensor([[1, 6, 11, 0, 0, 0, 0, 0]]), cfg_scale=2.0, temperature=0.0)
    assert codes.shape == (1, GRID, GRID)


def test_sigkill_and_resume_reaches_the_same_state_as_an_unbroken_run(data_dir, tmp_path):
    # On the CPU the same ops in the same order on the same data give bit-identical results, and a resumed
    # run restores weights, optimizer, schedule position, data sampler and RNG states exactly; so the
    # tolerance is zero: any drift would mean some state was not restored.
    flags = ["--data_dir", str(data_dir), "--max_iters", "80", "--log_interval", "1"]
    unbroken = run_train(*flags, "--out_dir", str(tmp_path / "unbroken"))
    broken = run_train(*flags, "--out_dir", str(tmp_path / "broken"))
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        # A one-page pipe that we stop reading blocks the run a few dozen log lines later, so it cannot
        # finish before the kill however slow this machine is.
        fcntl.fcntl(broken.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    for line in broken.stdout:
        if line.startswith("iter 25:"):  # past the checkpoint written at step 20
            broken.send_signal(signal.SIGKILL)
            break
    assert broken.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)["iter_num"] == 20
    unbroken_log, _ = unbroken.communicate()
    assert unbroken.returncode == 0, unbroken_log
    resumed = run_train(*flags, "--out_dir", str(tmp_path / "broken"), "--init_from", "resume")
    resumed_log, _ = resumed.communicate()
    assert resumed.returncode == 0, resumed_log
    assert "iter 21:" in resumed_log and "iter 20:" not in resumed_log

    def last_line(log, prefix):
        return next(line.split(",")[0] for line in reversed(log.splitlines()) if line.startswith(prefix))

    assert last_line(resumed_log, "iter 80:") == last_line(unbroken_log, "iter 80:")
    assert last_line(resumed_log, "step 80:") == last_line(unbroken_log, "step 80:")
    a = torch.load(tmp_path / "unbroken" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)
    assert a["best_val_loss"] == b["best_val_loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    train.save_checkpoint_atomic({"iter_num": 1, "model": {"w": torch.zeros(3)}}, path)
    # Kill the writer after the new bytes are written but before they could replace the old file.
    script = (
        "import os, signal, sys, torch\n"
        "import train\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        "train.save_checkpoint_atomic({'iter_num': 2, 'model': {'w': torch.ones(100000)}}, sys.argv[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT)
    assert result.returncode == -signal.SIGKILL
    old = torch.load(path, weights_only=True)
    assert old["iter_num"] == 1 and torch.equal(old["model"]["w"], torch.zeros(3))


@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None or not dist.is_available()
                    or not dist.is_gloo_available(), reason="torchrun or the gloo backend is missing")
def test_ddp_with_two_gloo_processes(data_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), TINY, "--data_dir", str(data_dir), "--out_dir", str(out),
               "--max_iters", "6", "--eval_interval", "3"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes, 128 tokens per step" in result.stderr  # 2 x batch 4 x 16 codes
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and len(ckpt["rng"]) == 2
    # each process drew its own batches
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])


# --- errors ---------------------------------------------------------------------------------------------------


def test_data_dir_without_meta_json(tmp_path):
    assert "has no meta.json" in error_of([TINY, "--data_dir", str(tmp_path)])
    assert "does not exist" in error_of([TINY, "--data_dir", str(tmp_path / "nowhere")])


def test_resume_on_data_with_another_codebook(data_dir, tmp_path):
    out = str(tmp_path / "out")
    train.main([TINY, "--data_dir", str(data_dir), "--out_dir", out, "--max_iters", "1", "--eval_interval", "1"])
    other = write_data(tmp_path / "other", codebook_size=64)
    message = error_of([TINY, "--data_dir", str(other), "--out_dir", out, "--init_from", "resume"])
    assert "codebook_size 32" in message and "has 64" in message


def test_a_new_run_never_replaces_an_existing_checkpoint(data_dir, tmp_path):
    flags = [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path), "--max_iters", "2", "--eval_interval", "2"]
    train.main(flags)
    saved = (tmp_path / "ckpt.pt").read_bytes()
    message = error_of(flags)
    assert "ckpt.pt exists: --init_from resume continues that run" in message
    assert (tmp_path / "ckpt.pt").read_bytes() == saved


def test_resume_without_a_checkpoint(data_dir, tmp_path):
    message = error_of([TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path), "--init_from", "resume"])
    assert "no checkpoint at" in message


def test_a_model_that_cannot_work(data_dir, tmp_path):
    message = error_of([TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path), "--n_embd", "65"])
    assert "n_embd 65 is not divisible by n_head 2" in message
    message = error_of([TINY, "--data_dir", str(data_dir), "--codebook_size", "16"])
    assert "conflicts with" in message and "meta.json" in message


def test_ids_beyond_the_codebook(tmp_path):
    data = write_data(tmp_path / "data", codebook_size=CODEBOOK)
    meta = json.loads((data / "meta.json").read_text())
    meta["codebook_size"] = 16  # the codes go up to 31
    (data / "meta.json").write_text(json.dumps(meta))
    message = error_of([TINY, "--data_dir", str(data), "--out_dir", str(tmp_path)])
    first = int(np.argmax(np.fromfile(data / "train.img.bin", np.uint16).reshape(-1, GRID * GRID).max(1) >= 16))
    assert f"train.img.bin row {first}: id " in message and ">= codebook_size 16" in message


def test_out_of_memory_says_what_to_do(data_dir, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.GPT, "forward", out_of_memory)
    message = error_of([TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path)])
    assert "lower --batch_size" in message and "--activation_checkpointing true" in message
