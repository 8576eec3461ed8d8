"""Train the text-conditioned GPT on prepare.py's memmaps.

    python train.py                                        # the demo: data/demo -> out/ckpt.pt
    python train.py config/muge_16gb.py --batch_size 8
    python train.py config/muge_16gb.py --init_from resume
    torchrun --standalone --nproc_per_node 4 train.py config/muge_16gb.py

Config files are Python files of `name = value` lines, applied in order; flags given on the command line
override them. Settings read from the data dir's meta.json (codebook size, code grid, caption length,
tokenizer) are not set by hand. The log goes to stderr.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig, peak_flops, setting
from utils import autocast, pick_device, pick_dtype
from vqgan import CheckpointError, load_checkpoint_file, save_checkpoint_atomic


@dataclass
class TrainConfig:
    # The defaults train the embedded demo on a CPU in minutes; config/ holds the recipes for real data.
    # data and output
    data_dir: str = setting("data/demo", "prepare.py output dir with meta.json")
    out_dir: str = setting("out", "where ckpt.pt is written")
    init_from: str = setting("scratch", "scratch, or resume from <out_dir>/ckpt.pt")
    # schedule
    max_iters: int = setting(1200, "optimizer steps in total")
    batch_size: int = setting(32, "images per micro-batch on each process")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    learning_rate: float = setting(1e-3, "peak learning rate")
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = setting(50, "steps of linear warmup")
    lr_decay_iters: int = setting(0, "steps of cosine decay (0: max_iters)")
    weight_decay: float = setting(0.1, "AdamW weight decay of linear weights")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)")
    # evaluation, checkpoints and logging
    eval_interval: int = setting(250, "steps between val loss and checkpoint")
    eval_iters: int = setting(20, "batches per loss estimate")
    log_interval: int = setting(10, "steps between log lines")
    always_save_checkpoint: bool = setting(True, "save at every eval, not only when val loss improves")
    seed: int = setting(1337, "random seed")
    wandb_log: bool = setting(False, "log to Weights & Biases (needs wandb installed)")
    wandb_project: str = setting("nanoT2I", "wandb project")
    wandb_run_name: str = setting("", "wandb run name (empty: wandb picks one)")
    # system
    device: str = setting("", "cpu, cuda, cuda:1, mps (empty: the best there is)")
    dtype: str = setting("", "float32, bfloat16 or float16 (empty: bfloat16 where supported)")
    compile: bool | None = setting(None, "torch.compile the model (default: on CUDA)")
    backend: str = setting("", "DDP backend under torchrun (empty: nccl on GPU, gloo)")
    peak_flops: float = setting(0.0, "the device's peak FLOP/s for MFU (0: look the GPU up by name)")


# Model settings that may change when resuming; the rest of the architecture comes from the checkpoint.
RESUME_OVERRIDABLE = ("dropout", "cond_drop", "activation_checkpointing")
# Model settings that the data dictates.
FROM_META = ("codebook_size", "grid_rows", "grid_cols", "text_len", "text_encoder", "text_vocab_size")


class TrainError(Exception):
    """A problem the user can fix; main() prints it as one line."""


# ----------------------------------------------------------------------------------------------------------
# settings: dataclass defaults < config files < command-line flags


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_FLAG_TYPES = {"int": int, "float": float, "str": str, "bool": _parse_bool, "bool | None": _parse_bool}


def _settings() -> dict[str, dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    fields.update((f.name, f) for f in dataclasses.fields(GPTConfig) if f.type in _FLAG_TYPES)
    return fields


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", usage="%(prog)s [config_file ...] [--setting value | --setting=value ...]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("config_files", nargs="*", help="recipes of `name = value` lines, e.g. config/muge_16gb.py")
    train_group = parser.add_argument_group("training")
    model_group = parser.add_argument_group("model (GPTConfig)")
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, f in _settings().items():
        group = train_group if name in train_names else model_group
        kind = _FLAG_TYPES[f.type]
        extra: dict[str, Any] = {"nargs": "?", "const": True, "metavar": "BOOL"} if kind is _parse_bool else {}
        shown = "" if f.default in ("", None) or name in FROM_META else f" (default: {f.default})"
        group.add_argument(f"--{name}", type=kind, default=None, help=f.metadata["help"] + shown, **extra)
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    """The settings a recipe file assigns; unknown names are errors naming the file and line."""
    try:
        source = Path(path).read_text()
    except OSError as e:
        raise TrainError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise TrainError(f"{path}:{e.lineno}: {e.msg}") from None
    namespace: dict[str, Any] = {}
    try:
        exec(compile(tree, path, "exec"), namespace)
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise TrainError(f"{path}:{line}: {type(e).__name__}: {e}") from None
    known = _settings()
    # Every name the recipe assigns, in any form (`a = 1`, `a: int = 1`, `a, b = 1, 2`, inside an `if`), is a setting.
    lines: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            lines[node.id] = min(node.lineno, lines.get(node.id, node.lineno))
    values = {}
    for name, value in namespace.items():
        if name.startswith("_") or name not in lines:
            continue  # imports and private helpers a recipe may use
        if name not in known:
            raise TrainError(f"{path}:{lines[name]}: unknown setting {name!r} (see python train.py --help)")
        expected = _FLAG_TYPES[known[name].type]
        if not _fits(value, expected):
            raise TrainError(f"{path}:{lines[name]}: {name} = {value!r} is not a {known[name].type}")
        values[name] = value
    return values


def _fits(value: Any, kind: Any) -> bool:
    if kind is _parse_bool:
        return isinstance(value, bool) or value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """The training settings and the model settings that were given (by a recipe or a flag)."""
    args = vars(build_parser().parse_args(argv))
    given: dict[str, Any] = {}
    for path in args.pop("config_files"):
        given.update(read_config_file(path))
    given.update({k: v for k, v in args.items() if v is not None})
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    train_config = TrainConfig(**{k: v for k, v in given.items() if k in train_names})
    if train_config.init_from not in ("scratch", "resume"):
        raise TrainError(f"--init_from must be scratch or resume, not {train_config.init_from!r}")
    for name in ("max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                 "log_interval"):
        if getattr(train_config, name) < (0 if name == "max_iters" else 1):
            raise TrainError(f"--{name} {getattr(train_config, name)} is too small")
    return train_config, {k: v for k, v in given.items() if k not in train_names}


# ----------------------------------------------------------------------------------------------------------
# data


def read_meta(data_dir: str) -> dict:
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise TrainError(f"data dir {data_dir} does not exist: run prepare.py first, or pass --data_dir")
    if not path.is_file():
        raise TrainError(f"{data_dir} has no meta.json, so it is not a prepare.py output dir: "
                         f"run prepare.py --out_dir {data_dir}, or pass the right --data_dir")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    missing = [k for k in ("code_grid", "codebook_size", "text_len", "tokenizer") if k not in meta]
    if missing:
        raise TrainError(f"{path}: missing {', '.join(missing)}; re-run prepare.py")
    return meta


def meta_model_settings(meta: dict) -> dict[str, Any]:
    rows, cols = meta["code_grid"]
    settings = {"codebook_size": meta["codebook_size"], "grid_rows": rows, "grid_cols": cols,
                "text_len": meta["text_len"], "text_encoder": "", "text_vocab_size": meta.get("text_vocab_size", 0)}
    if meta["tokenizer"] != "vocab.txt":  # a Hugging Face tokenizer goes with its own pretrained encoder
        settings["text_encoder"] = meta["tokenizer"]
    return settings


def open_split(data_dir: str, split: str, meta: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The (codes [N, rows*cols], text ids [N, text_len]) memmaps of a split, or None when it has no rows."""
    rows, cols = meta["code_grid"]
    arrays = []
    for kind, width in (("img", rows * cols), ("txt", meta["text_len"])):
        path = Path(data_dir) / f"{split}.{kind}.bin"
        if not path.is_file():
            raise TrainError(f"{path} is missing: re-run prepare.py for {data_dir}")
        size = path.stat().st_size
        if size % (2 * width):
            raise TrainError(f"{path}: {size} bytes is not a whole number of uint16 rows of {width}")
        n = size // (2 * width)
        arrays.append(np.memmap(path, dtype=np.uint16, mode="r", shape=(n, width)) if n else None)
    codes, text = arrays
    n_codes, n_text = (0 if a is None else len(a) for a in arrays)
    if n_codes != n_text:
        raise TrainError(f"{data_dir}: {split}.img.bin has {n_codes} rows but {split}.txt.bin has {n_text}")
    return None if codes is None else (codes, text)


