"""Throughput benchmarks, one subcommand per part. Results go to BENCHMARKS.md with the machine named.

    python bench.py vqgan --batch_size 8
    python bench.py vqgan --device cuda --batch_size 64 --decode_dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from utils import pick_device, pick_dtype
from vqgan import VQGAN, VQGANConfig


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

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
