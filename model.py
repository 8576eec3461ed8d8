"""The text-conditioned GPT over VQGAN codes (an image is the row-major sequence of its codes), and its sampler.
Each block attends causally to the codes so far, then to the caption's encoded tokens, then runs an MLP. Training
swaps in a learned null caption with probability `cond_drop`, so one model also predicts unconditionally (guidance).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils import setting
from vqgan import CheckpointError, load_checkpoint_file

PAD_ID = 0  # prepare.py right-pads captions with 0; a caption of nothing but padding is "no caption"


@dataclass
class GPTConfig:
    """the model (the GPT's, and the scorer's where they apply: n_layer, n_head, n_embd, dropout, text_*)"""

    # what the data dictates: train.py takes it from the data dir's meta.json
    codebook_size: int = 1024
    grid_rows: int = 16
    grid_cols: int = 16
    text_len: int = 64
    text_encoder: str = ""  # a Hugging Face name or folder: the pretrained encoder of prepare's --text_tokenizer
    text_vocab_size: int = 0  # the size of the char vocab of a from-scratch encoder
    # The encoder's transformers config, filled in when built: a checkpoint rebuilds the model offline from it.
    text_config: dict | None = None
    # the model (the defaults are the CPU demo's size; config/ has the real recipes)
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "attention heads; must divide n_embd")
    n_embd: int = setting(128, "width of the model")
    dropout: float = setting(0.0, "dropout in the model (and in a from-scratch text encoder)")
    bias: bool = setting(False, "biases in linear layers and layer norms")
    text_n_layer: int = setting(1, "layers of the from-scratch text encoder")
    text_n_head: int = setting(4, "heads of the from-scratch text encoder")
    text_n_embd: int = setting(128, "width of the from-scratch text encoder")
    text_finetune_layers: int = setting(0, "a pretrained text encoder: train its top k layers (0 frozen, -1 all)")
    cond_drop: float = setting(0.1, "GPT: probability of training on the null caption (for guidance)")
    activation_checkpointing: bool = setting(False, "GPT: recompute activations in the backward pass to save memory")

    def __post_init__(self) -> None:
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not self.text_encoder and self.text_config is None and self.text_n_embd % self.text_n_head:
            problems.append(f"text_n_embd {self.text_n_embd} is not divisible by text_n_head {self.text_n_head}")
        if not 2 <= self.codebook_size <= 65536:
            problems.append(f"codebook_size {self.codebook_size} is outside 2..65536 (codes are uint16)")
        if min(self.grid_rows, self.grid_cols, self.text_len, self.n_layer) < 1:
            problems.append("grid_rows, grid_cols, text_len and n_layer must be at least 1")
        if not 0.0 <= self.cond_drop <= 1.0 or not 0.0 <= self.dropout < 1.0:
            problems.append(f"cond_drop {self.cond_drop} must lie in [0, 1] and dropout {self.dropout} in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def block_size(self) -> int:
        return self.grid_rows * self.grid_cols

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown model settings {unknown}")
        return cls(**values)


def build_text_encoder(config: GPTConfig) -> nn.Module:
    """The caption encoder, filling in `config.text_config`: a checkpoint's text_config rebuilds it offline (the
    weights come from the state dict), else a named encoder loads pretrained, an unnamed one is a small BERT."""
    from transformers import AutoConfig, AutoModel, BertConfig
    from transformers.utils import logging as hf_logging

    if config.text_config is not None:
        values = dict(config.text_config)
        encoder = AutoModel.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    elif config.text_encoder:
        # Its load report lists the pooler we drop as missing, which would only confuse.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            encoder = AutoModel.from_pretrained(config.text_encoder, dtype=torch.float32)
        except OSError as e:
            where = "folder" if os.path.isdir(config.text_encoder) else "Hugging Face name (is it downloaded?)"
            raise ValueError(f"cannot load the text encoder {config.text_encoder!r} as a {where}: {e}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        if config.text_vocab_size < 1:
            raise ValueError("text_vocab_size must be set for a from-scratch text encoder (meta.json has it)")
        encoder = AutoModel.from_config(BertConfig(
            vocab_size=config.text_vocab_size, hidden_size=config.text_n_embd, num_hidden_layers=config.text_n_layer,
            num_attention_heads=config.text_n_head, intermediate_size=4 * config.text_n_embd,
            max_position_embeddings=config.text_len, hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout, pad_token_id=PAD_ID))
    # The pooled sentence vector is never used; an unused parameter would also upset DDP.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    encoder = encoder.float()
    # JSON round trip: plain types only, so that the checkpoint loads with weights_only=True.
    config.text_config = json.loads(encoder.config.to_json_string())
    return encoder


def set_text_finetuning(encoder: nn.Module, finetune_layers: int) -> None:
    """Freeze a pretrained encoder except its top `finetune_layers` layers (-1: train all of it)."""
    encoder.requires_grad_(finetune_layers < 0)
    if finetune_layers > 0:
        modules = dict(encoder.named_modules())
        candidates = [modules.get(path) for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer")]
        layers = next((module for module in candidates if isinstance(module, nn.ModuleList)), None)
        if layers is None:
            raise ValueError(f"cannot find the layers of {type(encoder).__name__}; use text_finetune_layers 0 "
                             "(frozen) or -1 (all)")
        layers[-finetune_layers:].requires_grad_(True)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [B, L] mask of tokens to attend to as an additive bias [B, 1, 1, L] (0 or very negative) in `dtype`:
    built once per batch, it lets SDPA pick its fused kernels, which a boolean mask can rule out."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        if cache is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            # One new token at `pos` [1]: its keys and values go into the static cache (a KVCache's), and it
            # attends to the slots written so far, `visible` [1, block_size]; later slots hold stale values.
            cache_k, cache_v, pos, visible = cache
            cache_k.index_copy_(2, pos, k)
            cache_v.index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=visible)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class CrossAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the text [B, n_head, L, head_dim]; sampling computes them once per prompt."""
        B, L, C = context.shape
        return tuple(t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for t in self.kv(context).split(C, 2))

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor], text_bias: torch.Tensor,
                null_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`null_kv` (guidance): the rows past those of `text_kv`, the unconditional stream of one query each, read
        the null caption's keys and values as one row of B queries: the caption is held once, not B times."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        rows = text_kv[0].shape[0]
        y = F.scaled_dot_product_attention(q[:rows], *text_kv, attn_mask=text_bias, dropout_p=dropout)
        if null_kv is not None:
            y_null = F.scaled_dot_product_attention(q[rows:].transpose(0, 2), *null_kv).transpose(0, 2)
            y = torch.cat([y, y_null])
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.self_attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.cross_attn = CrossAttention(config)
        self.ln_3 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor], text_bias: torch.Tensor,
                cache: tuple[torch.Tensor, ...] | None = None,
                null_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.ln_1(x), cache)
        x = x + self.cross_attn(self.ln_2(x), text_kv, text_bias, null_kv)
        return x + self.mlp(self.ln_3(x))


