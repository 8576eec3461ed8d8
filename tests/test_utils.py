"""utils.py: settings from recipes and flags, devices, the schedule, worker pools, locks and error reporting."""

from __future__ import annotations  # setting types are strings, as in the scripts that declare them

import math
import os
import sys
import time
import types
from dataclasses import dataclass

import pytest
import torch

import utils
from utils import (
    Report,
    UserError,
    batched,
    configure,
    cosine_lr,
    locked,
    map_in_order,
    pick_device,
    process_pool,
    results_stdout,
    run_main,
    setting,
    sha256_file,
)


@dataclass
class Train:
    """Training"""

    lr: float = setting(1e-3, "peak learning rate")
    steps: int = setting(100, "optimizer steps")
    compile: bool = setting(True, "torch.compile the model")
    out_dir: str = setting("out", "where checkpoints go")
    note: str | None = setting(None, "free text")

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


@dataclass
class Model:
    """Model"""

    n_layer: int = setting(4, "transformer blocks")
    grid: tuple[int, ...] = setting((8, 8), "code grid")
    names: list[str] | None = setting(None, "some names")


def run_configure(argv: list[str]) -> tuple[Train, Model, set[str]]:
    (train, model), given = configure(argv, (Train, Model), "train.py", "Train a model.")
    return train, model, given


def write_recipe(tmp_path, text: str, name: str = "recipe.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- settings ---------------------------------------------------------------------------------------------------


def test_defaults_then_recipes_then_flags_in_both_forms(tmp_path):
    train, model, given = run_configure([])
    assert (train.lr, train.steps, train.compile, model.grid) == (1e-3, 100, True, (8, 8)) and given == set()
    first = write_recipe(tmp_path, "lr = 3e-4\nsteps = 10\n_helper = 2  # a recipe's own name\nn_layer = _helper * 3\n")
    second = write_recipe(tmp_path, "steps = 20\nout_dir = 'recipe_out'\n", "second.py")
    train, model, given = run_configure([first, second, "--steps=30", "--out_dir", "flag_out", "--compile", "false",
                                         "--grid=16,16", "--names", "x,y", "--note=none"])
    assert (train.lr, train.steps, train.out_dir, train.compile, train.note) == (3e-4, 30, "flag_out", False, None)
    assert (model.n_layer, model.grid, model.names) == (6, (16, 16), ["x", "y"])
    assert given == {"lr", "steps", "out_dir", "compile", "grid", "names", "note", "n_layer"}
    train, _, _ = run_configure([second])  # a later recipe overrides an earlier one; a flag overrides both
    assert (train.steps, train.out_dir) == (20, "recipe_out")


def test_unknown_names_are_refused_with_file_and_line(tmp_path):
    recipe = write_recipe(tmp_path, "lr = 1e-3\n\nlearning_rate = 1e-4\n")
    with pytest.raises(UserError, match=rf"^{recipe}:3: unknown setting 'learning_rate'"):
        run_configure([recipe])
    with pytest.raises(UserError, match="unknown setting --learning_rate"):
        run_configure(["--learning_rate=1e-4"])
    with pytest.raises(UserError, match=r"--steps needs a value"):
        run_configure(["--steps"])
    with pytest.raises(UserError, match="cannot read the recipe"):
        run_configure([str(tmp_path / "missing.py")])


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps = 'ten'\n", r":1: steps = 'ten' is not a int"),
        ("lr = 0.1\nsteps = True\n", r":2: steps = True is not a int"),  # a bool is no int here
        ("compile = 1\n", r":1: compile = 1 is not a bool"),
        ("grid = [8, 8]\n", r":1: grid = \[8, 8\] is not a tuple"),
        ("lr = 1\n\nsteps = 1 / 0\n", r":3: ZeroDivisionError"),
        ("lr = (\n", r":1: "),  # a syntax error
    ],
)
def test_recipe_type_errors_name_the_line(tmp_path, text, message):
    recipe = write_recipe(tmp_path, text)
    with pytest.raises(UserError, match=f"^{recipe}{message}"):
        run_configure([recipe])


