"""Benchmarks, one subcommand per part; results go to BENCHMARKS.md with the machine named.

    python bench.py gpu                     # everything a lent GPU should measure, one table and bench_gpu.json
    python bench.py vqgan --device cuda --batch_size 64
    python bench.py train config/muge_16gb.py --steps 10 --batch_size 16 --gpu_memory_gib 16
    python bench.py train config/muge_16gb.py --steps 3 --batch_size 1 --device cpu --estimate_memory
    python bench.py generate config/muge_16gb.py --device cuda --vqgan f16_1024 --limit 0 --batch_size 256
    python bench.py steps config/muge_16gb.py --batch_size 1,64,256 --no_cache
    python bench.py prepare --vqgan small --image_size 64 --rows 2000,20000
    python bench.py vqgan-train --device cuda --batch_size 8 --disc
    python bench.py app --ckpt out/best.pt

Random weights throughout: they cost what trained ones do. Every subcommand prints one `RESULT {json}` line
besides its summary, which `bench.py gpu` collects.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import dataclasses
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

import generate
import train
from data import read_text_tsv
from model import GPT, GPTConfig, Sampler, attention_bias, peak_flops, row_keys
from text import build_char_vocab, write_vocab
from utils import autocast, configure, memory_gib, pick_device, pick_dtype
from vqgan import VQGAN, VQGANConfig, infer_config, load_vqgan, save_checkpoint_atomic
from vqgan.train import VQGANTrainConfig, make_optimizers, train_step

ROOT = Path(__file__).resolve().parent
TAMING_FIXTURES = ROOT.parent / "shared" / "fixtures" / "taming"
MUGE_CAPTIONS = ROOT.parent / "shared" / "data" / "muge_t2i_captions_5k.tsv"
VQGAN_CHOICES = "tiny: the taming fixture; f16_1024: full size, random weights; small: a random f4"


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:  # Linux names the model
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def report(part: str, device: torch.device, summary: str, **figures: object) -> None:
    """The summary for people, then the figures as the `RESULT {json}` line that `bench.py gpu` collects."""
    machine = describe_machine(device)
    print(f"machine: {machine}\n{part}: {summary}")
    print(f"RESULT {json.dumps({'part': part, 'machine': machine, **figures})}", flush=True)


def seconds_per_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 3) -> float:
    """Median wall time of `fn`, waiting for queued GPU work so that it is counted."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def recipe_config(recipe: str | None, codebook_size: int, grid: int, text_len: int, text_vocab_size: int
                  ) -> GPTConfig:
    """A recipe's model settings (none: the demo's) for data of this shape."""
    (_, config), _ = configure([recipe] if recipe else [], (train.TrainConfig, GPTConfig), "bench.py", "")
    return dataclasses.replace(config, codebook_size=codebook_size, grid_rows=grid, grid_cols=grid,
                               text_len=text_len, text_vocab_size=text_vocab_size)


def full_size_vqgan_config() -> VQGANConfig:
    """imagenet_f16_1024's architecture, read off its tensor shapes when the key list is at hand."""
    keys = TAMING_FIXTURES / "imagenet_f16_1024_keys.json"
    if not keys.is_file():
        return VQGANConfig(n_embed=1024)
    shapes = json.loads(keys.read_text())["state_dict"]
    return infer_config({k: torch.empty(shape, device="meta") for k, shape in shapes.items()}, keys)


def vqgan_checkpoint(name: str, folder: str) -> str:
    """The checkpoint of one of VQGAN_CHOICES."""
    if name == "tiny":
        path = TAMING_FIXTURES / "tiny_f16" / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise SystemExit(f"{path} not found: the tiny fixture is only present in development")
        return str(path)
    config = full_size_vqgan_config() if name == "f16_1024" else VQGANConfig(
        ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_levels=(), z_channels=4, embed_dim=4, n_embed=64)
    torch.manual_seed(0)
    path = os.path.join(folder, f"{name}.pt")
    save_checkpoint_atomic({"state_dict": VQGAN(config).state_dict(), "config": dataclasses.asdict(config)}, path)
    return path


# --- the VQGAN ----------------------------------------------------------------------------------------------


