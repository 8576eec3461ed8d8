"""Shared test setup: the repo root on sys.path and the optional fixtures beside the checkout."""

import base64
import io
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vqgan import VQGAN, VQGANConfig, save_checkpoint_atomic  # noqa: E402 - needs the repo root on sys.path

# Reference outputs and real-size key lists live outside the repo; users will not have them.
FIXTURES = ROOT.parent / "shared" / "fixtures"
TAMING_TINY = FIXTURES / "taming" / "tiny_f16"

requires_fixtures = pytest.mark.skipif(
    not TAMING_TINY.is_dir(), reason=f"taming fixtures not found at {FIXTURES} (only present in development)"
)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test models are tiny: a second thread only adds contention, badly so when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a tiny VQGAN and MUGE-format inputs, shared by the prepare, generate and pipeline tests ------------------

TINY_F4_SIZE = 32  # the tiny VQGAN below is f4: 32x32 images -> 8x8 codes
TINY_F4 = VQGANConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_levels=(), z_channels=4, embed_dim=4, n_embed=64)


@pytest.fixture(scope="module")
def vqgan_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vqgan") / "tiny_f4.pt"
    save_checkpoint_atomic({"state_dict": VQGAN(TINY_F4).state_dict(), "config": asdict(TINY_F4)}, path)
    return path


def encoded(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def random_image(seed: int, size: tuple[int, int] = (TINY_F4_SIZE, TINY_F4_SIZE)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_lines(path: Path, lines: list[str], newline: str = "\n", bom: bool = False) -> None:
    data = "".join(line + newline for line in lines).encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)


def write_dataset(folder: Path, rows: list[tuple[str, str, str]], split: str = "train") -> Path:
    """rows: (img_id, base64 image, caption); the caption file lists them in reverse order."""
    folder.mkdir(parents=True, exist_ok=True)
    write_lines(folder / f"T2I_{split}.img.tsv", [f"{i}\t{img}" for i, img, _ in rows])
    write_lines(folder / f"T2I_{split}.text.tsv", [f"{i}\t{cap}" for i, _, cap in reversed(rows)])
    return folder


def good_rows(n: int, prefix: str = "id", seed: int = 0) -> list[tuple[str, str, str]]:
    return [(f"{prefix}{i}", b64(encoded(random_image(seed + i))), f"红色T恤 XL码 {i}号") for i in range(n)]