class CaptionModel(nn.Module):
    """What the GPT and the scorer share: the caption encoder, projected to the model's width."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.text_encoder = build_text_encoder(config)
        if config.text_encoder:
            set_text_finetuning(self.text_encoder, config.text_finetune_layers)
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, config.n_embd, bias=config.bias)

    @property
    def text_trainable(self) -> bool:
        return any(p.requires_grad for p in self.text_encoder.parameters())

    def train(self, mode: bool = True) -> CaptionModel:
        super().train(mode)
        # A frozen encoder stays in eval mode: its dropout would only add noise to fixed features.
        if not self.text_trainable:
            self.text_encoder.eval()
        return self

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def text_states(self, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text states [B, L, n_embd] and the mask of real (not padding) tokens [B, L]."""
        text_ids = text_ids.long()
        if text_ids.shape[1] > self.config.text_len:
            raise ValueError(f"captions of {text_ids.shape[1]} tokens, but the model takes at most text_len "
                             f"{self.config.text_len}")
        mask = text_ids != PAD_ID
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trainable):
            hidden = self.text_encoder(input_ids=text_ids, attention_mask=mask.long()).last_hidden_state
        return self.text_proj(hidden), mask

    def text_flops(self) -> int:
        """Training FLOPs of the caption encoder per caption: 6 per trained weight and token, 2 per frozen one."""
        return sum((6 if p.requires_grad else 2) * self.config.text_len * p.numel()
                   for name, p in self.text_encoder.named_parameters() if p.dim() == 2 and "embeddings" not in name)


