"""Benchmarks, one subcommand per part; results go to BENCHMARKS.md with the machine named. Random weights
throughout: they cost what trained ones do. Every part prints its figures and one `RESULT {json}` line, which
`bench.py gpu` (everything a lent GPU should measure) collects into one table and bench_gpu.json.

    python bench.py gpu
    python bench.py train config/muge_16gb.py --steps 3 --batch_size 1 --device cpu --estimate_memory
    python bench.py generate config/muge_16gb.py --device cuda --vqgan f16_1024 --limit 0 --batch_size 256
    python bench.py steps config/muge_16gb.py --batch_size 1,64,256 --no_cache
    python bench.py prepare --vqgan small --image_size 64 --rows 2000,20000
"""

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import os
import platform
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
from vqgan import VQGAN, VQGANConfig, load_vqgan, save_checkpoint_atomic
from vqgan.train import VQGANTrainConfig, make_optimizers, train_step

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"  # fixtures and data beside the development checkout
MUGE_CAPTIONS = SHARED / "data" / "muge_t2i_captions_5k.tsv"
SKIPPED = {"rc": None, "error": "skipped: out of time"}
VQGAN_CHOICES = "tiny: the taming fixture; f16_1024: full size, random weights; small: a random f4"


def report(part: str, device: torch.device, setting: str, **figures: Any) -> None:
    """The machine and the figures for people (three digits), then the `RESULT {json}` that `bench.py gpu` collects."""
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        cpu = platform.processor() or platform.machine()
        with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:  # Linux names the model
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        machine = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    print(f"machine: {machine}\n{part} {setting}: " + ", ".join(f"{k} {rounded(v)}" for k, v in figures.items()))
    print(f"RESULT {json.dumps({'part': part, 'machine': machine, **figures})}", flush=True)


def rounded(figure: Any) -> Any:
    if isinstance(figure, dict):
        return {k: rounded(v) for k, v in figure.items()}
    return float(f"{figure:.3g}") if isinstance(figure, float) else figure


def seconds_per_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 3) -> float:
    """Median wall time of `fn`; every call waits for the GPU work it queued, so none spills into the next."""
    times = []
    for _ in range(warmup + repeat):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[warmup:])[repeat // 2]  # the median


def data_meta(grid: int, codebook_size: int, text_len: int, text_vocab_size: int, image_size: int) -> dict:
    """prepare.py's meta.json for data of this shape, the captions in a char vocab."""
    return {"image_size": image_size, "code_grid": [grid, grid], "codebook_size": codebook_size,
            "text_len": text_len, "tokenizer": "vocab.txt", "text_vocab_size": text_vocab_size, "pad_id": 0}


def recipe_config(recipe: str | None, meta: dict) -> GPTConfig:
    """The GPT train.py builds from a recipe (none: the demo's settings) and data of this meta."""
    (_, config), _ = configure([recipe] if recipe else [], (train.TrainConfig, GPTConfig), "bench.py", "")
    return dataclasses.replace(config, **train.model_settings_from_meta(meta))


def vqgan_checkpoint(name: str, folder: str) -> str:
    """The checkpoint of one of VQGAN_CHOICES."""
    if name == "tiny":
        path = SHARED / "fixtures" / "taming" / "tiny_f16" / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise SystemExit(f"{path} not found: the tiny fixture is only present in development")
        return str(path)
    # VQGANConfig's defaults are imagenet_f16_1024's architecture
    config = VQGANConfig() if name == "f16_1024" else VQGANConfig(
        ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_levels=(), z_channels=4, embed_dim=4, n_embed=64)
    torch.manual_seed(0)
    path = os.path.join(folder, f"{name}.pt")
    save_checkpoint_atomic({"state_dict": VQGAN(config).state_dict(), "config": dataclasses.asdict(config)}, path)
    return path


def bench_vqgan(args: argparse.Namespace) -> None:
    """VQGAN encode/decode images/s at full size.
    Encoding in exact fp32; decoding also as generate.py does it on a GPU (bfloat16 weights, then channels-last,
    the one model converted in place) and, with --compile, compiled."""
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(n_embed=args.n_embed)).to(device).eval()
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    codes, dtype = model.encode(x), pick_dtype(device, args.decode_dtype)
    images_per_sec = lambda fn, warmup=1: args.batch_size / seconds_per_call(fn, device, warmup, args.repeat)
    decode = lambda: model.decode(codes)
    figures = {"encode_fp32": images_per_sec(lambda: model.encode(x)), "decode_fp32": images_per_sec(decode)}
    if dtype != torch.float32:
        model.to(dtype)
        figures[f"decode_{str(dtype)[6:]}"] = images_per_sec(decode)
        model.to(memory_format=torch.channels_last)
        figures[f"decode_{str(dtype)[6:]}_channels_last"] = images_per_sec(decode)
    if args.compile:
        model.to(dtype, memory_format=torch.channels_last)
        model.decoder = torch.compile(model.decoder)
        figures["decode_compiled"] = images_per_sec(decode, warmup=2)
    report("vqgan", device, f"f16_{args.n_embed}, {args.image_size} px", batch_size=args.batch_size,
           images_per_sec=figures, memory_gib=memory_gib(device))


