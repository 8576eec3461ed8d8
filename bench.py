"""Throughput benchmarks, one subcommand per part. Results go to BENCHMARKS.md with the machine named.

    python bench.py vqgan --batch_size 8
    python bench.py vqgan --device cuda --batch_size 64 --decode_dtype bfloat16
    python bench.py vqgan-train --ckpt assets/vqgan_demo.pt --image_size 64 --batch_size 16
    python bench.py vqgan-train --device cuda --batch_size 8 --disc
    python bench.py train config/tiny_cpu.py --steps 30
    python bench.py train config/muge_16gb.py --steps 3 --batch_size 1 --device cpu --estimate_memory
    python bench.py prepare --vqgan tiny --rows 256
    python bench.py prepare --vqgan small --image_size 64 --rows 2000,20000
    OMP_NUM_THREADS=1 python bench.py generate config/tiny_cpu.py --batch_size 1,16 --limit 64
    OMP_NUM_THREADS=1 python bench.py generate config/muge_16gb.py --kv_cache_ratio --batch_size 1
    python bench.py generate config/muge_16gb.py --device cuda --vqgan f16_1024 --limit 0 --batch_size 256 \\
        --cfg_scale 1,3
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from model import GPT, GPTConfig
from utils import autocast, pick_device, pick_dtype
from vqgan import VQGAN, VQGANConfig, infer_config, save_checkpoint_atomic


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def seconds_per_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 3) -> float:
    """Median wall time of `fn`, waiting for queued GPU work so that it is counted."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

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