class GPT(CaptionModel):
    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.null_context = nn.Parameter(torch.zeros(config.text_len, config.n_embd))
        self.start_token = config.codebook_size  # code_emb's extra last row: what every image begins from
        self.code_emb = nn.Embedding(config.codebook_size + 1, config.n_embd)
        self.row_emb = nn.Embedding(config.grid_rows, config.n_embd)
        self.col_emb = nn.Embedding(config.grid_cols, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.codebook_size, bias=False)
        init_weights(self, config.n_layer)
        nn.init.normal_(self.null_context, mean=0.0, std=0.02)

    def encode_text(self, text_ids: torch.Tensor, drop_caption: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text states [B, L, n_embd] and the mask of tokens to attend to [B, L]; rows with no tokens,
        or with `drop_caption` set, get the learned null context instead."""
        context, mask = self.text_states(text_ids)
        use_null = ~mask.any(1)
        if drop_caption is not None:
            use_null = use_null | drop_caption
        # torch.where keeps null_context in the graph even when no row picks it, which DDP requires.
        context = torch.where(use_null[:, None, None], self.null_context[: mask.shape[1]].to(context.dtype), context)
        return context, mask | use_null[:, None]

    def embed_codes(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Input tokens [B, T] at sequence `positions` [T]; each position carries the grid cell it predicts."""
        rows, cols = positions // self.config.grid_cols, positions % self.config.grid_cols
        return self.drop(self.code_emb(tokens) + self.row_emb(rows) + self.col_emb(cols))

    def forward(self, codes: torch.Tensor, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, codebook_size] for codes [B, T] (T up to rows*cols) given captions, and the loss."""
        B, n_codes = codes.shape
        if n_codes > self.config.block_size:
            raise ValueError(f"{n_codes} codes per image, but the grid holds {self.config.block_size}")
        drop = None
        if self.training and self.config.cond_drop > 0:
            drop = torch.rand(B, device=codes.device) < self.config.cond_drop
        context, mask = self.encode_text(text_ids, drop)
        device = codes.device.type  # the bias in the dtype that the matmuls run in: autocast's when it is on
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else context.dtype
        text_bias = attention_bias(mask, dtype)
        start = torch.full((B, 1), self.start_token, dtype=torch.long, device=codes.device)
        x = self.embed_codes(torch.cat([start, codes[:, :-1]], dim=1), torch.arange(n_codes, device=codes.device))
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            args = (x, block.cross_attn.text_kv(context), text_bias)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        logits = self.head(self.ln_f(x))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def score(self, codes: torch.Tensor, text_ids: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Mean log-likelihood per code [B] of code grids [B, rows*cols] (or [B, rows, cols]) given their captions,
        to rank best-of-N candidates; in slices, as the float logits of a large codebook are large."""
        scores = []
        for codes_chunk, text_chunk in zip(codes.flatten(1).long().split(chunk), text_ids.split(chunk), strict=True):
            logits, _ = self(codes_chunk, text_chunk)
            scores.append(-F.cross_entropy(logits.float().transpose(1, 2), codes_chunk, reduction="none").mean(1))
        return torch.cat(scores)

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) for one image and caption: 6 per weight per token it touches for
        trained matmuls (2 forward, 4 backward); attention scores as in the PaLM paper's appendix B."""
        cfg = self.config
        T, L, C = cfg.block_size, cfg.text_len, cfg.n_embd
        per_code = cfg.n_layer * 14 * C * C + C * cfg.codebook_size  # qkv, proj, cross q and proj, mlp; head
        per_text = cfg.n_layer * 2 * C * C + self.text_proj.weight.numel()  # cross-attention keys and values
        return float(6 * (T * per_code + L * per_text) + 12 * cfg.n_layer * C * T * (T + L) + self.text_flops())


def init_weights(model: nn.Module, n_layer: int) -> None:
    """Small normal weights, zero biases; the text encoder keeps its own (possibly pretrained) weights.
    Residual projections are scaled down so the residual stream's variance stays put as depth grows."""
    for name, module in model.named_modules():
        if not name.startswith("text_encoder") and isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
    for name, param in model.named_parameters():
        if name.startswith("blocks.") and name.endswith("proj.weight"):
            nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(3 * n_layer))


def adamw(model: nn.Module, weight_decay: float, learning_rate: float, betas: tuple[float, float],
          device_type: str) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; only linear layers' weights decay: pulling norm gains, biases,
    embeddings and the null context to zero fights what they represent rather than regularising."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


