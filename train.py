"""Train the text-conditioned GPT (or the text-image scorer) on prepare.py's memmaps.

    python train.py                                        # the demo: data/demo -> out/
    python train.py config/muge_16gb.py --batch_size=8
    python train.py config/muge_16gb.py --init_from=resume
    torchrun --standalone --nproc_per_node=4 train.py config/muge_16gb.py
    python train.py config/scorer_demo.py                  # the demo's scorer -> out/grader/

A recipe is a Python file of `name = value` settings, which `--name=value` flags override; prepare.py's meta.json
gives the codebook size, code grid, caption length and tokenizer. <out_dir>/ckpt.pt is the last state, which
--init_from=resume continues exactly; <out_dir>/best.pt the weights with the lowest val loss. Log: stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data import check_ids, open_split, read_meta
from model import GPT, GPTConfig, adamw, peak_flops
from scorer import Scorer
from utils import (
    UserError,
    autocast,
    check_compiler,
    configure,
    cosine_lr,
    format_memory,
    locked,
    memory_gib,
    pick_device,
    pick_dtype,
    run_main,
    setting,
)
from vqgan import load_checkpoint_file, save_checkpoint_atomic


@dataclass
class TrainConfig:
    """training (the defaults train the demo on a CPU in minutes; config/ holds the recipes for real data)"""

    model: str = setting("gpt", "gpt (the picture generator) or scorer (the text-image scorer evaluate.py grades with)")
    data_dir: str = setting("data/demo", "prepare.py output dir with meta.json")
    out_dir: str = setting("out", "where ckpt.pt (the last state) and best.pt (the best weights) go")
    init_from: str = setting("scratch", "scratch, or resume: continue <out_dir>/ckpt.pt exactly")
    max_iters: int = setting(2400, "optimizer steps in total")
    batch_size: int = setting(32, "images per micro-batch on each process")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    learning_rate: float = setting(2e-3, "peak learning rate")
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = setting(50, "steps of linear warmup")
    lr_decay_iters: int = setting(0, "steps of cosine decay (0: max_iters)")
    weight_decay: float = setting(0.1, "AdamW weight decay of linear weights")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)")
    eval_interval: int = setting(400, "steps between val loss and checkpoints")
    eval_iters: int = setting(10, "batches per loss estimate")
    log_interval: int = setting(10, "steps between log lines")
    seed: int = setting(1337, "random seed")
    wandb_log: bool = setting(False, "log to Weights & Biases (needs wandb installed)")
    wandb_project: str = setting("nanoT2I", "wandb project")
    device: str = setting("", "cpu, cuda, cuda:1, mps (empty: the best there is)")
    dtype: str = setting("", "float32, bfloat16 or float16 (empty: bfloat16 where supported)")
    compile: bool | None = setting(None, "torch.compile the model (default: on CUDA)")
    backend: str = setting("", "DDP backend under torchrun (empty: nccl on GPU, gloo)")
    peak_flops: float = setting(0.0, "the device's peak FLOP/s for MFU (0: look the GPU up by name)")

    def __post_init__(self) -> None:
        for name, allowed in (("model", ("gpt", "scorer")), ("init_from", ("scratch", "resume"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                     "log_interval"):
            if getattr(self, name) < (0 if name == "max_iters" else 1):
                raise ValueError(f"--{name} {getattr(self, name)} is too small")


def model_settings_from_meta(meta: dict) -> dict[str, Any]:
    rows, cols = meta["code_grid"]
    tokenizer = meta["tokenizer"]  # a Hugging Face tokenizer goes with its own pretrained encoder
    return {"codebook_size": meta["codebook_size"], "grid_rows": rows, "grid_cols": cols, "text_len": meta["text_len"],
            "text_encoder": "" if tokenizer == "vocab.txt" else tokenizer,
            "text_vocab_size": meta.get("text_vocab_size", 0)}


def get_batch(data: tuple[np.ndarray, np.ndarray], batch_size: int, generator: torch.Generator,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows (codes, text ids) as int64 on `device`, no row twice (the scorer's contrastive loss would take
    a repeated row for a wrong pair); `generator` alone decides which."""
    rows = torch.randperm(len(data[0]), generator=generator)[:batch_size].sort().values.numpy()
    codes, text = (torch.from_numpy(a[rows].astype(np.int64)) for a in data)
    if device.type == "cuda":
        return codes.pin_memory().to(device, non_blocking=True), text.pin_memory().to(device, non_blocking=True)
    return codes.to(device), text.to(device)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, splits: dict[str, tuple[np.ndarray, np.ndarray]], tc: TrainConfig,
                  device: torch.device, dtype: torch.dtype, rank: int, world_size: int) -> dict[str, float]:
    """Mean loss per split over eval_iters batches per process. Each estimate draws the same batches (a
    generator seeded afresh), so that successive values compare, and evaluating never shifts the data order."""
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