def check_ids(data_dir: str, split: str, data: tuple[np.ndarray, np.ndarray], codebook_size: int,
              text_vocab_size: int) -> None:
    """Out-of-range ids would crash deep inside an embedding lookup; catch them here by name."""
    for kind, array, limit in (("img", data[0], codebook_size), ("txt", data[1], text_vocab_size)):
        row_max = array.max(axis=1)
        if row_max.max() >= limit:
            row = int(np.argmax(row_max >= limit))
            what = "codebook_size" if kind == "img" else "the text encoder's vocab size"
            raise TrainError(f"{data_dir}/{split}.{kind}.bin row {row}: id {row_max[row]} >= {what} {limit}; "
                             "the data and meta.json disagree, re-run prepare.py")


def get_batch(data: tuple[np.ndarray, np.ndarray], batch_size: int, generator: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows (codes, text ids) as int64 on `device`; `generator` alone decides which."""
    rows = torch.randint(len(data[0]), (batch_size,), generator=generator).numpy()
    codes, text = (torch.from_numpy(a[rows].astype(np.int64)) for a in data)
    if device.type == "cuda":
        return codes.pin_memory().to(device, non_blocking=True), text.pin_memory().to(device, non_blocking=True)
    return codes.to(device), text.to(device)


# ----------------------------------------------------------------------------------------------------------
# schedule, evaluation, checkpoints


def learning_rate_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr over lr_decay_iters, then flat."""
    decay_iters = tc.lr_decay_iters or tc.max_iters
    if step < tc.warmup_iters:
        return tc.learning_rate * (step + 1) / (tc.warmup_iters + 1)
    if step >= decay_iters:
        return tc.min_lr
    progress = (step - tc.warmup_iters) / max(1, decay_iters - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.learning_rate - tc.min_lr)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, splits: dict[str, tuple[np.ndarray, np.ndarray]], tc: TrainConfig,
                  device: torch.device, dtype: torch.dtype, rank: int, world_size: int) -> dict[str, float]:
    """Mean loss per split over eval_iters batches per process.

    Each estimate draws the same batches (a generator seeded afresh), so successive values are comparable
    and evaluating never shifts the training data order.
    """
    model.eval()
    out = {}
    for split, data in splits.items():
        generator = torch.Generator().manual_seed(tc.seed + 1000 + rank)
        total = torch.zeros((), device=device)
        for _ in range(tc.eval_iters):
            with autocast(device, dtype):
                total += model(*get_batch(data, tc.batch_size, generator, device))[1].float()
        if world_size > 1:
            dist.all_reduce(total)
        out[split] = total.item() / (tc.eval_iters * world_size)
    model.train()
    return out


