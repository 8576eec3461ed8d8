"""The VQGAN image tokenizer: encoder, vector quantizer and decoder. Parameter names are taming-transformers' own
(`encoder.down.0.block.1.conv2.weight`, ...), so that its checkpoints load without renaming."""

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQGANConfig:
    # Fully convolutional, so described by levels, not a resolution: level i works at 1/2**i of the image size.
    ch: int = 128  # channels at the first level; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per level; 5 levels = f16, 4 = f8
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    attn_levels: tuple[int, ...] = (4,)  # levels with self-attention after each res block
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 256
    double_z: bool = False  # taming's encoder may emit 2 * z_channels (unused by VQ models)
    embed_dim: int = 256  # width of a codebook vector
    n_embed: int = 1024  # codebook size

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # nn.Identity has no tensors: the state dict holds nin_shortcut only where the widths differ, as taming's
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of a feature map, with 1x1 convolutions as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose sequence is the pixels
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding (right and bottom only) halves even sizes exactly, as the checkpoints expect.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: res blocks, each followed by self-attention where the config asks for it."""

    def __init__(self, ch_in: int, ch: int, n_blocks: int, attention: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(ch_in if i == 0 else ch, ch) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(ch) for _ in range(n_blocks if attention else 0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


def _mid(channels: int) -> nn.Sequential:
    """Res block, attention, res block at the coarsest level, under taming's names."""
    return nn.Sequential(OrderedDict(block_1=ResnetBlock(channels, channels), attn_1=AttnBlock(channels),
                                     block_2=ResnetBlock(channels, channels)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = Level(channels, cfg.ch * mult, cfg.num_res_blocks, i in cfg.attn_levels)
            channels = cfg.ch * mult
            level.downsample = Downsample(channels) if i < len(cfg.ch_mult) - 1 else nn.Identity()
            self.down.append(level)
        self.mid = _mid(channels)
        self.norm_out = Normalize(channels)
        self.conv_out = nn.Conv2d(channels, cfg.z_channels * (2 if cfg.double_z else 1), 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.downsample(level(h))
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        channels = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = _mid(channels)
        # Stored finest-first (up.0 is full resolution) but run coarsest-first, as in the checkpoints.
        self.up = nn.ModuleList()
        for i in reversed(range(len(cfg.ch_mult))):
            level = Level(channels, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, i in cfg.attn_levels)
            channels = cfg.ch * cfg.ch_mult[i]
            level.upsample = Upsample(channels) if i > 0 else nn.Identity()
            self.up.insert(0, level)
        self.norm_out = Normalize(channels)
        self.conv_out = nn.Conv2d(channels, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.upsample(level(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector lookup; the training losses live in vqgan/train.py."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """[B, D, h, w] latents -> [B, h, w] indices of the nearest codebook vectors."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.embedding.weight
        # |z|^2 + |e|^2 - 2 z.e, in this order, so that ties break as in the reference implementation
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return dist.argmin(dim=1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, h, w] indices -> [B, D, h, w] codebook vectors."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


@contextlib.contextmanager
def _exact_fp32():
    # Codes are compared across machines: no TF32 in cuDNN's convolutions (its default) nor in the codebook matmul.
    # The settings are global, hence restored, and set through the one API that torch.compile also reads.
    matmul, conv = torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.conv.fp32_precision = conv


class VQGAN(nn.Module):
    """Images in [-1, 1] <-> grids of codebook indices."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.n_embed

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> continuous latents [B, embed_dim, H/f, W/f] before quantizing."""
        return self.quant_conv(self.encoder(x))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, embed_dim, h, w] -> images [B, 3, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> codes [B, H/f, W/f] (int64), always computed in fp32."""
        x = x.to(self.device, torch.float32)
        with torch.autocast(self.device.type, enabled=False), _exact_fp32():
            return self.quantize.codes(self.latents(x))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> float32 images [B, 3, h*f, w*f] in about [-1, 1], computed in the dtype of the
        weights: a bfloat16 copy of the model decodes faster on GPUs, and not exactly."""
        return self.decode_latents(self.quantize.lookup(codes.to(self.device, torch.long))).float()
