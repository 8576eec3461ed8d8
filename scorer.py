"""A contrastive text-image scorer: two towers map a VQGAN code grid and a caption into one space, trained as CLIP
is (InfoNCE both ways over the batch). It reads code grids, not pixels: evaluate.py encodes pictures with the VQGAN
and ranks captions for them by it (R-precision). `python train.py --model=scorer` trains it, with GPTConfig's settings.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import CaptionModel, GPTConfig, init_weights, load_trained


class Scorer(CaptionModel):
    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.code_emb = nn.Embedding(config.codebook_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        layer = nn.TransformerEncoderLayer(config.n_embd, config.n_head, 4 * config.n_embd, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True, bias=config.bias)
        self.blocks = nn.TransformerEncoder(layer, config.n_layer, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.image_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.caption_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        init_weights(self, config.n_layer)
        # CLIP's starting temperature of 0.07, learnt from there.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids [B, rows*cols] (or [B, rows, cols]) -> unit vectors [B, n_embd]."""
        codes = codes.flatten(1).long()
        x = self.code_emb(codes) + self.pos_emb(torch.arange(codes.shape[1], device=codes.device))
        return F.normalize(self.image_proj(self.ln_f(self.blocks(x)).mean(1)), dim=-1)

    def embed_captions(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Caption token ids [B, L] -> unit vectors [B, n_embd]: the mean of the projected token states."""
        states, mask = self.text_states(text_ids)
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.caption_proj(pooled), dim=-1)

    def forward(self, codes: torch.Tensor, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarity logits [B, B] of every picture with every caption of the batch, and the InfoNCE loss."""
        logits = self.embed_images(codes).float() @ self.embed_captions(text_ids).float().T
        logits = logits * self.logit_scale.clamp(max=math.log(100)).exp()  # at most 100, as CLIP caps it
        targets = torch.arange(len(logits), device=logits.device)
        return logits, (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    @torch.no_grad()
    def score(self, codes: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """The cosine similarity [B] of each code grid with its caption."""
        return (self.embed_images(codes).float() * self.embed_captions(text_ids).float()).sum(-1)

    def flops_per_sample(self) -> float:
        """Training FLOPs for one picture and caption: 6 per weight per token of the image tower's matmuls,
        attention scores as in the GPT's count, and the caption encoder's."""
        cfg = self.config
        T, C = cfg.block_size, cfg.n_embd
        return float(6 * T * cfg.n_layer * 12 * C * C + 12 * cfg.n_layer * C * T * T + self.text_flops())


def load_scorer(ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Scorer, dict]:
    """The scorer of a `train.py --model=scorer` checkpoint, in eval mode, and the checkpoint."""
    return load_trained(ckpt_path, Scorer, device)