def rng_state(data_generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random state a resumed run needs to continue as if never stopped, as plain tensors and lists."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": position, "has_gauss": has_gauss,
                  "gauss": gauss},
        "python": {"version": version, "internal": list(internal), "gauss": python_gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], data_generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_resume_checkpoint(path: Path, meta: dict, data_dir: str) -> dict:
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path} to resume from: start with --init_from scratch")
    try:
        ckpt = load_checkpoint_file(path)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "optimizer" not in ckpt:
        raise TrainError(f"{path} is not a train.py checkpoint (no model_config or optimizer)")
    for name, wanted in meta_model_settings(meta).items():
        had = ckpt["model_config"].get(name)
        if had != wanted:
            raise TrainError(f"{path} was trained with {name} {had!r} but {data_dir}/meta.json has {wanted!r}: "
                             "resume on the data it was trained on, or start a new run (--init_from scratch "
                             "with another --out_dir)")
    return ckpt


def model_config_for(tc: TrainConfig, given: dict[str, Any], meta: dict, ckpt: dict | None) -> GPTConfig:
    """From the checkpoint when resuming (the few safe changes applied), else defaults + settings + meta."""
    from_meta = meta_model_settings(meta)
    for name in FROM_META:
        if name in given and given[name] != from_meta[name]:
            raise TrainError(f"{name} {given[name]!r} conflicts with {tc.data_dir}/meta.json ({from_meta[name]!r}); "
                             "it is read from there, so leave it out")
    try:
        if ckpt is None:
            return GPTConfig(**{**given, **from_meta})
        values = dict(ckpt["model_config"])
        for name, value in given.items():
            if name in RESUME_OVERRIDABLE:
                values[name] = value
            elif name not in FROM_META and values.get(name) != value:
                raise TrainError(f"{name} {value!r} differs from the checkpoint's {values.get(name)!r}; a resumed "
                                 "run keeps the checkpoint's architecture, so leave it out")
        return GPTConfig.from_dict(values)
    except ValueError as e:
        raise TrainError(f"the model config cannot work: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# the loop


def train(tc: TrainConfig, given: dict[str, Any]) -> dict[str, Any]:
    """Run training; returns a summary (last losses, tokens/s, peak memory) for scripts and benchmarks."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = 0, 1
    device = pick_device(tc.device or None)
    if distributed:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(tc.backend or ("nccl" if device.type == "cuda" else "gloo"))
    master = rank == 0

    def log(message: str) -> None:
        if master:
            print(message, file=sys.stderr, flush=True)

    try:
        summary = _train(tc, given, device, rank, world_size, log)
        if distributed:
            # The first process may still be writing the checkpoint; a peer that tears its group down
            # before then aborts gloo's background threads (SIGABRT) and fails the whole run.
            dist.barrier()
        return summary
    except torch.cuda.OutOfMemoryError:
        raise TrainError(
            f"out of GPU memory at batch_size {tc.batch_size} on {device}: lower --batch_size (and raise "
            "--gradient_accumulation_steps to keep the tokens per step), or add --activation_checkpointing true"
        ) from None
    finally:
        if distributed:
            dist.destroy_process_group()


def load_data(tc: TrainConfig, log: Callable[[str], None]) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    meta = read_meta(tc.data_dir)
    splits = {"train": open_split(tc.data_dir, "train", meta), "val": open_split(tc.data_dir, "val", meta)}
    if splits["train"] is None:
        raise TrainError(f"{tc.data_dir}/train.img.bin has no rows: nothing to train on")
    if splits["val"] is None:
        log(f"note: {tc.data_dir} has no val rows; the val loss is measured on train rows")
        splits["val"] = splits["train"]
    return meta, splits


def restore(ckpt: dict, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            data_generator: torch.Generator, tc: TrainConfig, device: torch.device, rank: int, world_size: int,
            log: Callable[[str], None]) -> tuple[int, float]:
    """Put the optimizer, scaler and random states back; returns the step and best val loss."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world_size:
        set_rng_state(ckpt["rng"][rank], data_generator, device)
    else:
        log(f"note: the checkpoint ran on {len(ckpt['rng'])} processes, this run on {world_size}: "
            "the data order will differ from an unbroken run")
    changed = {k: (v, getattr(tc, k)) for k, v in ckpt["train_config"].items()
               if k != "init_from" and getattr(tc, k, v) != v}
    if changed:
        log("note: settings changed since the checkpoint: "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    return ckpt["iter_num"], ckpt["best_val_loss"]


def _train(tc: TrainConfig, given: dict[str, Any], device: torch.device, rank: int, world_size: int,
           log: Callable[[str], None]) -> dict[str, Any]:
    master = rank == 0
    dtype = pick_dtype(device, tc.dtype or None)
    use_compile = tc.compile if tc.compile is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ckpt_path = Path(tc.out_dir) / "ckpt.pt"
    if tc.init_from == "scratch" and ckpt_path.exists():
        # A new run would replace it at its first evaluation: hours of training lost to a re-run command.
        raise TrainError(f"{ckpt_path} exists: --init_from resume continues that run; to start a new one, move it "
                         "away or pick another --out_dir")
    meta, splits = load_data(tc, log)
    ckpt = load_resume_checkpoint(ckpt_path, meta, tc.data_dir) if tc.init_from == "resume" else None

    # The same seed on every process builds the same initial model; the training randomness then differs.
    torch.manual_seed(tc.seed)
    model_config = model_config_for(tc, given, meta, ckpt)
    try:
        raw_model = GPT(model_config)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if ckpt is not None:
        raw_model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    raw_model.to(device)
    for split in ("train", "val"):
        check_ids(tc.data_dir, split, splits[split], model_config.codebook_size,
                  raw_model.text_encoder.config.vocab_size)

    optimizer = raw_model.configure_optimizers(tc.weight_decay, tc.learning_rate, (tc.beta1, tc.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    torch.manual_seed(tc.seed + rank)
    np.random.seed(tc.seed + rank)
    random.seed(tc.seed + rank)
    data_generator = torch.Generator().manual_seed(tc.seed + rank)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        iter_num, best_val_loss = restore(ckpt, optimizer, scaler, data_generator, tc, device, rank, world_size, log)
        del ckpt  # its tensors would otherwise stay alive for the whole run

    model = torch.compile(raw_model) if use_compile else raw_model
    train_model = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    tokens_per_iter = tc.batch_size * tc.gradient_accumulation_steps * world_size * model_config.block_size
    log(f"model: {raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(True) / 1e6:.2f}M "
        f"trained), {model_config.n_layer} layers x {model_config.n_embd} wide, codebook {model_config.codebook_size}")
    log(f"training on {device} in {str(dtype).removeprefix('torch.')}{' with torch.compile' if use_compile else ''}"
        f", {world_size} process{'es' if world_size > 1 else ''}, {tokens_per_iter:,} tokens per step, "
        f"{len(splits['train'][0]):,} train rows")
    peak = tc.peak_flops or peak_flops(device)
    wandb_run = _start_wandb(tc, model_config) if tc.wandb_log and master else None

    first_iter = iter_num
    last_losses: dict[str, float] = {}
    last_loss = float("nan")
    interval_start, interval_iters = time.perf_counter(), 0
    rates: list[float] = []
    while True:
        lr = learning_rate_at(iter_num, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr

        due = iter_num % tc.eval_interval == 0 or iter_num == tc.max_iters
        if due and not (tc.init_from == "resume" and iter_num == first_iter):
            last_losses = estimate_loss(model, splits, tc, device, dtype, rank, world_size)
            log(f"step {iter_num}: train loss {last_losses['train']:.4f}, val loss {last_losses['val']:.4f}")
            if wandb_run is not None:
                wandb_run.log({"iter": iter_num, "train/loss": last_losses["train"],
                               "val/loss": last_losses["val"], "lr": lr})
            improved = last_losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, last_losses["val"])
            if iter_num > 0 and (improved or tc.always_save_checkpoint):
                save_checkpoint(ckpt_path, raw_model, optimizer, scaler, iter_num, best_val_loss, tc, meta,
                                data_generator, device, world_size)
                log(f"saved {ckpt_path}")
            interval_start, interval_iters = time.perf_counter(), 0  # evaluating is not training throughput
        if iter_num >= tc.max_iters:
            if iter_num == first_iter:
                log(f"nothing to do: the run is at step {iter_num} and max_iters is {tc.max_iters}")
            break

        for micro_step in range(tc.gradient_accumulation_steps):
            last_micro = micro_step == tc.gradient_accumulation_steps - 1
            # Gradients are averaged across processes only once per step, on the last micro-batch.
            sync = contextlib.nullcontext() if world_size == 1 or last_micro else train_model.no_sync()
            codes, text = get_batch(splits["train"], tc.batch_size, data_generator, device)
            with sync:
                with autocast(device, dtype):
                    loss = train_model(codes, text)[1] / tc.gradient_accumulation_steps
                scaler.scale(loss).backward()
        if tc.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        interval_iters += 1

        if iter_num % tc.log_interval == 0 or iter_num == tc.max_iters:
            last_loss = loss.item() * tc.gradient_accumulation_steps  # .item() waits for the GPU
            elapsed = time.perf_counter() - interval_start
            tokens_per_sec = interval_iters * tokens_per_iter / elapsed
            # The first interval holds compilation and warm-up; leave it out of the average.
            if iter_num - first_iter > interval_iters:
                rates.append(tokens_per_sec)
            line = f"iter {iter_num}: loss {last_loss:.4f}, lr {lr:.2e}, {tokens_per_sec:,.0f} tok/s"
            if peak:
                mfu = raw_model.estimate_mfu(tc.batch_size * tc.gradient_accumulation_steps,
                                             elapsed / interval_iters, peak)
                line += f", mfu {mfu:.1%}"
            line += f", peak mem {peak_memory_gib(device):.2f} GiB, {1000 * elapsed / interval_iters:.0f} ms/iter"
            log(line)
            if wandb_run is not None:
                wandb_run.log({"iter": iter_num, "train/step_loss": last_loss, "lr": lr,
                               "tokens_per_sec": tokens_per_sec})
            interval_start, interval_iters = time.perf_counter(), 0
    if wandb_run is not None:
        wandb_run.finish()
    return {
        "iter_num": iter_num,
        "loss": last_loss,
        "train_loss": last_losses.get("train"),
        "val_loss": last_losses.get("val"),
        "tokens_per_sec": sum(rates) / len(rates) if rates else None,
        "peak_memory_gib": peak_memory_gib(device),
        "params": raw_model.num_params(),
        "tokens_per_iter": tokens_per_iter,
    }


def save_checkpoint(path: Path, raw_model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    iter_num: int, best_val_loss: float, tc: TrainConfig, meta: dict,
                    data_generator: torch.Generator, device: torch.device, world_size: int) -> None:
    """Every process's random state is gathered; the first process writes the file atomically."""
    states = [rng_state(data_generator, device)]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, rng_state(data_generator, device))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    save_checkpoint_atomic({
        "model": raw_model.state_dict(),
        "model_config": dataclasses.asdict(raw_model.config),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "train_config": dataclasses.asdict(tc),
        "meta": meta,
        "data_dir": str(Path(tc.data_dir).resolve()),
        "rng": states,
    }, path)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; elsewhere the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def _start_wandb(tc: TrainConfig, model_config: GPTConfig) -> Any:
    try:
        import wandb
    except ImportError:
        raise TrainError("--wandb_log is on but wandb is not installed: pip install wandb, or leave it off") from None
    config = {**dataclasses.asdict(tc), **dataclasses.asdict(model_config)}
    return wandb.init(project=tc.wandb_project, name=tc.wandb_run_name or None, config=config)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        return train(*parse_args(argv))
    except TrainError as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()
