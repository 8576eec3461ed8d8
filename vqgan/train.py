"""Train a VQGAN from scratch, or fine-tune one (a taming checkpoint or our own), on product images.

    python -m vqgan.train config/vqgan_demo.py          # the demo tokenizer, assets/vqgan_demo.pt
    # fine-tune the ImageNet f16 tokenizer on MUGE photos, with the patch discriminator after 2000 steps
    python -m vqgan.train --init_from=vqgan_imagenet_f16_1024/checkpoints/last.ckpt \\
        --data=dataset/ECommerce-T2I/T2I_train.img.tsv --val_data=dataset/ECommerce-T2I/T2I_val.img.tsv \\
        --batch_size=8 --learning_rate=2e-5 --disc_start=2000 --num_workers=6 --out_dir=out/vqgan_muge

Settings are recipe files of `name = value` lines, then `--name=value` flags, as for train.py. Images (MUGE
`*.img.tsv` files or image folders) are fitted to the square as prepare.py does. The loss needs no pretrained
network: L1 (optionally squared error too) and multi-scale SSIM, the codebook and commitment terms, and from
`disc_start` on a hinge-loss patch discriminator. <out_dir>/ckpt.pt is the whole training state (--init_from=resume
continues it), <out_dir>/vqgan.pt the weights and config for prepare.py and generate.py.
"""

from __future__ import annotations

import itertools
import math
import random
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from data import RESIZE_MODES, BadRowError, fit_to_square, image_from_base64, open_image, read_tsv
from utils import (
    UserError,
    autocast,
    configure,
    cosine_lr,
    locked,
    pick_device,
    pick_dtype,
    progress,
    run_main,
    setting,
)

from .checkpoint import load_checkpoint_file, load_vqgan, save_checkpoint_atomic
from .image import images_to_tensor, psnr, tensor_to_images
from .model import VQGAN, VQGANConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CKPT_FILE = "ckpt.pt"  # full training state
EXPORT_FILE = "vqgan.pt"  # weights and config only
EXPORT_KEYS = ("state_dict", "config", "step", "metrics", "command")  # what prepare.py and generate.py need
GRID_FILE = "reconstructions.png"