def bench_vqgan(args: argparse.Namespace) -> None:
    """Encoding runs in exact fp32; decoding as generate.py does it on a GPU (bfloat16 weights, channels-last)
    and, where asked, compiled."""
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = VQGAN(dataclasses.replace(full_size_vqgan_config(), n_embed=args.n_embed)).to(device).eval()
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    codes = model.encode(x)
    dtype = pick_dtype(device, args.decode_dtype)
    calls = {"encode_fp32": lambda: model.encode(x), "decode_fp32": lambda: model.decode(codes)}
    if dtype != torch.float32:
        for suffix, memory_format in (("", torch.preserve_format), ("_channels_last", torch.channels_last)):
            decoder = copy.deepcopy(model).to(dtype=dtype, memory_format=memory_format)
            calls[f"decode_{str(dtype)[6:]}{suffix}"] = lambda d=decoder: d.decode(codes)
    figures = {name: args.batch_size / seconds_per_call(fn, device, repeat=args.repeat) for name, fn in calls.items()}
    if args.compile:
        decoder = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last)
        decoder.decoder = torch.compile(decoder.decoder)
        figures["decode_compiled"] = args.batch_size / seconds_per_call(lambda: decoder.decode(codes), device,
                                                                        warmup=2, repeat=args.repeat)
    report("vqgan", device, f"f16_{args.n_embed}, {args.image_size} px, batch {args.batch_size}: "
           + ", ".join(f"{k} {v:.1f} images/s" for k, v in figures.items()),
           batch_size=args.batch_size, images_per_sec=figures, memory_gib=memory_gib(device))


