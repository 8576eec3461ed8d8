"""The text-conditioned GPT over VQGAN codes.

An image is the row-major sequence of its VQGAN codes. The GPT predicts code t from a start token and codes
0..t-1; every block attends causally to the codes so far, then to the caption's encoded tokens (a
`transformers` encoder, projected to the GPT's width, with the padding masked out), then runs an MLP.
Captions are replaced by a learned null context with probability `cond_drop` during training, so one model
gives both the conditional and the unconditional predictions that classifier-free guidance mixes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vqgan import CheckpointError, load_checkpoint_file

PAD_ID = 0  # prepare.py right-pads captions with 0; a caption of nothing but padding is "no caption"


def setting(default: Any, help_text: str) -> Any:
    """A dataclass field with the help text that train.py shows for its flag."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class GPTConfig:
    # image side: set from the data dir's meta.json by train.py
    codebook_size: int = setting(1024, "VQGAN codebook size (from meta.json)")
    grid_rows: int = setting(16, "rows of the code grid (from meta.json)")
    grid_cols: int = setting(16, "columns of the code grid (from meta.json)")
    # the GPT (the defaults are the CPU demo's size; config/ has the real recipes)
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "attention heads; must divide n_embd")
    n_embd: int = setting(256, "width of the GPT")
    dropout: float = setting(0.0, "dropout in the GPT (and a from-scratch text encoder)")
    bias: bool = setting(False, "biases in linear layers and layer norms")
    # the text side
    text_len: int = setting(64, "caption tokens per row (from meta.json)")
    text_encoder: str = setting("", "Hugging Face name or folder of a pretrained encoder; empty: a BertModel "
                                "trained from scratch over the data dir's vocab.txt (from meta.json)")
    text_vocab_size: int = setting(0, "size of the char vocab (from meta.json)")
    text_n_layer: int = setting(2, "layers of the from-scratch text encoder")
    text_n_head: int = setting(4, "heads of the from-scratch text encoder")
    text_n_embd: int = setting(128, "width of the from-scratch text encoder")
    text_finetune_layers: int = setting(0, "pretrained encoder: train its top k layers (0 frozen, -1 all)")
    # The encoder's own transformers config, filled in when the model is built. Keeping it here rebuilds the
    # model from a checkpoint without the network or the Hugging Face cache.
    text_config: dict | None = setting(None, "transformers config of the text encoder")
    cond_drop: float = setting(0.1, "probability of training on the null caption (for guidance)")
    activation_checkpointing: bool = setting(False, "recompute activations in the backward pass to save memory")

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------
# text encoder


def build_text_encoder(config: GPTConfig) -> nn.Module:
    """The caption encoder, and `config.text_config` filled in with its transformers config.

    A checkpoint's config already holds text_config, so the encoder is built from it offline and its weights
    come from the state dict. Otherwise a named encoder is loaded pretrained, and an unnamed one is a small
    BertModel over the char vocab.
    """
    from transformers import AutoConfig, AutoModel, BertConfig

    if config.text_config is not None:
        values = dict(config.text_config)
        encoder = AutoModel.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    elif config.text_encoder:
        encoder = _load_pretrained(config.text_encoder)
    else:
        if config.text_vocab_size < 1:
            raise ValueError("text_vocab_size must be set for a from-scratch text encoder (meta.json has it)")
        bert = BertConfig(
            vocab_size=config.text_vocab_size,
            hidden_size=config.text_n_embd,
            num_hidden_layers=config.text_n_layer,
            num_attention_heads=config.text_n_head,
            intermediate_size=4 * config.text_n_embd,
            max_position_embeddings=config.text_len,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            pad_token_id=PAD_ID,
        )
        encoder = AutoModel.from_config(bert)
    # The pooled sentence vector is never used; an unused parameter would also upset DDP.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    encoder = encoder.float()
    # JSON round trip: plain types only, so that the checkpoint loads with weights_only=True.
    config.text_config = json.loads(encoder.config.to_json_string())
    return encoder


