"""Small helpers shared by the scripts: device and precision choice, atomic files, stderr progress."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import torch

T = TypeVar("T")


def pick_device(name: str | None = None) -> torch.device:
    """The requested device, or the best one present: cuda, then mps, then cpu."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """float32 on the CPU; bfloat16 on GPUs that have it, float16 on those that don't."""
    if name:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for `dtype`, or a no-op when it is float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose contents replace `path` when the block ends without error.

    Readers, and a crash at any moment, see the old file or the new one, never half of either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600); this one gets the permissions the umask gives any new file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    """Replace `path` with `content` (text is written as UTF-8), atomically."""
    with atomic_write(path) as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and new files in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Progress:
    """A one-line progress bar with a rate on stderr; plain periodic lines when stderr is not a tty."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", every: float = 0.5):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        # Off a terminal a line every `every` seconds would flood logs, so report less often.
        if now - self.last >= (self.every if self.tty else 30.0):
            self.last = now
            self._print(end="\r" if self.tty else "\n")

    def close(self) -> None:
        self._print(end="\n")

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def _print(self, end: str) -> None:
        elapsed = time.perf_counter() - self.start
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        eta = ""
        if self.total and self.done:
            eta = f" eta {_clock(elapsed / self.done * (self.total - self.done))}"
        line = f"{self.desc}: {count} {self.unit} [{_clock(elapsed)}, {self.rate:.1f} {self.unit}/s{eta}]"
        if self.postfix:
            line += f" {self.postfix}"
        sys.stderr.write(line.ljust(79) + end)
        sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Iterate over `items`, reporting progress on stderr."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items (the last may be shorter); itertools.batched needs Python 3.12."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"
