import dataclasses
import fcntl
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, TINY_F4

import train
import utils
from model import GPT, GPTConfig, Sampler, load_model, row_keys
from scorer import Scorer, load_scorer
from utils import UserError, configure
from vqgan import VQGAN, save_checkpoint_atomic
from vqgan.train import VQGANTrainConfig, build_model

TINY = str(ROOT / "config" / "tiny_cpu.py")
CODEBOOK, GRID, TEXT_LEN, VOCAB = 32, 4, 8, 20
# What meta.json dictates; no recipe or flag may set these.
DATA_FIELDS = {"codebook_size", "grid_rows", "grid_cols", "text_len", "text_encoder", "text_vocab_size"}


def tiny_meta() -> dict:
    return {"image_size": 64, "code_grid": [GRID, GRID], "codebook_size": CODEBOOK, "text_len": TEXT_LEN,
            "tokenizer": "vocab.txt", "text_vocab_size": VOCAB}


def write_data(data_dir: Path, codebook_size: int = CODEBOOK, train_rows: int = 64) -> Path:
    """prepare.py's layout with a learnable rule: the caption's first token picks the image's code pattern.
    The last caption token marks the row, 16 + its parity in train and 18 in val, so that a test can tell
    which rows a batch came from."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, rows in (("train", train_rows), ("val", 16)):
        text = np.zeros((rows, TEXT_LEN), np.uint16)
        codes = np.zeros((rows, GRID * GRID), np.uint16)
        for i in range(rows):
            k = int(rng.integers(1, 6))
            text[i, :3] = [k, k + 5, k + 10]
            text[i, -1] = 16 + i % 2 if split == "train" else 18
            codes[i] = (np.arange(GRID * GRID) * k) % codebook_size
        codes.tofile(data_dir / f"{split}.img.bin")
        text.tofile(data_dir / f"{split}.txt.bin")
        (data_dir / f"{split}.ids.txt").write_text("".join(f"{split}{i}\n" for i in range(rows)))
    meta = {**tiny_meta(), "codebook_size": codebook_size, "pad_id": 0,
            "splits": {"train": {"rows": train_rows}, "val": {"rows": 16}}}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return data_dir


@pytest.fixture
def data_dir(tmp_path):
    return write_data(tmp_path / "data")


def edit_meta(data_dir: Path, **changes) -> None:
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "meta.json").write_text(json.dumps({**meta, **changes}))


def failure(capsys, argv: list[str]) -> tuple[str, str]:
    """The one line train.py ends with when it exits with status 1, and its whole log."""
    capsys.readouterr()  # what earlier calls wrote
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    message = err.splitlines()[-1]
    assert message.startswith("train.py: error: ") and err.endswith(message + "\n") and err.count("error:") == 1
    return message, err


def error_of(capsys, argv: list[str]) -> str:
    return failure(capsys, argv)[0]


def run_train(*flags: str) -> subprocess.Popen:
    # One thread each: two runs side by side on two cores would otherwise fight over them.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), TINY, *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def small_pipe(process: subprocess.Popen) -> None:
    # A one-page pipe that we stop reading blocks the run a few dozen log lines later, so it cannot finish
    # before we are done with it however slow or fast this machine is.
    fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)


needs_small_pipes = pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="pipe sizes are Linux only")


def all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from all_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from all_tensors(value)


# --- settings -----------------------------------------------------------------------------------------------


def test_flags_in_both_forms_and_over_recipes(tmp_path, capsys):
    assert train.parse_args(["--batch_size", "8"])[0].batch_size == 8
    assert train.parse_args(["--batch_size=8"])[0].batch_size == 8
    recipe = tmp_path / "recipe.py"
    recipe.write_text("batch_size = 3\nn_layer = 5\nlearning_rate = 1  # ints are fine for floats\ncompile = False\n")
    tc, mc, given = train.parse_args([str(recipe), "--batch_size", "4", "--compile", "true", "--bias=false"])
    assert (tc.batch_size, tc.learning_rate, tc.compile) == (4, 1, True)
    assert (mc.n_layer, mc.bias) == (5, False)
    assert given == {"batch_size", "n_layer", "learning_rate", "compile", "bias"}
    assert train.parse_args(["--batch_size=4", str(recipe)])[0].batch_size == 4  # a flag wins wherever it stands
    assert train.parse_args([]) == (train.TrainConfig(), GPTConfig(), set())  # no arguments: the demo defaults
    # every form of assignment sets a setting, and a typo in any of them is caught
    recipe.write_text("import math\nbatch_size: int = 8\nlearning_rate, min_lr = 5e-4, 5e-5\n"
                      "if math.pi > 3:\n    max_iters = 7\n")
    tc = train.parse_args([str(recipe)])[0]
    assert (tc.batch_size, tc.learning_rate, tc.min_lr, tc.max_iters) == (8, 5e-4, 5e-5, 7)
    recipe.write_text("if True:\n    max_iter = 7\n")
    assert f"{recipe}:2: unknown setting 'max_iter'" in error_of(capsys, [str(recipe)])
    # a bool needs its value: a bare --compile would silently take the next argument's place
    assert "--compile needs a value" in error_of(capsys, ["--compile"])
    assert "--compile=maybe: expected bool" in error_of(capsys, ["--compile=maybe"])
    assert "--max_iters=many: expected int" in error_of(capsys, ["--max_iters", "many"])
    assert "--model must be one of gpt, scorer, not 'bert'" in error_of(capsys, ["--model=bert"])


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    settings = [f for cls in (train.TrainConfig, GPTConfig) for f in dataclasses.fields(cls) if "help" in f.metadata]
    names = {f.name for f in settings}
    assert names == {f.name for f in dataclasses.fields(train.TrainConfig)} | (
        {f.name for f in dataclasses.fields(GPTConfig)} - DATA_FIELDS - {"text_config"})
    for f in settings:
        assert f"--{f.name}=" in text and f.metadata["help"] in text, f.name
    assert not any(f"--{name}" in text for name in DATA_FIELDS)
    assert set(train.model_settings_from_meta(tiny_meta())) == DATA_FIELDS


@pytest.mark.parametrize("recipe", sorted((ROOT / "config").glob("*.py")), ids=lambda path: path.name)
def test_recipes_give_a_working_config(recipe):
    if recipe.name.startswith("vqgan"):  # vqgan.train's settings, which train.py does not know
        (args,), _ = configure([str(recipe)], (VQGANTrainConfig,), "-m vqgan.train", "")
        vq, fresh = build_model(args, None)
        assert fresh and vq.codebook_size == args.n_embed and args.image_size % vq.downsample_factor == 0
        with pytest.raises(UserError, match=f"{recipe}:\\d+: unknown setting"):
            train.parse_args([str(recipe)])
        return
    tc, mc, given = train.parse_args([str(recipe)])
    assert given and not given & DATA_FIELDS
    assert tc.batch_size * tc.gradient_accumulation_steps >= 1 and tc.model in ("gpt", "scorer")
    mc = dataclasses.replace(mc, **train.model_settings_from_meta(tiny_meta()))
    with torch.device("meta"):  # the real sizes, without their memory
        model = (Scorer if tc.model == "scorer" else GPT)(mc)
    assert model.num_params() > 0


def test_bad_recipe_files_are_named_with_their_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("n_layer = 2\nn_layers = 3\n")
    assert f"{recipe}:2: unknown setting 'n_layers'" in error_of(capsys, [str(recipe)])
    recipe.write_text("batch_size = 'eight'\n")
    assert f"{recipe}:1: batch_size = 'eight' is not a int" in error_of(capsys, [str(recipe)])
    recipe.write_text("batch_size = (\n")
    assert f"{recipe}:1:" in error_of(capsys, [str(recipe)])
    recipe.write_text("n_layer = 2\nn_embd = width * 2\n")
    assert f"{recipe}:2: NameError" in error_of(capsys, [str(recipe)])
    recipe.write_text("n_layer = 2\ncodebook_size = 16\n")  # meta.json's, not the recipe's
    assert f"{recipe}:2: unknown setting 'codebook_size'" in error_of(capsys, [str(recipe)])
    assert "cannot read the recipe" in error_of(capsys, [str(tmp_path / "nowhere.py")])


# --- training -------------------------------------------------------------------------------------------------


def test_loss_drops_and_both_checkpoints_are_complete(data_dir, tmp_path):
    out = tmp_path / "out"
    summary = train.main([TINY, "--data_dir", str(data_dir), "--out_dir", str(out), "--max_iters", "40"])
    assert summary["iter_num"] == 40
    assert summary["val_loss"] < 2.5  # from ~3.47 (uniform over 32 codes)
    assert summary["memory_gib"]["resident"] > 0 and summary["tokens_per_iter"] == 4 * GRID * GRID
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # plain data only
    assert set(ckpt) == {"kind", "model", "model_config", "optimizer", "scaler", "iter_num", "best_val_loss",
                         "best_iter", "train_config", "meta", "data_dir", "rng"}
    assert ckpt["kind"] == "gpt" and ckpt["iter_num"] == 40 and ckpt["data_dir"] == str(data_dir.resolve())
    assert ckpt["model_config"]["codebook_size"] == CODEBOOK and ckpt["meta"]["text_len"] == TEXT_LEN
    best = torch.load(out / "best.pt", weights_only=True)
    assert "optimizer" not in best and "rng" not in best  # weights for generate.py, not a training state
    assert best["kind"] == "gpt" and best["iter_num"] == ckpt["best_iter"] and best["val_loss"] == ckpt["best_val_loss"]
    gpt, loaded = load_model(out / "best.pt")
    assert loaded["iter_num"] == best["iter_num"]
    text = torch.tensor([[1, 6, 11, 0, 0, 0, 0, 0]])
    codes = Sampler(gpt, 1, cfg_scale=2.0, temperature=0.0).sample(text, row_keys(0, range(1)).flatten())
    assert codes.shape == (1, GRID, GRID) and codes.min() >= 0 and codes.max() < CODEBOOK


def test_best_pt_keeps_the_lowest_val_loss(data_dir, tmp_path, monkeypatch):
    # Val losses that rise after step 10: best.pt stays at step 10 while ckpt.pt moves on.
    losses = iter([3.0, 1.0, 2.0, 1.5])
    estimate = train.estimate_loss

    def rising(*args):
        real = estimate(*args)
        return {split: next(losses) if split == "val" else value for split, value in real.items()}

    monkeypatch.setattr(train, "estimate_loss", rising)
    out = tmp_path / "out"
    train.main([TINY, "--data_dir", str(data_dir), "--out_dir", str(out), "--max_iters", "30"])
    best, last = (torch.load(out / name, weights_only=True) for name in ("best.pt", "ckpt.pt"))
    assert (best["iter_num"], best["val_loss"]) == (10, 1.0)
    assert (last["iter_num"], last["best_iter"], last["best_val_loss"]) == (30, 10, 1.0)
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_sigkill_and_resume_reaches_the_same_state_as_an_unbroken_run(data_dir, tmp_path):
    # On the CPU the same ops in the same order on the same data give bit-identical results, and a resumed
    # run restores weights, optimizer, schedule position, data sampler and RNG states exactly; so the
    # tolerance is zero: any drift would mean some state was not restored.
    flags = ["--data_dir", str(data_dir), "--max_iters", "80", "--log_interval", "1"]
    unbroken = run_train(*flags, "--out_dir", str(tmp_path / "unbroken"))
    broken = run_train(*flags, "--out_dir", str(tmp_path / "broken"))
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        small_pipe(broken)
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
        # `iter N: loss X` without the timings after it; eval lines whole
        line = next(line for line in reversed(log.splitlines()) if line.startswith(prefix))
        return line.split(",")[0] if prefix.startswith("iter") else line

    assert last_line(resumed_log, "iter 80:") == last_line(unbroken_log, "iter 80:")
    assert last_line(resumed_log, "step 80:") == last_line(unbroken_log, "step 80:")
    a = torch.load(tmp_path / "unbroken" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)
    assert (a["best_val_loss"], a["best_iter"]) == (b["best_val_loss"], b["best_iter"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    a, b = (torch.load(tmp_path / run / "best.pt", weights_only=True) for run in ("unbroken", "broken"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint_atomic({"iter_num": 1, "model": {"w": torch.zeros(3)}}, path)
    # Kill the writer after the new bytes are written but before they could replace the old file.
    script = (
        "import os, signal, sys, torch\n"
        "from vqgan import save_checkpoint_atomic\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        "save_checkpoint_atomic({'iter_num': 2, 'model': {'w': torch.ones(100000)}}, sys.argv[1])\n"
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
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes, 128 tokens per step" in result.stderr  # 2 x batch 4 x 16 codes
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and len(ckpt["rng"]) == 2
    # each process drew its own batches
    assert not torch.equal(ckpt["rng"][0]["data"], ckpt["rng"][1]["data"])
    assert torch.load(out / "best.pt", weights_only=True)["iter_num"] in (3, 6)


# --- the scorer -----------------------------------------------------------------------------------------------


def test_the_scorer_trains(data_dir, tmp_path, capsys):
    out = tmp_path / "scorer"
    summary = train.main([TINY, "--model=scorer", "--data_dir", str(data_dir), "--out_dir", str(out),
                          "--batch_size=16", "--max_iters=30", "--eval_interval=30"])
    first = float(re.search(r"step 0: train loss \S+, val loss ([\d.]+)", capsys.readouterr().err).group(1))
    assert summary["val_loss"] < first - 0.5  # from ~ln 16 = 2.77
    scorer, ckpt = load_scorer(out / "best.pt")
    assert ckpt["kind"] == "scorer"
    # each of the five caption kinds is most similar to its own code pattern
    text = torch.tensor([[k, k + 5, k + 10] + [0] * (TEXT_LEN - 3) for k in range(1, 6)])
    codes = torch.stack([(torch.arange(GRID * GRID) * k) % CODEBOOK for k in range(1, 6)])
    with torch.no_grad():
        similarity = scorer.embed_images(codes) @ scorer.embed_captions(text).T
    assert torch.equal(similarity.argmax(1), torch.arange(5))
    with pytest.raises(Exception, match="holds a scorer, not a gpt"):
        load_model(out / "best.pt")


@pytest.mark.parametrize("trained, resumed", [("gpt", "scorer"), ("scorer", "gpt")])
def test_resume_refuses_a_checkpoint_of_the_other_kind(data_dir, tmp_path, capsys, trained, resumed):
    flags = [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"), "--eval_interval", "1"]
    train.main([*flags, f"--model={trained}", "--max_iters=1"])
    message = error_of(capsys, [*flags, f"--model={resumed}", "--init_from=resume", "--max_iters=2"])
    assert f"holds a {trained}, not a {resumed}: pass the --model it was trained as" in message


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_interval", [1, 100], ids=["caught-at-log", "caught-at-eval"])
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch,
                                                                             capsys, log_interval):
    forward = train.GPT.forward
    steps = []

    def poisoned(self, codes, text):
        logits, loss = forward(self, codes, text)
        if self.training:
            steps.append(None)
            if len(steps) >= 15:  # from the 15th step on; its NaN gradients poison the weights too
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(train.GPT, "forward", poisoned)
    out = tmp_path / "out"
    message, log = failure(capsys, [TINY, "--data_dir", str(data_dir), "--out_dir", str(out), "--max_iters", "40",
                                    "--log_interval", str(log_interval)])
    assert "the loss is not finite from step 15 on" in message and f"keeping {out}/ckpt.pt (step 10)" in message
    for name in ("ckpt.pt", "best.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert ckpt["iter_num"] == 10
        assert all(torch.isfinite(t).all() for t in all_tensors(ckpt) if t.is_floating_point()), name
    # it stopped at the first check after the bad step: the log line of step 15, or the evaluation at 20
    assert len(steps) == (15 if log_interval == 1 else 20)
    assert ("iter 14:" in log) == (log_interval == 1) and "iter 15:" not in log and "step 20:" not in log


@needs_small_pipes
def test_a_second_run_on_the_same_out_dir_stops_at_once(data_dir, tmp_path):
    flags = ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"), "--max_iters", "80",
             "--log_interval", "1"]
    runs = [run_train(*flags), run_train(*flags)]
    for run in runs:
        small_pipe(run)  # unread, the run that holds the lock stays in training until we read it
    deadline = time.monotonic() + 120
    while all(run.poll() is None for run in runs):
        assert time.monotonic() < deadline, "neither run ended"
        time.sleep(0.1)
    (second,) = [run for run in runs if run.poll() is not None]
    (first,) = [run for run in runs if run is not second]
    second_log, _ = second.communicate()
    assert second.returncode == 1
    assert re.fullmatch(r"train\.py: error: another train\.py run is using \S+/out: wait for it to end, or pick "
                        r"another folder\n", second_log)
    first_log, _ = first.communicate()
    assert first.returncode == 0 and "step 80:" in first_log, first_log[-2000:]
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 80


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unusable_out_dir_fails_at_once(data_dir, tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = {"a file": blocker, "under a file": blocker / "out", "read-only": tmp_path / "read-only"}[where]
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root may write into a read-only folder")
        out.mkdir(mode=0o555)
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.main([TINY, "--data_dir", str(data_dir), "--out_dir", str(out)])
    finally:
        if where == "read-only":
            out.chmod(0o755)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    # one line, before the model is even built: not at the first checkpoint, after an eval interval of training
    assert err.startswith("train.py: error: ") and err.count("\n") == 1 and str(out) in err
    assert "iter" not in err


def test_meta_json_with_a_null_codebook_size(data_dir, tmp_path, capsys):
    edit_meta(data_dir, codebook_size=None)
    message = error_of(capsys, [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out")])
    assert f"{data_dir / 'meta.json'}: codebook_size missing or of the wrong type" in message


def test_data_dir_without_meta_json(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "has no meta.json" in error_of(capsys, [TINY, "--data_dir", str(tmp_path), "--out_dir", out])
    assert "does not exist" in error_of(capsys, [TINY, "--data_dir", str(tmp_path / "nowhere"), "--out_dir", out])


def test_resume_on_data_with_another_codebook(data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    train.main([TINY, "--data_dir", str(data_dir), "--out_dir", out, "--max_iters", "1", "--eval_interval", "1"])
    other = write_data(tmp_path / "other", codebook_size=64)
    message = error_of(capsys, [TINY, "--data_dir", str(other), "--out_dir", out, "--init_from", "resume"])
    assert "codebook_size 32" in message and "has 64" in message


def test_resume_takes_the_model_settings_from_the_checkpoint(data_dir, tmp_path, capsys):
    flags = [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path), "--eval_interval", "1"]
    train.main([*flags, "--max_iters", "1"])
    train.main([*flags, "--max_iters", "2", "--init_from", "resume", "--n_layer", "3", "--dropout", "0.0"])
    assert "the model settings come from the checkpoint; ignored: n_layer\n" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 2 and ckpt["model_config"]["n_layer"] == 2


def test_a_new_run_never_replaces_an_existing_checkpoint(data_dir, tmp_path, capsys):
    flags = [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path), "--max_iters", "2", "--eval_interval", "2"]
    train.main(flags)
    saved = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "best.pt")}
    message = error_of(capsys, flags)
    assert "ckpt.pt exists: --init_from=resume continues that run" in message
    assert all((tmp_path / name).read_bytes() == data for name, data in saved.items())


def test_resume_without_a_checkpoint(data_dir, tmp_path, capsys):
    message = error_of(capsys, [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path), "--init_from", "resume"])
    assert "no checkpoint at" in message


def test_a_model_that_cannot_work(data_dir, tmp_path, capsys):
    flags = [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path)]
    assert "n_embd 65 is not divisible by n_head 2" in error_of(capsys, [*flags, "--n_embd", "65"])
    assert "unknown setting --codebook_size" in error_of(capsys, [*flags, "--codebook_size", "16"])
    edit_meta(data_dir, text_vocab_size=0)  # a char vocab encoder with no vocab
    assert "the model cannot work: text_vocab_size must be set" in error_of(capsys, flags)


def test_ids_beyond_the_codebook(tmp_path, capsys):
    data = write_data(tmp_path / "data", codebook_size=CODEBOOK)
    edit_meta(data, codebook_size=16)  # the codes go up to 31
    message = error_of(capsys, [TINY, "--data_dir", str(data), "--out_dir", str(tmp_path / "out")])
    first = int(np.argmax(np.fromfile(data / "train.img.bin", np.uint16).reshape(-1, GRID * GRID).max(1) >= 16))
    assert f"train.img.bin row {first}: id " in message and ">= codebook_size 16" in message


def test_out_of_memory_says_what_to_do(data_dir, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.GPT, "forward", out_of_memory)
    message = error_of(capsys, [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path)])
    assert "out of GPU memory at batch_size 4" in message and "lower --batch_size" in message
    assert "--activation_checkpointing=true" in message


def test_compile_without_a_compiler_says_how_to_turn_it_off(data_dir, tmp_path, monkeypatch, capsys):
    # A stand-in for inductor's compiler lookup (the real module takes seconds to import) that finds none.
    def no_compiler():
        raise RuntimeError("no compiler found\nsearched: g++, clang++")

    monkeypatch.setitem(sys.modules, "torch._inductor.cpp_builder", types.SimpleNamespace(get_cpp_compiler=no_compiler))
    message = error_of(capsys, [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path), "--compile=true"])
    assert "torch.compile cannot work here: no working C++ compiler (no compiler found)" in message
    assert message.endswith("install them, or pass --compile false")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_a_gpu_that_torch_cannot_use_is_an_error(data_dir, tmp_path, capsys, monkeypatch):
    flags = [TINY, "--data_dir", str(data_dir), "--out_dir", str(tmp_path)]
    message = error_of(capsys, [*flags, "--device=cuda"])
    assert "--device cuda, but torch cannot use a CUDA GPU here" in message
    # an NVIDIA card this CUDA build cannot drive (an old driver): an error, not hours on the CPU unasked
    card = tmp_path / "nvidiactl"
    card.touch()
    monkeypatch.setattr(utils, "NVIDIA_DEVICE_FILES", (str(card),))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    message = error_of(capsys, [*flags, "--device="])
    assert "this machine has an NVIDIA GPU that torch cannot use" in message and "built for CUDA 12.8" in message
    assert message.endswith("--device cpu runs on the CPU")
    assert not (tmp_path / "ckpt.pt").exists()


# --- GPU readiness, as far as the CPU can show it --------------------------------------------------------------


def read_legacy_tf32_flags() -> tuple[bool, bool]:
    # torch raises RuntimeError here when the legacy and the new TF32 APIs were mixed
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_cuda_setup_turns_tf32_on_through_the_new_api_only_and_cudnn_attention_off():
    precision, cudnn_sdp = torch.get_float32_matmul_precision(), torch.backends.cuda.cudnn_sdp_enabled()
    torch.manual_seed(0)
    vq = VQGAN(TINY_F4).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = vq.encode(x)
    try:
        train.set_up_cuda(torch.device("cpu"))  # nothing to set up
        assert (torch.get_float32_matmul_precision(), torch.backends.cuda.cudnn_sdp_enabled()) == (precision, cudnn_sdp)
        train.set_up_cuda(torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
        assert read_legacy_tf32_flags()[0] is True  # the legacy view of the new setting
        conv = torch.backends.cudnn.conv.fp32_precision
        # the VQGAN encodes in exact fp32 whatever training set, and puts the training's settings back
        assert torch.equal(vq.encode(x), codes)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.conv.fp32_precision == conv
        read_legacy_tf32_flags()
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)


def test_memory_figures(monkeypatch):
    assert utils.memory_gib(torch.device("cpu"))["resident"] > 0
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 5 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * gib)  # now, below the peak
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 16 * gib))  # 6 GiB in use
    # card: the peak reserved plus what no allocator counts (6 GiB in use now - 2 GiB reserved now)
    memory = utils.memory_gib(torch.device("cuda"))
    assert memory == {"allocated": 3.0, "reserved": 5.0, "card": 9.0}
    assert utils.format_memory(memory) == "3.00 GiB allocated, 5.00 GiB reserved, 9.00 GiB card"