def bench_vqgan_train(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = load_vqgan(args.ckpt).requires_grad_(True) if args.ckpt else VQGAN(full_size_vqgan_config())
    model = model.to(device).train()
    settings = VQGANTrainConfig(data=["unused"], batch_size=args.batch_size, disc_start=0 if args.disc else -1)
    dtype = pick_dtype(device, args.dtype)
    optimizers = make_optimizers(model, settings, device, dtype)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    rate = args.batch_size / seconds_per_call(lambda: train_step(model, x, settings, 1000, optimizers, device, dtype),
                                              device, repeat=args.repeat)
    memory = memory_gib(device)
    report("vqgan-train", device, f"{args.ckpt or 'f16'} {args.image_size} px, batch {args.batch_size}, "
           f"{str(dtype)[6:]}, {'with' if args.disc else 'without'} the discriminator: {rate:.1f} images/s; peak "
           f"{memory}", batch_size=args.batch_size, disc=args.disc, images_per_sec=rate, memory_gib=memory)


# --- training -----------------------------------------------------------------------------------------------


def write_synthetic_data(data_dir: str, rows: int, codebook_size: int, grid: int, text_len: int,
                         text_vocab_size: int) -> None:
    """Random codes and captions in prepare.py's layout: the speed of a step does not depend on the values."""
    rng = np.random.default_rng(0)
    os.makedirs(data_dir)
    for split, n in (("train", rows), ("val", max(1, rows // 8))):
        rng.integers(0, codebook_size, (n, grid * grid), dtype=np.uint16).tofile(f"{data_dir}/{split}.img.bin")
        text = rng.integers(1, text_vocab_size, (n, text_len), dtype=np.uint16)
        text[:, text_len // 2 :] = 0  # captions are right-padded
        text.tofile(f"{data_dir}/{split}.txt.bin")
    meta = {"image_size": grid * 16, "code_grid": [grid, grid], "codebook_size": codebook_size, "text_len": text_len,
            "tokenizer": "vocab.txt", "text_vocab_size": text_vocab_size, "pad_id": 0}
    Path(data_dir, "meta.json").write_text(json.dumps(meta))


def saved_activation_bytes(model: GPT, batch_size: int) -> int:
    """Bytes autograd keeps for the backward pass after one bf16-autocast forward on the CPU."""
    cfg = model.config
    codes = torch.randint(0, cfg.codebook_size, (batch_size, cfg.block_size))
    text = torch.randint(1, model.text_encoder.config.vocab_size, (batch_size, cfg.text_len))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast(torch.device("cpu"), torch.bfloat16):
        model(codes, text)
    return sum(saved.values())


def estimate_gpu_memory(config: GPTConfig, batch_sizes: list[int]) -> dict[int, float]:
    """GiB a GPU must have for bf16 training (what the card reserves), predicted from CPU measurements: a guess
    until `bench.py train` has measured a GPU's reserved memory."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(config, dropout=0.0)).train()
    one, two = (saved_activation_bytes(model, b) for b in (1, 2))
    per_image, fixed = two - one, 2 * one - two  # fixed: mostly autocast's bf16 copies of the weights
    if config.dropout > 0:  # one mask byte per element on CUDA: after the embeddings, self-attention, cross-attn, MLP
        per_image += (1 + 3 * config.n_layer) * config.block_size * config.n_embd
    per_image += 6 * config.block_size * config.codebook_size  # the logits' gradient, fp32 and bf16
    # fp32 weights, gradients and AdamW's two moments; a frozen parameter keeps only its weights
    states = sum((16 if p.requires_grad else 4) * p.numel() for p in model.parameters())
    # the caching allocator's usual 25% over the peak, and 0.5 GiB of CUDA context and cuBLAS workspaces
    return {b: round((1.25 * (states + fixed + b * per_image) + 0.5 * 2**30) / 2**30, 2) for b in batch_sizes}


def bench_train(args: argparse.Namespace, flags: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        write_synthetic_data(data_dir, args.rows, args.codebook_size, args.grid, args.text_len, args.text_vocab_size)
        argv = [*([args.config] if args.config else []), *flags, f"--data_dir={data_dir}",
                f"--out_dir={tmp}/out", f"--max_iters={args.steps}", f"--eval_interval={args.steps + 1}",
                "--eval_iters=1", "--log_interval=1", "--warmup_iters=0"]
        tc, _, _ = train.parse_args(argv)
        device = pick_device(tc.device or None)
        if args.gpu_memory_gib and device.type == "cuda":
            # Stand in for a smaller card: the allocator refuses to go past this much of this one.
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib * 2**30 / total), device)
        summary = train.main(argv)
    rate, peak = summary["tokens_per_sec"], tc.peak_flops or peak_flops(device)
    config = recipe_config(args.config, args.codebook_size, args.grid, args.text_len, args.text_vocab_size)
    with torch.device("meta"):  # only its FLOP count is wanted
        model_flops = GPT(config).flops_per_sample()
    figures = {"params_m": summary["params"] / 1e6, "tokens_per_iter": summary["tokens_per_iter"],
               "tokens_per_sec": rate, "memory_gib": summary["memory_gib"], "batch_size": tc.batch_size,
               "epoch_minutes": 90_000 * args.grid**2 / rate / 60 if rate else None,
               "mfu": model_flops * rate / args.grid**2 / peak if rate and peak else None}
    if args.estimate_memory:  # GiB, bf16
        figures["estimated_card_gib"] = estimate_gpu_memory(config, [1, 8, 16, 32])
    report("train", device, f"{' '.join([args.config or '(demo)', *flags])}: "
           + ", ".join(f"{k} {v}" for k, v in figures.items()), config=args.config, **figures)


# --- prepare ------------------------------------------------------------------------------------------------


def write_muge_tsvs(data_dir: str, rows: int, source_size: int) -> int:
    """T2I_train.{img,text}.tsv with `rows` JPEG stand-ins for product photos; returns the image TSV's bytes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(64):  # smooth pictures: JPEG sizes like real photos, unlike noise
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((source_size, source_size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        pictures.append(base64.b64encode(buffer.getvalue()).decode())
    captions = [c for _, c in benchmark_captions(MUGE_CAPTIONS)]
    os.makedirs(data_dir, exist_ok=True)
    with open(f"{data_dir}/T2I_train.img.tsv", "w") as images, open(f"{data_dir}/T2I_train.text.tsv", "w") as texts:
        for i in range(rows):
            images.write(f"{i:032x}\t{pictures[i % len(pictures)]}\n")
            texts.write(f"{i:032x}\t{captions[i % len(captions)]}\n")
    return os.path.getsize(f"{data_dir}/T2I_train.img.tsv")


def bench_prepare(args: argparse.Namespace) -> None:
    """Each size runs in a fresh process, so that its peak memory is its own."""
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = vqgan_checkpoint(args.vqgan, tmp)
        for rows in (int(n) for n in args.rows.split(",")):
            data_dir, out_dir = os.path.join(tmp, f"muge{rows}"), os.path.join(tmp, f"out{rows}")
            tsv_bytes = write_muge_tsvs(data_dir, rows, args.source_size)
            flags = ["--data_dir", data_dir, "--vqgan_ckpt", ckpt, "--out_dir", out_dir, "--device", str(device),
                     "--image_size", str(args.image_size), "--batch_size", str(args.batch_size)]
            if args.num_workers is not None:
                flags += ["--num_workers", str(args.num_workers)]
            subprocess.run([sys.executable, str(ROOT / "prepare.py"), *flags], check=True, stderr=subprocess.DEVNULL)
            meta = json.loads(Path(out_dir, "meta.json").read_text())
            report("prepare", device, f"--vqgan {args.vqgan}: {rows} rows ({tsv_bytes / 2**20:.0f} MiB), "
                   f"{meta['seconds']} s, {rows / meta['seconds']:.1f} rows/s; peak memory {meta['peak_memory_gib']} "
                   "GiB", rows=rows, seconds=meta["seconds"], peak_memory_gib=meta["peak_memory_gib"])
            shutil.rmtree(data_dir)


# --- generation ---------------------------------------------------------------------------------------------


def benchmark_captions(path: Path, limit: int = 0) -> list[tuple[str, str]]:
    """(img_id, caption) rows of a captions TSV, or where it is missing 5,000 made-up titles of 28 characters
    drawn from characters real titles use (the lengths matter for speed, not the words)."""
    if path.is_file():
        rows = [(row.img_id, row.caption) for row in read_text_tsv(path) if row.error is None]
    else:
        rng = np.random.default_rng(0)
        chars = list("男女童纯棉短裤夏季新款宝宝帅气五分裤洋气运动韩版宽松显瘦刺绣条纹大码长袖T恤连衣裙红蓝黑白")
        rows = [(f"{i:032x}", "".join(rng.choice(chars, 28))) for i in range(5000)]
    return rows[:limit] if limit else rows


def write_checkpoint(folder: str, recipe: str | None, vqgan_path: str, captions: list[str], image_size: int,
                     text_len: int) -> str:
    """A train.py-style checkpoint with random weights, its char vocab and meta, for generate.py to load."""
    vq = load_vqgan(vqgan_path)
    grid = image_size // vq.downsample_factor
    vocab = build_char_vocab(captions)
    write_vocab(vocab, os.path.join(folder, "vocab.txt"))
    config = recipe_config(recipe, vq.codebook_size, grid, text_len, len(vocab))
    torch.manual_seed(0)
    model = GPT(config)
    meta = {"image_size": image_size, "code_grid": [grid, grid], "codebook_size": vq.codebook_size,
            "text_len": text_len, "tokenizer": "vocab.txt", "text_vocab_size": len(vocab),
            "vqgan_ckpt": os.path.abspath(vqgan_path)}
    path = os.path.join(folder, "best.pt")
    save_checkpoint_atomic({"kind": "gpt", "model": model.state_dict(), "model_config": dataclasses.asdict(config),
                            "meta": meta, "data_dir": os.path.abspath(folder)}, path)
    return path


def bench_generate(args: argparse.Namespace) -> None:
    """generate.py's own run, per batch size, with a random-weight GPT of a recipe's shape."""
    device = pick_device(args.device)
    rows = benchmark_captions(Path(args.captions or MUGE_CAPTIONS), args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(tmp, args.config, vqgan_checkpoint(args.vqgan, tmp), [c for _, c in rows],
                                args.image_size, args.text_len)
        prompts = os.path.join(tmp, "prompts.tsv")
        Path(prompts).write_text("".join(f"{i}\t{c}\n" for i, c in rows), encoding="utf-8")
        for batch_size in (int(b) for b in args.batch_size.split(",")):
            flags = ["--ckpt", ckpt, "--batch_size", str(batch_size), "--cfg_scale", str(args.cfg_scale),
                     "--device", str(device), "--prompts", prompts]
            flags += ["--compile", args.compile] if args.compile else []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            with open(os.path.join(tmp, "T2I_test.tsv"), "wb") as out:
                s = generate.run(generate.build_parser().parse_args(flags), out)
            total, memory = time.perf_counter() - started, memory_gib(device)
            report("generate", device, f"{args.config or '(demo)'} --vqgan {args.vqgan}: {len(rows)} captions, batch "
                   f"{batch_size}, cfg {args.cfg_scale}: {total:.1f} s end to end (start-up {s['load_seconds']:.1f} s; "
                   f"sampling {s['sampling_seconds']:.1f} s, decoding {s['decoding_seconds']:.1f} s, PNG "
                   f"{s['encoding_seconds']:.1f} s over {s['encode_workers']} processes); peak {memory}",
                   config=args.config, captions=len(rows), batch_size=batch_size, cfg_scale=args.cfg_scale,
                   total_seconds=total, **{k: v for k, v in s.items() if k != "warnings"}, memory_gib=memory)


def bench_steps(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    config = recipe_config(args.config, args.codebook_size, args.grid, args.text_len, 5000)
    torch.manual_seed(0)
    model = GPT(config).to(device, dtype).eval()
    figures: dict[str, dict[int, float]] = {"eager_ms": {}, "compiled_ms": {}, "no_cache_ratio": {}}
    for batch in (int(b) for b in args.batch_size.split(",")):
        text = torch.randint(1, 5000, (batch, args.text_len), device=device)
        text[:, args.text_len // 2 :] = 0
        for mode in ("eager", "compiled") if args.compile else ("eager",):
            sampler = Sampler(model, batch, cfg_scale=args.cfg_scale, compile=mode == "compiled")
            sampler.prefill(text)
            sampler.keys.copy_(row_keys(0, range(batch)).flatten().to(device))

            def steps(sampler: Sampler = sampler, n: int = 16) -> None:
                with torch.no_grad():
                    for _ in range(n):
                        sampler.tokens.copy_(sampler.step(sampler.tokens, sampler.pos))

            sampler.pos.fill_(config.block_size // 2)
            figures[f"{mode}_ms"][batch] = 1000 * seconds_per_call(steps, device, warmup=3, repeat=args.repeat) / 16
        if args.no_cache:
            figures["no_cache_ratio"][batch] = no_cache_ratio(model, text, figures["eager_ms"][batch] / 1000, device)
    report("steps", device, f"{args.config or '(demo)'}: {model.num_params() / 1e6:.0f}M parameters, cfg "
           f"{args.cfg_scale}, {str(dtype)[6:]}: " + "; ".join(
               f"{name} " + ", ".join(f"batch {b}: {v:.2f}" for b, v in values.items())
               for name, values in figures.items() if values), config=args.config, cfg_scale=args.cfg_scale, **figures)


@torch.no_grad()
def no_cache_ratio(model: GPT, text: torch.Tensor, cached_step: float, device: torch.device,
                   prefixes: tuple[int, ...] = (1, 64, 128, 192, 256)) -> float:
    """How many times longer an image takes without a cache: every step runs the blocks over the whole prefix
    (the caption's keys and values still once per prompt), timed at a few lengths and interpolated."""
    context, mask = model.encode_text(text)
    bias = attention_bias(mask, context.dtype)
    text_kv = [block.cross_attn.text_kv(context) for block in model.blocks]
    codes = torch.randint(0, model.config.codebook_size, (len(text), model.config.block_size), device=device)
    prefixes = tuple(min(p, model.config.block_size) for p in prefixes)

    def uncached(length: int) -> None:
        x = model.embed_codes(codes[:, :length], torch.arange(length, device=device))
        for block, kv in zip(model.blocks, text_kv, strict=True):
            x = block(x, kv, bias)
        model.head(model.ln_f(x[:, -1:]))

    times = [seconds_per_call(lambda n=n: uncached(n), device, repeat=1) for n in prefixes]
    per_image = np.interp(np.arange(1, model.config.block_size + 1), prefixes, times).sum()
    return float(per_image / (cached_step * model.config.block_size))


# --- the web page -------------------------------------------------------------------------------------------


APP_TITLES = ("红色条纹T恤 2021夏季新款", "蓝色纯色连衣裙 韩版", "黑色运动鞋 男", "白色波点帽子", "绿色手提包 女",
              "粉色口红 正品", "紫色格子裤子 宽松", "黄色香水 女士")


def bench_app(args: argparse.Namespace) -> None:
    """Over HTTP, as scripts and browsers reach it; every request must come back with its pictures. The batcher's
    draws are counted in app.py's log."""
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url, log_path = f"http://127.0.0.1:{port}", Path(tmp, "app.log")
        command = [sys.executable, str(ROOT / "app.py"), "--ckpt", os.path.abspath(args.ckpt), "--device",
                   str(device), "--port", str(port), "--max_batch", str(args.max_batch)]
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env={**os.environ, "GRADIO_TEMP_DIR": os.path.join(tmp, "cache")})
        try:
            started = time.perf_counter()
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.perf_counter() - started > 300:
                        raise SystemExit(f"app.py did not start:\n{log_path.read_text()[-2000:]}") from None
                    time.sleep(0.5)
            start_seconds = time.perf_counter() - started

            def draws() -> int:
                return log_path.read_text().count("app: drew ")

            def one(i: int) -> int:
                """Pictures in the answer to request i; 0 for an error or a refusal."""
                body = json.dumps({"data": [APP_TITLES[i % len(APP_TITLES)], 3.0, args.pictures, i, 0, 1.0]})
                posted = urllib.request.Request(f"{url}/gradio_api/call/draw", body.encode(),
                                                {"Content-Type": "application/json"})
                try:
                    event_id = json.load(urllib.request.urlopen(posted, timeout=60))["event_id"]
                    stream = urllib.request.urlopen(f"{url}/gradio_api/call/draw/{event_id}", timeout=1800).read()
                except OSError:
                    return 0
                lines = stream.decode().splitlines()
                if not any(line.startswith("event: complete") for line in lines):
                    return 0
                gallery, _ = json.loads([line for line in lines if line.startswith("data:")][-1][5:])
                return len(gallery)

            one(0)  # the first draw builds a sampler and brings the weights into the caches
            runs: dict[str, dict[str, float]] = {}
            for name, n, together in (("sequential_8", 8, False), ("concurrent_8", 8, True),
                                      ("concurrent_32", 32, True)):
                before, started = draws(), time.perf_counter()
                with ThreadPoolExecutor(n if together else 1) as pool:
                    answers = list(pool.map(one, range(n)))
                runs[name] = {"requests": n, "seconds": round(time.perf_counter() - started, 2),
                              "answered": sum(got == args.pictures for got in answers), "draws": draws() - before}
        finally:
            server.terminate()
            server.wait(timeout=60)
    ratios = {f"{name}_vs_sequential_8": round(runs[name]["seconds"] / runs["sequential_8"]["seconds"], 3)
              for name in ("concurrent_8", "concurrent_32")}
    report("app", device, f"{args.ckpt}: {args.pictures} pictures per request, --max_batch {args.max_batch}, started "
           f"in {start_seconds:.0f} s; " + "; ".join(
               f"{name.replace('_', ' ')}: {run['seconds']:.1f} s, {run['answered']}/{run['requests']} answered, "
               f"{run['draws']} draws" for name, run in runs.items())
           + f"; 8 at once take {ratios['concurrent_8_vs_sequential_8']:.2f}x and 32 at once "
           f"{ratios['concurrent_32_vs_sequential_8']:.2f}x the time of 8 in a row", ckpt=args.ckpt,
           pictures=args.pictures, max_batch=args.max_batch, start_seconds=round(start_seconds, 1), **runs, **ratios)
    lost = sum(run["requests"] - run["answered"] for run in runs.values())
    if lost:
        raise SystemExit(f"app: {lost} requests came back without their {args.pictures} pictures")


# --- everything a lent GPU should measure -------------------------------------------------------------------


def bench_gpu(args: argparse.Namespace) -> None:
    """Every GPU figure in one call, each part in its own process with a time limit so that a crash or a hang
    costs only its part. One table on stdout, everything in --out."""
    recipe = "config/muge_16gb.py"
    train_flags = ["--codebook_size", "16384", "--gpu_memory_gib", "16", "--device", "cuda", "--steps", "12"]
    parts = [
        ("vqgan", ["vqgan", "--device", "cuda", "--batch_size", "32", "--compile"], 60),
        ("generate", ["generate", recipe, "--device", "cuda", "--vqgan", "f16_1024", "--limit", "0", "--batch_size",
                      "256"], 150),
        ("steps", ["steps", recipe, "--device", "cuda", "--batch_size", "1,64,256", "--compile", "--no_cache"], 90),
        *((f"train{b}", ["train", recipe, *train_flags, f"--batch_size={b}",
                          f"--gradient_accumulation_steps={32 // b}"], 75) for b in (8, 16, 32)),
        ("vqgan-train", ["vqgan-train", "--device", "cuda", "--batch_size", "8", "--disc"], 45),
    ]
    results, started = [], time.perf_counter()
    for name, argv, limit in parts:
        left = args.budget - (time.perf_counter() - started)
        if left < 20:
            results.append({"part": name, "rc": None, "error": "skipped: out of time"})
            continue
        results.append(run_part(name, [sys.executable, str(ROOT / "bench.py"), *argv], min(limit, left)))
    results.append(demo_training(args.budget - (time.perf_counter() - started)))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        figures = {k: v for k, v in r.items() if k not in ("part", "machine", "log_tail")}
        print(f"{r['part']:>12}: {json.dumps(figures)[:400]}")
    print(f"bench gpu: {time.perf_counter() - started:.0f} s; all results in {args.out}")


def run_logged(command: list[str], limit: float, cwd: str | Path) -> tuple[str, int | str]:
    """(stdout + stderr, return code or "timeout") of a command run for at most `limit` seconds."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=cwd)
        return done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        # what a killed command had written comes back as bytes, even with text=True
        output = [o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in (e.stdout, e.stderr)]
        return "".join(output), "timeout"


def run_part(name: str, command: list[str], limit: float) -> dict:
    """Run one part; its RESULT line, or its return code and the tail of its log."""
    log, rc = run_logged(command, limit, ROOT)
    found = [json.loads(line[7:]) for line in log.splitlines() if line.startswith("RESULT ")]
    if not found:
        return {"part": name, "rc": rc, "log_tail": log[-1500:]}
    return {**found[-1], "part": name, "rc": rc, **({"more": found[:-1]} if len(found) > 1 else {})}


def demo_training(budget: float) -> dict:
    """The 16 GB recipe for 200 steps on the demo data (prepare.py's defaults): the loss must fall, never NaN."""
    if budget < 60:
        return {"part": "demo-train", "rc": None, "error": "skipped: out of time"}
    deadline = time.monotonic() + budget
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(ROOT / "assets", Path(tmp, "assets"))
        steps = [[sys.executable, str(ROOT / "prepare.py")],
                 [sys.executable, str(ROOT / "train.py"), str(ROOT / "config/muge_16gb.py"), "--data_dir=data/demo",
                  "--out_dir=out", "--max_iters=200", "--eval_interval=100", "--log_interval=20", "--eval_iters=5",
                  "--warmup_iters=20"]]
        log, rc = "", 0
        for command in steps:
            output, rc = run_logged(command, max(1.0, deadline - time.monotonic()), tmp)
            log += output
            if rc:
                break
    losses = [line for line in log.splitlines() if line.startswith(("step ", "iter "))]
    return {"part": "demo-train", "rc": rc, "log": losses[-12:], **({} if not rc else {"log_tail": log[-1500:]})}


# --- command line -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="part", required=True)
    parts: dict[str, argparse.ArgumentParser] = {}
    for name, run, help_text in (
            ("gpu", bench_gpu, "every GPU figure in one call (needs CUDA)"),
            ("app", bench_app, "app.py under load: 8 requests in a row, then 8 and 32 at once over HTTP"),
            ("vqgan", bench_vqgan, "VQGAN encode/decode images/s at full size"),
            ("vqgan-train", bench_vqgan_train, "VQGAN training images/s (vqgan/train.py's step)"),
            ("train", bench_train, "train.py tokens/s, MFU and memory on synthetic MUGE-shaped data; other flags go "
             "to train.py"),
            ("prepare", bench_prepare, "prepare.py rows/s and peak memory on generated MUGE-format TSVs"),
            ("generate", bench_generate, "generate.py end to end on MUGE captions (random weights): seconds and the "
             "split"),
            ("steps", bench_steps, "seconds per decode step, eager and compiled, and the cache's gain")):
        parts[name] = subparsers.add_parser(name, help=help_text, description=help_text)
        parts[name].set_defaults(run=run)
        if name != "train":  # train.py takes its own --device
            parts[name].add_argument("--device", help="cuda, cpu, ... (default: the best there is)")

    def add(names: str, *flag: str, **options: Any) -> None:
        for name in names.split():  # space-separated subcommands
            parts[name].add_argument(*flag, **options)

    add("vqgan vqgan-train steps", "--repeat", type=int, default=3, help="timed calls; the median is reported")
    add("prepare generate", "--vqgan", choices=["tiny", "f16_1024", "small"], default="tiny", help=VQGAN_CHOICES)
    add("gpu", "--budget", type=float, default=480, help="seconds for all parts together (default: 480)")
    add("gpu", "--out", default="bench_gpu.json", help="where the results go (default: bench_gpu.json)")
    add("app", "--ckpt", default="out/best.pt", help="train.py checkpoint (default: out/best.pt, make demo's)")
    add("app", "--max_batch", type=int, default=16, help="app.py --max_batch (default: 16)")
    add("app", "--pictures", type=int, default=4, help="pictures per request (default: 4)")
    add("vqgan", "--batch_size", type=int, default=8, help="images per call")
    add("vqgan-train", "--batch_size", type=int, default=8, help="images per step")
    add("vqgan vqgan-train", "--image_size", type=int, default=256, help="square image side in pixels")
    add("vqgan", "--n_embed", type=int, default=1024, help="codebook size (1024 or 16384 for the taming models)")
    add("vqgan", "--decode_dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU)")
    add("vqgan", "--compile", action="store_true", help="also time a compiled decoder")
    add("vqgan-train", "--ckpt", help="the architecture and weights of this VQGAN, e.g. assets/vqgan_demo.pt "
        "(default: the full-size f16 architecture, random weights)")
    add("vqgan-train", "--disc", action="store_true", help="include the patch discriminator and its adaptive weight")
    add("vqgan-train", "--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    add("train", "config", nargs="?", help="a train.py recipe, e.g. config/tiny_cpu.py (none: the demo defaults)")
    add("train", "--steps", type=int, default=20, help="optimizer steps; the first interval is left out")
    add("train", "--rows", type=int, default=512, help="synthetic training rows")
    add("train", "--codebook_size", type=int, default=1024, help="codebook of the synthetic codes")
    add("train", "--grid", type=int, default=16, help="code grid side")
    add("train", "--text_len", type=int, default=64, help="caption tokens")
    add("train", "--text_vocab_size", type=int, default=5000, help="size of the synthetic char vocab")
    add("train", "--gpu_memory_gib", type=float, default=0, help="on CUDA, cap this process's memory, e.g. 16 to "
        "stand in for a 16 GB card")
    add("train", "--estimate_memory", action="store_true", help="also predict what a GPU needs at batch 1, 8, 16, 32 "
        "from CPU measurements")
    add("prepare", "--rows", default="256", help="image rows; several comma-separated sizes run one after another")
    add("prepare", "--image_size", type=int, default=256, help="prepare.py --image_size")
    add("prepare", "--source_size", type=int, default=256, help="side of the generated JPEGs")
    add("prepare", "--batch_size", type=int, default=32, help="prepare.py --batch_size")
    add("prepare", "--num_workers", type=int, help="prepare.py --num_workers (default: its own)")
    # generate and steps share the GPT's shape and the sampling flags
    add("generate steps", "config", nargs="?", help="a train.py recipe for the GPT's shape, e.g. config/muge_16gb.py")
    add("generate", "--batch_size", default="32", help="comma-separated batch sizes, each timed in turn")
    add("steps", "--batch_size", default="1,64,256", help="comma-separated batch sizes, each timed in turn")
    add("generate steps", "--cfg_scale", type=float, default=3.0, help="guidance scale (1: no unconditional stream)")
    add("generate steps", "--text_len", type=int, default=64, help="caption tokens")
    add("generate", "--captions", help=f"img_id<TAB>caption TSV (default: {MUGE_CAPTIONS})")
    add("generate", "--limit", type=int, default=64, help="captions to draw, the first ones (0: all)")
    add("generate", "--image_size", type=int, default=256, help="decoded side; the code grid is this / the VQGAN's "
        "factor (32 for --vqgan small)")
    add("generate", "--compile", choices=["true", "false"], help="generate.py --compile")
    add("steps", "--codebook_size", type=int, default=16384, help="codebook of the GPT")
    add("steps", "--grid", type=int, default=16, help="code grid side")
    add("steps", "--dtype", help="float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    add("steps", "--compile", action="store_true", help="also time the compiled step")
    add("steps", "--no_cache", action="store_true", help="also time the uncached step and give the ratio")
    return parser


def main() -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args()
    if args.part != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run(args, rest) if args.part == "train" else args.run(args)


if __name__ == "__main__":
    main()