def checkpoint_to_resume(tc: TrainConfig, meta: dict) -> dict | None:
    """<out_dir>/ckpt.pt for --init_from=resume, checked against the data; None for a new run."""
    path = Path(tc.out_dir) / "ckpt.pt"
    if tc.init_from == "scratch":
        if path.exists():  # a new run would replace it at its first evaluation: hours lost to a re-run command
            raise UserError(f"{path} exists: --init_from=resume continues that run; to start a new one, move it away "
                            "or pick another --out_dir")
        return None
    if not path.is_file():
        raise UserError(f"no checkpoint at {path} to resume from: start with --init_from scratch")
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (no model_config or optimizer)")
    if ckpt.get("kind", "gpt") != tc.model:
        raise UserError(f"{path} holds a {ckpt.get('kind', 'gpt')}, not a {tc.model}: pass the --model it was "
                        "trained as")
    for name, wanted in model_settings_from_meta(meta).items():
        if ckpt["model_config"].get(name) != wanted:
            raise UserError(f"{path} was trained with {name} {ckpt['model_config'].get(name)!r} but "
                            f"{tc.data_dir}/meta.json has {wanted!r}: resume on the data it was trained on, or start "
                            "a new run elsewhere")
    return ckpt


def set_up_cuda(device: torch.device) -> None:
    # TF32 matmuls through the one API torch.compile reads too (mixing in the legacy allow_tf32 flags makes it fail;
    # cuDNN's convolutions use TF32 already). No cuDNN attention: its backward gives NaN gradients with an explicit
    # mask and keys of length 64 mod 128 (pytorch#196678), our cross-attention to 64-token captions exactly.
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.enable_cudnn_sdp(False)


