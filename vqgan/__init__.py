"""A minimal VQGAN image tokenizer that loads taming-transformers checkpoints as they are."""

from .checkpoint import CheckpointError, infer_config, load_checkpoint_file, load_vqgan, save_checkpoint_atomic
from .image import images_to_tensor, psnr, tensor_to_images
from .model import VQGAN, VQGANConfig

__all__ = ["VQGAN", "CheckpointError", "VQGANConfig", "images_to_tensor", "infer_config", "load_checkpoint_file",
           "load_vqgan", "psnr", "save_checkpoint_atomic", "tensor_to_images"]