def bench_vqgan_train(args: argparse.Namespace) -> None:
    """VQGAN training images/s: vqgan/train.py's step, with or without the discriminator."""
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    torch.manual_seed(0)
    model = (load_vqgan(args.ckpt).requires_grad_(True) if args.ckpt else VQGAN(VQGANConfig())).to(device).train()
    settings = VQGANTrainConfig(data=["unused"], batch_size=args.batch_size, disc_start=0 if args.disc else -1)
    optimizers = make_optimizers(model, settings, device, dtype)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    step = lambda: train_step(model, x, settings, 1000, optimizers, device, dtype)
    rate = args.batch_size / seconds_per_call(step, device, repeat=args.repeat)
    report("vqgan-train", device, f"{args.ckpt or 'f16'}, {args.image_size} px, {str(dtype)[6:]}",
           batch_size=args.batch_size, disc=args.disc, images_per_sec=rate, memory_gib=memory_gib(device))


def write_synthetic_data(data_dir: str, rows: int, meta: dict) -> None:
    """Random codes and captions in prepare.py's layout: the speed of a step does not depend on the values."""
    rng = np.random.default_rng(0)
    os.makedirs(data_dir)
    (grid, _), text_len = meta["code_grid"], meta["text_len"]
    for split, n in (("train", rows), ("val", max(1, rows // 8))):
        rng.integers(0, meta["codebook_size"], (n, grid * grid), dtype=np.uint16).tofile(f"{data_dir}/{split}.img.bin")
        text = rng.integers(1, meta["text_vocab_size"], (n, text_len), dtype=np.uint16)
        text[:, text_len // 2 :] = 0  # captions are right-padded
        text.tofile(f"{data_dir}/{split}.txt.bin")
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


def bench_train(args: argparse.Namespace) -> None:
    """train.py's tokens/s, MFU and memory on synthetic MUGE-shaped data; flags bench.py does not know go to it."""
    meta = data_meta(args.grid, args.codebook_size, args.text_len, args.text_vocab_size, image_size=args.grid * 16)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_data(f"{tmp}/data", args.rows, meta)
        argv = [*([args.config] if args.config else []), *args.train_flags, f"--data_dir={tmp}/data",
                f"--out_dir={tmp}/out", f"--max_iters={args.steps}", f"--eval_interval={args.steps + 1}",
                "--eval_iters=1", "--log_interval=1", "--warmup_iters=0"]
        tc, model_config, _ = train.parse_args(argv)
        device = pick_device(tc.device or None)
        if args.gpu_memory_gib and device.type == "cuda":  # the allocator refuses to go past a smaller card's size
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib * 2**30 / total), device)
        summary = train.main(argv)
    config = dataclasses.replace(model_config, **train.model_settings_from_meta(meta))
    rate, peak = summary["tokens_per_sec"], tc.peak_flops or peak_flops(device)
    with torch.device("meta"):  # only its FLOP count is wanted
        model_flops = GPT(config).flops_per_sample()
    figures = {"params_m": summary["params"] / 1e6, "tokens_per_iter": summary["tokens_per_iter"],
               "tokens_per_sec": rate, "memory_gib": summary["memory_gib"], "batch_size": tc.batch_size,
               "epoch_minutes": 90_000 * args.grid**2 / rate / 60 if rate else None,
               "mfu": model_flops * rate / args.grid**2 / peak if rate and peak else None}
    if args.estimate_memory:  # GiB, bf16
        figures["estimated_card_gib"] = estimate_gpu_memory(config, [1, 8, 16, 32])
    report("train", device, " ".join([args.config or "(demo)", *args.train_flags]), config=args.config, **figures)


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
    os.makedirs(data_dir)
    with open(f"{data_dir}/T2I_train.img.tsv", "w") as images, open(f"{data_dir}/T2I_train.text.tsv", "w") as texts:
        for i in range(rows):
            images.write(f"{i:032x}\t{pictures[i % len(pictures)]}\n")
            texts.write(f"{i:032x}\t{captions[i % len(captions)]}\n")
    return os.path.getsize(f"{data_dir}/T2I_train.img.tsv")


def bench_prepare(args: argparse.Namespace) -> None:
    """prepare.py's rows/s and peak memory on generated MUGE-format TSVs.
    Each size runs in a fresh process, so that its peak memory is its own."""
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = vqgan_checkpoint(args.vqgan, tmp)
        for rows in args.rows:
            with tempfile.TemporaryDirectory(dir=tmp) as work:  # one size's TSVs go before the next's are written
                tsv_bytes = write_muge_tsvs(f"{work}/muge", rows, args.source_size)
                flags = ["--data_dir", f"{work}/muge", "--vqgan_ckpt", ckpt, "--out_dir", f"{work}/out", "--device",
                         str(device), "--image_size", str(args.image_size), "--batch_size", str(args.batch_size)]
                flags += ["--num_workers", str(args.num_workers)] if args.num_workers is not None else []
                subprocess.run([sys.executable, ROOT / "prepare.py", *flags], check=True, stderr=subprocess.DEVNULL)
                meta = json.loads(Path(work, "out", "meta.json").read_text())
            report("prepare", device, f"--vqgan {args.vqgan}", rows=rows, tsv_mib=round(tsv_bytes / 2**20, 1),
                   seconds=meta["seconds"], rows_per_sec=rows / meta["seconds"],
                   peak_memory_gib=meta["peak_memory_gib"])


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
    vocab = build_char_vocab(captions)
    write_vocab(vocab, os.path.join(folder, "vocab.txt"))
    meta = data_meta(image_size // vq.downsample_factor, vq.codebook_size, text_len, len(vocab), image_size)
    config = recipe_config(recipe, meta)
    torch.manual_seed(0)
    checkpoint = {"kind": "gpt", "model": GPT(config).state_dict(), "model_config": dataclasses.asdict(config),
                  "meta": {**meta, "vqgan_ckpt": os.path.abspath(vqgan_path)}, "data_dir": os.path.abspath(folder)}
    save_checkpoint_atomic(checkpoint, os.path.join(folder, "best.pt"))
    return os.path.join(folder, "best.pt")


def bench_generate(args: argparse.Namespace) -> None:
    """generate.py end to end on MUGE captions, and its time split, per batch size, with a random-weight GPT."""
    device = pick_device(args.device)
    rows = benchmark_captions(Path(args.captions or MUGE_CAPTIONS), args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(tmp, args.config, vqgan_checkpoint(args.vqgan, tmp), [c for _, c in rows],
                                args.image_size, args.text_len)
        Path(tmp, "prompts.tsv").write_text("".join(f"{i}\t{c}\n" for i, c in rows), encoding="utf-8")
        for batch_size in args.batch_size:
            flags = ["--ckpt", ckpt, "--batch_size", str(batch_size), "--cfg_scale", str(args.cfg_scale),
                     "--device", str(device), "--prompts", f"{tmp}/prompts.tsv"]
            flags += ["--compile", args.compile] if args.compile else []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            with open(os.path.join(tmp, "T2I_test.tsv"), "wb") as out:
                split = generate.run(generate.build_parser().parse_args(flags), out)
            split.pop("warnings", None)
            report("generate", device, f"{args.config or '(demo)'} --vqgan {args.vqgan}", config=args.config,
                   captions=len(rows), batch_size=batch_size, cfg_scale=args.cfg_scale,
                   total_seconds=time.perf_counter() - started, **split, memory_gib=memory_gib(device))


def bench_steps(args: argparse.Namespace) -> None:
    """Milliseconds per decode step, eager and compiled, and how many times longer an image takes uncached."""
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    config = recipe_config(args.config, data_meta(args.grid, args.codebook_size, args.text_len, 5000, args.grid * 16))
    torch.manual_seed(0)
    model = GPT(config).to(device, dtype).eval()
    figures: dict[str, dict[int, float]] = {"eager_ms": {}, "compiled_ms": {}, "no_cache_ratio": {}}
    for batch in args.batch_size:
        text = torch.randint(1, 5000, (batch, args.text_len), device=device)
        text[:, args.text_len // 2 :] = 0
        for mode in ("eager", "compiled") if args.compile else ("eager",):
            sampler = Sampler(model, batch, cfg_scale=args.cfg_scale, compile=mode == "compiled")
            sampler.prefill(text)
            sampler.keys.copy_(row_keys(0, range(batch)).flatten().to(device))
            sampler.pos.fill_(config.block_size // 2)
            steps = lambda sampler=sampler: decode_steps(sampler, 16)
            figures[f"{mode}_ms"][batch] = 1000 * seconds_per_call(steps, device, 3, args.repeat) / 16
        if args.no_cache:
            figures["no_cache_ratio"][batch] = no_cache_ratio(model, text, figures["eager_ms"][batch] / 1000, device)
    report("steps", device, f"{args.config or '(demo)'}, {model.num_params() / 1e6:.0f}M parameters, {str(dtype)[6:]}",
           config=args.config, cfg_scale=args.cfg_scale, **figures)


@torch.no_grad()
def decode_steps(sampler: Sampler, n: int) -> None:
    for _ in range(n):
        sampler.tokens.copy_(sampler.step(sampler.tokens, sampler.pos))


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


APP_TITLES = ("红色条纹T恤 2021夏季新款", "蓝色纯色连衣裙 韩版", "黑色运动鞋 男", "白色波点帽子", "绿色手提包 女",
              "粉色口红 正品", "紫色格子裤子 宽松", "黄色香水 女士")
APP_RUNS = {"sequential_8": (8, 1), "concurrent_8": (8, 8), "concurrent_32": (32, 32)}  # requests, at once


def pictures_drawn(url: str, title: str, pictures: int, seed: int) -> int:
    """Pictures in app.py's answer to one request over its HTTP API; 0 for an error or a refusal."""
    body = json.dumps({"data": [title, 3.0, pictures, seed, 0, 1.0]}).encode()
    request = urllib.request.Request(f"{url}/gradio_api/call/draw", body, {"Content-Type": "application/json"})
    try:
        event_id = json.load(urllib.request.urlopen(request, timeout=60))["event_id"]
        stream = urllib.request.urlopen(f"{url}/gradio_api/call/draw/{event_id}", timeout=1800).read().decode()
    except OSError:
        return 0
    if "event: complete" not in stream:
        return 0
    gallery, _ = json.loads([line for line in stream.splitlines() if line.startswith("data:")][-1][5:])
    return len(gallery)


def bench_app(args: argparse.Namespace) -> None:
    """app.py under load over HTTP: 8 requests in a row, then 8 and 32 at once.
    Every request must come back with its pictures; the batcher's draws are counted in app.py's log."""
    device = pick_device(args.device)
    with socket.socket() as free:  # a port no one listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp, open(f"{tmp}/app.log", "w") as log:
        command = [sys.executable, ROOT / "app.py", "--ckpt", os.path.abspath(args.ckpt), "--device", str(device),
                   "--port", str(port), "--max_batch", str(args.max_batch)]
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env={**os.environ, "GRADIO_TEMP_DIR": f"{tmp}/cache"})
        draw = lambda i: pictures_drawn(url, APP_TITLES[i % len(APP_TITLES)], args.pictures, i)
        draws_logged = lambda: Path(log.name).read_text().count("app: drew ")
        try:
            started = time.perf_counter()
            while True:
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(url, timeout=2)
                    break
                if server.poll() is not None or time.perf_counter() - started > 300:
                    raise SystemExit(f"app.py did not start:\n{Path(log.name).read_text()[-2000:]}")
                time.sleep(0.5)
            figures = {"start_seconds": round(time.perf_counter() - started, 1)}
            draw(0)  # the first draw builds a sampler and brings the weights into the caches
            for name, (requests, workers) in APP_RUNS.items():
                draws_before, started = draws_logged(), time.perf_counter()
                with ThreadPoolExecutor(workers) as pool:
                    answers = list(pool.map(draw, range(requests)))
                figures[name] = {"requests": requests, "seconds": round(time.perf_counter() - started, 2),
                                 "answered": answers.count(args.pictures), "draws": draws_logged() - draws_before}
        finally:
            server.terminate()
            server.wait(timeout=60)
    for name in ("concurrent_8", "concurrent_32"):
        figures[f"{name}_vs_sequential_8"] = round(figures[name]["seconds"] / figures["sequential_8"]["seconds"], 3)
    report("app", device, "under load", ckpt=args.ckpt, pictures=args.pictures, max_batch=args.max_batch, **figures)
    lost = sum(figures[name]["requests"] - figures[name]["answered"] for name in APP_RUNS)
    if lost:
        raise SystemExit(f"app: {lost} requests came back without their {args.pictures} pictures")


def bench_gpu(args: argparse.Namespace) -> None:
    """Every GPU figure in one call (needs CUDA): one table on stdout, everything in --out.
    Each part runs in its own process with a time limit, so that a crash or a hang costs only its part."""
    recipe = "config/muge_16gb.py"
    parts = [("vqgan", "vqgan --device cuda --batch_size 32 --compile", 60),
             ("generate", f"generate {recipe} --device cuda --vqgan f16_1024 --limit 0 --batch_size 256", 150),
             ("steps", f"steps {recipe} --device cuda --batch_size 1,64,256 --compile --no_cache", 90),
             *((f"train{b}", f"train {recipe} --codebook_size 16384 --gpu_memory_gib 16 --device cuda --steps 12 "
                f"--batch_size={b} --gradient_accumulation_steps={32 // b}", 75) for b in (8, 16, 32)),
             ("vqgan-train", "vqgan-train --device cuda --batch_size 8 --disc", 45)]
    results, started = [], time.perf_counter()
    for name, command, limit in parts:
        left = args.budget - (time.perf_counter() - started)
        command = [sys.executable, ROOT / "bench.py", *command.split()]
        results.append(run_part(name, command, min(limit, left)) if left >= 20 else {"part": name, **SKIPPED})
    results.append(demo_training(args.budget - (time.perf_counter() - started)))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        figures = {k: v for k, v in r.items() if k not in ("part", "machine", "log_tail")}
        print(f"{r['part']:>12}: {json.dumps(figures)[:400]}")
    print(f"bench gpu: {time.perf_counter() - started:.0f} s; all results in {args.out}")


def run_logged(command: list[str | Path], limit: float, cwd: str | Path) -> tuple[str, int | str]:
    """(stdout + stderr, return code or "timeout") of a command run for at most `limit` seconds."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=cwd)
        return done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        # what a killed command had written comes back as bytes, even with text=True
        output = [o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in (e.stdout, e.stderr)]
        return "".join(output), "timeout"


def run_part(name: str, command: list[str | Path], limit: float) -> dict:
    """Run one part; its RESULT line, or its return code and the tail of its log."""
    log, rc = run_logged(command, limit, ROOT)
    found = [json.loads(line[7:]) for line in log.splitlines() if line.startswith("RESULT ")]
    if not found:
        return {"part": name, "rc": rc, "log_tail": log[-1500:]}
    return {**found[-1], "part": name, "rc": rc, **({"more": found[:-1]} if len(found) > 1 else {})}


def demo_training(budget: float) -> dict:
    """The 16 GB recipe for 200 steps on the demo data (prepare.py's defaults): the loss must fall, never NaN."""
    if budget < 60:
        return {"part": "demo-train", **SKIPPED}
    deadline, log, rc = time.monotonic() + budget, "", 0
    train_flags = ["--data_dir=data/demo", "--out_dir=out", "--max_iters=200", "--eval_interval=100",
                   "--log_interval=20", "--eval_iters=5", "--warmup_iters=20"]
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(ROOT / "assets", Path(tmp, "assets"))
        for command in ([ROOT / "prepare.py"], [ROOT / "train.py", ROOT / "config/muge_16gb.py", *train_flags]):
            output, rc = run_logged([sys.executable, *command], max(1.0, deadline - time.monotonic()), tmp)
            log += output
            if rc:
                break
    losses = [line for line in log.splitlines() if line.startswith(("step ", "iter "))]
    return {"part": "demo-train", "rc": rc, "log": losses[-12:], **({"log_tail": log[-1500:]} if rc else {})}


def sizes(text: str) -> list[int]:
    """The argparse type of a comma-separated list such as --batch_size 1,64,256."""
    return [int(size) for size in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="part", required=True)
    parts: dict[str, argparse.ArgumentParser] = {}
    for run in (bench_gpu, bench_app, bench_vqgan, bench_vqgan_train, bench_train, bench_prepare, bench_generate,
                bench_steps):
        name = run.__name__.removeprefix("bench_").replace("_", "-")
        parts[name] = subparsers.add_parser(name, help=run.__doc__.splitlines()[0], description=run.__doc__)
        parts[name].set_defaults(run=run)

    def add(names: str, flag: str, default: Any, help_text: str, **options: Any) -> None:
        """`flag` on each of the space-separated subcommands, typed as its default; a False default is a switch."""
        if default is False:
            options["action"] = "store_true"
        elif default is not None:
            options.setdefault("type", type(default))
            help_text += " (default: %(default)s)"
        for name in names.split():
            parts[name].add_argument(flag, default=default, help=help_text, **options)

    add("app vqgan vqgan-train prepare generate steps", "--device", None, "cuda, cpu, ... (default: the best there is)")
    add("train generate steps", "config", None, "a train.py recipe, e.g. config/muge_16gb.py (none: the demo's)",
        nargs="?")
    add("vqgan vqgan-train steps", "--repeat", 3, "timed calls; the median is reported")
    add("prepare generate", "--vqgan", "tiny", VQGAN_CHOICES, choices=["tiny", "f16_1024", "small"])
    add("vqgan-train steps", "--dtype", None, "float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    add("train steps", "--grid", 16, "code grid side")
    add("train generate steps", "--text_len", 64, "caption tokens")
    add("generate steps", "--cfg_scale", 3.0, "guidance scale (1: no unconditional stream)")
    add("gpu", "--budget", 480.0, "seconds for all parts together")
    add("gpu", "--out", "bench_gpu.json", "where the results go")
    add("app", "--ckpt", "out/best.pt", "train.py checkpoint (make demo's)")
    add("app", "--max_batch", 16, "app.py --max_batch")
    add("app", "--pictures", 4, "pictures per request")
    add("vqgan vqgan-train", "--batch_size", 8, "images per timed call")
    add("vqgan vqgan-train", "--image_size", 256, "square image side in pixels")
    add("vqgan", "--n_embed", 1024, "codebook size (1024 or 16384 for the taming models)")
    add("vqgan", "--decode_dtype", None, "float32, bfloat16 or float16 (default: bf16 on GPU)")
    add("vqgan", "--compile", False, "also time a compiled decoder")
    add("vqgan-train", "--ckpt", None, "the architecture and weights of this VQGAN, e.g. assets/vqgan_demo.pt "
        "(default: the full-size f16 architecture, random weights)")
    add("vqgan-train", "--disc", False, "include the patch discriminator and its adaptive weight")
    add("train", "--steps", 20, "optimizer steps; the first interval is left out")
    add("train", "--rows", 512, "synthetic training rows")
    add("train", "--codebook_size", 1024, "codebook of the synthetic codes")
    add("train", "--text_vocab_size", 5000, "size of the synthetic char vocab")
    add("train", "--gpu_memory_gib", 0.0, "on CUDA, cap this process's memory, e.g. 16 to stand in for a 16 GB card")
    add("train", "--estimate_memory", False, "also predict what a GPU needs at batch 1, 8, 16, 32 from CPU figures")
    add("prepare", "--rows", "256", "image rows; comma-separated sizes run one after another", type=sizes)
    add("prepare", "--image_size", 256, "prepare.py --image_size")
    add("prepare", "--source_size", 256, "side of the generated JPEGs")
    add("prepare", "--batch_size", 32, "prepare.py --batch_size")
    add("prepare", "--num_workers", None, "prepare.py --num_workers (default: its own)", type=int)
    add("generate", "--batch_size", "32", "comma-separated batch sizes, each timed in turn", type=sizes)
    add("generate", "--captions", None, f"img_id<TAB>caption TSV (default: {MUGE_CAPTIONS})")
    add("generate", "--limit", 64, "captions to draw, the first ones (0: all)")
    add("generate", "--image_size", 256, "decoded side: the VQGAN's factor times the code grid (32 for small)")
    add("generate", "--compile", None, "generate.py --compile", choices=["true", "false"])
    add("steps", "--batch_size", "1,64,256", "comma-separated batch sizes, each timed in turn", type=sizes)
    add("steps", "--codebook_size", 16384, "codebook of the GPT")
    add("steps", "--compile", False, "also time the compiled step")
    add("steps", "--no_cache", False, "also time the uncached step and give the ratio")
    return parser


def main() -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args()
    if rest and args.part != "train":  # only train passes flags on, to train.py
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.train_flags = rest
    args.run(args)


if __name__ == "__main__":
    main()
