"""Conversions between pictures (PIL images, uint8 arrays) and the model's [-1, 1] tensors."""

import numpy as np
import torch
from PIL import Image


def images_to_tensor(images: np.ndarray | Image.Image | list[Image.Image]) -> torch.Tensor:
    """uint8 [B, H, W, 3] or [H, W, 3] arrays, or RGB PIL images -> float32 [B, 3, H, W] as x / 127.5 - 1."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, list):
        images = np.stack([np.asarray(img.convert("RGB")) for img in images])
    if images.dtype != np.uint8 or images.shape[-1] != 3 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images of shape [B, H, W, 3], got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in about [-1, 1] -> uint8 [B, H, W, 3], clamped and rounded."""
    pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per uint8 image pair [B, H, W, 3]."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