@dataclass
class VQGANTrainConfig:
    """training the VQGAN (the architecture settings apply from scratch; fine-tuning keeps the checkpoint's)"""

    data: list[str] = setting(None, "training images: MUGE *.img.tsv files and/or image folders, comma-separated")
    val_data: list[str] | None = setting(None, "held-out images (same kinds); default: the first val_images of "
                                         "data, left out of training")
    val_images: int = setting(256, "held-out images to measure PSNR and codebook usage on")
    image_size: int = setting(256, "train on square images of this side (pixels)")
    resize: str = setting("pad", "fit images to the square as prepare.py does: pad keeps the whole product, crop "
                          "the centre")
    out_dir: str = setting("out/vqgan", f"writes {CKPT_FILE}, {EXPORT_FILE} and {GRID_FILE} here")
    init_from: str = setting("scratch", "scratch, resume (continue <out_dir>/ckpt.pt), or a checkpoint to fine-tune "
                             "(taming last.ckpt or ours)")
    ch: int = setting(128, "channels of the first level (a multiple of 32)")
    ch_mult: tuple[int, ...] = setting((1, 1, 2, 2, 4), "channel multiplier per level; n levels downsample by "
                                       "2**(n-1)")
    num_res_blocks: int = setting(2, "res blocks per encoder level")
    attn_levels: tuple[int, ...] = setting((4,), "levels with self-attention (empty for none; the middle always "
                                           "has it)")
    z_channels: int = setting(256, "channels of the encoder output")
    embed_dim: int = setting(256, "width of a codebook vector")
    n_embed: int = setting(1024, "codebook size (at most 65536: codes are uint16)")
    batch_size: int = setting(8, "images per step")
    max_iters: int = setting(20000, "optimizer steps in total")
    learning_rate: float = setting(1e-4, "peak Adam learning rate (also the discriminator's)")
    min_lr: float = setting(1e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = setting(200, "steps of linear warmup")
    beta1: float = setting(0.5, "Adam beta1 (0.5, as is usual for GANs)")
    beta2: float = setting(0.9, "Adam beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)")
    l1_weight: float = setting(1.0, "weight of the pixel L1 loss")
    l2_weight: float = setting(0.0, "weight of the pixel squared error: large errors (a wrong colour) then weigh "
                               "more, which speeds up training from scratch (e.g. 10)")
    ssim_weight: float = setting(0.5, "weight of the multi-scale 1 - SSIM loss")
    codebook_weight: float = setting(1.0, "weight of the codebook loss")
    commit_beta: float = setting(0.25, "weight of the commitment loss")
    codebook_ema: float = setting(0.0, "instead of the codebook loss, keep each code at a running mean of its "
                                  "latents with this decay (e.g. 0.99: much faster from scratch); 0: the loss")
    disc_start: int = setting(-1, "step at which the patch discriminator starts (-1: never)")
    disc_weight: float = setting(0.5, "weight of the generator's GAN loss")
    disc_adaptive: bool = setting(True, "scale the GAN loss to the reconstruction loss's gradient at the last layer")
    disc_ch: int = setting(64, "discriminator width (a multiple of 8)")
    disc_layers: int = setting(3, "discriminator stride-2 layers")
    restart_every: int = setting(200, "every this many steps, codes unused since the last check move onto encoder "
                                 "outputs (0: never)")
    device: str = setting("", "cuda, cpu, ... (empty: the best there is)")
    dtype: str = setting("", "autocast precision: float32, bfloat16 or float16 (empty: bfloat16 on GPUs that have "
                         "it, float16 on others, float32 on the CPU)")
    num_workers: int = setting(0, "image decoding processes (4-8 on a GPU machine)")
    shuffle_buffer: int = setting(1024, "images held to shuffle the stream")
    eval_interval: int = setting(1000, "steps between held-out PSNR and usage, and checkpoints")
    seed: int = setting(0, "initialization and data order")

    def __post_init__(self) -> None:
        positive = ("batch_size", "max_iters", "val_images", "eval_interval", "image_size")
        problems = [message for failed, message in (
            (not self.data, "--data is needed: MUGE *.img.tsv files or image folders"),
            (self.n_embed > 65536, f"--n_embed {self.n_embed}: codes are stored as uint16, so at most 65536"),
            (self.ch % 32 or self.ch <= 0, f"--ch {self.ch}: must be a positive multiple of 32 (GroupNorm's groups)"),
            (not self.ch_mult or any(level >= len(self.ch_mult) for level in self.attn_levels),
             f"--attn_levels {self.attn_levels} must name levels of --ch_mult {self.ch_mult}"),
            (self.disc_ch % 8, f"--disc_ch {self.disc_ch}: must be a multiple of 8"),
            (self.resize not in RESIZE_MODES, f"--resize must be one of {', '.join(RESIZE_MODES)}"),
            *((getattr(self, name) <= 0, f"--{name} must be positive") for name in positive),
        ) if failed]
        if problems:
            raise ValueError("; ".join(problems))


# --- images ------------------------------------------------------------------------------------------------


def list_items(sources: list[str]) -> list[tuple[str, Path | None]]:
    """(label, path) of every image file, and (TSV path, None) for every TSV, whose rows are read as they stream."""
    items: list[tuple[str, Path | None]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise UserError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            items.extend((str(p), p) for p in files)
        elif path.is_file():
            items.append((str(path), None))
        else:
            raise UserError(f"{path}: no such file or folder")
    return items


def stream_images(sources: list[str], image_size: int, resize: str, order: random.Random | None = None,
                  skip: frozenset = frozenset(), shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, np.ndarray]]:
    """(`file:line` or path, uint8 [S, S, 3]) of every readable image not in `skip`, files in `order` if given; `shard`
    (index, count) keeps every count-th, so that DataLoader workers split the work (sharing one `order`)."""
    items = list_items(sources)
    if order is not None:
        order.shuffle(items)  # a TSV's rows stay in file order: the shuffle buffer mixes them
    rows = itertools.chain.from_iterable(
        ((f"{label}:{row.line_no}", row) for row in read_tsv(label)) if path is None else [(label, path)]
        for label, path in items)
    for position, (where, row) in enumerate(rows):
        if position % shard[1] != shard[0] or where in skip:
            continue
        try:
            if isinstance(row, Path):
                image = np.asarray(fit_to_square(open_image(row.read_bytes()), image_size, resize), dtype=np.uint8)
            elif row.error is not None:
                raise row.error
            else:
                image = image_from_base64(row.value, image_size, resize)
        except (BadRowError, OSError) as e:
            print(f"warning: {where}: skipped: {e}", file=sys.stderr)
        else:
            yield where, image


class ImageStream(torch.utils.data.IterableDataset):
    """An endless, shuffled stream of training images; each DataLoader worker reads its own share."""

    def __init__(self, sources: list[str], image_size: int, resize: str, seed: int, buffer_size: int,
                 skip: frozenset = frozenset()):
        super().__init__()
        self.sources, self.image_size, self.resize = sources, image_size, resize
        self.seed, self.buffer_size, self.skip = seed, buffer_size, skip

    def __iter__(self) -> Iterator[np.ndarray]:
        info = torch.utils.data.get_worker_info()
        shard = (info.id, info.num_workers) if info else (0, 1)
        buffer_rng = random.Random(f"{self.seed}/buffer/{shard[0]}")
        buffer: list[np.ndarray] = []
        for epoch in itertools.count():
            # Every worker shuffles the files alike, so that the shards still split them exactly.
            order = random.Random(f"{self.seed}/order/{epoch}")
            images = stream_images(self.sources, self.image_size, self.resize, order, self.skip, shard)
            seen = 0
            for _, image in images:
                seen += 1
                # TSVs stream in file order; the buffer decorrelates neighbouring rows.
                if len(buffer) < self.buffer_size:
                    buffer.append(image)
                    continue
                i = buffer_rng.randrange(len(buffer))
                yield buffer[i]
                buffer[i] = image
            if seen == 0:
                break  # no images at all (or none for this worker): stop rather than loop forever
        yield from buffer


def load_held_out(sources: list[str], n: int, image_size: int, resize: str) -> tuple[np.ndarray, list[str]]:
    """The first `n` readable images (in file order) and their labels."""
    found = list(itertools.islice(stream_images(sources, image_size, resize), n))
    if not found:
        raise UserError(f"no readable images in {', '.join(sources)}")
    return np.stack([image for _, image in found]), [label for label, _ in found]


# --- losses ------------------------------------------------------------------------------------------------


def quantize(model: VQGAN, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straight-through nearest-code quantization: (quantized latents, codes, codebook loss, which pulls the codes
    towards the encoder outputs, commitment loss, which keeps the encoder near its codes)."""
    with torch.no_grad():
        codes = model.quantize.codes(z)
    z_q = model.quantize.lookup(codes)
    codebook_loss = F.mse_loss(z_q, z.detach())
    commitment_loss = F.mse_loss(z, z_q.detach())
    return z + (z_q - z).detach(), codes, codebook_loss, commitment_loss


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(3, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity of images in [-1, 1] (1 = identical)."""
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # the usual constants for a value range of 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean()


def multiscale_ssim_loss(x: torch.Tensor, y: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """1 - SSIM averaged over the image and its 2x and 4x reductions: edges and textures at several sizes."""
    window = _gaussian_window().to(x.device)
    losses = []
    for _ in range(scales):
        if min(x.shape[-2:]) < window.shape[-1]:
            break
        losses.append(1 - ssim(x, y, window))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(losses).mean()


class PatchDiscriminator(nn.Module):
    """Stride-2 convolutions that end in one real/fake logit per overlapping image patch (PatchGAN)."""

    def __init__(self, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = ch
        for i in range(1, n_layers + 1):
            out = ch * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(channels, out, 4, stride, padding=1, bias=False), nn.GroupNorm(8, out),
                       nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Scale the GAN loss so that its gradient at the decoder's last layer matches the reconstruction's."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


# --- the codebook ------------------------------------------------------------------------------------------


class EMACodebook:
    """Codes kept as running means of the latents assigned to them (`--codebook_ema`): Adam moves a code about lr per
    step, thousands of steps from the latents; a mean follows within ~1 / (1 - decay). Each starts as its own latent."""

    def __init__(self, weight: torch.Tensor, decay: float):
        self.decay = decay
        self.cluster_size = torch.ones(weight.shape[0], device=weight.device)
        self.embed_sum = weight.detach().float().clone()

    @torch.no_grad()
    def update(self, weight: torch.Tensor, z: torch.Tensor, codes: torch.Tensor) -> None:
        latents = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = codes.flatten()
        counts = torch.bincount(codes, minlength=weight.shape[0]).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, latents)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        weight.copy_(self.embed_sum / self.cluster_size.clamp(min=1e-12)[:, None])

    def reset(self, weight: torch.Tensor, ids: torch.Tensor) -> None:
        """Codes that were moved by hand start their running means afresh where they now are."""
        self.cluster_size[ids] = 1.0
        self.embed_sum[ids] = weight.detach().float()[ids]

    def state_dict(self) -> dict:
        return {"decay": self.decay, "cluster_size": self.cluster_size, "embed_sum": self.embed_sum}

    def load_state_dict(self, state: dict) -> None:
        self.cluster_size = state["cluster_size"].to(self.cluster_size.device)
        self.embed_sum = state["embed_sum"].to(self.embed_sum.device)


def restart_dead_codes(model: VQGAN, dead: torch.Tensor, z: torch.Tensor, optimizer: torch.optim.Optimizer,
                       ema: EMACodebook | None = None) -> int:
    """Move the `dead` codes (bool [n_embed]) onto random encoder outputs `z` [B, D, h, w] of this batch, where
    they start winning inputs, and restart their optimizer moments (or running means), whose history is stale."""
    dead_ids = dead.nonzero().flatten()
    if len(dead_ids) == 0:
        return 0
    latents = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    # With replacement only when the batch has fewer latents than dead codes; the noise separates duplicates.
    picks = torch.randperm(len(latents))[: len(dead_ids)].to(latents.device)
    if len(picks) < len(dead_ids):
        picks = torch.randint(len(latents), (len(dead_ids),)).to(latents.device)
    noise = torch.randn(len(dead_ids), latents.shape[1]).to(latents.device)
    weight = model.quantize.embedding.weight
    with torch.no_grad():
        weight[dead_ids] = latents[picks] + 0.01 * latents.std() * noise
    for moment in optimizer.state.get(weight, {}).values():
        if isinstance(moment, torch.Tensor) and moment.shape == weight.shape:
            moment[dead_ids] = 0
    if ema is not None:
        ema.reset(weight, dead_ids)
    return len(dead_ids)


# --- evaluation --------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(model: VQGAN, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 images -> (uint8 reconstructions, codes) through the inference path: encode, then decode."""
    outputs, all_codes = [], []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size]).to(model.device)
        codes = model.encode(x)
        outputs.append(tensor_to_images(model.decode(codes)))
        all_codes.append(codes.cpu())
    return np.concatenate(outputs), torch.cat(all_codes)


def evaluate(model: VQGAN, images: np.ndarray, batch_size: int) -> dict[str, float]:
    """PSNR of the round trip and codebook usage on held-out images."""
    recon, codes = reconstruct(model, images, batch_size)
    counts = torch.bincount(codes.flatten(), minlength=model.codebook_size).double()
    p = counts[counts > 0] / counts.sum()
    return {"psnr": float(psnr(images, recon).mean()), "codes_used": len(p), "usage": len(p) / model.codebook_size,
            "perplexity": math.exp(-(p * p.log()).sum().item()), "images": len(images)}


def save_grid(model: VQGAN, images: np.ndarray, path: Path) -> None:
    """The first 16 originals above their reconstructions, for looking at rather than measuring."""
    recon, _ = reconstruct(model, images[:16], batch_size=16)
    Image.fromarray(np.vstack([np.hstack(images[:16]), np.hstack(recon)])).save(path)


# --- checkpoints -------------------------------------------------------------------------------------------


def training_checkpoint(model: VQGAN, opt: Optimizers, step: int, usage_counts: torch.Tensor, metrics: dict,
                        args: VQGANTrainConfig, command: str) -> dict:
    """Everything `--init_from=resume` needs, in a layout `load_vqgan` also reads (taming's weight names)."""
    ckpt = {"state_dict": model.state_dict(), "config": asdict(model.config), "step": step, "metrics": metrics,
            "command": command,
            **{key: part.state_dict() if part is not None else None for key, part in opt.parts()},
            "usage_counts": usage_counts, "train_config": vars(args), "rng": {"torch": torch.get_rng_state()}}
    if torch.cuda.is_available():
        ckpt["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    return ckpt


def restore_training_state(ckpt: dict, opt: Optimizers) -> None:
    """All of a `training_checkpoint` but the weights, which are loaded with the model."""
    for key, part in opt.parts():
        if part is not None and ckpt.get(key) is not None:
            part.load_state_dict(ckpt[key])
    # Only torch's generators: the image stream draws from its own random.Random, reseeded by step.
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


class Forward(NamedTuple):
    loss: torch.Tensor  # everything but the GAN term
    rec_loss: torch.Tensor  # the weighted L1 + L2 + SSIM part, whose gradient scale the GAN weight follows
    l1: torch.Tensor
    ssim: torch.Tensor
    codebook: torch.Tensor
    x_rec: torch.Tensor  # fp32 reconstructions
    z: torch.Tensor  # encoder latents before quantizing
    codes: torch.Tensor


def forward(model: VQGAN, x: torch.Tensor, args: VQGANTrainConfig, device: torch.device, dtype: torch.dtype) -> Forward:
    """Encode, quantize (fp32, so that code choice does not depend on the precision) and decode one batch."""
    with autocast(device, dtype):
        z = model.latents(x)
    z_q, codes, codebook_loss, commitment_loss = quantize(model, z.float())
    with autocast(device, dtype):
        x_rec = model.decode_latents(z_q)
    x_rec = x_rec.float()
    l1 = (x_rec - x).abs().mean()
    l2 = (x_rec - x).pow(2).mean()
    ssim_loss = multiscale_ssim_loss(x_rec, x)
    rec_loss = args.l1_weight * l1 + args.l2_weight * l2 + args.ssim_weight * ssim_loss
    loss = rec_loss + args.commit_beta * commitment_loss
    if args.codebook_ema <= 0:
        loss = loss + args.codebook_weight * codebook_loss
    return Forward(loss, rec_loss, l1, ssim_loss, codebook_loss, x_rec, z, codes)


# --- the run -----------------------------------------------------------------------------------------------


class Optimizers(NamedTuple):
    model: torch.optim.Optimizer
    disc: nn.Module | None  # the patch discriminator, when one is used
    disc_optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler  # loss scaling for float16; a no-op otherwise
    codebook_ema: EMACodebook | None  # with --codebook_ema the codebook is a running mean, not trained by Adam

    def parts(self) -> list[tuple[str, Any]]:
        """The training state besides the weights, under its checkpoint keys."""
        return [("optimizer", self.model), ("discriminator", self.disc), ("disc_optimizer", self.disc_optimizer),
                ("scaler", self.scaler), ("codebook_ema", self.codebook_ema)]


def make_optimizers(model: VQGAN, args: VQGANTrainConfig, device: torch.device, dtype: torch.dtype) -> Optimizers:
    codebook = model.quantize.embedding.weight
    codebook_ema = None
    if args.codebook_ema > 0:
        codebook_ema = EMACodebook(codebook, args.codebook_ema)
        codebook.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, betas=(args.beta1, args.beta2))
    disc = disc_optimizer = None
    if args.disc_start >= 0:
        disc = PatchDiscriminator(args.disc_ch, args.disc_layers).to(device)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=args.learning_rate, betas=(args.beta1, args.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return Optimizers(optimizer, disc, disc_optimizer, scaler, codebook_ema)


def train_step(model: VQGAN, x: torch.Tensor, args: VQGANTrainConfig, step: int, opt: Optimizers,
               device: torch.device, dtype: torch.dtype) -> tuple[Forward, float, float]:
    """One update of the VQGAN, and of the discriminator once it is on: (forward pass, GAN weight, D loss)."""
    lr = cosine_lr(step, args.learning_rate, args.min_lr, args.warmup_iters, args.max_iters)
    for group in opt.model.param_groups + (opt.disc_optimizer.param_groups if opt.disc_optimizer else []):
        group["lr"] = lr
    out = forward(model, x, args, device, dtype)
    loss = out.loss
    gan_on = opt.disc is not None and step >= args.disc_start
    gan_weight = 0.0
    if gan_on:
        opt.disc.requires_grad_(False)  # the generator's step must not train the discriminator
        with autocast(device, dtype):
            gan_loss = -opt.disc(out.x_rec).float().mean()
        gan_weight = args.disc_weight
        if args.disc_adaptive:
            gan_weight = gan_weight * adaptive_gan_weight(out.rec_loss, gan_loss, model.decoder.conv_out.weight)
        loss = loss + gan_weight * gan_loss
    opt.model.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    opt.scaler.unscale_(opt.model)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.scaler.step(opt.model)
    if opt.codebook_ema is not None:
        opt.codebook_ema.update(model.quantize.embedding.weight, out.z, out.codes)
    disc_loss = 0.0
    if gan_on:
        opt.disc.requires_grad_(True)
        with autocast(device, dtype):
            d_loss = hinge_discriminator_loss(opt.disc(x).float(), opt.disc(out.x_rec.detach()).float())
        opt.disc_optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(d_loss).backward()
        opt.scaler.step(opt.disc_optimizer)
        disc_loss = d_loss.item()
    opt.scaler.update()
    return out, float(gan_weight), disc_loss


def build_model(args: VQGANTrainConfig, resume: dict | None) -> tuple[VQGAN, bool]:
    """The model to train and whether its codebook is fresh (and so should start on encoder outputs)."""
    if resume is not None:
        model = VQGAN(VQGANConfig(**resume["config"]))
        model.load_state_dict(resume["state_dict"])
        return model, False
    if args.init_from != "scratch":
        return load_vqgan(args.init_from).requires_grad_(True), False  # its architecture, not the size settings
    torch.manual_seed(args.seed)
    return VQGAN(VQGANConfig(ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks,
                             attn_levels=args.attn_levels, z_channels=args.z_channels, embed_dim=args.embed_dim,
                             n_embed=args.n_embed)), True


def load_resume_checkpoint(path: Path, args: VQGANTrainConfig) -> dict | None:
    """The run to continue with --init_from=resume; None for a new run, which never replaces an old one."""
    if args.init_from == "resume":
        if not path.is_file():
            raise UserError(f"{path}: nothing to resume (--init_from=scratch starts a run)")
        return load_checkpoint_file(path)
    if path.exists():
        raise UserError(f"{path} exists: --init_from=resume continues that run; to start a new one, move it away or "
                        "pick another --out_dir")
    return None


def train(args: VQGANTrainConfig, command: str = "") -> dict:
    """Run training as `args` say; returns the final held-out metrics."""
    out_dir = Path(args.out_dir)
    device = pick_device(args.device or None)
    dtype = pick_dtype(device, args.dtype or None)
    ckpt_path = out_dir / CKPT_FILE
    resume = load_resume_checkpoint(ckpt_path, args)
    model, fresh_codebook = build_model(args, resume)
    model = model.to(device).train()
    n_embed, factor = model.config.n_embed, model.config.downsample_factor
    if args.image_size % factor:
        raise UserError(f"--image_size {args.image_size} is not a multiple of the downsampling factor {factor}")
    optimizers = make_optimizers(model, args, device, dtype)
    usage_counts = torch.zeros(n_embed, dtype=torch.long, device=device)
    step, metrics = 0, {}
    if resume is not None:
        restore_training_state(resume, optimizers)
        usage_counts, step, metrics = resume["usage_counts"].to(device), resume["step"], resume.get("metrics", {})
        print(f"resuming {ckpt_path} at step {step}", file=sys.stderr)
    # Held-out images: val_data, or else the first val_images of data, which training then skips.
    val_images, val_labels = load_held_out(args.val_data or args.data, args.val_images, args.image_size, args.resize)
    skip = frozenset() if args.val_data else frozenset(val_labels)
    # Reseeded by step, so a resumed run does not replay the images it has already seen.
    stream = ImageStream(args.data, args.image_size, args.resize, args.seed + step, args.shuffle_buffer, skip)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=args.batch_size, num_workers=args.num_workers,
                                               collate_fn=np.stack, persistent_workers=args.num_workers > 0))
    if fresh_codebook:
        # Codes start on encoder outputs of real images, not at random points that no input is near.
        first = _next_batch(batches, args)
        with torch.no_grad(), autocast(device, dtype):
            z = model.latents(images_to_tensor(first).to(device))
        restart_dead_codes(model, torch.ones(n_embed, dtype=torch.bool, device=device), z, optimizers.model,
                           optimizers.codebook_ema)
        batches = itertools.chain([first], batches)
    print(f"vqgan f{factor}, {n_embed} codes, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{args.image_size} px -> {args.image_size // factor}x{args.image_size // factor} codes; {device}, "
          f"{str(dtype)[6:]}; {len(val_images)} held-out images", file=sys.stderr)

    def checkpoint() -> None:
        ckpt = training_checkpoint(model, optimizers, step, usage_counts, metrics, args, command)
        save_checkpoint_atomic(ckpt, ckpt_path)
        save_checkpoint_atomic({key: ckpt[key] for key in EXPORT_KEYS}, out_dir / EXPORT_FILE)

    window_start, started = step, time.perf_counter()
    try:
        with progress(args.max_iters - step, f"vqgan train from step {step}", "step") as bar:
            while step < args.max_iters:
                x = images_to_tensor(_next_batch(batches, args)).to(device)
                out, gan_weight, disc_loss = train_step(model, x, args, step, optimizers, device, dtype)
                usage_counts += torch.bincount(out.codes.flatten(), minlength=n_embed)
                step += 1
                if args.restart_every > 0 and step - window_start >= args.restart_every:
                    restarted = restart_dead_codes(model, usage_counts == 0, out.z, optimizers.model,
                                                   optimizers.codebook_ema)
                    if restarted:
                        bar.write(f"step {step}: restarted {restarted} unused codes", file=sys.stderr)
                    usage_counts.zero_()
                    window_start = step
                bar.set_postfix_str(f"loss {out.loss.item():.4f} l1 {out.l1.item():.4f} ssim {out.ssim.item():.4f} "
                                    f"vq {out.codebook.item():.4f} gan {gan_weight:.3g}/{disc_loss:.3f} codes "
                                    f"{int((usage_counts > 0).sum())}/{n_embed}", refresh=False)
                bar.update()
                if step % args.eval_interval == 0 or step == args.max_iters:
                    metrics = {**evaluate(model, val_images, args.batch_size), "step": step}
                    bar.write(f"step {step}: held-out PSNR {metrics['psnr']:.2f} dB, codebook usage "
                              f"{metrics['codes_used']}/{n_embed} ({100 * metrics['usage']:.1f}%), perplexity "
                              f"{metrics['perplexity']:.1f}, {time.perf_counter() - started:.0f} s", file=sys.stderr)
                    checkpoint()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}: saving {ckpt_path}; continue with --init_from=resume", file=sys.stderr)
        checkpoint()
        raise
    if metrics.get("step") != step:  # a resumed run that had nothing left to do
        metrics = {**evaluate(model, val_images, args.batch_size), "step": step}
    save_grid(model, val_images, out_dir / GRID_FILE)
    print(f"done: {out_dir / EXPORT_FILE} (weights), {ckpt_path} (training state), {out_dir / GRID_FILE}; held-out "
          f"PSNR {metrics['psnr']:.2f} dB, codebook usage {metrics['codes_used']}/{n_embed}", file=sys.stderr)
    return metrics


def _next_batch(batches: Iterator[np.ndarray], args: VQGANTrainConfig) -> np.ndarray:
    batch = next(batches, None)
    if batch is None:  # the stream is endless unless it has no image at all
        held_out = "" if args.val_data else f" after holding out the first {args.val_images} for evaluation"
        raise UserError(f"no training images left in {', '.join(args.data)}{held_out}")
    return batch


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    result: dict = {}

    def run() -> None:
        (args,), _ = configure(argv, (VQGANTrainConfig,), "-m vqgan.train", __doc__)
        # Created and locked before any training: an unusable out_dir, or a second run on it, stops at once
        # rather than at the first checkpoint.
        with locked(args.out_dir, "vqgan.train run"):
            result.update(train(args, shlex.join(["python", "-m", "vqgan.train", *argv])))

    if status := run_main("vqgan.train", run):
        sys.exit(status)
    return result


if __name__ == "__main__":
    main()
