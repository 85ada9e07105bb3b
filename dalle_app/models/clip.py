"""CLIP of DALLE-pytorch: a text transformer and a patch-based visual transformer mapped into one latent space,
used here to score and rerank generated images. Keys and arguments as in DALLE-pytorch 1.6.6."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import Transformer


class CLIP(nn.Module):
    """Contrastive text/image model; `forward` returns per-pair similarities or the symmetric contrastive loss."""

    def __init__(self, *, dim_text=512, dim_image=512, dim_latent=512, num_text_tokens=10000, text_enc_depth=6,
                 text_seq_len=256, text_heads=8, num_visual_tokens=512, visual_enc_depth=6, visual_heads=8,
                 visual_image_size=256, visual_patch_size=32, channels=3):
        super().__init__()
        if visual_image_size % visual_patch_size != 0:
            raise ValueError(f"visual_image_size {visual_image_size} must be divisible by visual_patch_size "
                             f"{visual_patch_size}.")
        self.config = dict(dim_text=dim_text, dim_image=dim_image, dim_latent=dim_latent,
                           num_text_tokens=num_text_tokens, text_enc_depth=text_enc_depth, text_seq_len=text_seq_len,
                           text_heads=text_heads, num_visual_tokens=num_visual_tokens,
                           visual_enc_depth=visual_enc_depth, visual_heads=visual_heads,
                           visual_image_size=visual_image_size, visual_patch_size=visual_patch_size, channels=channels)
        self.text_seq_len, self.image_size, self.patch_size = text_seq_len, visual_image_size, visual_patch_size
        num_patches = (visual_image_size // visual_patch_size) ** 2

        self.text_emb = nn.Embedding(num_text_tokens, dim_text)
        self.text_pos_emb = nn.Embedding(text_seq_len, dim_text)
        self.text_transformer = Transformer(causal=False, seq_len=text_seq_len, dim=dim_text, depth=text_enc_depth,
                                            heads=text_heads, rotary_emb=False)
        self.to_text_latent = nn.Linear(dim_text, dim_latent, bias=False)

        self.to_visual_embedding = nn.Linear(channels * visual_patch_size ** 2, dim_image)
        self.visual_pos_emb = nn.Embedding(num_patches, dim_image)
        self.visual_transformer = Transformer(causal=False, seq_len=num_patches, dim=dim_image,
                                              depth=visual_enc_depth, heads=visual_heads, rotary_emb=False)
        self.to_visual_latent = nn.Linear(dim_image, dim_latent, bias=False)
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised text latents (b, dim_latent); text_mask (b, T) True marks real tokens."""
        x = self.text_emb(text) + self.text_pos_emb(torch.arange(text.shape[1], device=text.device))
        x = self.text_transformer(x, mask=text_mask)
        if text_mask is not None:
            m = text_mask[..., None].to(x.dtype)
            x = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        else:
            x = x.mean(dim=1)
        return F.normalize(self.to_text_latent(x), dim=-1)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image latents (b, dim_latent) for images (b, c, s, s), s = visual_image_size."""
        p = self.patch_size
        b, c, h, w = image.shape
        patches = image.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        x = self.to_visual_embedding(patches)
        x = x + self.visual_pos_emb(torch.arange(x.shape[1], device=x.device))
        x = self.visual_transformer(x).mean(dim=1)
        return F.normalize(self.to_visual_latent(x), dim=-1)

    def forward(self, text, image, text_mask=None, return_loss=False):
        """Similarity per (text_i, image_i) pair (b,), or the symmetric cross-entropy loss over the batch."""
        text_latents = self.encode_text(text, text_mask)
        image_latents = self.encode_image(image)
        temp = self.temperature.exp()
        if not return_loss:
            return (text_latents * image_latents).sum(dim=-1) * temp
        sim = text_latents @ image_latents.t() * temp
        labels = torch.arange(text.shape[0], device=sim.device)
        return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2