def train(tc: TrainConfig, mc: GPTConfig, given: set[str]) -> dict[str, Any]:
    """Run training; returns a summary (last losses, tokens/s, peak memory) for scripts and benchmarks."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(tc.device or None)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group(tc.backend or ("nccl" if device.type == "cuda" else "gloo"))
    try:
        # One run per out_dir at a time: a second one would overwrite the first one's checkpoints.
        with locked(tc.out_dir, "train.py run") if rank == 0 else contextlib.nullcontext():
            summary = Run(tc, mc, given, device, rank, world_size).loop()
        if distributed:
            # The first process may still be writing the checkpoint; a peer that tears its group down
            # before then aborts gloo's background threads (SIGABRT) and fails the whole run.
            dist.barrier()
        return summary
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory at batch_size {tc.batch_size} on {device}: lower --batch_size (and raise "
                        "--gradient_accumulation_steps to keep the tokens per step), or add "
                        "--activation_checkpointing=true") from None
    finally:
        if distributed:
            dist.destroy_process_group()


def build(tc: TrainConfig, mc: GPTConfig, given: set[str], meta: dict, ckpt: dict | None, log) -> torch.nn.Module:
    """The model to train: the checkpoint's architecture when resuming, else the settings with meta.json's."""
    if ckpt is not None:
        differ = sorted(k for k in given if k in ckpt["model_config"] and ckpt["model_config"][k] != getattr(mc, k))
        if differ:
            log(f"note: the model settings come from the checkpoint; ignored: {', '.join(differ)}")
        mc = GPTConfig.from_dict(ckpt["model_config"])
    else:
        mc = replace(mc, **model_settings_from_meta(meta))
    torch.manual_seed(tc.seed)  # every process builds the same initial model
    try:
        model = Scorer(mc) if tc.model == "scorer" else GPT(mc)
    except ValueError as e:
        raise UserError(f"the model cannot work: {e}") from None
    if ckpt is not None:
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model


class Run:
    """One process's training: the setup, then the loop and what it carries from step to step."""

    def __init__(self, tc: TrainConfig, mc: GPTConfig, given: set[str], device: torch.device, rank: int,
                 world_size: int) -> None:
        self.tc, self.device, self.rank, self.world_size = tc, device, rank, world_size
        self.dtype = pick_dtype(device, tc.dtype or None)
        use_compile = tc.compile if tc.compile is not None else device.type == "cuda"
        if use_compile:
            check_compiler(device)
        set_up_cuda(device)
        self.meta = read_meta(tc.data_dir)
        self.splits = splits = {split: open_split(tc.data_dir, split, self.meta) for split in ("train", "val")}
        if splits["train"] is None:
            raise UserError(f"{tc.data_dir}/train.img.bin has no rows: nothing to train on")
        if splits["val"] is None:
            self.log(f"note: {tc.data_dir} has no val rows; the val loss is measured on train rows")
            splits["val"] = splits["train"]
        ckpt = checkpoint_to_resume(tc, self.meta)
        self.raw_model = raw = build(tc, mc, given, self.meta, ckpt, self.log).to(device)
        for split, data in splits.items():
            check_ids(tc.data_dir, split, data, raw.config.codebook_size, raw.text_encoder.config.vocab_size)

        self.optimizer = adamw(raw, tc.weight_decay, tc.learning_rate, (tc.beta1, tc.beta2), device.type)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        torch.manual_seed(tc.seed + rank)
        self.state = {"iter_num": 0, "best_val_loss": float("inf"), "best_iter": 0}
        self.data_generator = torch.Generator().manual_seed(tc.seed + rank)
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.state = {k: ckpt[k] for k in self.state}
            if len(ckpt["rng"]) == world_size:
                rng = ckpt["rng"][rank]
                torch.set_rng_state(rng["torch"])
                self.data_generator.set_state(rng["data"])
                if device.type == "cuda" and "cuda" in rng:
                    torch.cuda.set_rng_state(rng["cuda"], device)
            else:
                self.log(f"note: the checkpoint ran on {len(ckpt['rng'])} processes, this run on {world_size}: the "
                         "data order differs from an unbroken run's")
            del ckpt  # its tensors would otherwise stay alive for the whole run
        self.model = raw  # the same, wrapped in DDP and compiled where they apply
        if world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                raw, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        if use_compile:  # after DDP, as PyTorch's DDP notes ask, so that the graph splits at its buckets
            self.model = torch.compile(self.model)

        self.tokens_per_iter = tc.batch_size * tc.gradient_accumulation_steps * world_size * raw.config.block_size
        self.log(f"{tc.model}: {raw.num_params() / 1e6:.2f}M parameters ({raw.num_params(True) / 1e6:.2f}M trained), "
                 f"{raw.config.n_layer} layers x {raw.config.n_embd} wide, codebook {raw.config.codebook_size}")
        self.log(f"training on {device} in {str(self.dtype).removeprefix('torch.')}"
                 f"{' with torch.compile' if use_compile else ''}, {world_size} "
                 f"process{'es' if world_size > 1 else ''}, {self.tokens_per_iter:,} tokens per step, "
                 f"{len(splits['train'][0]):,} train rows")
        self.peak = tc.peak_flops or peak_flops(device)
        self.wandb = None
        if tc.wandb_log and rank == 0:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb_log needs wandb, which is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=tc.wandb_project, config=asdict(tc) | asdict(raw.config))
        # The first step whose loss was not finite, kept on the device so that checking costs no sync per step.
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.saved_iter = self.state["iter_num"]

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def loop(self) -> dict[str, Any]:
        tc, state = self.tc, self.state
        first_iter, losses, rates = state["iter_num"], {}, []
        interval_start, interval_iters, loss = time.perf_counter(), 0, None
        while True:
            step = state["iter_num"]
            due = step % tc.eval_interval == 0 or step == tc.max_iters
            if due and not (tc.init_from == "resume" and step == first_iter):
                losses = self.evaluate_and_save(step)
                interval_start, interval_iters = time.perf_counter(), 0  # evaluating is not training throughput
            if step >= tc.max_iters:
                if step == first_iter:
                    self.log(f"nothing to do: the run is at step {step} and max_iters is {tc.max_iters}")
                break
            loss = self.step(step)
            state["iter_num"] += 1
            interval_iters += 1
            if state["iter_num"] % tc.log_interval == 0 or state["iter_num"] == tc.max_iters:
                elapsed = time.perf_counter() - interval_start
                rate = self.log_step(loss, elapsed, interval_iters)
                if state["iter_num"] - first_iter > interval_iters:  # the first interval holds compilation
                    rates.append(rate)
                interval_start, interval_iters = time.perf_counter(), 0
        if self.wandb is not None:
            self.wandb.finish()
        return {"iter_num": state["iter_num"], "loss": None if loss is None else loss.item(),
                "train_loss": losses.get("train"), "val_loss": losses.get("val"),
                "best_val_loss": state["best_val_loss"], "tokens_per_sec": sum(rates) / len(rates) if rates else None,
                "memory_gib": memory_gib(self.device), "params": self.raw_model.num_params(),
                "tokens_per_iter": self.tokens_per_iter}

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the last one's loss."""
        tc = self.tc
        lr = cosine_lr(step, tc.learning_rate, tc.min_lr, tc.warmup_iters, tc.lr_decay_iters or tc.max_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(tc.gradient_accumulation_steps):
            last = micro_step == tc.gradient_accumulation_steps - 1
            # Gradients are averaged across processes only once per step, on the last micro-batch.
            sync = contextlib.nullcontext() if self.world_size == 1 or last else self.model.no_sync()
            with sync, autocast(self.device, self.dtype):
                loss = self.model(*get_batch(self.splits["train"], tc.batch_size, self.data_generator, self.device))[1]
            self.scaler.scale(loss / tc.gradient_accumulation_steps).backward()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss.detach()), step + 1, self.first_bad)
        if tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def check_finite(self, step: int, val_loss: float = 0.0) -> None:
        bad = int(self.first_bad.item())
        if bad >= 0 or not np.isfinite(val_loss):
            where = f"step {bad}" if bad >= 0 else f"the evaluation at step {step}"
            kept = f"{self.tc.out_dir}/ckpt.pt (step {self.saved_iter})" if self.saved_iter else "no checkpoint"
            raise UserError(f"the loss is not finite from {where} on: training stopped, keeping {kept}; lower "
                            "--learning_rate, or --dtype=bfloat16 where it ran float16")

    def log_step(self, loss: torch.Tensor, elapsed: float, iters: int) -> float:
        self.check_finite(self.state["iter_num"])
        rate = iters * self.tokens_per_iter / elapsed
        line = f"iter {self.state['iter_num']}: loss {loss.item():.4f}, {rate:,.0f} tok/s"
        if self.peak:
            samples = self.tc.batch_size * self.tc.gradient_accumulation_steps * iters
            line += f", mfu {self.raw_model.flops_per_sample() * samples / elapsed / self.peak:.1%}"
        self.log(f"{line}, {1000 * elapsed / iters:.0f} ms/iter, peak {format_memory(memory_gib(self.device))}")
        if self.wandb is not None:
            self.wandb.log({"iter": self.state["iter_num"], "train/step_loss": loss.item(), "tokens_per_sec": rate})
        return rate

    def evaluate_and_save(self, step: int) -> dict[str, float]:
        losses = estimate_loss(self.model, self.splits, self.tc, self.device, self.dtype, self.rank, self.world_size)
        self.check_finite(step, losses["val"])  # never a checkpoint of a poisoned model
        state = self.state
        improved = losses["val"] < state["best_val_loss"]
        # Step 0, the untrained model, is never saved: were it the best, no best.pt would ever be written.
        if improved and step > 0:
            state["best_val_loss"], state["best_iter"] = losses["val"], step
        since = "" if improved else f" (no better than {state['best_val_loss']:.4f} at step {state['best_iter']})"
        self.log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{since}")
        if self.wandb is not None:
            self.wandb.log({"iter": step, "train/loss": losses["train"], "val/loss": losses["val"]})
        if step == 0:
            return losses
        # the random states a resumed run needs to go on as if never stopped (training draws from no others)
        rng = {"torch": torch.get_rng_state(), "data": self.data_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        states = [rng] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(states, rng)
        if self.rank == 0:
            weights = {"kind": self.tc.model, "model": self.raw_model.state_dict(), "meta": self.meta,
                       "model_config": asdict(self.raw_model.config), "iter_num": step,
                       "train_config": asdict(self.tc), "data_dir": str(Path(self.tc.data_dir).resolve())}
            out_dir = Path(self.tc.out_dir)
            if improved:
                save_checkpoint_atomic({**weights, "val_loss": losses["val"]}, out_dir / "best.pt")
            save_checkpoint_atomic({**weights, "optimizer": self.optimizer.state_dict(), "rng": states,
                                    "scaler": self.scaler.state_dict(), **state}, out_dir / "ckpt.pt")
            self.log(f"saved {out_dir / 'ckpt.pt'}{' and best.pt' if improved else ''}")
        self.saved_iter = step
        return losses


def parse_args(argv: list[str]) -> tuple[TrainConfig, GPTConfig, set[str]]:
    (tc, mc), given = configure(argv, (TrainConfig, GPTConfig), "train.py", __doc__)
    return tc, mc, given


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    status = run_main("train.py", lambda: result.update(train(*parse_args(sys.argv[1:] if argv is None else argv))))
    if status:
        sys.exit(status)
    return result


if __name__ == "__main__":
    main()