def test_flag_type_errors_and_invalid_values(tmp_path):
    for flag, kind in (("--steps=ten", "int"), ("--lr=fast", "float"), ("--compile=maybe", "bool"),
                       ("--grid=8,x", r"tuple\[int, ...\]")):
        with pytest.raises(UserError, match=f"{flag}: expected {kind}"):
            run_configure([flag])
    assert run_configure(["--lr=1"])[0].lr == 1.0  # an int is a fine float
    with pytest.raises(UserError, match="steps must be positive"):  # the dataclass's own check
        run_configure(["--steps=0"])


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        run_configure(["--steps=3", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Train a model.") and "usage: python train.py" in out
    assert "Training:" in out and "Model:" in out
    for name, default, text in [("lr", "0.001", "peak learning rate"), ("steps", "100", "optimizer steps"),
                                ("compile", "True", "torch.compile"), ("out_dir", "out", "where checkpoints"),
                                ("note", "", "free text"), ("n_layer", "4", "transformer blocks"),
                                ("grid", "(8, 8)", "code grid"), ("names", "", "some names")]:
        line = next(line for line in out.splitlines() if line.strip().startswith(f"--{name}="))
        assert line.split("=", 1)[1].startswith(default) and text in line


# --- schedule, batches, reports ---------------------------------------------------------------------------------


def test_cosine_lr_warms_up_decays_and_stays_at_the_floor():
    lrs = [cosine_lr(step, 1.0, 0.1, warmup=10, decay_steps=110) for step in range(150)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # linear warmup, rising
    assert lrs[0] == pytest.approx(1 / 11) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=True))  # then falling
    assert lrs[60] == pytest.approx(0.55)  # halfway down the cosine: the midpoint of lr and min_lr
    assert lrs[110:] == [pytest.approx(0.1)] * 40
    # no warmup and nothing to decay over: no division by zero, the floor from step 1
    assert [cosine_lr(step, 1.0, 0.0, warmup=0, decay_steps=0) for step in range(3)] == [1.0, 0.0, 0.0]
    assert math.isclose(cosine_lr(5, 2.0, 0.0, warmup=0, decay_steps=10), 1.0)


def test_batched_keeps_every_item_in_order():
    assert list(batched(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []
    assert list(batched("ab", 2)) == [["a", "b"]]


def test_report_shows_the_first_few_of_each_kind_and_counts_all(capsys):
    report = Report(shown=2)
    for i in range(5):
        report.warn(f"line {i}", "bad caption", "empty")
    report.warn("line 9", "bad image")
    assert report.counts == {"bad caption": 5, "bad image": 1}
    assert capsys.readouterr().err.splitlines() == [
        "line 0: bad caption: empty",
        "line 1: bad caption: empty",
        "(further 'bad caption' warnings are counted in the summary, not shown)",
        "line 9: bad image",
    ]


# --- worker pools -----------------------------------------------------------------------------------------------


def slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def counted_jobs(n: int, pulled: list[int]):
    for i in range(n):
        pulled[0] += 1
        yield (i, 0.02 * ((i * 7) % 3))  # uneven durations: later jobs may finish first


@pytest.mark.parametrize("workers", [0, 2])
def test_map_in_order_keeps_order_and_a_bounded_window(workers):
    pool = process_pool(workers)
    try:
        pulled = [0]
        results = []
        for result in map_in_order(pool, slow_square, counted_jobs(20, pulled), 4, "test"):
            results.append(result)
            assert pulled[0] - len(results) <= 4  # jobs are taken only as room frees up
        assert results == [i * i for i in range(20)]
    finally:
        if pool is not None:
            pool.shutdown()


def test_a_dead_worker_is_a_user_error_not_a_hang():
    pool = process_pool(1)
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match=r"a worker process \(test\) died"):
            list(map_in_order(pool, os._exit, [(1,), (2,)], 2, "test"))
        assert time.monotonic() - started < 30
    finally:
        pool.shutdown()


# --- files and output -------------------------------------------------------------------------------------------


def test_locked_refuses_a_second_holder(tmp_path):
    folder = tmp_path / "out"
    with locked(folder, "training run"):
        assert folder.is_dir()
        with pytest.raises(UserError, match=f"another training run is using {folder}"), locked(folder, "training run"):
            pass
    with locked(folder, "training run"):  # released at the end
        pass


def test_locked_refuses_another_process(tmp_path):
    with locked(tmp_path, "training run"):
        pid = os.fork()
        if pid == 0:  # the child: exit 3 if refused, 4 if it got the lock, 5 on anything else
            code = 5
            try:
                with locked(tmp_path, "training run"):
                    code = 4
            except UserError:
                code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3


def test_sha256_file(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(5 << 20))  # more than one read block
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_results_stdout_keeps_stdout_for_results(capfd):
    with results_stdout() as out:
        print("chatter from a library")
        os.write(1, b"and from C code\n")
        out.write(b"the result\n")
    print("stdout is back")
    captured = capfd.readouterr()
    assert captured.out == "the result\nstdout is back\n"
    assert captured.err == "chatter from a library\nand from C code\n"


def test_run_main_turns_errors_into_one_line_and_an_exit_status(capsys):
    def fails(error: BaseException):
        def main():
            raise error

        return main

    assert run_main("x.py", lambda: None) == 0
    assert run_main("x.py", fails(UserError("fix this"))) == 1
    assert capsys.readouterr().err == "x.py: error: fix this\n"
    assert run_main("x.py", fails(IsADirectoryError(21, "Is a directory", "out"))) == 1
    assert capsys.readouterr().err == "x.py: error: [Errno 21] Is a directory: 'out'\n"
    assert run_main("x.py", fails(KeyboardInterrupt())) == 130
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main("x.py", fails(ZeroDivisionError()))


# --- devices --------------------------------------------------------------------------------------------------


def test_an_unusable_nvidia_gpu_is_an_error_not_hours_on_the_cpu(tmp_path, monkeypatch):
    device_file = tmp_path / "nvidiactl"
    device_file.write_text("")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(utils, "NVIDIA_DEVICE_FILES", (str(tmp_path / "nvidia0"), str(device_file)))
    with pytest.raises(UserError, match="NVIDIA GPU that torch cannot use") as e:
        pick_device()
    assert "driver" in str(e.value) and "--device cpu" in str(e.value) and "CUDA 12.8" in str(e.value)
    assert pick_device("cpu") == torch.device("cpu")  # asked for on purpose
    with pytest.raises(UserError, match="--device cuda, but torch cannot use a CUDA GPU"):
        pick_device("cuda")
    device_file.unlink()  # no GPU at all: the CPU (or mps) without a word
    assert pick_device().type in ("cpu", "mps")


def test_an_unknown_dtype_is_a_user_error():
    assert utils.pick_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(UserError, match="--dtype fp16: expected one of float32, bfloat16, float16"):
        utils.pick_dtype(torch.device("cpu"), "fp16")


def test_check_compiler_names_the_way_out(monkeypatch):
    # A stand-in for torch._inductor.cpp_builder: the real one takes seconds to import.
    def no_compiler():
        raise RuntimeError("Unsupported compiler: cc not found\nmore detail")

    monkeypatch.setitem(sys.modules, "torch._inductor.cpp_builder", types.SimpleNamespace(get_cpp_compiler=no_compiler))
    with pytest.raises(UserError, match="no working C\\+\\+ compiler \\(Unsupported compiler: cc not found\\)") as e:
        utils.check_compiler(torch.device("cpu"))
    assert "--compile false" in str(e.value)


def test_memory_gib_reports_this_process():
    memory = utils.memory_gib(torch.device("cpu"))
    if sys.platform == "win32":
        pytest.skip("no resource module on Windows")
    assert 0.01 < memory["resident"] < 64