class KVCache(nn.Module):
    """One block's self-attention keys and values [rows, n_head, block_size, head_dim]. A buffer per block:
    compiled, writing into it is in place, where a slice of one buffer for all blocks is copied whole each step."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Sampler(nn.Module):
    """Draws code grids for batches of up to `batch_size` captions in the model's dtype. Every buffer the decode step
    touches is allocated once here, so that compiled, one graph (a CUDA graph on CUDA) serves every position of every
    batch. Guidance: uncond + cfg_scale * (cond - uncond): 1 runs no unconditional stream, 0 ignores the caption."""

    def __init__(self, model: GPT, batch_size: int, cfg_scale: float = 3.0, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, compile: bool = False):
        super().__init__()
        self.model = model.eval()
        cfg, weight = model.config, model.head.weight
        self.batch_size, self.cfg_scale = batch_size, cfg_scale
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.guided = cfg_scale not in (0.0, 1.0)
        head_dim = cfg.n_embd // cfg.n_head

        def buffer(name: str, *shape: int, dtype: torch.dtype = weight.dtype) -> None:
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=weight.device), persistent=False)

        shape = ((2 if self.guided else 1) * batch_size, cfg.n_head, cfg.block_size, head_dim)
        self.caches = nn.ModuleList(KVCache(shape, weight.dtype, weight.device) for _ in model.blocks)
        for name in ("text_k", "text_v"):
            buffer(name, cfg.n_layer, batch_size, cfg.n_head, cfg.text_len, head_dim)
        buffer("text_bias", batch_size, 1, 1, cfg.text_len)
        buffer("keys", batch_size, dtype=torch.long)
        buffer("tokens", batch_size, dtype=torch.long)
        buffer("pos", 1, dtype=torch.long)
        with torch.no_grad():
            null_kv = [block.cross_attn.text_kv(model.null_context[None]) for block in model.blocks]
        self.register_buffer("null_k", torch.stack([k for k, _ in null_kv]), persistent=False)
        self.register_buffer("null_v", torch.stack([v for _, v in null_kv]), persistent=False)
        self.step = self.decode_step
        if compile:
            # Without CUDA, inductor's C++ code for the CPU; the graph and its guards are the same.
            mode = "reduce-overhead" if weight.device.type == "cuda" else None
            self.step = torch.compile(self.decode_step, fullgraph=True, dynamic=False, mode=mode)

    def logits(self, tokens: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float logits [batch_size, codebook_size] of the conditional and (guided) unconditional streams for the
        code at `pos` after `tokens` [batch_size] at pos - 1, writing this position into the caches."""
        model = self.model
        x = model.embed_codes(tokens[:, None], pos)
        if self.guided:
            x = torch.cat([x, x])
        visible = (torch.arange(model.config.block_size, device=pos.device) <= pos)[None]
        for i, (block, cache) in enumerate(zip(model.blocks, self.caches, strict=True)):
            null_kv = (self.null_k[i], self.null_v[i]) if self.guided else None
            x = block(x, (self.text_k[i], self.text_v[i]), self.text_bias, (cache.k, cache.v, pos, visible), null_kv)
        logits = model.head(model.ln_f(x))[:, -1].float()
        return tuple(logits.chunk(2)) if self.guided else (logits, None)

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The next code of every row, drawn on the device with the rows' random keys (no host sync)."""
        cond, uncond = self.logits(tokens, pos)
        logits = cond if uncond is None else uncond + self.cfg_scale * (cond - uncond)
        noise = exponential_noise(self.keys, pos * self.model.config.codebook_size, self.model.config.codebook_size)
        return draw(logits, noise, self.temperature, self.top_k, self.top_p)

    @torch.no_grad()
    def prefill(self, text_ids: torch.Tensor) -> None:
        """Encode captions [n <= batch_size, L <= text_len] into the cross-attention buffers, padded with 0."""
        padded = torch.zeros(self.batch_size, self.model.config.text_len, dtype=torch.long, device=self.pos.device)
        if self.cfg_scale != 0:
            padded[: len(text_ids), : text_ids.shape[1]] = text_ids
        context, mask = self.model.encode_text(padded)
        self.text_bias.copy_(attention_bias(mask, self.text_bias.dtype))
        text_kv = [block.cross_attn.text_kv(context) for block in self.model.blocks]
        self.text_k.copy_(torch.stack([k for k, _ in text_kv]))
        self.text_v.copy_(torch.stack([v for _, v in text_kv]))

    @torch.no_grad()
    def sample(self, text_ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Codes [n, grid_rows, grid_cols] for captions `text_ids` [n <= batch_size, L] (0 = padding; a row of
        padding asks for an unconditional image), each row drawn with the random numbers of its key [n]
        (`row_keys`): the same key, caption and settings give the same picture, whatever else is in the batch."""
        n, cfg = len(text_ids), self.model.config
        if n > self.batch_size:
            raise ValueError(f"{n} captions, but the sampler was built for batches of {self.batch_size}")
        self.prefill(text_ids)
        self.keys[:n] = keys.to(self.keys.device)
        codes = torch.empty(self.batch_size, cfg.block_size, dtype=torch.long, device=self.pos.device)
        self.tokens.fill_(self.model.start_token)
        self.pos.zero_()
        for t in range(cfg.block_size):
            # The compiled step's output is overwritten by its next replay: copied out before that.
            self.tokens.copy_(self.step(self.tokens, self.pos))
            codes[:, t] = self.tokens
            self.pos += 1
        return codes[:n].view(n, cfg.grid_rows, cfg.grid_cols)


def row_keys(seed: int, rows: range, candidates: int = 1) -> torch.Tensor:
    """The random keys [len(rows), candidates] of the candidates of each row: 32-bit hashes of the seed, the
    row's index and the candidate's (the first candidate's key is that of a row drawn alone)."""
    def key(*entropy: int) -> int:
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    return torch.tensor([[key(seed, row, *([j] if j else [])) for j in range(candidates)] for row in rows])


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer hash (lowbias32, from Chris Wellons' hash prospector) in int64 arithmetic.
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def exponential_noise(keys: torch.Tensor, offset: torch.Tensor, width: int) -> torch.Tensor:
    """Exp(1) noise [rows, width], a function of each row's key and the counters offset .. offset + width - 1:
    computed on the device, in a compiled graph too, and the same for a row whatever batch it is in."""
    counters = offset + torch.arange(width, device=keys.device)
    bits = _mix32(_mix32(counters)[None, :] + keys[:, None]) >> 8  # 24 uniform bits, what a float32 holds
    return -torch.log((bits.float() + 0.5) / 2**24)


def draw(logits: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None) -> torch.Tensor:
    """One code per row of logits [B, V], given Exp(1) noise [B, V]: the argmax of p_i / E_i is a draw from p
    (of V exponential clocks with rates p_i, the first to ring), so sampling needs no sync with the host."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return (filter_logits(logits / temperature, top_k, top_p) - noise.log()).argmax(dim=-1)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits [B, V] with codes outside the top k (ties with the k-th kept) and outside the top-p nucleus (the
    fewest most likely codes whose probability reaches top_p; the most likely always survives) set to -inf."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this code already reaches top_p
        outside[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    return logits


# Dense bf16 FLOP/s with fp32 accumulation (PyTorch's bf16 matmuls), most specific names first. From NVIDIA's
# datasheets (H100 / H200 SXM 1979, PCIe 1513, L4 242, L40S 733 TFLOPS "with sparsity", halved; A100 312) and the
# GA102 / Ada whitepapers (RTX 3090 71, RTX 4090 165.2: half their fp16-accumulate rate). The 4070 Ti SUPER,
# absent there, is the 4090 scaled per SM and clock: 165.2 * (66 * 2.61) / (128 * 2.52) = 88.2 (not the ~176 quoted).
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "RTX 4090": 165.2e12, "RTX 4070 Ti SUPER": 88.2e12, "RTX 3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak dense bf16 FLOP/s if it is in the table, else None (MFU is then not reported)."""
    name = torch.cuda.get_device_name(device).lower() if device.type == "cuda" else ""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key.lower() in name), None)


def load_model(ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The GPT of a train.py checkpoint, in eval mode on `device`, and the checkpoint dict. Offline, never runs
    code from the file; raises vqgan.CheckpointError naming the file when it is not a nanoT2I checkpoint."""
    return load_trained(ckpt_path, GPT, device)


def load_trained(ckpt_path: str | os.PathLike, cls: type[CaptionModel], device: str | torch.device = "cpu"
                 ) -> tuple[Any, dict]:
    """A model of class `cls` (GPT or scorer.Scorer) from a train.py checkpoint, and the checkpoint."""
    ckpt = load_checkpoint_file(ckpt_path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{ckpt_path}: not a train.py checkpoint (no 'model' and 'model_config')")
    kind = ckpt.get("kind", "gpt")
    if kind != cls.__name__.lower():
        raise CheckpointError(f"{ckpt_path}: holds a {kind}, not a {cls.__name__.lower()}")
    try:
        model = cls(GPTConfig.from_dict(ckpt["model_config"]))
        # A compiled model's state dict names its parameters `_orig_mod.*`.
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt_path}: cannot rebuild the model: {e}") from None
    return model.to(device).eval(), ckpt
