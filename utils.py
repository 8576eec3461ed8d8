"""What the scripts share: settings, the error a user acts on, devices and precision, the learning-rate schedule,
memory figures, a lock on an output folder and worker processes."""

import ast
import contextlib
import dataclasses
import hashlib
import itertools
import math
import multiprocessing
import os
import shutil
import signal
import sys
import sysconfig
import traceback
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

import torch
from tqdm import tqdm

T = TypeVar("T")


class UserError(Exception):
    """Something the user must fix; the scripts print it as one line that says what, where and what to do."""


def run_main(prog: str, main: Callable[[], object]) -> int:
    """Run a script's main: the user's errors as one line each, no traceback; the exit status."""
    from vqgan import CheckpointError

    try:
        main()
        return 0
    except BrokenPipeError:  # `... | head`: whoever read the output has stopped
        print(f"{prog}: error: the output was closed before everything was written", file=sys.stderr)
    except (UserError, CheckpointError, OSError) as e:  # OSError: a read-only path, a full disk; it names the file
        print(f"{prog}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    return 1


def setting(default: Any, help_text: str) -> Any:
    """A dataclass field that is a setting: a recipe may assign it and `--name=value` overrides it. Its module
    imports `annotations` from __future__, so that the field's type reads as text: "int", "bool | None"."""
    return dataclasses.field(default=default, metadata={"help": help_text})


def configure(argv: list[str], classes: Iterable[type], prog: str, doc: str) -> tuple[list[Any], set[str]]:
    """The `classes` instances from recipes, then `--name=value` or `--name value` flags; and the names given."""
    fields = {f.name: f for cls in classes for f in dataclasses.fields(cls) if "help" in f.metadata}
    recipes, flags = [], {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(_help(classes, prog, doc))
            sys.exit(0)
        name, has_value, text = arg[2:].partition("=")
        if not arg.startswith("--"):
            recipes.append(arg)
        elif not has_value and (not args or args[0].startswith("--")):
            raise UserError(f"--{name} needs a value: --{name}=VALUE")
        elif name not in fields:
            raise UserError(f"unknown setting --{name} (python {prog} --help lists them)")
        else:
            flags[name] = text if has_value else args.pop(0)
    given: dict[str, Any] = {}
    for path in recipes:
        given.update(read_recipe(path, fields))
    for name, text in flags.items():
        try:
            given[name] = _parse(text, fields[name].type)
        except ValueError:
            raise UserError(f"--{name}={text}: expected {fields[name].type}") from None
    try:
        instances = [cls(**{k: v for k, v in given.items() if k in {f.name for f in dataclasses.fields(cls)}})
                     for cls in classes]
    except ValueError as e:
        raise UserError(str(e)) from None
    return instances, set(given)


def read_recipe(path: str, fields: dict[str, dataclasses.Field]) -> dict[str, Any]:
    """The settings a recipe assigns; an unknown name or a value of the wrong type names the file and line."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    except OSError as e:
        raise UserError(f"cannot read the recipe {path}: {e.strerror}") from None
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: {e.msg}") from None
    namespace: dict[str, Any] = {}
    try:
        exec(compile(tree, path, "exec"), namespace)
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise UserError(f"{path}:{line}: {type(e).__name__}: {e}") from None
    # every name the recipe assigns, in any form, by line; _names are the recipe's own helpers
    assigned = sorted((node.lineno, node.id) for node in ast.walk(tree) if isinstance(node, ast.Name)
                      and isinstance(node.ctx, ast.Store) and not node.id.startswith("_"))
    values = {}
    for line, name in assigned:
        if name not in fields:
            raise UserError(f"{path}:{line}: unknown setting {name!r} (python {sys.argv[0]} --help lists them)")
        if not _fits(namespace[name], fields[name].type):
            raise UserError(f"{path}:{line}: {name} = {namespace[name]!r} is not a {fields[name].type}")
        values[name] = namespace[name]
    return values


def _parse(text: str, kind: str) -> Any:
    base = kind.removesuffix(" | None")
    if base != kind and text.lower() == "none":
        return None
    if base == "bool":
        if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(text)
        return text.lower() in ("1", "true", "yes", "on")
    if base.startswith(("tuple", "list")):
        items = [item.strip() for item in text.split(",") if item.strip()]
        return tuple(int(i) for i in items) if base.startswith("tuple") else items
    return {"int": int, "float": float}.get(base, str)(text)


def _fits(value: Any, kind: str) -> bool:
    base = kind.removesuffix(" | None")
    if value is None:
        return base != kind
    types = {"bool": bool, "int": int, "float": (int, float), "str": str, "tuple[int, ...]": tuple, "list[str]": list}
    return isinstance(value, types[base]) and (base == "bool" or not isinstance(value, bool))


def _help(classes: Iterable[type], prog: str, doc: str) -> str:
    lines = [doc.strip(), "", f"usage: python {prog} [recipe.py ...] [--name=value ...]"]
    for cls in classes:
        lines += ["", f"{cls.__doc__.strip()}:" if cls.__doc__ else f"{cls.__name__}:"]
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                default = f.default if f.default not in ("", None) else ""
                lines.append(f"  --{f.name}={default!s:<12} {f.metadata['help']}")
    return "\n".join(lines)


NVIDIA_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0")  # what the driver makes, whether torch can use it or not


def pick_device(name: str | None = None) -> torch.device:
    """The requested device, or the best one present: cuda, then mps, then cpu. An NVIDIA GPU that this torch
    cannot use (a driver older than its CUDA, mostly) is an error rather than hours on the CPU."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cuda = torch.cuda.is_available()
    # torch says why once, as a warning ("CUDA initialization: ..."), when it finds GPUs it cannot use.
    warned = next((str(w.message) for w in caught if "CUDA initialization" in str(w.message)), "")
    cuda_build = f"torch {torch.__version__} is built for CUDA {torch.version.cuda}; is the NVIDIA driver that recent?"
    why = warned or (cuda_build if torch.version.cuda else f"this torch {torch.__version__} is a CPU-only build")
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not cuda:
            raise UserError(f"--device {name}, but torch cannot use a CUDA GPU here: {why}")
        return device
    if cuda:
        return torch.device("cuda")
    if torch.version.cuda and (warned or any(Path(p).exists() for p in NVIDIA_DEVICE_FILES)):
        raise UserError(f"this machine has an NVIDIA GPU that torch cannot use ({why}): update the driver or install "
                        "a torch built for an older CUDA; --device cpu runs on the CPU")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def check_compiler(device: torch.device) -> None:
    """torch.compile needs a C compiler and Python's headers, or fails deep inside the first step: say so up front."""
    problems = []
    if device.type != "cuda":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:
            problems.append(f"no working C++ compiler ({str(e).splitlines()[0]})")
    elif not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        problems.append("no C compiler (gcc, clang or $CC) for Triton")
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        problems.append("no Python headers (Python.h; Debian: apt install python3-dev)")
    if problems:
        raise UserError(f"torch.compile cannot work here: {'; '.join(problems)}: install them, or pass --compile false")


def pick_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """float32 on the CPU; bfloat16 on GPUs that have it, float16 on those that don't."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name and name not in dtypes:
        raise UserError(f"--dtype {name}: expected one of {', '.join(dtypes)}")
    if name:
        return dtypes[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for `dtype`, or a no-op when it is float32."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def cosine_lr(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_lr` at `decay_steps`, then flat."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def memory_gib(device: torch.device, children: bool = False) -> dict[str, float]:
    """Peak GiB so far: on CUDA what tensors took, what the allocator reserved and what the card needed (reserved
    plus the CUDA context and libraries); elsewhere peak resident memory of this process or its largest ended child."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.max_memory_reserved(device)
        outside = total - free - torch.cuda.memory_reserved(device)
        return {"allocated": torch.cuda.max_memory_allocated(device) / 2**30, "reserved": reserved / 2**30,
                "card": (reserved + outside) / 2**30}
    try:
        import resource
    except ImportError:  # Windows
        return {}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return {"resident": resource.getrusage(who).ru_maxrss * scale / 2**30}


def format_memory(memory: dict[str, float]) -> str:
    return ", ".join(f"{value:.2f} GiB {kind}" for kind, value in memory.items())


@contextlib.contextmanager
def locked(folder: str | os.PathLike, what: str) -> Iterator[IO]:
    """Lock `folder` (created if needed) while `what` writes into it: a second run there stops at once."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another {what} is using {folder}: wait for it to end, or pick another folder") from None
        yield lock


def progress(total: int | None, desc: str, unit: str, items: Iterable | None = None) -> tqdm:
    """A progress bar with a rate on stderr, over `items` if given; off a terminal, a line every 30 s, not a flood."""
    return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0)


@contextlib.contextmanager
def results_stdout() -> Iterator[BinaryIO]:
    """The real stdout, for a script's results; meanwhile print, libraries and C code writing to fd 1 go to stderr."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield out
    finally:
        os.dup2(out.fileno(), 1)
        with contextlib.suppress(BrokenPipeError):
            out.close()


class Report:
    """Warnings on stderr, the first few of each kind in full, and a count of every kind for the summary."""

    def __init__(self, shown: int = 10):
        self.shown = shown
        self.counts: Counter[str] = Counter()

    def warn(self, where: str, kind: str, detail: str = "") -> None:
        self.counts[kind] += 1
        if self.counts[kind] <= self.shown:
            print(f"{where}: {kind}{': ' + detail if detail else ''}", file=sys.stderr)
        elif self.counts[kind] == self.shown + 1:
            print(f"(further '{kind}' warnings are counted in the summary, not shown)", file=sys.stderr)


def process_pool(workers: int) -> ProcessPoolExecutor | None:
    """`workers` processes for CPU work (decoding, PNG encoding), or None for 0; forked at once with the loaded
    modules, so create it before torch runs anything (its threads do not survive a fork); workers ignore Ctrl-C."""
    if workers <= 0:
        return None
    fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork" if fork else "spawn"),
                               initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    pool.submit(int).result()  # a fork pool starts every worker at its first job
    return pool


def map_in_order(pool: ProcessPoolExecutor | None, fn: Callable[..., T], jobs: Iterable[tuple], window: int,
                 what: str) -> Iterator[T]:
    """fn(*job) for every job, in order, by the `pool` (or here) with at most `window` in flight; jobs are taken as
    room frees up, so a generator of jobs runs alongside. A dead worker ends the run with a message, not a hang."""
    if pool is None:
        yield from (fn(*job) for job in jobs)
        return
    pending: deque[Future] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            while len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise UserError(f"a worker process ({what}) died, killed or out of memory (the system log says which); run "
                        "again, with fewer --num_workers if memory is short") from None
    finally:
        for future in pending:
            future.cancel()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items (the last may be shorter); itertools.batched needs Python 3.12."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