def peak_memory_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def bench_vqgan(args: argparse.Namespace) -> None:
    """Encode and decode throughput of the full-size f16 architecture (random weights: speed only)."""
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(n_embed=args.n_embed)).to(device).eval()
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    codes = model.encode(x)
    decode_dtype = pick_dtype(device, args.decode_dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    encode_s = seconds_per_call(lambda: model.encode(x), device, repeat=args.repeat)
    decode_s = seconds_per_call(lambda: model.decode(codes, dtype=decode_dtype), device, repeat=args.repeat)
    print(f"machine: {describe_machine(device)}")
    print(f"vqgan f16_{args.n_embed}, {args.image_size}px, batch {args.batch_size}, device {device}")
    print(f"encode fp32: {args.batch_size / encode_s:8.1f} images/s")
    print(f"decode {str(decode_dtype).removeprefix('torch.')}: {args.batch_size / decode_s:8.1f} images/s")
    print(f"peak memory: {peak_memory_gib(device)}")


def bench_vqgan_train(args: argparse.Namespace) -> None:
    """Training images/s of vqgan/train.py's own step on random images (speed only), with or without the
    patch discriminator; the architecture is a checkpoint's, or the full-size f16 one."""
    from vqgan import load_vqgan
    from vqgan.train import build_parser, make_optimizers, train_step

    device = pick_device(args.device)
    torch.manual_seed(0)
    if args.ckpt:
        model, name = load_vqgan(args.ckpt, device).requires_grad_(True), args.ckpt
    else:
        model, name = VQGAN(full_size_vqgan_config()).to(device), "imagenet_f16_1024 architecture, random weights"
    model.train()
    flags = ["--data", "unused", "--batch_size", str(args.batch_size), "--disc_start", "0" if args.disc else "-1"]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    train_args = build_parser().parse_args(flags)
    dtype = pick_dtype(device, args.dtype)
    optimizers = make_optimizers(model, train_args, device, dtype)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = seconds_per_call(lambda: train_step(model, x, train_args, 1000, optimizers, device, dtype), device,
                              repeat=args.repeat)
    print(f"machine: {describe_machine(device)}")
    params = sum(p.numel() for p in model.parameters())
    print(f"vqgan training step: {name} ({params / 1e6:.2f} M parameters), {args.image_size}px, "
          f"batch {args.batch_size}, {str(dtype).removeprefix('torch.')}, "
          f"{'with' if args.disc else 'without'} the patch discriminator, device {device}")
    print(f"throughput: {args.batch_size / step_s:.1f} images/s ({step_s:.3f} s per step, median of {args.repeat})")
    print(f"peak memory: {peak_memory_gib(device)}")


def write_synthetic_data(data_dir: str, rows: int, codebook_size: int, grid: int, text_len: int,
                         text_vocab_size: int) -> None:
    """Random codes and captions in prepare.py's layout: the speed of a step does not depend on the values."""
    rng = np.random.default_rng(0)
    for split, n in (("train", rows), ("val", max(1, rows // 8))):
        rng.integers(0, codebook_size, (n, grid * grid), dtype=np.uint16).tofile(f"{data_dir}/{split}.img.bin")
        text = rng.integers(1, text_vocab_size, (n, text_len), dtype=np.uint16)
        text[:, text_len // 2 :] = 0  # captions are right-padded
        text.tofile(f"{data_dir}/{split}.txt.bin")
    meta = {"image_size": grid * 16, "code_grid": [grid, grid], "codebook_size": codebook_size,
            "text_len": text_len, "tokenizer": "vocab.txt", "text_vocab_size": text_vocab_size, "pad_id": 0,
            "splits": {"train": {"rows": rows}, "val": {"rows": max(1, rows // 8)}}}
    with open(f"{data_dir}/meta.json", "w") as f:
        json.dump(meta, f)


def saved_activation_bytes(model: torch.nn.Module, batch_size: int, text_len: int) -> int:
    """Bytes autograd keeps for the backward pass after one bf16-autocast forward on the CPU."""
    codes = torch.randint(0, model.config.codebook_size, (batch_size, model.config.block_size))
    text = torch.randint(1, model.text_encoder.config.vocab_size, (batch_size, text_len))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast(
        torch.device("cpu"), torch.bfloat16
    ):
        model(codes, text)
    return sum(saved.values())


def estimate_gpu_memory(config: GPTConfig, batch_size: int, text_len: int) -> None:
    """Predict peak GPU memory of bf16 training from CPU measurements, since no GPU may be at hand.

    fp32 weights, gradients and AdamW's two moments take 16 bytes per trained parameter (4 per frozen one).
    What autograd saves is measured at batch 1 and 2: the difference is the per-image activations, the rest
    (mostly autocast's bf16 copies of the weights) is fixed. It is measured with dropout off, because the
    CPU's attention keeps the probabilities that the CUDA kernels recompute; the dropout masks are added by
    count (one byte per element on CUDA). The backward pass briefly holds the logits' gradient in fp32 and
    bf16 on top. Not counted: the CUDA context (~0.3-0.5 GiB) and allocator slack.
    """
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(config, dropout=0.0)).train()
    one, two = (saved_activation_bytes(model, b, text_len) for b in (1, 2))
    per_image, fixed = two - one, 2 * one - two
    if config.dropout > 0:  # after the embeddings, and after self-attention, cross-attention and MLP
        per_image += (1 + 3 * config.n_layer) * config.block_size * config.n_embd
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    states = 16 * trained + 4 * frozen
    logits_grad = 6 * config.block_size * config.codebook_size
    gib = 2**30
    print(f"memory estimate (bf16 autocast, measured on the CPU): weights+grads+AdamW {states / gib:.2f} GiB, "
          f"bf16 weight copies and other fixed saved tensors {fixed / gib:.2f} GiB, activations "
          f"{per_image / 2**20:.0f} MiB per image, logits gradient {logits_grad / 2**20:.0f} MiB per image")
    totals = ", ".join(f"batch {b}: {(states + fixed + b * (per_image + logits_grad)) / gib:.1f} GiB"
                       for b in sorted({1, 8, 16, 32, batch_size}))
    print(f"estimated peak allocated: {totals} (+ CUDA context and allocator slack)")


def bench_train(args: argparse.Namespace, train_flags: list[str]) -> None:
    """tokens/s of train.py's own loop on synthetic data shaped like MUGE's (16x16 codes, 64-token captions)."""
    import train

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        os.makedirs(data_dir)
        write_synthetic_data(data_dir, args.rows, args.codebook_size, args.grid, args.text_len, args.text_vocab_size)
        recipe = [args.config] if args.config else []
        flags = [*recipe, *train_flags, "--data_dir", data_dir, "--out_dir", os.path.join(tmp, "out"),
                 "--max_iters", str(args.steps), "--eval_interval", str(args.steps + 1), "--eval_iters", "1",
                 "--log_interval", "1", "--warmup_iters", "0"]
        tc, given = train.parse_args(flags)
        device = pick_device(tc.device or None)
        if args.gpu_memory_gib and device.type == "cuda":
            # Stand in for a smaller card: the allocator refuses to go past this much of this one.
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib * 2**30 / total), device)
        summary = train.main(flags)
        if args.estimate_memory:
            config = train.model_config_for(tc, given, train.read_meta(data_dir), None)
    rate = summary["tokens_per_sec"]
    print(f"machine: {describe_machine(device)}")
    recipe = " ".join([args.config or "(demo defaults)", *train_flags])
    print(f"train {recipe}: {summary['params'] / 1e6:.1f}M parameters, "
          f"{summary['tokens_per_iter']:,} tokens per step, device {device}")
    if rate:
        print(f"throughput: {rate:,.0f} tokens/s, {summary['tokens_per_iter'] / rate:.2f} s per step "
              f"(mean over steps 2..{args.steps}); a 90,000-image epoch at this rate: "
              f"{90_000 * args.grid**2 / rate / 60:,.1f} min")
    print(f"peak memory: {summary['peak_memory_gib']:.2f} GiB "
          f"({'allocated' if device.type == 'cuda' else 'process resident'})")
    if args.estimate_memory:
        estimate_gpu_memory(config, tc.batch_size, args.text_len)


SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "shared")
TAMING_FIXTURES = os.path.join(SHARED, "fixtures", "taming")
MUGE_CAPTIONS = os.path.join(SHARED, "data", "muge_t2i_captions_5k.tsv")


def full_size_vqgan_config() -> VQGANConfig:
    """imagenet_f16_1024's architecture, read off its tensor shapes when the key list is at hand."""
    keys = os.path.join(TAMING_FIXTURES, "imagenet_f16_1024_keys.json")
    if not os.path.isfile(keys):
        return VQGANConfig(n_embed=1024)
    with open(keys) as f:
        shapes = json.load(f)["state_dict"]
    return infer_config({k: torch.empty(shape, device="meta") for k, shape in shapes.items()}, keys)


def prepare_vqgan_checkpoint(name: str, folder: str) -> str:
    """tiny: the taming fixture; f16_1024: full size, random weights; small: a random f4 for memory runs."""
    if name == "tiny":
        path = os.path.join(TAMING_FIXTURES, "tiny_f16", "checkpoints", "last.ckpt")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found: the tiny fixture is only present in development")
        return path
    if name == "f16_1024":
        config = full_size_vqgan_config()
    else:
        config = VQGANConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_levels=(), z_channels=4, embed_dim=4,
                             n_embed=64)
    torch.manual_seed(0)
    path = os.path.join(folder, f"{name}.pt")
    save_checkpoint_atomic({"state_dict": VQGAN(config).state_dict(), "config": dataclasses.asdict(config)}, path)
    return path


def write_muge_tsvs(data_dir: str, rows: int, source_size: int) -> int:
    """T2I_train.{img,text}.tsv with `rows` JPEG product-photo stand-ins; returns the image TSV's bytes.

    64 distinct smooth pictures (JPEG sizes like real photos, unlike noise) repeat under unique ids; captions
    are the real MUGE ones when present.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(64):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        coarse.resize((source_size, source_size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        pictures.append(base64.b64encode(buffer.getvalue()).decode())
    captions = ["商品标题 T恤 2021 新款"]
    if os.path.isfile(MUGE_CAPTIONS):
        with open(MUGE_CAPTIONS, encoding="utf-8") as f:
            captions = [line.rstrip("\n").split("\t", 1)[1] for line in f if "\t" in line]
    os.makedirs(data_dir, exist_ok=True)
    with open(f"{data_dir}/T2I_train.img.tsv", "w") as images, open(f"{data_dir}/T2I_train.text.tsv", "w") as texts:
        for i in range(rows):
            images.write(f"{i:032x}\t{pictures[i % len(pictures)]}\n")
            texts.write(f"{i:032x}\t{captions[i % len(captions)]}\n")
    return os.path.getsize(f"{data_dir}/T2I_train.img.tsv")


def bench_prepare(args: argparse.Namespace) -> None:
    """prepare.py end to end on generated MUGE-format TSVs: rows/s and peak resident memory per row count.

    Each size runs in a fresh process, so that its peak memory is its own.
    """
    device = pick_device(args.device)
    run_prepare = (
        "import json, sys, prepare\n"
        "args = prepare.build_parser().parse_args(sys.argv[1:])\n"
        "print(json.dumps(prepare.prepare(args, 'bench')))"
    )
    print(f"machine: {describe_machine(device)}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = prepare_vqgan_checkpoint(args.vqgan, tmp)
        for rows in (int(n) for n in args.rows.split(",")):
            data_dir, out_dir = os.path.join(tmp, f"muge{rows}"), os.path.join(tmp, f"out{rows}")
            tsv_bytes = write_muge_tsvs(data_dir, rows, args.source_size)
            flags = ["--data_dir", data_dir, "--vqgan_ckpt", ckpt, "--out_dir", out_dir, "--device", str(device)]
            flags += ["--image_size", str(args.image_size), "--batch_size", str(args.batch_size)]
            if args.num_workers is not None:
                flags += ["--num_workers", str(args.num_workers)]
            done = subprocess.run(
                [sys.executable, "-c", run_prepare, *flags],
                cwd=os.path.dirname(os.path.abspath(__file__)),
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            memory = summary["peak_rss_mb"]
            print(
                f"prepare --vqgan {args.vqgan}: {rows} rows ({tsv_bytes / 2**20:.0f} MiB image TSV, "
                f"{args.source_size}px JPEGs -> {args.image_size}px), batch {args.batch_size}, device {device}: "
                f"{summary['rows_per_sec']:.1f} rows/s after start-up, {summary['seconds']:.1f} s in all; "
                f"peak RSS main {memory['main']} MB, largest worker {memory['largest_worker']} MB"
            )
            shutil.rmtree(data_dir)


def read_captions(path: str, limit: int) -> list[tuple[str, str]]:
    """(img_id, caption) rows of a `T2I_*.text.tsv` file, the first `limit` of them (0: all)."""
    from data import read_text_tsv

    rows = [(row.img_id, row.caption) for row in read_text_tsv(path) if row.error is None]
    return rows[:limit] if limit else rows


def write_generate_checkpoint(folder: str, recipe: str | None, vqgan_path: str, captions: list[str],
                              image_size: int, text_len: int) -> str:
    """A train.py-style checkpoint with random weights, its char vocab and meta, for generate.py to load."""
    import train
    from text import build_char_vocab, write_vocab
    from vqgan import load_vqgan

    vq = load_vqgan(vqgan_path)
    grid = image_size // vq.downsample_factor
    vocab = build_char_vocab(captions)
    write_vocab(vocab, os.path.join(folder, "vocab.txt"))
    _, model_settings = train.parse_args([recipe] if recipe else [])
    config = GPTConfig(**{**model_settings, "codebook_size": vq.codebook_size, "grid_rows": grid, "grid_cols": grid,
                          "text_len": text_len, "text_vocab_size": len(vocab)})
    torch.manual_seed(0)
    model = GPT(config)
    meta = {"image_size": image_size, "code_grid": [grid, grid], "codebook_size": vq.codebook_size,
            "text_len": text_len, "tokenizer": "vocab.txt", "text_vocab_size": len(vocab), "pad_id": 0,
            "vqgan_ckpt": os.path.abspath(vqgan_path), "test_prompts": None}
    path = os.path.join(folder, "ckpt.pt")
    save_checkpoint_atomic({"model": model.state_dict(), "model_config": dataclasses.asdict(config), "meta": meta,
                            "data_dir": os.path.abspath(folder)}, path)
    return path


def bench_generate(args: argparse.Namespace) -> None:
    """generate.py's own run (sampling, VQGAN decoding, PNG encoding, writing) over real MUGE captions with a
    random-weight GPT of a recipe's shape: images/s and the time in each stage, per batch size and guidance scale."""
    import generate

    device = pick_device(args.device)
    captions_path = args.captions or MUGE_CAPTIONS
    if not os.path.isfile(captions_path):
        raise SystemExit(f"{captions_path}: no captions file (--captions)")
    rows = read_captions(captions_path, args.limit)
    batch_sizes = [int(b) for b in args.batch_size.split(",")]
    print(f"machine: {describe_machine(device)}")
    with tempfile.TemporaryDirectory() as tmp:
        vqgan_path = prepare_vqgan_checkpoint(args.vqgan, tmp)
        ckpt = write_generate_checkpoint(tmp, args.config, vqgan_path, [c for _, c in rows], args.image_size,
                                         args.text_len)
        prompts, warmup = os.path.join(tmp, "prompts.tsv"), os.path.join(tmp, "warmup.tsv")
        for path, subset in ((prompts, rows), (warmup, rows[: max(batch_sizes)])):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(f"{img_id}\t{caption}\n" for img_id, caption in subset)
        for cfg_scale in args.cfg_scale.split(","):
            for batch_size in batch_sizes:
                flags = ["--ckpt", ckpt, "--batch_size", str(batch_size), "--cfg_scale", cfg_scale,
                         "--device", str(device)]
                if args.dtype:
                    flags += ["--dtype", args.dtype]
                # One untimed batch first: CUDA context, kernel choice and allocator warm-up are not generation.
                with open(os.devnull, "wb") as out:
                    generate.run(generate.build_parser().parse_args([*flags, "--prompts", warmup]), out)
                with open(os.path.join(tmp, "T2I_test.tsv"), "wb") as out:
                    s = generate.run(generate.build_parser().parse_args([*flags, "--prompts", prompts]), out)
                print(f"generate {args.config or '(demo defaults)'} --vqgan {args.vqgan}: {s['generated']} captions, "
                      f"batch {batch_size}, cfg {cfg_scale}, device {device}: {s['seconds']:.2f} s, "
                      f"{s['images_per_sec']:.2f} images/s; stage times (overlapping): sampling "
                      f"{s['sampling_seconds']:.2f} s, VQGAN decoding {s['decoding_seconds']:.2f} s, PNG encoding "
                      f"{s['encoding_seconds']:.2f} s in {s['encode_workers']} processes; loading "
                      f"{s['load_seconds']:.1f} s; peak memory {peak_memory_gib(device)}")


def step_with_cache(model: GPT, prefix: torch.Tensor, length: int, text_kv: list, mask: torch.Tensor,
                    caches: list) -> None:
    """The sampling step after `length` codes: one new token against the cached keys and values."""
    for cache in caches:
        cache.length = length  # forget the token that the previous call appended
    model.run_blocks(prefix[:, length:], text_kv, mask, caches)


def step_without_cache(model: GPT, prefix: torch.Tensor, text_kv: list, attn_mask: torch.Tensor) -> None:
    """The same step without a cache: all the blocks over the whole prefix, the head on its last position."""
    x = prefix
    for i, block in enumerate(model.blocks):
        x = block(x, text_kv[i], attn_mask)
    model.head(model.ln_f(x[:, -1:]))


def bench_kv_cache(args: argparse.Namespace) -> None:
    """Seconds for one sampling step with and without the KV cache at several prefix lengths, and the ratio
    for a whole image, interpolating linearly between the measured lengths.

    Without a cache every step reruns all the blocks over the whole prefix (the text keys and values are still
    computed once per prompt, and only the last position goes through the head): the fairest uncached sampler.
    """
    import train
    from model import KVCache

    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    _, model_settings = train.parse_args([args.config] if args.config else [])
    config = GPTConfig(**{**model_settings, "codebook_size": args.codebook_size, "grid_rows": args.grid,
                          "grid_cols": args.grid, "text_len": args.text_len, "text_vocab_size": 5000})
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    batch = int(args.batch_size.split(",")[0])
    text = torch.randint(1, 5000, (batch, args.text_len), device=device)
    text[:, args.text_len // 2 :] = 0
    codes = torch.randint(0, config.codebook_size, (batch, config.block_size), device=device)
    lengths = [int(p) for p in args.prefixes.split(",")]
    cached, uncached = [], []
    with torch.no_grad(), autocast(device, dtype):
        context, mask = model.encode_text(text)
        text_kv = [block.cross_attn.text_kv(context) for block in model.blocks]
        attn_mask = mask[:, None, None, :]
        for length in lengths:
            prefix = model.embed_codes(torch.cat([torch.full((batch, 1), model.start_token, device=device),
                                                  codes[:, :length]], dim=1))
            caches = [KVCache(config.block_size) for _ in model.blocks]
            if length:
                model.run_blocks(prefix[:, :length], text_kv, mask, caches)
            step = functools.partial(step_with_cache, model, prefix, length, text_kv, mask, caches)
            cached.append(seconds_per_call(step, device, repeat=args.repeat))
            step = functools.partial(step_without_cache, model, prefix, text_kv, attn_mask)
            uncached.append(seconds_per_call(step, device, repeat=args.repeat))
    positions = np.arange(config.block_size)
    total_cached = np.interp(positions, lengths, cached).sum()
    total_uncached = np.interp(positions, lengths, uncached).sum()
    print(f"machine: {describe_machine(device)}")
    print(f"KV cache, {args.config or '(demo defaults)'}: {model.num_params() / 1e6:.0f}M parameters, "
          f"{config.block_size} codes, batch {batch}, {str(dtype).removeprefix('torch.')}, device {device}")
    for length, with_cache, without in zip(lengths, cached, uncached, strict=True):
        print(f"  step at prefix {length:3d}: cached {with_cache * 1e3:8.1f} ms, uncached {without * 1e3:8.1f} ms")
    print(f"one image ({config.block_size} steps, interpolated): cached {total_cached:.1f} s, uncached "
          f"{total_uncached:.1f} s, ratio {total_uncached / total_cached:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)

    p = parts.add_parser("vqgan", help="VQGAN encode/decode images/s at full size")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: best available)")
    p.add_argument("--batch_size", type=int, default=8, help="images per call")
    p.add_argument("--image_size", type=int, default=256, help="square image side in pixels")
    p.add_argument("--n_embed", type=int, default=1024, help="codebook size (1024 or 16384 for the taming models)")
    p.add_argument("--decode_dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls; the median is reported")
    p.set_defaults(run=bench_vqgan)

    p = parts.add_parser("vqgan-train", help="VQGAN training images/s (vqgan/train.py's step)")
    p.add_argument("--ckpt", default=None,
                   help="take the architecture and weights from this VQGAN checkpoint, e.g. assets/vqgan_demo.pt "
                   "(default: the full-size f16 architecture with random weights)")
    p.add_argument("--image_size", type=int, default=256, help="square image side in pixels")
    p.add_argument("--batch_size", type=int, default=8, help="images per step")
    p.add_argument("--disc", action="store_true", help="include the patch discriminator and its adaptive weight")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: best available)")
    p.add_argument("--repeat", type=int, default=3, help="timed steps; the median is reported")
    p.set_defaults(run=bench_vqgan_train)

    p = parts.add_parser("train", help="train.py tokens/s on synthetic MUGE-shaped data; other flags go to train.py")
    p.add_argument("config", nargs="?", help="a train.py recipe, e.g. config/tiny_cpu.py (none: the demo defaults)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps; the first is left out of the mean")
    p.add_argument("--rows", type=int, default=512, help="synthetic training rows")
    p.add_argument("--codebook_size", type=int, default=1024, help="codebook of the synthetic codes")
    p.add_argument("--grid", type=int, default=16, help="code grid side")
    p.add_argument("--text_len", type=int, default=64, help="caption tokens")
    p.add_argument("--text_vocab_size", type=int, default=5000, help="size of the synthetic char vocab")
    p.add_argument("--gpu_memory_gib", type=float, default=0,
                   help="on CUDA, cap the memory this process may use, e.g. 16 to stand in for a 16 GB card")
    p.add_argument("--estimate_memory", action="store_true",
                   help="also predict bf16 GPU memory at batch 1, 8, 16, 32 and this run's from CPU measurements")
    p.set_defaults(run=bench_train)

    p = parts.add_parser("prepare", help="prepare.py rows/s and peak memory on generated MUGE-format TSVs")
    p.add_argument("--vqgan", choices=["tiny", "f16_1024", "small"], default="tiny",
                   help="tiny: the taming fixture; f16_1024: full size, random weights; small: a random f4")
    p.add_argument("--rows", default="256", help="image rows; several comma-separated sizes run one after another")
    p.add_argument("--image_size", type=int, default=256, help="prepare.py --image_size")
    p.add_argument("--source_size", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--batch_size", type=int, default=32, help="prepare.py --batch_size")
    p.add_argument("--num_workers", type=int, default=None, help="prepare.py --num_workers (default: its own)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: best available)")
    p.set_defaults(run=bench_prepare)

    p = parts.add_parser("generate", help="generate.py images/s and stage times on MUGE captions (random weights); "
                         "--kv_cache_ratio: sampling step times with and without the KV cache")
    p.add_argument("config", nargs="?", help="a train.py recipe for the GPT's shape, e.g. config/tiny_cpu.py or "
                   "config/muge_16gb.py (none: the demo defaults)")
    p.add_argument("--captions", default=None, help=f"img_id<TAB>caption TSV (default: {MUGE_CAPTIONS})")
    p.add_argument("--limit", type=int, default=64, help="captions to generate for, the first ones (0: all)")
    p.add_argument("--vqgan", choices=["tiny", "f16_1024", "small"], default="tiny",
                   help="tiny: the taming fixture (f16, 1024 codes); f16_1024: full size, random weights; small: a "
                   "random f4 with 64 codes (use --image_size 32)")
    p.add_argument("--image_size", type=int, default=256, help="decoded image side; the code grid is this / the "
                   "VQGAN's downsampling factor")
    p.add_argument("--text_len", type=int, default=64, help="caption tokens")
    p.add_argument("--batch_size", default="1,16", help="comma-separated batch sizes, each timed in turn")
    p.add_argument("--cfg_scale", default="3", help="comma-separated guidance scales (1: no unconditional stream)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--kv_cache_ratio", action="store_true",
                   help="instead: time one sampling step with and without the KV cache at --prefixes, for the first "
                   "--batch_size, and derive the ratio for a whole image")
    p.add_argument("--prefixes", default="0,64,128,192,255", help="prefix lengths for --kv_cache_ratio")
    p.add_argument("--codebook_size", type=int, default=16384, help="codebook for --kv_cache_ratio")
    p.add_argument("--grid", type=int, default=16, help="code grid side for --kv_cache_ratio")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per step for --kv_cache_ratio (median)")
    p.set_defaults(run=lambda args: (bench_kv_cache if args.kv_cache_ratio else bench_generate)(args))

    args, rest = parser.parse_known_args()
    if args.part != "train" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.part == "train":
        args.run(args, rest)
    else:
        args.run(args)


if __name__ == "__main__":
    main()