def _load_pretrained(name: str) -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # Its load report lists the pooler we drop as missing, which would only confuse.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(name, dtype=torch.float32)
    except OSError as e:
        where = "folder" if os.path.isdir(name) else "Hugging Face name (is it downloaded?)"
        raise ValueError(f"cannot load the text encoder {name!r} as a {where}: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "encoder.layers", "layers", "transformer.layer"):
        module: Any = encoder
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(
        f"cannot find the layers of {type(encoder).__name__}; use text_finetune_layers 0 (frozen) or -1 (all)"
    )


def set_text_finetuning(encoder: nn.Module, finetune_layers: int) -> None:
    """Freeze a pretrained encoder except its top `finetune_layers` layers (-1: train all of it)."""
    encoder.requires_grad_(finetune_layers < 0)
    if finetune_layers > 0:
        for layer in _encoder_layers(encoder)[-finetune_layers:]:
            layer.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------------
# the GPT


class KVCache:
    """Self-attention keys and values of the codes generated so far, for one block."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            # Allocated on first use so that it takes the dtype autocast gives the keys.
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        causal = True
        if cache is not None:
            if cache.length and T > 1:
                raise ValueError("the KV cache takes one token at a time once it holds some")
            # Every cached position precedes the new token, so one new token needs no mask.
            causal = cache.length == 0 and T > 1
            k, v = cache.append(k, v)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)
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
        """Keys and values of the text; generation computes them once per prompt."""
        B, L, C = context.shape
        k, v = self.kv(context).split(C, 2)
        return tuple(t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for t in (k, v))

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor], text_mask: torch.Tensor
                ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, *text_kv, attn_mask=text_mask, dropout_p=dropout)
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

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor], text_mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.ln_1(x), cache)
        x = x + self.cross_attn(self.ln_2(x), text_kv, text_mask)
        return x + self.mlp(self.ln_3(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.text_encoder = build_text_encoder(config)
        if config.text_encoder:
            set_text_finetuning(self.text_encoder, config.text_finetune_layers)
        self.text_proj = nn.Linear(self.text_encoder.config.hidden_size, config.n_embd, bias=config.bias)
        self.null_context = nn.Parameter(torch.zeros(config.text_len, config.n_embd))
        # The extra last row is the start token that every image begins from.
        self.code_emb = nn.Embedding(config.codebook_size + 1, config.n_embd)
        self.row_emb = nn.Embedding(config.grid_rows, config.n_embd)
        self.col_emb = nn.Embedding(config.grid_cols, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.codebook_size, bias=False)
        self._init_weights()

    @property
    def start_token(self) -> int:
        return self.config.codebook_size

    @property
    def text_trainable(self) -> bool:
        return any(p.requires_grad for p in self.text_encoder.parameters())

    def _init_weights(self) -> None:
        # The text encoder keeps its own (possibly pretrained) weights.
        for name, module in self.named_modules():
            if name.startswith("text_encoder"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.null_context, mean=0.0, std=0.02)
        # Residual projections scaled down so the residual stream's variance stays put as depth grows.
        for name, param in self.named_parameters():
            if name.startswith("blocks.") and name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(3 * self.config.n_layer))

    def train(self, mode: bool = True) -> GPT:
        super().train(mode)
        # A frozen encoder stays in eval mode: its dropout would only add noise to fixed features.
        if not self.text_trainable:
            self.text_encoder.eval()
        return self

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # --- forward ------------------------------------------------------------------------------------------

    def encode_text(self, text_ids: torch.Tensor, drop_caption: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text states [B, L, n_embd] and the mask of tokens to attend to [B, L].

        Rows with no tokens, and rows where `drop_caption` is set, get the learned null context instead.
        """
        text_ids = text_ids.long()
        length = text_ids.shape[1]
        if length > self.config.text_len:
            raise ValueError(f"captions of {length} tokens, but the model takes at most text_len "
                             f"{self.config.text_len}")
        mask = text_ids != PAD_ID
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trainable):
            hidden = self.text_encoder(input_ids=text_ids, attention_mask=mask.long()).last_hidden_state
        context = self.text_proj(hidden)
        use_null = ~mask.any(1)
        if drop_caption is not None:
            use_null = use_null | drop_caption
        # torch.where keeps null_context in the graph even when no row picks it, which DDP requires.
        context = torch.where(use_null[:, None, None], self.null_context[:length], context)
        return context, mask | use_null[:, None]

    def embed_codes(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Input tokens at sequence positions start.. ; each position carries the grid cell it predicts."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        rows, cols = positions // self.config.grid_cols, positions % self.config.grid_cols
        return self.drop(self.code_emb(tokens) + self.row_emb(rows) + self.col_emb(cols))

    def run_blocks(self, x: torch.Tensor, text_kv: list[tuple[torch.Tensor, torch.Tensor]],
                   text_mask: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        attn_mask = text_mask[:, None, None, :]  # broadcast over heads and queries
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, text_kv[i], attn_mask, use_reentrant=False)
            else:
                x = block(x, text_kv[i], attn_mask, None if caches is None else caches[i])
        return self.head(self.ln_f(x))

    def forward(self, codes: torch.Tensor, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, codebook_size] for codes [B, T] (T up to rows*cols) given captions, and the loss."""
        B, n_codes = codes.shape
        if n_codes > self.config.block_size:
            raise ValueError(f"{n_codes} codes per image, but the grid holds {self.config.block_size}")
        drop = None
        if self.training and self.config.cond_drop > 0:
            drop = torch.rand(B, device=codes.device) < self.config.cond_drop
        context, mask = self.encode_text(text_ids, drop)
        text_kv = [block.cross_attn.text_kv(context) for block in self.blocks]
        start = torch.full((B, 1), self.start_token, dtype=torch.long, device=codes.device)
        x = self.embed_codes(torch.cat([start, codes[:, :-1]], dim=1))
        logits = self.run_blocks(x, text_kv, mask)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        return logits, loss

    # --- sampling -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        text_ids: torch.Tensor,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample one image's codes per caption.

        text_ids: [B, L] token ids (any integer dtype, uint16 included), 0 = padding, L <= text_len; a row of
            nothing but padding asks for an unconditional image.
        cfg_scale: classifier-free guidance, logits = uncond + cfg_scale * (cond - uncond); 1 is plain
            conditional sampling and skips the unconditional stream.
        temperature: 0 picks the most likely code; top_k / top_p: keep the k most likely codes / the
            smallest set holding probability top_p (None: no cut).
        generator: makes the draw reproducible; it may live on the CPU or on the model's device.
        Returns LongTensor [B, grid_rows, grid_cols] of codes, ready for `VQGAN.decode`.
        Runs in whatever precision the caller's autocast gives; the model is in eval mode meanwhile.
        """
        device = self.head.weight.device
        B = text_ids.shape[0]
        guided = cfg_scale != 1.0
        text_ids = text_ids.to(device).long()
        if guided:  # the unconditional stream rides in the same batch, after the conditional one
            text_ids = torch.cat([text_ids, torch.zeros_like(text_ids)])
        was_training = self.training
        self.eval()
        try:
            context, mask = self.encode_text(text_ids)
            text_kv = [block.cross_attn.text_kv(context) for block in self.blocks]
            caches = [KVCache(self.config.block_size) for _ in self.blocks]
            codes = torch.empty(B, self.config.block_size, dtype=torch.long, device=device)
            token = torch.full((text_ids.shape[0], 1), self.start_token, dtype=torch.long, device=device)
            for t in range(self.config.block_size):
                logits = self.run_blocks(self.embed_codes(token, start=t), text_kv, mask, caches)[:, -1].float()
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = uncond + cfg_scale * (cond - uncond)
                codes[:, t] = sample_logits(logits, temperature, top_k, top_p, generator)
                token = codes[:, t : t + 1].repeat(2 if guided else 1, 1)
        finally:
            self.train(was_training)
        return codes.view(B, self.config.grid_rows, self.config.grid_cols)

    # --- training helpers ---------------------------------------------------------------------------------

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        """AdamW over the trainable parameters; only the weights of linear layers decay.

        Norm gains, biases, embeddings and the null context are left undecayed: pulling them to zero
        fights what they represent rather than regularising.
        """
        decay, no_decay = [], []
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) for one image and caption.

        6 per weight per token it touches for trained matmuls (2 forward, 4 backward), 2 for frozen ones;
        attention scores count as in the PaLM paper's appendix B (the whole causal square).
        """
        cfg = self.config
        T, L, C = cfg.block_size, cfg.text_len, cfg.n_embd
        per_code = cfg.n_layer * 14 * C * C + C * cfg.codebook_size  # qkv, proj, cross q and proj, mlp; head
        per_text = cfg.n_layer * 2 * C * C + self.text_proj.weight.numel()  # cross-attention keys and values
        gpt = 6 * (T * per_code + L * per_text) + 12 * cfg.n_layer * C * T * (T + L)
        text = 0
        for name, param in self.text_encoder.named_parameters():
            if param.dim() == 2 and "embeddings" not in name:
                text += (6 if param.requires_grad else 2) * L * param.numel()
        return float(gpt + text)

    def estimate_mfu(self, samples_per_iter: int, dt: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_sample() * samples_per_iter / dt / peak_flops


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of logits [B, V]; returns LongTensor [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(logits.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits [B, V] with codes outside the top k and outside the top-p nucleus set to -inf.

    Ties with the k-th logit are kept. The nucleus is the smallest prefix of codes, most likely first, whose
    probability reaches top_p; the most likely code always survives.
    """
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this code already reaches top_p
        outside[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


# Dense bf16 tensor-core FLOP/s with fp32 accumulation (what PyTorch's bf16 matmuls use), by device name;
# the most specific names come first. Sources: NVIDIA's H100 and H200 datasheets (1979 / 1513 TFLOPS
# "with sparsity" for SXM / PCIe, halved for dense), the A100 datasheet (312), the L4 and L40S datasheets
# (242 / 733 sparse), the Ampere GA102 and Ada whitepapers' GeForce tables (RTX 3090 71, RTX 4090 165.2).
# GeForce cards run bf16 with fp32 accumulation at half their fp16-accumulate rate; the 4070 Ti SUPER has
# no whitepaper row, so it is scaled from the 4090 per SM and clock: 165.2 * (66 SM * 2.61 GHz) /
# (128 SM * 2.52 GHz) = 88.2 TFLOPS. Its often-quoted ~176 TFLOPS is the fp16-accumulate rate.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165.2e12),
    ("RTX 4070 Ti SUPER", 88.2e12),
    ("RTX 3090", 71e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's peak dense bf16 FLOP/s if it is in the table, else None (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key.lower() in name), None)


def load_model(ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The GPT of a train.py checkpoint, in eval mode on `device`, and the checkpoint dict itself.

    Needs neither the network nor the Hugging Face cache; never runs code from the file. Raises
    vqgan.CheckpointError naming the file when it is not a readable nanoT2I checkpoint.
    """
    ckpt = load_checkpoint_file(ckpt_path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{ckpt_path}: not a train.py checkpoint (no 'model' and 'model_config')")
    try:
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
        # A compiled model's state dict names its parameters `_orig_mod.*`.
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt_path}: cannot rebuild the model: {e}") from None
    return model.to(device).eval(), ckpt
