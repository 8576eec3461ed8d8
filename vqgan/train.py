"""Train a VQGAN from scratch, or fine-tune one (a taming checkpoint or our own), on product images.

    python -m vqgan.train config/vqgan_demo.py          # the demo tokenizer, assets/vqgan_demo.pt
    # fine-tune the ImageNet f16 tokenizer on MUGE photos, with the patch discriminator after 2000 steps
    python -m vqgan.train --init_from=vqgan_imagenet_f16_1024/checkpoints/last.ckpt \\
        --data=dataset/ECommerce-T2I/T2I_train.img.tsv --val_data=dataset/ECommerce-T2I/T2I_val.img.tsv \\
        --batch_size=8 --learning_rate=2e-5 --disc_start=2000 --num_workers=6 --out_dir=out/vqgan_muge

Settings as for train.py: recipe files, then `--name=value` flags. The loss needs no pretrained network: L1 (and
optionally squared error), multi-scale SSIM, the codebook and commitment terms, and from `disc_start` on a
patch discriminator. <out_dir>/ckpt.pt is the training state (--init_from=resume continues it), vqgan.pt the
weights and config that prepare.py and generate.py load.
"""

from __future__ import annotations

import itertools
import math
import random
import shlex
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from data import RESIZE_MODES, BadRowError, TsvRow, fit_to_square, image_from_base64, open_image, read_tsv
from utils import (
    UserError,
    autocast,
    batched,
    configure,
    cosine_lr,
    locked,
    map_in_order,
    pick_device,
    pick_dtype,
    process_pool,
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
    val_data: list[str] | None = setting(None, "held-out images; default: the first val_images of data, not trained on")
    val_images: int = setting(256, "held-out images to measure PSNR and codebook usage on")
    image_size: int = setting(256, "train on square images of this side (pixels)")
    resize: str = setting("pad", "fit to the square as prepare.py does: pad keeps the whole product, crop the centre")
    out_dir: str = setting("out/vqgan", f"writes {CKPT_FILE}, {EXPORT_FILE} and {GRID_FILE} here")
    init_from: str = setting("scratch", "scratch, resume (continue <out_dir>/ckpt.pt) or a checkpoint to fine-tune")
    ch: int = setting(128, "channels of the first level (a multiple of 32)")
    ch_mult: tuple[int, ...] = setting((1, 1, 2, 2, 4), "channel multiplier per level; n levels downsample by 2**(n-1)")
    num_res_blocks: int = setting(2, "res blocks per encoder level")
    attn_levels: tuple[int, ...] = setting((4,), "levels with self-attention (empty: none; the middle always has it)")
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
    l2_weight: float = setting(0.0, "squared-error weight: a wrong colour weighs more, faster from scratch (e.g. 10)")
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
    restart_every: int = setting(200, "every this many steps, unused codes move onto encoder outputs (0: never)")
    device: str = setting("", "cuda, cpu, ... (empty: the best there is)")
    dtype: str = setting("", "autocast precision: float32, bfloat16 or float16 (empty: the GPU's best, float32 on CPU)")
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


def decode(where: str, row: TsvRow | Path, image_size: int, resize: str) -> tuple[str, np.ndarray | None]:
    """(where, uint8 [S, S, 3]), or (where, None) with a warning for an image that cannot be read."""
    try:
        if isinstance(row, Path):
            return where, np.asarray(fit_to_square(open_image(row.read_bytes()), image_size, resize), dtype=np.uint8)
        if row.error is not None:
            raise row.error
        return where, image_from_base64(row.value, image_size, resize)
    except (BadRowError, OSError) as e:
        print(f"warning: {where}: skipped: {e}", file=sys.stderr)
        return where, None


def stream_images(sources: list[str], image_size: int, resize: str, pool: ProcessPoolExecutor | None = None,
                  order: random.Random | None = None, skip: frozenset = frozenset()
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """(`file:line` or path, uint8 [S, S, 3]) of every readable image in `sources` (MUGE TSVs, image folders) not in
    `skip`, the files shuffled by `order` if given, decoded by the `pool`'s processes if given (in the same order)."""
    items: list[tuple[str, Path | None]] = []  # (label, path) of an image file, (label, None) of a TSV
    for path in map(Path, sources):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise UserError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            items += [(str(p), p) for p in files]
        elif path.is_file():
            items.append((str(path), None))
        else:
            raise UserError(f"{path}: no such file or folder")
    if order is not None:
        order.shuffle(items)  # a TSV's rows stay in file order: the shuffle buffer mixes them
    rows = itertools.chain.from_iterable(
        ((f"{label}:{row.line_no}", row) for row in read_tsv(label)) if path is None else [(label, path)]
        for label, path in items)
    jobs = ((where, row, image_size, resize) for where, row in rows if where not in skip)
    for where, image in map_in_order(pool, decode, jobs, 64, "image decoding"):
        if image is not None:
            yield where, image


def shuffled_images(args: VQGANTrainConfig, seed: int, skip: frozenset, pool: ProcessPoolExecutor | None
                    ) -> Iterator[np.ndarray]:
    """Training images for ever: the files in a new order every epoch, and a shuffle buffer that mixes their rows."""
    buffer: list[np.ndarray] = []
    buffer_rng = random.Random(f"{seed}/buffer")
    for epoch in itertools.count():
        order = random.Random(f"{seed}/order/{epoch}")
        for _, image in stream_images(args.data, args.image_size, args.resize, pool, order, skip):
            if len(buffer) < args.shuffle_buffer:
                buffer.append(image)
                continue
            i = buffer_rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = image
        if not buffer:  # not one image in the first epoch
            held_out = "" if args.val_data else f" after holding out the first {args.val_images} for evaluation"
            raise UserError(f"no training images left in {', '.join(args.data)}{held_out}")


def quantize(model: VQGAN, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Straight-through nearest-code quantization: (quantized latents, codes, codebook loss, commitment loss)."""
    with torch.no_grad():
        codes = model.quantize.codes(z)
    z_q = model.quantize.lookup(codes)
    codebook_loss = F.mse_loss(z_q, z.detach())
    commitment_loss = F.mse_loss(z, z_q.detach())
    return z + (z_q - z).detach(), codes, codebook_loss, commitment_loss


def multiscale_ssim_loss(x: torch.Tensor, y: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """1 - SSIM (structural similarity) of images in [-1, 1], averaged over them and their 2x and 4x reductions."""
    g = torch.exp(-((torch.arange(7.0) - 3) ** 2) / (2 * 1.5**2))  # a 7-tap Gaussian window, sigma 1.5
    g = g / g.sum()
    window = torch.outer(g, g).expand(3, 1, 7, 7).contiguous().to(x.device)
    blur = lambda t: F.conv2d(t, window, groups=3)
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2  # the usual constants for a value range of 2
    losses = []
    for _ in range(scales):
        if min(x.shape[-2:]) < 7:
            break
        mu_x, mu_y = blur(x), blur(y)
        var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
        ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        losses.append(1 - ssim.mean())
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(losses).mean()


def patch_discriminator(ch: int, n_layers: int) -> nn.Sequential:
    """Stride-2 convolutions that end in one real/fake logit per overlapping image patch (PatchGAN)."""
    layers: list[nn.Module] = [nn.Conv2d(3, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
    channels = ch
    for i in range(1, n_layers + 1):
        out = ch * min(2**i, 8)
        layers += [nn.Conv2d(channels, out, 4, 2 if i < n_layers else 1, padding=1, bias=False),
                   nn.GroupNorm(8, out), nn.LeakyReLU(0.2)]
        channels = out
    layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, 0.0, 0.02)
    return nn.Sequential(*layers)


class EMACodebook(nn.Module):
    """Codes kept as running means of the latents assigned to them (`--codebook_ema`): Adam moves a code about lr per
    step, thousands of steps from the latents; a mean follows within ~1 / (1 - decay)."""

    def __init__(self, weight: torch.Tensor, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("cluster_size", torch.ones(weight.shape[0], device=weight.device))
        self.register_buffer("embed_sum", weight.detach().float().clone())

    @torch.no_grad()
    def update(self, weight: torch.Tensor, z: torch.Tensor, codes: torch.Tensor) -> None:
        latents = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = codes.flatten()
        counts = torch.bincount(codes, minlength=weight.shape[0]).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, latents)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_sum.lerp_(sums, 1 - self.decay)
        weight.copy_(self.embed_sum / self.cluster_size.clamp(min=1e-12)[:, None])


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
    if ema is not None:  # their running means start afresh where they now are
        ema.cluster_size[dead_ids] = 1.0
        ema.embed_sum[dead_ids] = weight.detach().float()[dead_ids]
    return len(dead_ids)


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


class Optimizers(NamedTuple):  # the training state besides the weights, each under its key in ckpt.pt
    optimizer: torch.optim.Optimizer
    discriminator: nn.Sequential | None  # with --disc_start >= 0
    disc_optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler  # loss scaling for float16; a no-op otherwise
    codebook_ema: EMACodebook | None  # with --codebook_ema the codebook is a running mean, not trained by Adam


def make_optimizers(model: VQGAN, args: VQGANTrainConfig, device: torch.device, dtype: torch.dtype) -> Optimizers:
    codebook = model.quantize.embedding.weight
    codebook_ema = EMACodebook(codebook, args.codebook_ema) if args.codebook_ema > 0 else None
    codebook.requires_grad_(codebook_ema is None)
    disc = patch_discriminator(args.disc_ch, args.disc_layers).to(device) if args.disc_start >= 0 else None
    adam = lambda params: torch.optim.Adam(params, lr=args.learning_rate, betas=(args.beta1, args.beta2))
    return Optimizers(optimizer=adam([p for p in model.parameters() if p.requires_grad]), discriminator=disc,
                      disc_optimizer=adam(disc.parameters()) if disc is not None else None, codebook_ema=codebook_ema,
                      scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def train_step(model: VQGAN, x: torch.Tensor, args: VQGANTrainConfig, step: int, opt: Optimizers,
               device: torch.device, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One update of the VQGAN, and of the discriminator once it is on: (losses to show, latents, their codes)."""
    for group in opt.optimizer.param_groups + (opt.disc_optimizer.param_groups if opt.disc_optimizer else []):
        group["lr"] = cosine_lr(step, args.learning_rate, args.min_lr, args.warmup_iters, args.max_iters)
    with autocast(device, dtype):
        z = model.latents(x)
    z_q, codes, codebook_loss, commitment_loss = quantize(model, z.float())  # fp32: codes independent of precision
    with autocast(device, dtype):
        x_rec = model.decode_latents(z_q).float()
    l1 = (x_rec - x).abs().mean()
    l2 = (x_rec - x).pow(2).mean()
    ssim_loss = multiscale_ssim_loss(x_rec, x)
    rec_loss = args.l1_weight * l1 + args.l2_weight * l2 + args.ssim_weight * ssim_loss
    loss = rec_loss + args.commit_beta * commitment_loss
    if args.codebook_ema <= 0:
        loss = loss + args.codebook_weight * codebook_loss
    logs = {"loss": loss.detach(), "l1": l1.detach(), "ssim": ssim_loss.detach(), "vq": codebook_loss.detach()}
    disc = opt.discriminator if step >= args.disc_start else None
    if disc is not None:
        disc.requires_grad_(False)  # the generator's step must not train the discriminator
        with autocast(device, dtype):
            gan_loss = -disc(x_rec).float().mean()
        logs["gan"] = args.disc_weight
        if args.disc_adaptive:  # scaled so that its gradient at the decoder's last layer matches the reconstruction's
            rec_grad, gan_grad = (torch.autograd.grad(part, model.decoder.conv_out.weight, retain_graph=True)[0]
                                  for part in (rec_loss, gan_loss))
            logs["gan"] = logs["gan"] * (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
        loss = loss + logs["gan"] * gan_loss
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    opt.scaler.unscale_(opt.optimizer)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.scaler.step(opt.optimizer)
    if opt.codebook_ema is not None:
        opt.codebook_ema.update(model.quantize.embedding.weight, z, codes)
    if disc is not None:
        disc.requires_grad_(True)
        with autocast(device, dtype):
            real, fake = disc(x).float(), disc(x_rec.detach()).float()
        logs["disc"] = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())  # the hinge loss
        opt.disc_optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(logs["disc"]).backward()
        opt.scaler.step(opt.disc_optimizer)
    opt.scaler.update()
    return logs, z, codes


def build_model(args: VQGANTrainConfig, resume: dict | None) -> tuple[VQGAN, bool]:
    """The model to train, and whether its codebook is fresh (and so should start on encoder outputs)."""
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


def restore_training_state(resume: dict, optimizers: Optimizers, device: torch.device, ckpt_path: Path) -> None:
    """The optimizers' and torch's random states of a checkpoint (the image stream reseeds by step)."""
    try:
        for key, part in optimizers._asdict().items():
            if part is not None and resume.get(key) is not None:
                part.load_state_dict(resume[key])
    except RuntimeError:  # an older layout of the discriminator or the codebook averages
        raise UserError(f"{ckpt_path}: this version cannot continue its training state; fine-tune from its weights "
                        f"instead: --init_from={ckpt_path.parent / EXPORT_FILE} and another --out_dir") from None
    torch.set_rng_state(resume["rng"]["torch"])
    if device.type == "cuda" and "cuda" in resume["rng"]:
        torch.cuda.set_rng_state_all(resume["rng"]["cuda"])


def held_out_and_batches(args: VQGANTrainConfig, step: int, pool: ProcessPoolExecutor | None
                         ) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """The held-out images (val_data, or else the first val_images of data, which training then skips) and the
    training batches, reseeded by step so that a resumed run does not replay the images it has already seen."""
    val_sources = args.val_data or args.data
    held_out = list(itertools.islice(stream_images(val_sources, args.image_size, args.resize, pool), args.val_images))
    if not held_out:
        raise UserError(f"no readable images in {', '.join(val_sources)}")
    skip = frozenset() if args.val_data else frozenset(label for label, _ in held_out)
    batches = map(np.stack, batched(shuffled_images(args, args.seed + step, skip, pool), args.batch_size))
    return np.stack([image for _, image in held_out]), batches


def train(args: VQGANTrainConfig, pool: ProcessPoolExecutor | None = None, command: str = "") -> dict:
    """Run training as `args` say, decoding images in the `pool`'s processes; returns the final held-out metrics."""
    out_dir = Path(args.out_dir)
    device = pick_device(args.device or None)
    dtype = pick_dtype(device, args.dtype or None)
    ckpt_path = out_dir / CKPT_FILE
    if args.init_from == "resume" and not ckpt_path.is_file():
        raise UserError(f"{ckpt_path}: nothing to resume (--init_from=scratch starts a run)")
    if args.init_from != "resume" and ckpt_path.exists():  # a new run never replaces an old one
        raise UserError(f"{ckpt_path} exists: --init_from=resume continues that run (or move it, or change --out_dir)")
    resume = load_checkpoint_file(ckpt_path) if args.init_from == "resume" else None
    model, fresh_codebook = build_model(args, resume)
    model = model.to(device).train()
    n_embed, factor = model.config.n_embed, model.config.downsample_factor
    if args.image_size % factor:
        raise UserError(f"--image_size {args.image_size} is not a multiple of the downsampling factor {factor}")
    optimizers = make_optimizers(model, args, device, dtype)
    usage_counts = torch.zeros(n_embed, dtype=torch.long, device=device)
    step, metrics = 0, {}
    if resume is not None:
        restore_training_state(resume, optimizers, device, ckpt_path)
        usage_counts, step, metrics = resume["usage_counts"].to(device), resume["step"], resume.get("metrics", {})
        print(f"resuming {ckpt_path} at step {step}", file=sys.stderr)
    val_images, batches = held_out_and_batches(args, step, pool)
    print(f"vqgan f{factor}, {n_embed} codes, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{args.image_size} px; {device}, {str(dtype)[6:]}; {len(val_images)} held-out images", file=sys.stderr)

    def checkpoint() -> None:
        ckpt = {"state_dict": model.state_dict(), "config": asdict(model.config), "step": step, "metrics": metrics,
                "command": command, "usage_counts": usage_counts, "train_config": vars(args),
                "rng": {"torch": torch.get_rng_state(),
                        **({"cuda": torch.cuda.get_rng_state_all()} if device.type == "cuda" else {})},
                **{key: part.state_dict() if part is not None else None for key, part in optimizers._asdict().items()}}
        save_checkpoint_atomic(ckpt, ckpt_path)
        save_checkpoint_atomic({key: ckpt[key] for key in EXPORT_KEYS}, out_dir / EXPORT_FILE)

    started = time.perf_counter()
    try:
        with progress(args.max_iters - step, f"vqgan train from step {step}", "step") as bar:
            while step < args.max_iters:
                x = images_to_tensor(next(batches)).to(device)
                if fresh_codebook and step == 0:
                    # Codes start on encoder outputs of real images, not at random points that no input is near.
                    with torch.no_grad(), autocast(device, dtype):
                        restart_dead_codes(model, torch.ones(n_embed, dtype=torch.bool, device=device),
                                           model.latents(x), optimizers.optimizer, optimizers.codebook_ema)
                logs, z, codes = train_step(model, x, args, step, optimizers, device, dtype)
                usage_counts += torch.bincount(codes.flatten(), minlength=n_embed)
                step += 1
                if args.restart_every > 0 and step % args.restart_every == 0:
                    dead = usage_counts == 0
                    if restarted := restart_dead_codes(model, dead, z, optimizers.optimizer, optimizers.codebook_ema):
                        bar.write(f"step {step}: restarted {restarted} unused codes", file=sys.stderr)
                    usage_counts.zero_()
                bar.set_postfix_str(" ".join(f"{name} {value:.4f}" for name, value in logs.items())
                                    + f" codes {int((usage_counts > 0).sum())}/{n_embed}", refresh=False)
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
    recon, _ = reconstruct(model, val_images[:16], batch_size=16)  # originals above reconstructions, to look at
    Image.fromarray(np.vstack([np.hstack(val_images[:16]), np.hstack(recon)])).save(out_dir / GRID_FILE)
    print(f"done: {out_dir / EXPORT_FILE} (weights), {ckpt_path} (training state), {out_dir / GRID_FILE}; held-out "
          f"PSNR {metrics['psnr']:.2f} dB, codebook usage {metrics['codes_used']}/{n_embed}", file=sys.stderr)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    result: dict = {}

    def run() -> None:
        (args,), _ = configure(argv, (VQGANTrainConfig,), "-m vqgan.train", __doc__)
        pool = process_pool(args.num_workers)  # before torch runs anything, and outside the lock they would hold
        try:
            # Locked before any training: an unusable out_dir, or a second run on it, stops at once.
            with locked(args.out_dir, "vqgan.train run"):
                result.update(train(args, pool, shlex.join(["python", "-m", "vqgan.train", *argv])))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    if status := run_main("vqgan.train", run):
        sys.exit(status)
    return result


if __name__ == "__main__":
    main()
